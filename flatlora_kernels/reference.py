"""Pure-torch reference: the semantics every backend implements, written to be read.

It materialises the noise (a bounded block of rows at a time for the norms, the whole
matrix for the matmul), so it is slow and memory-hungry, but obviously right. The Triton
kernels and the native ops are tested against it.

A 4-bit base (:class:`~flatlora_kernels.quant4bit.PackedWeight4bit`) is the exception: it is
dequantized and perturbed a bounded block of rows at a time, never whole, since holding the
dequantized weight is what a 4-bit base exists to avoid. This is the 4-bit path wherever the
Triton backend does not run (the native ops take dense weights only); the Triton kernels
dequantize 4-bit tiles in registers instead.
"""

from __future__ import annotations

from typing import Callable

import torch

from .matmul_call import PerturbedMatmul
from .noise import reference_noise
from .quant4bit import PackedWeight4bit

# A generator of blocks of Z: ``noise(seed, rows, cols, device, offset=(r0, c0))`` (the backends' ``noise``).
NoiseFn = Callable[..., torch.Tensor]

BLOCK_ELEMENTS = 2**20  # a 4-bit block of rows holds about this many float32 values


def block_rows(in_features: int) -> int:
    """Rows of a 4-bit weight dequantized at once: ``max(16, 2**20 / in_features)``."""
    return max(16, BLOCK_ELEMENTS // max(in_features, 1))


def _weight_rows(weight: torch.Tensor | PackedWeight4bit, start: int, stop: int) -> torch.Tensor:
    if isinstance(weight, PackedWeight4bit):
        return weight.dequantize_rows(start, stop)
    return weight[start:stop]


def perturbed_weight(weight: torch.Tensor, seed: int, row_std: torch.Tensor | None,
                     dtype: torch.dtype, noise_offset: tuple[int, int] = (0, 0),
                     noise: NoiseFn = reference_noise) -> torch.Tensor:
    """``(W + diag(c) Z(seed)[r0:, c0:])`` summed in float32 and rounded once to ``dtype``.

    ``noise_offset = (r0, c0)`` places ``W`` in a larger logical matrix (a tensor-parallel shard).
    """
    if row_std is None:
        return weight.to(dtype)
    m, n = weight.shape
    z = noise(seed, m, n, weight.device, offset=noise_offset)
    return (weight.float() + row_std.float()[:, None] * z).to(dtype)


def perturbed_matmul(call: PerturbedMatmul, *, out: torch.Tensor | None = None,
                     noise: NoiseFn = reference_noise) -> torch.Tensor:
    """The value :class:`~flatlora_kernels.matmul_call.PerturbedMatmul` defines, written into ``out`` when
    given; ``noise`` makes the blocks of Z (the native backend passes its C++ generator for 4-bit bases)."""
    a = call.a.to(call.out_dtype).float()
    if isinstance(call.weight, PackedWeight4bit):
        result = _packed_matmul(a, call.weight, call.transpose_weight, call.seed, call.row_std, call.out_dtype,
                                call.noise_offset, noise)
    else:
        w = perturbed_weight(call.weight, call.seed, call.row_std, call.out_dtype, call.noise_offset, noise).float()
        result = a @ (w.t() if call.transpose_weight else w)
    if call.lora_hidden is not None:
        lora = call.scaling * (call.lora_hidden.float() @ call.lora_out_factor.float())
        if call.dropout_keep is not None:
            lora = lora * (call.dropout_keep.float() * call.keep_scale)
        result = result + lora
    if call.bias is not None:
        result = result + call.bias.float()
    result = result.to(call.out_dtype)
    if out is not None:
        return out.copy_(result)
    return result


def merged_row_norms(weight: torch.Tensor | PackedWeight4bit, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     *, seed: int | None = None, row_std: torch.Tensor | None = None,
                     noise_offset: tuple[int, int] = (0, 0), noise: NoiseFn = reference_noise,
                     out: torch.Tensor | None = None, rows_per_chunk: int = 1024) -> torch.Tensor:
    """``||W[i] + c_i Z[i] + s * B[i] @ A||_2`` in float32, a block of rows at a time (``c Z`` only with
    ``row_std``: Z's block at ``noise_offset``, made by ``noise``)."""
    m, n = weight.shape
    norms = torch.empty(m, dtype=torch.float32, device=weight.device) if out is None else out
    a = lora_A.float()
    row_offset, col_offset = noise_offset
    for start in range(0, m, rows_per_chunk):
        stop = min(m, start + rows_per_chunk)
        merged = _weight_rows(weight, start, stop).float() + scaling * (lora_B[start:stop].float() @ a)
        if row_std is not None:
            z = noise(seed, stop - start, n, weight.device, offset=(row_offset + start, col_offset))
            merged += row_std[start:stop, None].float() * z
        norms[start:stop] = torch.linalg.vector_norm(merged, dim=1)
    return norms


def _packed_matmul(a: torch.Tensor, weight: PackedWeight4bit, transpose_weight: bool, seed: int,
                   row_std: torch.Tensor | None, dtype: torch.dtype, noise_offset: tuple[int, int],
                   noise: NoiseFn) -> torch.Tensor:
    """``a @ op(dequant(W4) + diag(c) Z)`` in float32, the perturbed weight built a block of rows at a time
    (each row block rounded to ``dtype`` as a whole perturbed weight would be)."""
    m, n = weight.shape
    result = a.new_zeros(a.shape[0], m if transpose_weight else n)
    step = block_rows(n)
    row_offset, col_offset = noise_offset
    for start in range(0, m, step):
        stop = min(m, start + step)
        w = weight.dequantize_rows(start, stop).float()
        if row_std is not None:
            z = noise(seed, stop - start, n, a.device, offset=(row_offset + start, col_offset))
            w = w + row_std[start:stop, None].float() * z
        w = w.to(dtype).float()
        if transpose_weight:
            result[:, start:stop] = a @ w.t()
        else:
            result += a[:, start:stop] @ w
    return result
