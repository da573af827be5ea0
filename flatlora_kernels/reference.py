"""Pure-torch reference: the semantics every backend implements, written to be read.

It materialises the noise (a bounded block of rows at a time for the norms, the whole
matrix for the matmul), so it is slow and memory-hungry, but obviously right. The Triton
kernels and the native ops are tested against it.
"""

from __future__ import annotations

import torch

from .noise import reference_noise


def perturbed_weight(weight: torch.Tensor, seed: int, row_std: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """``(W + diag(c) Z(seed))`` summed in float32 and rounded once to ``dtype``."""
    if row_std is None:
        return weight.to(dtype)
    m, n = weight.shape
    noise = reference_noise(seed, m, n, device=weight.device)
    return (weight.float() + row_std.float()[:, None] * noise).to(dtype)


def perturbed_matmul(
    a: torch.Tensor, weight: torch.Tensor, *, transpose_weight: bool, seed: int,
    row_std: torch.Tensor | None, bias: torch.Tensor | None, lora_left: torch.Tensor | None,
    lora_right: torch.Tensor | None, scaling: float, keep: torch.Tensor | None, keep_scale: float,
    out_dtype: torch.dtype, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``a @ op(Wp) + scaling * (lora_left @ lora_right) [* keep * keep_scale] + bias``.

    ``op`` is the transpose when ``transpose_weight`` (forward: ``a`` is ``(M, n)``, result
    ``(M, m)``), the identity otherwise (backward dX: ``a`` is ``(M, m)``, result ``(M, n)``).
    ``a`` and ``Wp`` are rounded to ``out_dtype`` and multiplied with float32 accumulation; the
    LoRA term, mask and bias are added in float32; the sum is rounded once to ``out_dtype``.
    """
    w = perturbed_weight(weight, seed, row_std, out_dtype).float()
    result = a.to(out_dtype).float() @ (w.t() if transpose_weight else w)
    if lora_left is not None:
        lora = scaling * (lora_left.float() @ lora_right.float())
        if keep is not None:
            lora = lora * (keep.float() * keep_scale)
        result = result + lora
    if bias is not None:
        result = result + bias.float()
    result = result.to(out_dtype)
    if out is not None:
        return out.copy_(result)
    return result


def merged_row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     *, out: torch.Tensor | None = None, rows_per_chunk: int = 1024) -> torch.Tensor:
    """``||W[i] + s * B[i] @ A||_2`` in float32, a block of rows at a time."""
    m = weight.shape[0]
    norms = torch.empty(m, dtype=torch.float32, device=weight.device) if out is None else out
    a = lora_A.float()
    for start in range(0, m, rows_per_chunk):
        rows = slice(start, min(m, start + rows_per_chunk))
        merged = weight[rows].float() + scaling * (lora_B[rows].float() @ a)
        norms[rows] = torch.linalg.vector_norm(merged, dim=1)
    return norms
