"""Static cost of the noise in the compiled sm_90 kernels, read off the SASS (no GPU needed).

Compiles every kernel variant (``flatlora_kernels.triton_ops.aot``: the launch configurations a
GPU uses, every entry of the matmul configuration table) for sm_90, disassembles the cubin with
the ``nvdisasm`` that ships with Triton's NVIDIA backend, finds the main loop (the K-loop: the
backward branch whose body holds the tensor-core MMAs, else the largest loop) and classifies its
instructions. Per kernel it reports

* instructions per thread and loop iteration by class (tensor-core MMA, integer multiply, other
  integer, FP32, FP64, SFU/MUFU, conversions, moves, shuffles, shared memory, local memory
  (spills), global memory, synchronisation, uniform datapath, control);
* noise elements produced per thread and iteration (noise tile / threads), ALU instructions per
  noise element, and tokens per noise tile (how many tokens one regenerated tile serves);
* the predicted ratio of ALU time to MMA time per iteration, from the throughput table below.

"Hot" counts leave out the cold paths inside the loop: a forward branch that skips over an inner
loop (libdevice's Payne-Hanek range reduction for huge sin/cos arguments, never taken here since
|theta| < pi). "Static" counts are everything between the loop head and its back edge.

Throughput model (per SM per clock, thread-level operations), sources:
  * NVIDIA CUDA C++ Programming Guide, "Arithmetic Instructions", throughput table for compute
    capability 9.0: FP32 add/mul/fma 128; 32-bit integer add, shift, logic, compare, multiply
    and multiply-add 64; FP64 64; SFU functions (rsqrt, log2, exp2, sin, cos) 16; type
    conversions 16; warp shuffle 32.
  * Instruction issue: 4 schedulers per SM, one warp instruction each per clock = 128
    thread-instructions per clock (NVIDIA H100 Tensor Core GPU Architecture whitepaper, SM
    description).
  * Tensor cores: H100 SXM5 dense BF16/FP16 989.4 TFLOP/s and TF32 494.7 TFLOP/s at 132 SMs and
    1.83 GHz boost (whitepaper, Table 2), i.e. 4096 and 2048 flops per SM per clock.
The ALU time of one iteration is max(issue time, busiest pipe) ("ideal overlap": every pipe
busy at once) and, pessimistically, the sum over pipes. Both are divided by the MMA time of the
iteration (2·BLOCK_M·BLOCK_N·BLOCK_K flops). A ratio above 1 means the loop is ALU-bound however
well the MMAs are overlapped; the noise can only hide under the MMA if it is well below 1.
Static overlap: instructions the compiler placed between an ``HGMMA`` and the ``WARPGROUP.DEPBAR``
that waits for it issue while the tensor cores run; the predicted iteration time is
serial issue time + max(MMA time, overlapped issue time), reported over the MMA time.

    python benchmarks/kernel_budget.py [--out benchmarks/results/kernel-budget.json] [--arch 90]

Must run without TRITON_INTERPRET (like scripts/compile_for_gpu.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_budget.py compiles real kernels: unset TRITON_INTERPRET")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, write_record  # noqa: E402
from flatlora_kernels.triton_ops.aot import compile_variant, variants  # noqa: E402

MMA_FLOPS_PER_SM_CLOCK = {"bf16/fp16": 4096, "tf32": 2048}
ISSUE_PER_SM_CLOCK = 128
# Thread-operations per SM per clock for each ALU class (CUDA C++ Programming Guide, cc 9.0).
PIPE_THROUGHPUT = {"int_mul": 64, "int_other": 64, "fp32": 128, "fp64": 64, "sfu": 16, "conversion": 16,
                   "move": 128, "shuffle": 32}
ALU_CLASSES = tuple(PIPE_THROUGHPUT)
CLASSES = ("mma", *ALU_CLASSES, "shared", "local", "global", "sync", "uniform", "control", "other")

_OPCODE_CLASS = {
    **dict.fromkeys(("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA"), "mma"),
    **dict.fromkeys(("IMUL",), "int_mul"),
    **dict.fromkeys(("IADD3", "IADD", "VIADD", "VIADDMNMX", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA",
                     "ISETP", "IMNMX", "IABS", "SEL", "PRMT", "BFE", "BFI", "FLO", "POPC", "BREV", "ISCADD",
                     "PLOP3", "P2R", "R2P", "BMSK", "ICMP", "VABSDIFF", "VABSDIFF4", "IDP", "IDP4A"),
                    "int_other"),
    **dict.fromkeys(("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FSWZADD", "HADD2",
                     "HMUL2", "HFMA2", "HSETP2", "HMNMX2", "FMUL2", "FADD2", "FFMA2"), "fp32"),
    **dict.fromkeys(("DADD", "DMUL", "DFMA", "DSETP", "DMNMX"), "fp64"),
    **dict.fromkeys(("MUFU",), "sfu"),
    **dict.fromkeys(("F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I", "F2IP", "I2IP"), "conversion"),
    **dict.fromkeys(("MOV", "MOVM", "CS2R", "S2R"), "move"),
    **dict.fromkeys(("SHFL",), "shuffle"),
    **dict.fromkeys(("LDS", "STS", "LDSM", "STSM", "ATOMS"), "shared"),
    **dict.fromkeys(("LDL", "STL"), "local"),
    **dict.fromkeys(("LDG", "STG", "LDGSTS", "UTMALDG", "UTMASTG", "UBLKCP", "ATOMG", "RED", "LD", "ST",
                     "LDGDEPBAR", "UTMAPF", "UTMACCTL", "LDC"), "global"),
    **dict.fromkeys(("BAR", "WARPGROUP", "DEPBAR", "SYNCS", "WARPSYNC", "MEMBAR", "FENCE", "ARRIVES", "ERRBAR",
                     "CCTL", "ELECT", "VOTE", "VOTEU", "MATCH", "REDUX", "NANOSLEEP"), "sync"),
    **dict.fromkeys(("BRA", "BSSY", "BSYNC", "EXIT", "NOP", "YIELD", "CALL", "RET", "BPT", "JMP", "BRX",
                     "JMX", "BMOV", "KILL", "RTT", "PREEXIT", "ACQBULK", "ENDCOLLECTIVE"), "control"),
}
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?P\w+\s+)?BRA\s+(?:\w+\s+)?`?\((\.L_x_\d+)\)")


def cuda_tool(name: str) -> str:
    """A CUDA binary tool (nvdisasm, cuobjdump) shipped with Triton's NVIDIA backend, or on PATH."""
    import triton.backends.nvidia as nvidia_backend
    shipped = Path(nvidia_backend.__file__).parent / "bin" / name
    if shipped.exists():
        return str(shipped)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: neither in triton/backends/nvidia/bin nor on PATH")
    return found


