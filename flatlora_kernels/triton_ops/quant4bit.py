"""Reading W inside a kernel: a dense tile, or a 4-bit (NF4/FP4) tile dequantized in registers.

Every kernel that reads the base weight (the perturbed matmul in both directions, the merged
norms) loads its tile with :func:`load_weight_tile` and gets its operands from
:func:`weight_operands`, so a packed 4-bit weight is read the same way everywhere. The layout is
bitsandbytes' (see :mod:`flatlora_kernels.quant4bit`): element ``k = row * n + col`` of the
logical ``(m, n)`` weight is the high nibble of byte ``k // 2`` when ``k`` is even, the low one
when odd, and its value is ``codebook[code] * absmax[k // blocksize]`` in float32, rounded once
to the weight's dtype. The packed codes, the scales and the 16-entry codebook are only read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant4bit import PackedWeight4bit
from .common import cast_needs_manual_rounding, round_to

# Tiles are at most 256 x 256: offsets within one stay below 255 * 2**23 + 4096 (a block) + 256 < 2**31.
MAX_4BIT_ROW_LENGTH = 2**23
TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def dequantize_tile(packed_ptr, absmax_ptr, codebook_ptr, row_start, col_start, row_count, row_length,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, QUANT_BLOCKSIZE: tl.constexpr,
                    WHOLE_BLOCK_ROWS: tl.constexpr, DEQUANT_DTYPE: tl.constexpr,
                    DEQUANT_MANUAL_ROUNDING: tl.constexpr):
    """``dequant(W4)`` on the ``(BLOCK_ROWS, BLOCK_COLS)`` tile at ``(row_start, col_start)`` of the
    ``(row_count, row_length)`` weight, in ``DEQUANT_DTYPE`` (0 outside the weight), as bitsandbytes
    computes it: float32 ``codebook[code] * absmax[block]``, rounded once. ``col_start`` is a
    multiple of ``BLOCK_COLS``.

    ``WHOLE_BLOCK_ROWS`` (rows of a whole number of blocks, as in every real model) reads each byte
    once for its two codes and, when a tile row lies in one block, one scale per tile row; otherwise
    blocks may straddle rows and every element is addressed on its own."""
    rows = tl.cast(row_start, tl.int64) + tl.arange(0, BLOCK_ROWS)
    cols = col_start + tl.arange(0, BLOCK_COLS)
    row_ok = rows < row_count
    mask = row_ok[:, None] & (cols < row_length)[None, :]
    if WHOLE_BLOCK_ROWS:
        # A tile row's codes are consecutive bytes (rows are even), high nibble first.
        pairs = col_start // 2 + tl.arange(0, BLOCK_COLS // 2)
        byte = tl.load(packed_ptr + rows[:, None] * (row_length // 2) + pairs[None, :],
                       mask=row_ok[:, None] & (pairs < row_length // 2)[None, :], other=0)
        code = tl.interleave(byte >> 4, byte & 0xF)
        blocks_per_row = row_length // QUANT_BLOCKSIZE
        if QUANT_BLOCKSIZE % BLOCK_COLS == 0:
            scale = tl.load(absmax_ptr + rows * blocks_per_row + col_start // QUANT_BLOCKSIZE, mask=row_ok,
                            other=0.0)[:, None]
        else:
            scale = tl.load(absmax_ptr + (rows * blocks_per_row)[:, None] + (cols // QUANT_BLOCKSIZE)[None, :],
                            mask=mask, other=0.0)
    else:
        # Flat indices relative to the block boundary at or before the tile's corner stay in int32
        # (the launcher bounds row_length); only this scalar origin needs 64 bits. Block sizes are
        # even, so a local index has the parity of the flat one.
        tl.static_assert(BLOCK_ROWS <= 256 and BLOCK_COLS <= 256, "MAX_4BIT_ROW_LENGTH assumes tiles of at most 256")
        corner = tl.cast(row_start, tl.int64) * row_length + col_start
        origin = corner - corner % QUANT_BLOCKSIZE
        local = ((corner - origin).to(tl.int32) + tl.arange(0, BLOCK_ROWS)[:, None] * row_length
                 + tl.arange(0, BLOCK_COLS)[None, :])
        byte = tl.load(packed_ptr + origin // 2 + (local >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> (((local & 1) ^ 1) * 4)) & 0xF  # even flat index: the high nibble
        scale = tl.load(absmax_ptr + origin // QUANT_BLOCKSIZE + local // QUANT_BLOCKSIZE, mask=mask, other=0.0)
    level = tl.load(codebook_ptr + code)  # 16 floats: stays in L1
    return round_to(level * scale, DEQUANT_DTYPE, DEQUANT_MANUAL_ROUNDING)


@triton.jit
def load_weight_tile(w_ptr, row_start, col_start, row_count, row_length, stride_wi, stride_wj, absmax_ptr, codebook_ptr,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, WEIGHT_4BIT: tl.constexpr,
                     QUANT_BLOCKSIZE: tl.constexpr, WHOLE_BLOCK_ROWS: tl.constexpr, DEQUANT_DTYPE: tl.constexpr,
                     DEQUANT_MANUAL_ROUNDING: tl.constexpr, WHOLE_ROWS: tl.constexpr = False,
                     WHOLE_COLS: tl.constexpr = False):
    """The ``(BLOCK_ROWS, BLOCK_COLS)`` tile of the logical ``(row_count, row_length)`` weight at
    ``(row_start, col_start)``, 0 outside it: a strided load of a dense W, or with ``WEIGHT_4BIT``
    the packed codes at ``w_ptr`` dequantized. ``col_start`` is a multiple of ``BLOCK_COLS``.

    A dense W's caller may promise that the tile's rows (``WHOLE_ROWS``) or columns (``WHOLE_COLS``) lie
    inside the weight: that side is then not masked, and the other side's elements past the weight are
    not 0 (the caller must not let them reach anything it stores): with ``WHOLE_COLS`` rows past the
    weight repeat its last row (no mask at all: a clamp keeps the row-major loads vectorised), with
    ``WHOLE_ROWS`` columns past it are masked and undefined."""
    tl.static_assert(not (WEIGHT_4BIT and (WHOLE_ROWS or WHOLE_COLS)), "4-bit tiles are always masked")
    if WEIGHT_4BIT:
        w = dequantize_tile(w_ptr, absmax_ptr, codebook_ptr, row_start, col_start, row_count, row_length,
                            BLOCK_ROWS, BLOCK_COLS, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                            DEQUANT_MANUAL_ROUNDING)
    else:
        rows = tl.cast(row_start, tl.int64) + tl.arange(0, BLOCK_ROWS)
        cols = tl.cast(col_start, tl.int64) + tl.arange(0, BLOCK_COLS)
        if WHOLE_COLS:
            rows = tl.minimum(rows, row_count - 1)
        pointers = w_ptr + rows[:, None] * stride_wi + cols[None, :] * stride_wj
        if WHOLE_COLS:
            w = tl.load(pointers)
        elif WHOLE_ROWS:
            w = tl.load(pointers, mask=(cols < row_length)[None, :])
        else:
            w = tl.load(pointers, mask=(rows < row_count)[:, None] & (cols < row_length)[None, :], other=0.0)
    return w


def tile_constexprs(dtype: torch.dtype | None, blocksize: int = 1, whole_block_rows: bool = False,
                    manual_rounding: bool = False) -> dict:
    """The constexprs of :func:`load_weight_tile`: a 4-bit W dequantized to ``dtype`` with quantization
    blocks of ``blocksize`` (rows of whole blocks, or blocks that straddle rows), or a dense W when
    ``dtype`` is None."""
    if dtype is None:
        return dict(WEIGHT_4BIT=False, QUANT_BLOCKSIZE=1, WHOLE_BLOCK_ROWS=False, DEQUANT_DTYPE=tl.float32,
                    DEQUANT_MANUAL_ROUNDING=False)
    return dict(WEIGHT_4BIT=True, QUANT_BLOCKSIZE=blocksize, WHOLE_BLOCK_ROWS=whole_block_rows,
                DEQUANT_DTYPE=TRITON_DTYPES[dtype], DEQUANT_MANUAL_ROUNDING=manual_rounding)


def weight_operands(weight: torch.Tensor | PackedWeight4bit) -> tuple[torch.Tensor, int, int, dict]:
    """``(w pointer tensor, stride_wi, stride_wj, keyword operands)`` of a kernel that reads W
    through :func:`load_weight_tile`. For a dense W the 4-bit operands are placeholders (never
    read: ``WEIGHT_4BIT`` is off); a 4-bit W has no strides (its codes are flat)."""
    if isinstance(weight, PackedWeight4bit):
        if weight.shape[1] > MAX_4BIT_ROW_LENGTH:
            raise ValueError(f"the Triton kernels read 4-bit weights with rows of at most {MAX_4BIT_ROW_LENGTH} "
                             f"elements (int32 offsets within a tile); this one has {weight.shape[1]}")
        if weight.blocksize % 2:
            raise ValueError(f"4-bit block sizes are even in bitsandbytes; got {weight.blocksize}")
        return weight.packed, 0, 0, dict(
            absmax_ptr=weight.absmax, codebook_ptr=weight.codebook,
            **tile_constexprs(weight.dtype, weight.blocksize, weight.shape[1] % weight.blocksize == 0,
                              cast_needs_manual_rounding(weight.dtype)))
    return weight, weight.stride(0), weight.stride(1), dict(absmax_ptr=weight, codebook_ptr=weight,
                                                            **tile_constexprs(None))
