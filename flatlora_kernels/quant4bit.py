"""4-bit (QLoRA) base weights: the bitsandbytes NF4/FP4 layout, read in place.

Flat-LoRA perturbs ``dequant(W4) + diag(c) Z``; the 4-bit weight cannot hold noise, so the
perturbed weight is built on the fly and never stored: tile by tile in registers by the Triton
kernels (:mod:`flatlora_kernels.triton_ops.quant4bit`), a block of rows at a time here
otherwise. The layout read is that of bitsandbytes' ``Params4bit``:

* the logical ``(out, in)`` weight, flattened row-major, two 4-bit codes per byte, the first
  element in the high nibble;
* one float32 scale ``absmax`` per block of ``blocksize`` consecutive flat elements (blocks may
  straddle rows);
* with double quantization (``compress_statistics``) the scales are themselves 8-bit codes:
  ``absmax = code8[q] * absmax8[block // blocksize8] + offset``, in float32;
* element ``k`` is ``codebook[code_k] * absmax[k // blocksize]`` in float32, rounded once to the
  weight's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks

# The 16 NF4 levels (quantiles of N(0, 1), normalised to [-1, 1]; Dettmers et al., QLoRA, 2023) and
# the FP4 (e2m1) levels as bitsandbytes scales them, both exactly as float32.
NF4_CODEBOOK = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0)
_FP4_MAGNITUDES = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)
FP4_CODEBOOK = _FP4_MAGNITUDES + tuple(-v for v in _FP4_MAGNITUDES)
CODEBOOKS = {"nf4": NF4_CODEBOOK, "fp4": FP4_CODEBOOK}


def is_4bit_weight(weight: object) -> bool:
    """True for a bitsandbytes ``Params4bit`` that has been quantized (it carries a ``quant_state``)."""
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


@dataclass(frozen=True)
class PackedWeight4bit:
    """A quantized ``(out, in)`` weight: the packed codes and float32 block scales, read-only."""

    packed: torch.Tensor       # uint8, (ceil(m*n / 2),)
    absmax: torch.Tensor       # float32, one scale per block (double quantization already undone)
    codebook: torch.Tensor     # float32, (16,)
    blocksize: int
    shape: tuple[int, int]     # logical (out_features, in_features)
    dtype: torch.dtype         # what dequantized values are rounded to

    def __post_init__(self):
        # The Triton kernels read these buffers raw: a short or mistyped one would be read past its end.
        checks.positive_int("blocksize", self.blocksize)
        m, n = (checks.nonnegative_int("shape", size) for size in self.shape)
        for name, tensor, dtype, numel in (("packed", self.packed, torch.uint8, -(-m * n // 2)),
                                           ("absmax", self.absmax, torch.float32, -(-m * n // self.blocksize)),
                                           ("codebook", self.codebook, torch.float32, 16)):
            if (tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() < numel or not tensor.is_contiguous()
                    or tensor.device != self.packed.device):
                raise ValueError(f"{name} must be a contiguous 1-D {dtype} tensor of at least {numel} elements on "
                                 f"{self.packed.device}, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"4-bit weights dequantize to float32, bfloat16 or float16, not {self.dtype}")

    @classmethod
    def from_bnb(cls, weight: torch.Tensor) -> "PackedWeight4bit":
        """Read a bitsandbytes ``Params4bit`` (NF4 or FP4, with or without double quantization)."""
        if not is_4bit_weight(weight):
            raise TypeError(f"expected a quantized bitsandbytes Params4bit, got {type(weight).__name__}")
        state = weight.quant_state
        if state.quant_type not in CODEBOOKS:
            raise NotImplementedError(f"4-bit quant_type {state.quant_type!r} is not supported (nf4 and fp4 are)")
        if len(state.shape) != 2:
            raise ValueError(f"a 4-bit linear weight must be 2-D, got shape {tuple(state.shape)}")
        absmax = state.absmax
        if state.nested:
            inner = state.state2
            codes = absmax.reshape(-1).to(torch.int64)
            block = torch.arange(codes.numel(), device=codes.device) // inner.blocksize
            absmax = inner.code.float()[codes] * inner.absmax.float()[block] + state.offset.float()
        packed = weight.data.reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        codebook = torch.tensor(CODEBOOKS[state.quant_type], dtype=torch.float32, device=packed.device)
        return cls(packed, absmax.float().reshape(-1), codebook, int(state.blocksize), tuple(state.shape),
                   state.dtype)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the dequantized weight, ``(stop - start, in)`` in ``self.dtype``."""
        m, n = self.shape
        if not 0 <= start <= stop <= m:
            raise ValueError(f"rows [{start}, {stop}) are outside a weight of {m} rows")
        if n % self.blocksize == 0:
            # Rows of whole blocks (every real model): the rows' bytes and scales are contiguous runs,
            # so no per-element index is needed; same float32 products as below.
            byte = self.packed[start * n // 2:stop * n // 2]
            code = torch.stack((byte >> 4, byte & 0xF), dim=-1).reshape(-1, self.blocksize).long()
            scale = self.absmax[start * n // self.blocksize:stop * n // self.blocksize, None]
            values = self.codebook[code] * scale
        else:
            flat = torch.arange(start * n, stop * n, dtype=torch.int64, device=self.device)
            byte = self.packed[flat >> 1].to(torch.int64)
            code = torch.where((flat & 1) == 0, byte >> 4, byte & 0xF)
            values = self.codebook[code] * self.absmax[flat // self.blocksize]
        return values.to(self.dtype).reshape(stop - start, n)

    def dequantize(self) -> torch.Tensor:
        """The whole dequantized ``(out, in)`` weight (for tests and references; the training paths
        dequantize tile by tile, or a bounded block of rows at a time)."""
        return self.dequantize_rows(0, self.shape[0])
