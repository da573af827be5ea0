"""Facts every Triton launcher here needs: interpreter mode and small helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when this package is
# imported; read the flag the same way so launchers agree with the kernels they launch.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_needs_fp32_operands(dtype: torch.dtype) -> bool:
    """Under the interpreter ``tl.dot`` on bf16 multiplies raw bit patterns (triton#11584):
    upcast such operands (exactly) to fp32 there, so bf16 paths still run on the CPU."""
    return INTERPRETER and dtype == torch.bfloat16


def cast_needs_manual_rounding(dtype: torch.dtype) -> bool:
    """The interpreter truncates float32 -> bf16 casts instead of rounding to nearest even."""
    return INTERPRETER and dtype == torch.bfloat16


@triton.jit
def round_to(x, dtype: tl.constexpr, MANUAL_BF16_ROUNDING: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even; with the flag, bf16 rounding is done on the
    float32 bits first (finite inputs), so the interpreter's truncating cast becomes exact."""
    if MANUAL_BF16_ROUNDING:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def fp32_dot_precision() -> str:
    """fp32 GEMMs follow torch's own TF32 switch, so results match ``F.linear`` in kind."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
