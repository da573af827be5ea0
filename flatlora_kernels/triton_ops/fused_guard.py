"""A guard on the fused kernels until they have a GPU record: each variant checks itself once.

The first CUDA launch of each fused kernel variant in a process (direction, compute dtype, launch
configuration, dense or 4-bit W, and which of bias, LoRA term, dropout mask and noise it carries)
first runs that variant and the slab path (:mod:`~flatlora_kernels.triton_ops.slab`) on a small
problem of odd sizes that spans several tiles of the configuration, with the call's own operand
dtypes, and compares them. Both round ``W + diag(c) Z`` to the compute dtype from the same noise, so
they differ only by float32 summation order and the slab path's second rounding of the LoRA term:
:data:`TOLERANCE` allows a few units in the last place of the compute dtype, relative to the
largest output. A kernel that miscompiles or misreads a tile lands far outside it.

``FLATLORA_FUSED_CHECK`` decides what a mismatch does: ``error`` (default) raises an error naming the
variant, the shapes and the difference; ``warn`` warns once and sends that variant's calls to the
slab path for the rest of the process; ``off`` skips the check.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Callable

import torch

from ..quant4bit import PackedWeight4bit
from .common import cdiv
from .perturbed_matmul import launch_fused
from .row_norms import rank_block
from .slab import slab_perturbed_matmul

CHECK_ENV = "FLATLORA_FUSED_CHECK"
MODES = ("error", "warn", "off")
# max |fused - slab| / max |slab| allowed: 4 ulp of bf16 / fp16 (the output's rounding, the LoRA term's second
# rounding on the slab path, summation order); float32 may run as TF32 on both paths (torch's switch).
TOLERANCE = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9, torch.float32: 2.0**-9}
CHECK_SEED = 2**63 + 2026


def check_mode() -> str:
    """``FLATLORA_FUSED_CHECK``: ``error`` (default), ``warn`` or ``off``."""
    mode = os.environ.get(CHECK_ENV, "").strip().lower() or "error"
    if mode not in MODES:
        raise ValueError(f"{CHECK_ENV}={mode!r} is not a mode; choose one of {', '.join(MODES)}")
    return mode


class _GuardState:
    """Each variant's verdict in this process, and the test-only hooks."""

    def __init__(self):
        self.lock = threading.Lock()
        self.verdicts: dict[tuple, bool] = {}
        self.devices = frozenset({"cuda"})  # where the check runs; tests add "cpu" (the interpreter)
        self.corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None


_STATE = _GuardState()


