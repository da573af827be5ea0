"""The native backend: C++ ops for CPU tensors (and CUDA noise), from ``flatlora_kernels._C``.

Built by ``setup.py`` from ``csrc/``. :func:`native_available` says whether this install has it.
"""

from __future__ import annotations

import torch

from .matmul_call import PerturbedMatmul
from .noise import seed_to_int64

try:
    from . import _C
except ImportError as exc:  # built without it (FLATLORA_NO_NATIVE=1) or the build is missing
    _C = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def native_available() -> bool:
    """True when the compiled native ops (``flatlora_kernels._C``) can be imported."""
    return _C is not None


def native_cuda_available() -> bool:
    """True when the native extension was built with its CUDA noise op."""
    return _C is not None and bool(_C.with_cuda)


def native_unavailable_reason(device: torch.device) -> str | None:
    """Why the native backend cannot run on ``device``, or None when it can."""
    if _C is None:
        return f"the native extension is not built ({_IMPORT_ERROR}); reinstall with scripts/install.sh"
    if device.type != "cpu":
        return f"the native fused ops run on CPU tensors only, not {device.type}"
    return None


def generate_noise_native(seed: int, m: int, n: int, device, *, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        if not native_cuda_available():
            raise RuntimeError("the native extension was built without CUDA; use the triton backend on GPUs")
        return _C.generate_noise_cuda(seed_to_int64(seed), m, n, *offset, device.index if device.index is not None
                                      else torch.cuda.current_device())
    return _C.generate_noise_cpu(seed_to_int64(seed), m, n, *offset).to(device)


def merged_row_norms_native(weight, lora_A, lora_B, scaling, *, out=None) -> torch.Tensor:
    norms = _C.merged_row_norms_cpu(weight, lora_A, lora_B, float(scaling))
    return norms if out is None else out.copy_(norms)


def perturbed_matmul_native(call: PerturbedMatmul, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics of :func:`flatlora_kernels.reference.perturbed_matmul`, in C++ on bounded blocks (dense W)."""
    result = _C.perturbed_matmul_cpu(call.a, call.weight, call.transpose_weight, seed_to_int64(call.seed),
                                     call.row_std, call.bias, call.lora_hidden, call.lora_out_factor,
                                     float(call.scaling), call.dropout_keep, float(call.keep_scale),
                                     _DTYPE_NAMES[call.out_dtype], *call.noise_offset)
    return result if out is None else out.copy_(result)


def block_rows(in_features: int) -> int:
    """Rows of the perturbed weight the native ops hold at once for a layer this wide."""
    return _C.block_rows(in_features)
