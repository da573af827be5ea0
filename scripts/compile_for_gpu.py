"""Compile every kernel variant ahead of time for an NVIDIA architecture, no GPU needed.

Catches what the interpreter cannot: layout or lowering errors that only the GPU compiler
sees. Prints one line per variant (PTX size, shared memory); with --asm-dir writes PTX/SASS-
ready cubins for reading. Must run without TRITON_INTERPRET.

    python scripts/compile_for_gpu.py --arch 90
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_for_gpu.py compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatlora_kernels.triton_ops.noise import _write_noise_kernel  # noqa: E402
from flatlora_kernels.triton_ops.perturbed_matmul import _block_sizes, _perturbed_matmul_kernel  # noqa: E402
from flatlora_kernels.triton_ops.row_norms import _merged_row_norms_kernel  # noqa: E402

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _signature(kernel, types: dict, constexprs: dict) -> dict:
    return {name: ("constexpr" if name in constexprs else types[name]) for name in kernel.arg_names}


def variants():
    yield "noise", _write_noise_kernel, {
        "out_ptr": "*fp32", "M": "i32", "N": "i32", "stride_om": "i32", "stride_on": "i32",
        "seed_lo": "i64", "seed_hi": "i64"}, {"BLOCK_M": 32, "BLOCK_N": 128}, {}
    for dtype in PTR:
        yield f"row_norms w={dtype}", _merged_row_norms_kernel, {
            "w_ptr": PTR[dtype], "a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32",
            "M": "i32", "N": "i32", "R": "i32", "scaling": "fp32",
            **{s: "i64" for s in ("stride_wm", "stride_wn", "stride_ar", "stride_an", "stride_bm", "stride_br")}},\
            {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 16}, {}
        for forward in (True, False):
            cfg = dict(_block_sizes(dtype))
            options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
            types = {
                "a_ptr": PTR[dtype], "w_ptr": PTR[dtype], "row_std_ptr": "*fp32", "bias_ptr": PTR[dtype],
                "left_ptr": "*fp32", "right_ptr": "*fp32", "keep_ptr": "*i1", "out_ptr": PTR[dtype],
                "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                "scaling": "fp32", "keep_scale": "fp32", "seed_lo": "i64", "seed_hi": "i64",
                **{n: "i64" for n in _perturbed_matmul_kernel.arg_names if n.startswith("stride_")}}
            constexprs = dict(W_ROWS_ARE_N=forward, HAS_NOISE=True, HAS_BIAS=forward, HAS_LORA=True,
                              HAS_KEEP=not forward, UPCAST_DOT=False, MANUAL_BF16_ROUNDING=False,
                              FP32_PRECISION="tf32", BLOCK_R=16, **cfg)
            yield f"perturbed_matmul {'forward' if forward else 'dX'} {dtype}", _perturbed_matmul_kernel, \
                types, constexprs, options


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 90 for H100/H200")
    parser.add_argument("--asm-dir", type=Path, help="write PTX and TTGIR of each variant here")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, kernel, types, constexprs, options in variants():
        src = ASTSource(fn=kernel, signature=_signature(kernel, types, constexprs), constexprs=constexprs)
        try:
            compiled = triton.compile(src, target=target, options=options)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        ptx = compiled.asm["ptx"]
        print(f"ok   {name}: ptx {len(ptx) // 1024} KiB, shared {compiled.metadata.shared} B")
        if args.asm_dir:
            args.asm_dir.mkdir(parents=True, exist_ok=True)
            stem = name.replace(" ", "_").replace("=", "").replace("torch.", "")
            (args.asm_dir / f"{stem}.ptx").write_text(ptx)
            (args.asm_dir / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
    print(f"{failures} failed" if failures else f"all variants compile for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
