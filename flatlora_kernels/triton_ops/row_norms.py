"""Merged filter norms ``||W[i, :] + s * B[i, :] @ A||_2`` without forming ``B @ A``.

Each program owns a block of rows, keeps that block of ``B`` in registers and streams
column tiles of ``W`` and ``A``: the low-rank update is rebuilt tile by tile with one small
``tl.dot`` (inner size ``r``), so no m×n temporary ever exists. A 4-bit (NF4/FP4) ``W`` is
dequantized tile by tile in registers from its packed codes, as the perturbed matmul reads it.
With ``row_std`` the noise ``c_i Z_ij`` is regenerated on each tile and added too: the norms of
the perturbed merged weight, which DoRA divides by.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant4bit import PackedWeight4bit
from .. import noise as contract
from .common import cdiv
from .launch_settings import row_norms_blocks
from .noise import gaussian_tile
from .quant4bit import load_weight_tile, weight_operands


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _merged_row_norms_kernel(
    w_ptr, a_ptr, b_ptr, row_std_ptr, out_ptr,
    M, N, R,
    stride_wm, stride_wn, stride_ar, stride_an, stride_bm, stride_br,
    scaling, seed_lo, seed_hi, noise_row_offset, noise_col_offset, absmax_ptr, codebook_ptr,
    HAS_NOISE: tl.constexpr, NOISE_COLS_ALIGNED: tl.constexpr,
    WEIGHT_4BIT: tl.constexpr, QUANT_BLOCKSIZE: tl.constexpr, WHOLE_BLOCK_ROWS: tl.constexpr,
    DEQUANT_DTYPE: tl.constexpr, DEQUANT_MANUAL_ROUNDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row_start + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    b = tl.load(b_ptr + rows[:, None] * stride_bm + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & (ranks[None, :] < R), other=0.0).to(tl.float32)
    if HAS_NOISE:
        std = tl.load(row_std_ptr + rows, mask=row_ok, other=0.0)
        noise_rows = tl.cast(noise_row_offset, tl.uint32) + rows.to(tl.uint32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        w = load_weight_tile(w_ptr, row_start, col_start, M, N, stride_wm, stride_wn, absmax_ptr, codebook_ptr,
                             BLOCK_M, BLOCK_N, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                             DEQUANT_MANUAL_ROUNDING).to(tl.float32)
        a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_an,
                    mask=(ranks[:, None] < R) & col_ok[None, :], other=0.0).to(tl.float32)
        merged = w + scaling * tl.dot(b, a, input_precision="ieee")
        if HAS_NOISE:
            # columns past N are zeroed by the masked loads of W and A; their noise must be too
            z = gaussian_tile(seed_lo, seed_hi, noise_rows, noise_col_offset + col_start, BLOCK_N, False,
                              NOISE_COLS_ALIGNED)
            merged += tl.where(col_ok[None, :], std[:, None] * z, 0.0)
        sum_sq += tl.sum(merged * merged, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(sum_sq), mask=row_ok)


def rank_block(r: int) -> int:
    """``tl.dot`` wants every dimension >= 16 and a power of two."""
    return max(16, triton.next_power_of_2(r))


def merged_row_norms_triton(weight: torch.Tensor | PackedWeight4bit, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            scaling: float, *, seed: int | None = None, row_std: torch.Tensor | None = None,
                            noise_offset: tuple[int, int] = (0, 0), out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 ``(m,)`` norms of the rows of ``W + scaling * lora_B @ lora_A``; ``W`` dense or 4-bit.

    With ``row_std``, of ``W + diag(row_std) Z(seed)[r0:, c0:] + scaling * lora_B @ lora_A``, ``(r0, c0) =
    noise_offset``, with the precise Z (the float32 matmul's)."""
    m, n = weight.shape
    r = lora_A.shape[0]
    if out is None:
        out = torch.empty(m, dtype=torch.float32, device=weight.device)
    if m == 0:
        return out
    block_m, block_n = row_norms_blocks(isinstance(weight, PackedWeight4bit))
    w, stride_wm, stride_wn, weight_kwargs = weight_operands(weight)
    seed_lo, seed_hi = contract.split_seed(seed) if row_std is not None else (0, 0)
    row_offset, col_offset = noise_offset
    _merged_row_norms_kernel[(cdiv(m, block_m),)](
        w, lora_A, lora_B, out if row_std is None else row_std.contiguous(), out, m, n, r,
        stride_wm, stride_wn, lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), float(scaling), seed_lo, seed_hi, row_offset, col_offset,
        **weight_kwargs, HAS_NOISE=row_std is not None,
        NOISE_COLS_ALIGNED=col_offset % contract.NORMALS_PER_CALL == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=rank_block(r),
    )
    return out
