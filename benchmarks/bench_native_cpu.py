"""Native CPU backend: time against plain-torch LoRA, and peak extra memory against its bound.

    python benchmarks/bench_native_cpu.py            # tokens 1024, 1024 -> 1024, r = 8, fp32
    python benchmarks/bench_native_cpu.py --quick    # smaller, for a smoke run

Time: medians (``common.median_ms``: alternating wall-clock repetitions) of forward, backward and
forward+backward of ``flat_lora_linear`` on the native backend against the same LoRA linear without
noise in plain torch autograd (``F.linear(x, W) + s * (x A^T) B^T``), both in the same call; the ratio
is native / LoRA. Memory: the peak resident-set growth of one forward+backward, measured by
resetting the kernel's high-water mark (``/proc/self/clear_refs``) and reading ``VmHWM``, each in a
fresh process (so freed heap pages of an earlier call cannot hide an allocation), minus what plain
LoRA needs for the same call; compared with the documented bound (a few ``block_rows(n) x n``
float32 buffers) and with the reference backend, which materialises the whole noise matrix. Writes
one ``flatlora-bench/1`` record to benchmarks/results/native-cpu.json, one row per case:
{"tokens", "in", "out", "r", "lora_<pass>_ms", "native_<pass>_ms", "<pass>_ratio",
"block_buffer_mib", "noise_matrix_mib", "peak_extra_mib_native", "peak_extra_mib_reference"}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

import flatlora_kernels as fk
from common import PASSES, RESULTS, device_label, median_ms, pass_callables, reset_peak_rss, status_kib, write_record
from flatlora_kernels.backends import BACKEND_ENV
from flatlora_kernels.native import block_rows

CASES = [(1024, 1024, 1024, 8), (256, 4096, 11008, 8)]  # (tokens, in, out, r)
QUICK_CASES = [(64, 1024, 8192, 8)]  # a 32 MiB noise matrix against a 4 MiB block


def peak_growth_mib(fn) -> float:
    """Peak RSS growth while ``fn`` runs (Linux: reset VmHWM, run, read it)."""
    before = reset_peak_rss()
    fn()
    return (status_kib("VmHWM") - before) / 1024


def make(tokens: int, n: int, m: int, r: int):
    torch.manual_seed(0)
    x = torch.randn(tokens, n, requires_grad=True)
    weight = torch.randn(m, n) / n**0.5
    lora_A = (torch.randn(r, n) / n**0.5).requires_grad_()
    lora_B = (torch.randn(m, r) * 0.01).requires_grad_()
    row_std = 0.05 * fk.merged_row_norms(weight, lora_A, lora_B, 2.0) / n**0.5
    dy = torch.randn(tokens, m)
    return x, weight, lora_A, lora_B, row_std, dy


def plain_lora(x, weight, lora_A, lora_B):
    return torch.nn.functional.linear(x, weight) + 2.0 * (x @ lora_A.t()) @ lora_B.t()


def flat(x, weight, lora_A, lora_B, row_std):
    return fk.flat_lora_linear(x, weight, None, lora_A, lora_B, 2.0, seed=1, row_std=row_std)


def _step(method, x, weight, lora_A, lora_B, row_std, dy):
    """One forward+backward of ``method`` ("lora", or a Flat-LoRA backend name)."""
    if method == "lora":
        y = plain_lora(x, weight, lora_A, lora_B)
    else:
        os.environ[BACKEND_ENV] = method
        y = flat(x, weight, lora_A, lora_B, row_std)
    return torch.autograd.grad(y, (x, lora_A, lora_B), dy)


def probe_memory(method: str, case: list[int]) -> float:
    """Peak RSS growth (MiB) of one forward+backward, measured in a fresh process."""
    # glibc keeps freed chunks below its (self-raising) mmap threshold in the heap, so RSS would count
    # allocator caching; a fixed 128 KiB threshold makes every large buffer an mmap, returned on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, __file__, "--probe", method, *map(str, case)], capture_output=True,
                          text=True, check=True, env=env)
    return float(proc.stdout.strip().splitlines()[-1])


def measure(tokens, n, m, r, reps, memory_backends):
    x, weight, lora_A, lora_B, row_std, dy = make(tokens, n, m, r)
    inputs = (x, lora_A, lora_B)
    lora = pass_callables(lambda: plain_lora(x, weight, lora_A, lora_B), inputs, dy)
    native = pass_callables(lambda: flat(x, weight, lora_A, lora_B, row_std), inputs, dy)
    row = {"tokens": tokens, "in": n, "out": m, "r": r}
    cpu = torch.device("cpu")
    for name in PASSES:
        row[f"lora_{name}_ms"], row[f"native_{name}_ms"] = median_ms([lora[name], native[name]], cpu, reps)
        row[f"{name}_ratio"] = row[f"native_{name}_ms"] / row[f"lora_{name}_ms"]
    case = [tokens, n, m, r]
    base = probe_memory("lora", case)
    row["block_buffer_mib"] = block_rows(n) * n * 4 / 2**20
    row["noise_matrix_mib"] = m * n * 4 / 2**20
    for backend in memory_backends:
        row[f"peak_extra_mib_{backend}"] = probe_memory(backend, case) - base
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "native-cpu.json")
    parser.add_argument("--probe", nargs=5, metavar=("METHOD", "TOKENS", "IN", "OUT", "R"),
                        help=argparse.SUPPRESS)  # internal: one memory measurement in this process
    args = parser.parse_args()
    if args.probe:
        method, *case = args.probe
        tensors = make(*map(int, case))
        print(peak_growth_mib(lambda: _step(method, *tensors)))
        return
    if not fk.native_available():
        raise SystemExit("the native extension is not built: run scripts/install.sh")
    os.environ[BACKEND_ENV] = "native"
    cases, reps = (QUICK_CASES, 3) if args.quick else (CASES, args.reps)
    print(f"{device_label(torch.device('cpu'))} | torch {torch.__version__} | fp32 | median of {reps}")
    rows = []
    for tokens, n, m, r in cases:
        row = measure(tokens, n, m, r, reps, memory_backends=("native", "reference"))
        rows.append(row)
        print(f"tokens {tokens}, {n} -> {m}, r {r}")
        for name in PASSES:
            print(f"  {name:>7}: LoRA {row[f'lora_{name}_ms']:8.2f} ms | Flat-LoRA native "
                  f"{row[f'native_{name}_ms']:8.2f} ms | x{row[f'{name}_ratio']:.2f}")
        print(f"  peak extra memory over LoRA: native {row['peak_extra_mib_native']:.1f} MiB "
              f"(block buffer {row['block_buffer_mib']:.1f} MiB), reference {row['peak_extra_mib_reference']:.1f} MiB "
              f"(noise matrix {row['noise_matrix_mib']:.1f} MiB)")
    config = {"dtype": "float32", "cases": [list(case) for case in cases], "reps": reps, "timer": "median_ms",
              "baseline": "plain torch LoRA (F.linear(x, W) + s * (x A^T) B^T)"}
    print(f"wrote {write_record(args.out, 'native_cpu', 'cpu', config, rows)}")


if __name__ == "__main__":
    main()