@contextlib.contextmanager
def checking_for_tests(devices: tuple[str, ...] = ("cpu",),
                       corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Test-only: run the check on ``devices`` too (the interpreter on the CPU), with fresh verdicts, and
    pass the fused result of each check through ``corrupt`` (to force a mismatch)."""
    saved = (_STATE.verdicts, _STATE.devices, _STATE.corrupt)
    _STATE.verdicts, _STATE.devices, _STATE.corrupt = {}, _STATE.devices | frozenset(devices), corrupt
    try:
        yield _STATE.verdicts
    finally:
        _STATE.verdicts, _STATE.devices, _STATE.corrupt = saved


def _weight_form(weight: torch.Tensor | PackedWeight4bit) -> tuple:
    if isinstance(weight, PackedWeight4bit):
        return ("4-bit", weight.dtype, weight.blocksize, weight.shape[1] % weight.blocksize == 0)
    return ("dense", weight.dtype)


def _dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _rank(kwargs: dict) -> int:
    return 1 if kwargs["lora_left"] is None else kwargs["lora_left"].shape[1]


def variant_key(a: torch.Tensor, weight: torch.Tensor | PackedWeight4bit, config_name: str, kwargs: dict) -> tuple:
    """What makes a fused launch a distinct compiled variant, as the guard tells them apart."""
    return (a.device, kwargs["transpose_weight"], kwargs["out_dtype"], config_name, _weight_form(weight), a.dtype,
            kwargs["row_std"] is not None, _dtype(kwargs["bias"]), _dtype(kwargs["lora_left"]),
            _dtype(kwargs["lora_right"]), rank_block(_rank(kwargs)), kwargs["keep"] is not None,
            kwargs["noise_offset"][1] % 4 == 0)


def variant_name(key: tuple) -> str:
    device, forward, dtype, config, form, a_dtype, noise, bias, left, right, rank_tile, keep, aligned = key
    weight = (f"4-bit/{form[2]} {form[1]}{'' if form[3] else ' straddling'}" if form[0] == "4-bit"
              else f"dense {form[1]}")
    return (f"perturbed_matmul {'forward' if forward else 'dX'} {dtype} {config} on {device} (W {weight}, a {a_dtype}, "
            f"noise {noise}, bias {bias}, LoRA {left}/{right} rank tile {rank_tile}, dropout mask {keep}, "
            f"noise columns {'aligned' if aligned else 'unaligned'})")


def variant_passes(a: torch.Tensor, weight: torch.Tensor | PackedWeight4bit, config_name: str, config: dict,
                   kwargs: dict) -> bool:
    """True when the fused launch may go ahead; False when it must take the slab path (``warn`` mode, a
    failed check). Checks the variant on its first use on a guarded device; raises on a failure in
    ``error`` mode."""
    if a.device.type not in _STATE.devices:
        return True
    key = variant_key(a, weight, config_name, kwargs)
    verdict = _STATE.verdicts.get(key)
    if verdict is not None:
        return verdict
    mode = check_mode()
    if mode == "off":
        return True
    with _STATE.lock:
        if key not in _STATE.verdicts:
            failure = _check(key, weight, config, kwargs)
            if failure is not None and mode == "error":
                raise RuntimeError(failure + f" Set {CHECK_ENV}=warn to fall back to the slab path for this "
                                   "variant, or pass path='slab'.")
            if failure is not None:
                warnings.warn(failure + " Its calls take the slab path from now on.", RuntimeWarning, stacklevel=3)
            _STATE.verdicts[key] = failure is None
    return _STATE.verdicts[key]


def _check_weight(weight: torch.Tensor | PackedWeight4bit, m: int, n: int,
                  g: torch.Generator) -> torch.Tensor | PackedWeight4bit:
    """A random ``(m, n)`` W of the same form as ``weight`` (on the CPU; moved by the caller)."""
    if not isinstance(weight, PackedWeight4bit):
        return torch.randn(m, n, generator=g).to(weight.dtype)
    blocks = cdiv(m * n, weight.blocksize)
    return PackedWeight4bit(torch.randint(0, 256, (cdiv(m * n, 2),), generator=g, dtype=torch.uint8),
                            torch.rand(blocks, generator=g) + 0.5, weight.codebook.cpu(), weight.blocksize, (m, n),
                            weight.dtype)


def _check_sizes(config: dict, weight: torch.Tensor | PackedWeight4bit, forward: bool) -> tuple[int, int, int]:
    """(tokens, m, n) of the check problem: past one tile in every dimension of the configuration, none a
    multiple of its tile; a 4-bit W keeps the call's relation between row length and block size."""
    tokens = config["BLOCK_M"] + 19
    out_columns = config["BLOCK_N"] + 37
    inner = 2 * config["BLOCK_K"] + 13
    m, n = (out_columns, inner) if forward else (inner, out_columns)
    if isinstance(weight, PackedWeight4bit):
        blocksize = weight.blocksize
        n = cdiv(n, blocksize) * blocksize + (0 if weight.shape[1] % blocksize == 0 else 2)
    return tokens, m, n


def _check(key: tuple, weight: torch.Tensor | PackedWeight4bit, config: dict, kwargs: dict) -> str | None:
    """Run the variant (launch ``config``) and the slab path on the check problem; None when they agree,
    else what went wrong."""
    device, forward, dtype = key[0], kwargs["transpose_weight"], kwargs["out_dtype"]
    tokens, m, n = _check_sizes(config, weight, forward)
    out_columns, inner = (m, n) if forward else (n, m)
    g = torch.Generator().manual_seed(CHECK_SEED % 2**63)
    w = _check_weight(weight, m, n, g)
    rank = _rank(kwargs)

    def like(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        return None if t is None else torch.randn(*shape, generator=g).to(t.dtype).to(device)

    problem = dict(
        kwargs, seed=CHECK_SEED, out=None,
        row_std=None if kwargs["row_std"] is None else (0.3 * (0.5 + torch.rand(m, generator=g))).to(device),
        bias=like(kwargs["bias"], out_columns), lora_left=like(kwargs["lora_left"], tokens, rank),
        lora_right=like(kwargs["lora_right"], rank, out_columns),
        keep=None if kwargs["keep"] is None else (torch.rand(tokens, out_columns, generator=g) >= 0.3).to(device),
        noise_offset=(5, 8 if kwargs["noise_offset"][1] % 4 == 0 else 7))
    a = torch.randn(tokens, inner, generator=g).to(key[5]).to(device)
    w = w.to(device) if isinstance(w, torch.Tensor) else PackedWeight4bit(
        *(t.to(device) for t in (w.packed, w.absmax, w.codebook)), w.blocksize, w.shape, w.dtype)
    with torch.no_grad():
        fused = launch_fused(a, w, config, **problem)
        if _STATE.corrupt is not None:
            fused = _STATE.corrupt(fused)
        slab = slab_perturbed_matmul(a, w, **problem)
    scale = slab.double().abs().max().clamp_min(1e-30)
    difference = ((fused.double() - slab.double()).abs().max() / scale).item()
    if difference <= TOLERANCE[dtype]:  # NaN compares False: a non-finite result fails
        return None
    return (f"Flat-LoRA fused kernel check failed: {variant_name(key)} disagrees with the slab path on a "
            f"{tokens}-token problem over a {m} x {n} W: max |fused - slab| / max |slab| = {difference:.3g}, "
            f"allowed {TOLERANCE[dtype]:.3g}.")
