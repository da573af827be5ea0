"""One perturbed-matmul call, as every backend takes it.

:class:`PerturbedMatmul` names the operands of ``a @ op(W + diag(c) Z) + s * (h @ F) * keep + bias``
once; the reference (:func:`flatlora_kernels.reference.perturbed_matmul`), the native C++ ops,
the Triton kernel and the registered ``torch.ops.flatlora.perturbed_matmul`` (which takes the
same fields as tensors and scalars, as a custom op must, and builds this inside) all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant4bit import PackedWeight4bit

PATHS = ("auto", "fused", "slab")  # how the Triton backend forms the product: flatlora_kernels.paths


@dataclass(frozen=True)
class PerturbedMatmul:
    """``a @ op(Wp) + scaling * (lora_hidden @ lora_out_factor) [* dropout_keep * keep_scale] + bias``,
    with ``Wp = W + diag(row_std) Z(seed)[r0:, c0:]`` and ``(r0, c0) = noise_offset``.

    The Flat-LoRA layer makes two of these per step; the operands' roles in each:

    =============== ============================================ ===========================================
    field           forward (``transpose_weight=True``)          backward dX (``transpose_weight=False``)
    =============== ============================================ ===========================================
    a               ``x``, ``(M, n)``                            ``dY``, ``(M, m)``
    op(Wp)          ``Wp^T``; result ``(M, m)``                  ``Wp``; result ``(M, n)``
    lora_hidden     ``u = dropout(x) A^T``, ``(M, r)``           ``g = dY B``, ``(M, r)``
    lora_out_factor ``B^T``, ``(r, m)``                          ``A``, ``(r, n)``
    dropout_keep    None                                         the dropout mask of ``x``, bool ``(M, n)``
    bias            ``(m,)`` or None                             None
    =============== ============================================ ===========================================

    ``a`` and ``Wp`` are rounded to ``out_dtype`` and multiplied with float32 accumulation; the
    LoRA term, mask and bias are added in float32; the sum is rounded once to ``out_dtype``.
    ``weight`` is the logical ``(m, n)`` base weight, dense or 4-bit; ``row_std`` is ``c``
    (float32 ``(m,)``) or None for no noise; ``seed`` is in ``[0, 2**64)``. ``path`` says how the Triton
    backend forms the product ("fused" kernels, "slab" path, or "auto": the committed table decides; see
    :mod:`flatlora_kernels.paths`); the other backends have one form and ignore it.
    """

    a: torch.Tensor
    weight: torch.Tensor | PackedWeight4bit
    transpose_weight: bool
    seed: int
    row_std: torch.Tensor | None
    out_dtype: torch.dtype
    bias: torch.Tensor | None = None
    lora_hidden: torch.Tensor | None = None
    lora_out_factor: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_keep: torch.Tensor | None = None
    keep_scale: float = 1.0
    path: str = "auto"
    noise_offset: tuple[int, int] = (0, 0)

    def __post_init__(self):
        if (self.lora_hidden is None) != (self.lora_out_factor is None):
            raise ValueError("lora_hidden and lora_out_factor come together: pass both or neither")
        if self.dropout_keep is not None and self.lora_hidden is None:
            raise ValueError("dropout_keep masks the LoRA term, but lora_hidden is None")
        if self.path not in PATHS:
            raise ValueError(f"path={self.path!r} is not a path; choose one of {', '.join(PATHS)}")

    @property
    def out_shape(self) -> tuple[int, int]:
        """``(M, m)`` forward, ``(M, n)`` for dX."""
        m, n = self.weight.shape
        return self.a.shape[0], m if self.transpose_weight else n

    @property
    def inner_size(self) -> int:
        """K, the length of the dot products: ``n`` forward, ``m`` for dX."""
        m, n = self.weight.shape
        return n if self.transpose_weight else m