def _run_on_cubin(tool: str, args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuda_tool(tool), *args, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> list[str]:
    return _run_on_cubin("nvdisasm", ["-c"], cubin).splitlines()


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and the local-memory stack frame (bytes; spills live there)."""
    text = _run_on_cubin("cuobjdump", ["-res-usage"], cubin)
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def classify(opcode: str, operands: str) -> str:
    base, _, modifiers = opcode.partition(".")
    if base == "IMAD":  # also the move/shift/add idioms of the FMA pipe; only real products count
        factors = [op.strip() for op in operands.split(",")][1:3]  # IMAD dst, a, b, c = a * b + c
        if modifiers.startswith(("MOV", "SHL", "IADD")) or "RZ" in factors:
            return "int_other"
        return "int_mul"
    if base.startswith("U") and base not in _OPCODE_CLASS:
        return "uniform"
    return _OPCODE_CLASS.get(base, "other")


def _loops(lines: list[str]) -> list[tuple[int, int]]:
    """(head line, back-edge line) of every loop: a branch to a label above it."""
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = []
    for n, line in enumerate(lines):
        m = _BRANCH.match(line)
        if m and labels.get(m.group(2), n) < n:
            loops.append((labels[m.group(2)], n))
    return loops


def _cold_lines(lines: list[str], start: int, end: int, inner_loops: list[tuple[int, int]]) -> set[int]:
    """Lines in [start, end] skipped by a conditional forward branch that jumps over an inner loop."""
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := _LABEL.match(line))}
    cold: set[int] = set()
    for n in range(start, end + 1):
        m = _BRANCH.match(lines[n])
        if not m or not m.group(1):
            continue
        target = labels.get(m.group(2), -1)
        if n < target <= end and any(n < head and back < target for head, back in inner_loops):
            cold.update(range(n + 1, target))
    return cold


def loop_body(lines: list[str], has_main_loop: bool = True) -> dict:
    """Instruction counts by class of the main loop: the loop holding the MMAs, else the largest
    one; with ``has_main_loop=False`` (a kernel without a loop of its own) the whole kernel."""
    loops = _loops(lines)
    with_mma = [(h, b) for h, b in loops if any(classify(*_parse(lines[i])) == "mma"
                                                 for i in range(h, b + 1) if _parse(lines[i]))]
    candidates = (with_mma or loops) if has_main_loop else []
    if candidates:
        start, end = max(candidates, key=lambda hb: hb[1] - hb[0])
        inner = [(h, b) for h, b in loops if start < h and b < end]
    else:
        start, end, inner = 0, len(lines) - 1, loops
    cold = _cold_lines(lines, start, end, inner)
    static, hot, under_mma = collections.Counter(), collections.Counter(), collections.Counter()
    in_flight = False  # between a wgmma and the wait for it: ALU work issued here overlaps the MMAs
    for n in range(start, end + 1):
        parsed = _parse(lines[n])
        if parsed is None:
            continue
        cls = classify(*parsed)
        static[cls] += 1
        if n in cold:
            continue
        hot[cls] += 1
        if parsed[0].startswith("HGMMA"):
            in_flight = True
        elif parsed[0].startswith("WARPGROUP.DEPBAR"):
            in_flight = False
        elif in_flight:
            under_mma[cls] += 1
    sfu_ops = collections.Counter(_parse(lines[n])[0] for n in range(start, end + 1)
                                  if n not in cold and _parse(lines[n]) and _parse(lines[n])[0].startswith("MUFU"))
    return {"has_loop": bool(candidates), "inner_loops": len(inner), "cold_instructions": len(cold & {
        n for n in range(start, end + 1) if _parse(lines[n])}),
        "static": {c: static[c] for c in CLASSES}, "hot": {c: hot[c] for c in CLASSES},
        "under_mma": {c: under_mma[c] for c in CLASSES}, "mufu": dict(sfu_ops)}


def _parse(line: str):
    m = _INSTRUCTION.match(line)
    return (m.group(1), m.group(2)) if m else None


def budget(variant, compiled) -> dict:
    cubin = compiled.asm["cubin"]
    body = loop_body(disassemble(cubin), has_main_loop=variant.role not in ("noise", "slab"))  # straight-line kernels
    resources = resource_usage(cubin)
    counts = body["hot"]
    threads = 32 * variant.num_warps
    alu = sum(counts[c] for c in ALU_CLASSES)
    entry = {"kernel": variant.name, "role": variant.role, "config": variant.config,
             "block": {k: v for k, v in variant.constexprs.items() if k.startswith(("BLOCK_", "GROUP_"))},
             "num_warps": variant.num_warps, "num_stages": variant.options.get("num_stages"),
             "registers": resources.get("reg"), "stack_bytes": resources.get("stack"),
             "shared_bytes": compiled.metadata.shared, "loop_found": body["has_loop"],
             "loop_static_instructions": sum(body["static"].values()),
             "loop_cold_instructions": body["cold_instructions"],
             "loop_instructions": sum(counts.values()), "classes": counts, "classes_static": body["static"],
             "mufu": body["mufu"], "alu_instructions": alu,
             "spills_in_loop": counts["local"]}
    if variant.noise_tile is not None:
        noise_per_thread = variant.noise_tile[0] * variant.noise_tile[1] / threads
        entry.update(noise_tile=list(variant.noise_tile), noise_elements_per_thread=noise_per_thread,
                     alu_per_noise_element=round(alu / noise_per_thread, 2), tokens_per_noise_tile=variant.token_tile)
    if variant.role in ("forward", "dX"):
        blocks = entry["block"]
        kind = "tf32" if str(variant.dtype) == "torch.float32" else "bf16/fp16"
        mma_cycles = 2 * blocks["BLOCK_M"] * blocks["BLOCK_N"] * blocks["BLOCK_K"] / MMA_FLOPS_PER_SM_CLOCK[kind]
        pipe_cycles = {c: counts[c] * threads / PIPE_THROUGHPUT[c] for c in ALU_CLASSES}
        issue_cycles = sum(counts[c] for c in CLASSES if c != "uniform") * threads / ISSUE_PER_SM_CLOCK
        # Static overlap: ALU work placed between a wgmma and its wait can run beside the tensor
        # cores; the rest is serial with them. Issue-bound cycles of each part.
        overlapped = sum(body["under_mma"][c] for c in CLASSES if c != "uniform") * threads / ISSUE_PER_SM_CLOCK
        serial = issue_cycles - overlapped
        entry.update(alu_instructions_under_mma=sum(body["under_mma"][c] for c in ALU_CLASSES),
                     predicted_iteration_over_mma_time=round((serial + max(mma_cycles, overlapped)) / mma_cycles, 2))
        entry.update(mma_kind=kind, mma_cycles_per_iteration=mma_cycles,
                     alu_cycles_per_iteration={"issue": issue_cycles, **{c: v for c, v in pipe_cycles.items() if v}},
                     predicted_alu_to_mma_time=round(max(issue_cycles, *pipe_cycles.values()) / mma_cycles, 2),
                     predicted_alu_to_mma_time_pessimistic=round(sum(pipe_cycles.values()) / mma_cycles, 2))
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel-budget.json")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", help="only variants whose name contains this text")
    args = parser.parse_args()
    results = []
    for variant in variants():
        if args.only and args.only not in variant.name:
            continue
        compiled = compile_variant(variant, args.arch)
        entry = budget(variant, compiled)
        results.append(entry)
        line = (f"{variant.name:44s} regs {entry['registers']:3d}, stack {entry['stack_bytes']:4d} B, "
                f"loop {entry['loop_instructions']:5d} instr, LDL/STL {entry['spills_in_loop']:3d}")
        if "alu_per_noise_element" in entry:
            line += (f", ALU/noise element {entry['alu_per_noise_element']:6.2f}, "
                     f"tokens/noise tile {entry['tokens_per_noise_tile']}")
        if "predicted_alu_to_mma_time" in entry:
            line += (f", ALU/MMA time {entry['predicted_alu_to_mma_time']}, ALU under MMA "
                     f"{entry['alu_instructions_under_mma']}, iteration/MMA {entry['predicted_iteration_over_mma_time']}")
        print(line)
    config = {"arch": f"sm_{args.arch}", "source": "SASS (nvdisasm of the cubin)", "nvdisasm": cuda_tool("nvdisasm"),
              "classes": list(CLASSES), "alu_classes": list(ALU_CLASSES),
              "pipe_throughput_per_sm_clock": PIPE_THROUGHPUT, "issue_per_sm_clock": ISSUE_PER_SM_CLOCK,
              "mma_flops_per_sm_clock": MMA_FLOPS_PER_SM_CLOCK,
              "model": "ALU cycles = max(issue, busiest pipe) (pessimistic: sum of pipes) over MMA cycles, "
                       "per program and loop iteration; hot path (cold Payne-Hanek branches excluded)"}
    path = write_record(args.out, "kernel_budget", "cpu", config, results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
