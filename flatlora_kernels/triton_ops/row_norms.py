"""Merged filter norms ``||W[i, :] + s * B[i, :] @ A||_2`` without forming ``B @ A``.

Each program owns a block of rows, keeps that block of ``B`` in registers and streams
column tiles of ``W`` and ``A``: the low-rank update is rebuilt tile by tile with one small
``tl.dot`` (inner size ``r``), so no m×n temporary ever exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRETER, cdiv


@triton.jit
def _merged_row_norms_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    M, N, R,
    stride_wm, stride_wn, stride_ar, stride_an, stride_bm, stride_br,
    scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    b = tl.load(b_ptr + rows[:, None] * stride_bm + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0).to(tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        w = tl.load(w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_an,
                    mask=(ranks[:, None] < R) & col_ok[None, :], other=0.0).to(tl.float32)
        merged = w + scaling * tl.dot(b, a, input_precision="ieee")
        sum_sq += tl.sum(merged * merged, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(sum_sq), mask=row_ok)


def rank_block(r: int) -> int:
    """``tl.dot`` wants every dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(r))


def merged_row_norms_triton(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            scaling: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    m, n = weight.shape
    r = lora_A.shape[0]
    if out is None:
        out = torch.empty(m, dtype=torch.float32, device=weight.device)
    if m == 0:
        return out
    block_m = 16 if INTERPRETER else 64
    block_n = 32 if INTERPRETER else 128
    _merged_row_norms_kernel[(cdiv(m, block_m),)](
        weight, lora_A, lora_B, out, m, n, r,
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), float(scaling),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rank_block(r),
    )
    return out
