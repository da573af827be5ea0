"""Which implementation runs: ``FLATLORA_BACKEND`` forces one, otherwise the fastest for the device
(Triton on CUDA, native C++ on the CPU when built, else the torch reference).

Every backend provides the same three operations with the reference's semantics:
``noise(seed, m, n, device, offset=(r0, c0))``, ``row_norms(weight, lora_A, lora_B, scaling, *, seed=None,
row_std=None, noise_offset=(0, 0))`` (the norms of the perturbed merged weight when ``row_std`` is given: DoRA's)
and ``perturbed_matmul(call, out=None)`` on a :class:`~flatlora_kernels.matmul_call.PerturbedMatmul` (see
:mod:`flatlora_kernels.reference`); ``offset``, the norms' and the call's ``noise_offset`` place the weight
inside a larger logical one (tensor parallelism). The call's ``path`` (fused kernels or
slabs, :mod:`flatlora_kernels.paths`) matters to the Triton backend only: the others have one form, the slab form.

A 4-bit base (:class:`~flatlora_kernels.quant4bit.PackedWeight4bit`): the Triton kernels dequantize
its tiles in registers; the native C++ ops take dense weights only, so under the native backend it
takes the reference's row-block path with each block's noise from the C++ generator (see
:func:`get_backend`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference
from .native import native_unavailable_reason
from .noise import reference_noise
from .quant4bit import PackedWeight4bit

BACKEND_ENV = "FLATLORA_BACKEND"
BACKENDS = ("triton", "native", "reference")


@dataclass(frozen=True)
class Backend:
    """One implementation of the three operations (signatures in the module docstring)."""

    name: str
    noise: Callable[..., torch.Tensor]
    row_norms: Callable[..., torch.Tensor]
    perturbed_matmul: Callable[..., torch.Tensor]


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda" or _interpreter_requested():
        return None
    return (f"Triton kernels run on CUDA tensors, or on {device.type} tensors under the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing triton)")


@functools.lru_cache(maxsize=None)  # built once: get_backend runs on every layer call
def _triton_backend() -> Backend:
    from .triton_ops.noise import generate_noise_triton
    from .triton_ops.perturbed_matmul import perturbed_matmul_triton
    from .triton_ops.row_norms import merged_row_norms_triton

    return Backend("triton", generate_noise_triton, merged_row_norms_triton, perturbed_matmul_triton)


@functools.lru_cache(maxsize=None)
def _native_backend() -> Backend:
    from .native import generate_noise_native, merged_row_norms_native, perturbed_matmul_native

    def row_norms(weight, lora_A, lora_B, scaling, *, row_std=None, **noise):
        if row_std is None:
            return merged_row_norms_native(weight, lora_A, lora_B, scaling)
        # The C++ norms op takes no noise: the reference's row blocks, each block's noise from C++.
        return reference.merged_row_norms(weight, lora_A, lora_B, scaling, row_std=row_std,
                                          noise=generate_noise_native, **noise)

    return Backend("native", generate_noise_native, row_norms, perturbed_matmul_native)


@functools.lru_cache(maxsize=None)
def _native_4bit_backend() -> Backend:
    """The native backend for a 4-bit base: the reference's row blocks, each block's noise from C++."""
    from .native import generate_noise_native

    return Backend("native", generate_noise_native, reference.merged_row_norms,
                   functools.partial(reference.perturbed_matmul, noise=generate_noise_native))


_REFERENCE = Backend("reference", reference_noise, reference.merged_row_norms, reference.perturbed_matmul)


def backend_name(device: torch.device | str) -> str:
    """The backend that will run for tensors on ``device`` (honours ``FLATLORA_BACKEND``)."""
    return _resolve_backend(torch.device(device).type, os.environ.get(BACKEND_ENV, "").strip().lower())


@functools.lru_cache(maxsize=None)  # backend_name runs on every layer call; probing is not free
def _resolve_backend(device_type: str, forced: str) -> str:
    device = torch.device(device_type)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        reason = _unavailable_reason(forced, device)
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}={forced} cannot run on {device}: {reason}")
        return forced
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        return "triton"
    if device.type == "cpu" and native_unavailable_reason(device) is None:
        return "native"
    return "reference"


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    if name == "triton":
        return triton_unavailable_reason(device)
    if name == "native":
        return native_unavailable_reason(device)
    return None


def get_backend(device: torch.device | str, weight: torch.Tensor | PackedWeight4bit | None = None) -> Backend:
    """The backend for tensors on ``device``, in the form that reads ``weight`` when it is a 4-bit base."""
    name = backend_name(device)
    if name == "triton":
        return _triton_backend()
    if name == "native":
        return _native_4bit_backend() if isinstance(weight, PackedWeight4bit) else _native_backend()
    return _REFERENCE
