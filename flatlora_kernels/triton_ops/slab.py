"""The slab path: the perturbed weight a bounded slab at a time, multiplied by the vendor GEMM.

The fused kernel (:mod:`~flatlora_kernels.triton_ops.perturbed_matmul`) regenerates a W tile's noise
once per token tile, so its noise work grows with the token count as the GEMM does. Here the
Triton kernel :func:`_perturbed_slab_kernel` writes ``W' = W + diag(c) Z`` for one slab of W, in the
compute dtype, into a workspace of at most :func:`slab_bytes`; ``torch.mm`` (cuBLAS on a GPU)
multiplies it into the output's slice. Each element's noise is made once per pass whatever the token
count, W is only read, and the extra memory is bounded by the workspace.

* forward, ``y = x W'^T``: slabs of whole W rows, ``y[:, r0:r1] = x W'[r0:r1]^T``;
* dX, ``dx = dy W'``: slabs of whole W columns, ``dx[:, c0:c1] = dy W'[:, c0:c1]``.

In both directions a slab spans the whole inner dimension, so every output element comes from one
GEMM with float32 accumulation over all of K, rounded once (as in the reference), and every output
column block is written once. (Row slabs for dX would need a running sum over slabs: rounded at each
step, or a float32 buffer as large as dx, and the output read and written once per slab.)

The bias and the LoRA term are added as PEFT adds them: the bias with the GEMM (``addmm``) when there is
no LoRA term; else the GEMM's result, rounded to the compute dtype, plus ``s (h F) [* keep / (1 - p)]``
and the bias in float32, rounded again, a block at a time (float32 blocks of at most
:func:`slab_bytes`). In float32 compute that is the reference's rounding exactly.

The workspace comes from torch's caching allocator at each call: after the first call on a device it
hands back the same block without a device allocation, and between calls that block serves other
tensors; nothing is held across calls.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import noise as contract
from ..matmul_call import PerturbedMatmul
from ..quant4bit import PackedWeight4bit
from .common import cast_needs_manual_rounding, cdiv, round_to
from .launch_settings import SLAB_BLOCK, launch_options
from .noise import gaussian_tile
from .perturbed_matmul import fast_noise
from .quant4bit import load_weight_tile, weight_operands

SLAB_BYTES_ENV = "FLATLORA_SLAB_BYTES"
DEFAULT_SLAB_BYTES = 16 * 2**20  # resident in a Hopper L2 (50 MB) while cuBLAS reads it


def slab_bytes() -> int:
    """The workspace bound: ``FLATLORA_SLAB_BYTES`` (bytes, a positive integer), 16 MiB by default."""
    value = os.environ.get(SLAB_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_SLAB_BYTES
    try:
        parsed = int(value)
    except ValueError:
        parsed = 0
    if parsed <= 0:
        raise ValueError(f"{SLAB_BYTES_ENV}={value!r} is not a positive number of bytes")
    return parsed


def slab_extent(m: int, n: int, dtype: torch.dtype, transpose_weight: bool, limit: int | None = None) -> int | None:
    """Rows (forward, ``transpose_weight``) or columns (dX) of the ``(m, n)`` W per slab, in ``dtype``, so
    that a slab holds at most ``limit`` bytes (:func:`slab_bytes` by default); None when not even the
    smallest slab fits (one row of W forward, ``BLOCK_COLS`` columns for dX)."""
    limit = slab_bytes() if limit is None else limit
    elements = limit // dtype.itemsize
    if transpose_weight:
        rows = min(m, elements // max(n, 1))
        return rows if rows >= 1 else None
    cols = elements // max(m, 1)
    if cols >= n:
        return n
    cols -= cols % SLAB_BLOCK["BLOCK_COLS"]
    return cols if cols > 0 else None


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _perturbed_slab_kernel(
    w_ptr, row_std_ptr, out_ptr,
    M, N, row_start, col_start, slab_rows, slab_cols,
    stride_wi, stride_wj, stride_om,
    seed_lo, seed_hi, noise_row_offset, noise_col_offset, absmax_ptr, codebook_ptr,
    HAS_NOISE: tl.constexpr, MANUAL_BF16_ROUNDING: tl.constexpr, FAST_NOISE: tl.constexpr,
    NOISE_COLS_ALIGNED: tl.constexpr, WEIGHT_4BIT: tl.constexpr, QUANT_BLOCKSIZE: tl.constexpr,
    WHOLE_BLOCK_ROWS: tl.constexpr, DEQUANT_DTYPE: tl.constexpr, DEQUANT_MANUAL_ROUNDING: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """``out[i, j] = W'[row_start + i, col_start + j]`` for the ``slab_rows x slab_cols`` slab of the
    ``(M, N)`` W, ``W' = W + diag(c) Z`` summed in float32 and rounded once to ``out``'s dtype (the
    fused kernel's W tile, written out). ``col_start`` is a multiple of ``BLOCK_COLS``."""
    compute_dtype = out_ptr.dtype.element_ty
    tile_rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS
    tile_cols = tl.program_id(1).to(tl.int64) * BLOCK_COLS
    rows = row_start + tile_rows
    cols = col_start + tile_cols
    w = load_weight_tile(w_ptr, rows, cols, M, N, stride_wi, stride_wj, absmax_ptr, codebook_ptr,
                         BLOCK_ROWS, BLOCK_COLS, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                         DEQUANT_MANUAL_ROUNDING)
    local_rows = tile_rows + tl.arange(0, BLOCK_ROWS)
    local_cols = tile_cols + tl.arange(0, BLOCK_COLS)
    row_ok = local_rows < slab_rows
    if HAS_NOISE:
        if NOISE_COLS_ALIGNED:
            noise_col_offset = tl.multiple_of(noise_col_offset, 8)  # contract.NORMALS_PER_CALL
        std = tl.load(row_std_ptr + row_start + local_rows, mask=row_ok, other=0.0)
        noise_rows = (tl.cast(noise_row_offset + rows, tl.uint32) + tl.arange(0, BLOCK_ROWS).to(tl.uint32))
        z = gaussian_tile(seed_lo, seed_hi, noise_rows, noise_col_offset + cols, BLOCK_COLS, FAST_NOISE,
                          NOISE_COLS_ALIGNED)
        w = w.to(tl.float32) + std[:, None] * z
    tl.store(out_ptr + local_rows[:, None] * stride_om + local_cols[None, :],
             round_to(w, compute_dtype, MANUAL_BF16_ROUNDING),
             mask=row_ok[:, None] & (local_cols < slab_cols)[None, :])


def write_perturbed_slab(weight: torch.Tensor | PackedWeight4bit, seed: int, row_std: torch.Tensor | None,
                         rows: tuple[int, int], cols: tuple[int, int], out: torch.Tensor,
                         noise_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Write ``W'[r0:r1, c0:c1]`` (``W' = W + diag(c) Z(seed)`` at ``noise_offset``, rounded to ``out``'s
    dtype) into the row-major ``out`` of that shape. ``c0`` is a multiple of ``SLAB_BLOCK['BLOCK_COLS']``."""
    (r0, r1), (c0, c1) = rows, cols
    if c0 % SLAB_BLOCK["BLOCK_COLS"]:
        raise ValueError(f"a slab starts at a column that is a multiple of {SLAB_BLOCK['BLOCK_COLS']}, not {c0}")
    if tuple(out.shape) != (r1 - r0, c1 - c0) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major ({r1 - r0}, {c1 - c0}) tensor, got {tuple(out.shape)} "
                         f"with strides {out.stride()}")
    if out.numel() == 0:
        return out
    m, n = weight.shape
    seed_lo, seed_hi = contract.split_seed(seed)
    w, stride_wi, stride_wj, weight_kwargs = weight_operands(weight)
    row_std = row_std.contiguous() if row_std is not None else None
    blocks, options = launch_options(SLAB_BLOCK)
    grid = (cdiv(r1 - r0, blocks["BLOCK_ROWS"]), cdiv(c1 - c0, blocks["BLOCK_COLS"]))
    _perturbed_slab_kernel[grid](
        w, row_std if row_std is not None else out, out, m, n, r0, c0, r1 - r0, c1 - c0,
        stride_wi, stride_wj, out.stride(0), seed_lo, seed_hi, *noise_offset, **weight_kwargs,
        HAS_NOISE=row_std is not None, MANUAL_BF16_ROUNDING=cast_needs_manual_rounding(out.dtype),
        FAST_NOISE=fast_noise(out.dtype), NOISE_COLS_ALIGNED=noise_offset[1] % contract.NORMALS_PER_CALL == 0,
        **blocks, **options)
    return out


def slab_perturbed_matmul(call: PerturbedMatmul, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``call`` by slabs, into ``out`` when given (semantics: :func:`flatlora_kernels.reference.perturbed_matmul`,
    with the bias and LoRA term added as the module docstring says)."""
    m, n = call.weight.shape
    forward, dtype = call.transpose_weight, call.out_dtype
    tokens, out_columns = call.out_shape
    if out is None:
        out = torch.empty(tokens, out_columns, dtype=dtype, device=call.a.device)
    if tokens == 0 or out_columns == 0:
        return out
    extent = slab_extent(m, n, dtype, forward)
    if extent is None:
        smallest = "one row" if forward else f"{SLAB_BLOCK['BLOCK_COLS']} columns"
        raise ValueError(f"{SLAB_BYTES_ENV}={slab_bytes()} cannot hold one slab of a {m} x {n} weight in {dtype} "
                         f"({smallest}); raise it or take the fused path (path='fused')")
    a = call.a.to(dtype)
    workspace = torch.empty(extent * (n if forward else m), dtype=dtype, device=a.device)
    has_lora = call.lora_hidden is not None
    bias = None if call.bias is None else call.bias.to(torch.float32 if has_lora else dtype)
    for start in range(0, out_columns, extent):
        stop = min(out_columns, start + extent)
        if forward:
            slab = write_perturbed_slab(call.weight, call.seed, call.row_std, (start, stop), (0, n),
                                        workspace[:(stop - start) * n].view(stop - start, n), call.noise_offset)
            operand = slab.t()
        else:
            operand = write_perturbed_slab(call.weight, call.seed, call.row_std, (0, m), (start, stop),
                                           workspace[:m * (stop - start)].view(m, stop - start), call.noise_offset)
        segment = out[:, start:stop]
        if not has_lora and bias is not None:
            torch.addmm(bias[start:stop], a, operand, out=segment)
        else:
            torch.mm(a, operand, out=segment)
        if has_lora:
            _add_lora_term(segment, call.lora_hidden, call.lora_out_factor[:, start:stop], call.scaling,
                           None if call.dropout_keep is None else call.dropout_keep[:, start:stop], call.keep_scale,
                           None if bias is None else bias[start:stop])
    return out


def _add_lora_term(segment: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float,
                   keep: torch.Tensor | None, keep_scale: float, bias: torch.Tensor | None) -> None:
    """``segment = round(segment + s (left @ right) [* keep * keep_scale] [+ bias])`` in float32, in token
    blocks whose float32 temporaries stay within :func:`slab_bytes`."""
    width = segment.shape[1]
    step = max(1, slab_bytes() // (4 * width))
    right = right.float()
    for start in range(0, segment.shape[0], step):
        rows = slice(start, start + step)
        lora = (left[rows].float() @ right).mul_(scaling)
        if keep is not None:
            lora.mul_(keep[rows]).mul_(keep_scale)
        if bias is not None:
            lora.add_(bias)
        segment[rows] = lora.add_(segment[rows])
        del lora  # before the next block's is made: one block at a time
