"""A guard on the fused kernels until they have a GPU record: each variant checks itself once.

The first CUDA launch of each fused kernel variant in a process (direction, compute dtype, launch
configuration, dense or 4-bit W, which of bias, LoRA term, dropout mask and noise it carries, and
whether K is a multiple of the K tile) first runs that variant and the slab path
(:mod:`~flatlora_kernels.triton_ops.slab`) on a small problem that spans several tiles of the
configuration and compiles to the same variant (:func:`check_problem`), with the call's own operand
dtypes, and compares them. Both round ``W + diag(c) Z`` to the compute dtype from the same noise, so
they differ only by float32 summation order and the slab path's second rounding of the LoRA term:
:data:`TOLERANCE` allows a few units in the last place of the compute dtype, relative to the
largest output. A kernel that miscompiles or misreads a tile lands far outside it.

``FLATLORA_FUSED_CHECK`` decides what a mismatch does: ``error`` (default) raises an error naming the
variant, the shapes and the difference; ``warn`` warns once and sends that variant's calls to the
slab path for the rest of the process; ``off`` skips the check. The check runs on CUDA only; the
tests run it on the CPU under the interpreter (:func:`flatlora_kernels.testing.checking_fused_guard`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import warnings
from typing import Callable

import torch

from .. import noise as contract
from ..matmul_call import PerturbedMatmul
from ..quant4bit import PackedWeight4bit
from .common import cdiv
from .perturbed_matmul import launch_fused, whole_k_steps
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


class GuardState:
    """Each variant's verdict in this process; where the check runs, and (tests only) what corrupts the
    fused result of a check (:func:`flatlora_kernels.testing.checking_fused_guard`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.verdicts: dict[tuple, bool] = {}
        self.devices = frozenset({"cuda"})
        self.corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None


STATE = GuardState()


def _weight_form(weight: torch.Tensor | PackedWeight4bit) -> tuple:
    if isinstance(weight, PackedWeight4bit):
        return ("4-bit", weight.dtype, weight.blocksize, weight.shape[1] % weight.blocksize == 0)
    return ("dense", weight.dtype)


def _dtype(t: torch.Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _rank(call: PerturbedMatmul) -> int:
    return 1 if call.lora_hidden is None else call.lora_hidden.shape[1]


def variant_key(call: PerturbedMatmul, config_name: str, config: dict) -> tuple:
    """What makes a fused launch a distinct compiled variant, as the guard tells them apart."""
    return (call.a.device, call.transpose_weight, call.out_dtype, config_name, _weight_form(call.weight), call.a.dtype,
            call.row_std is not None, _dtype(call.bias), _dtype(call.lora_hidden), _dtype(call.lora_out_factor),
            rank_block(_rank(call)), call.dropout_keep is not None,
            call.noise_offset[1] % contract.NORMALS_PER_CALL == 0,
            whole_k_steps(call.inner_size, config["BLOCK_K"]))


def variant_name(key: tuple) -> str:
    device, forward, dtype, config, form, a_dtype, noise, bias, hidden, factor, rank_tile, keep, aligned, even_k = key
    weight = (f"4-bit/{form[2]} {form[1]}{'' if form[3] else ' straddling'}" if form[0] == "4-bit"
              else f"dense {form[1]}")
    return (f"perturbed_matmul {'forward' if forward else 'dX'} {dtype} {config} on {device} (W {weight}, a {a_dtype}, "
            f"noise {noise}, bias {bias}, LoRA {hidden}/{factor} rank tile {rank_tile}, dropout mask {keep}, "
            f"noise columns {'aligned' if aligned else 'unaligned'}, {'whole' if even_k else 'partial'} K steps)")


def variant_passes(call: PerturbedMatmul, config_name: str, config: dict) -> bool:
    """True when the fused launch of ``call`` with ``config`` may go ahead; False when it must take the slab
    path (``warn`` mode, a failed check). Checks the variant on its first use on a guarded device; raises
    on a failure in ``error`` mode."""
    if call.a.device.type not in STATE.devices:
        return True
    key = variant_key(call, config_name, config)
    verdict = STATE.verdicts.get(key)
    if verdict is not None:
        return verdict
    mode = check_mode()
    if mode == "off":
        return True
    with STATE.lock:
        if key not in STATE.verdicts:
            failure = _check(key, call, config)
            if failure is not None and mode == "error":
                raise RuntimeError(failure + f" Set {CHECK_ENV}=warn to fall back to the slab path for this "
                                   "variant, or pass path='slab'.")
            if failure is not None:
                warnings.warn(failure + " Its calls take the slab path from now on.", RuntimeWarning, stacklevel=3)
            STATE.verdicts[key] = failure is None
    return STATE.verdicts[key]


def _check_weight(weight: torch.Tensor | PackedWeight4bit, m: int, n: int,
                  g: torch.Generator) -> torch.Tensor | PackedWeight4bit:
    """A random ``(m, n)`` W of the same form as ``weight``, on its device."""
    if not isinstance(weight, PackedWeight4bit):
        return torch.randn(m, n, generator=g).to(weight.dtype).to(weight.device)
    device = weight.device
    return PackedWeight4bit(torch.randint(0, 256, (cdiv(m * n, 2),), generator=g, dtype=torch.uint8).to(device),
                            (torch.rand(cdiv(m * n, weight.blocksize), generator=g) + 0.5).to(device),
                            weight.codebook, weight.blocksize, (m, n), weight.dtype)


def _check_sizes(config: dict, call: PerturbedMatmul) -> tuple[int, int, int]:
    """(tokens, m, n) of the check problem, compiled as the same variant as ``call``: past one tile in every
    dimension of the configuration; tokens and output columns not a multiple of their tile; the inner size
    a multiple of BLOCK_K exactly when the call's is (``EVEN_K``); a 4-bit W keeps the call's relation
    between row length and block size."""
    tokens = config["BLOCK_M"] + 19
    out_columns = config["BLOCK_N"] + 37
    weight, forward, block_k = call.weight, call.transpose_weight, config["BLOCK_K"]
    packed = isinstance(weight, PackedWeight4bit)
    whole_blocks = packed and weight.shape[1] % weight.blocksize == 0

    def fits(inner: int) -> bool:  # the inner size is W's row length forward
        return (whole_k_steps(inner, block_k) == whole_k_steps(call.inner_size, block_k)
                and not (packed and forward and (inner % weight.blocksize == 0) != whole_blocks))

    # the call's inner size plus any multiple of BLOCK_K times the block size fits: the search ends
    inner = next(size for size in itertools.count(2 * block_k + 13) if fits(size))
    m, n = (out_columns, inner) if forward else (inner, out_columns)
    if packed and not forward:
        n = cdiv(n, weight.blocksize) * weight.blocksize + (0 if whole_blocks else 2)
    return tokens, m, n


def check_problem(call: PerturbedMatmul, config: dict) -> PerturbedMatmul:
    """The guard's problem for the variant of ``call`` launched with ``config``: random operands of the
    call's forms, dtypes and flags at :func:`_check_sizes`, so it compiles to the same variant."""
    device, forward = call.a.device, call.transpose_weight
    tokens, m, n = _check_sizes(config, call)
    out_columns, inner = (m, n) if forward else (n, m)
    g = torch.Generator().manual_seed(CHECK_SEED % 2**63)

    def like(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
        return None if t is None else torch.randn(*shape, generator=g).to(t.dtype).to(device)

    rank = _rank(call)
    return dataclasses.replace(
        call, a=torch.randn(tokens, inner, generator=g).to(call.a.dtype).to(device),
        weight=_check_weight(call.weight, m, n, g), seed=CHECK_SEED,
        row_std=None if call.row_std is None else (0.3 * (0.5 + torch.rand(m, generator=g))).to(device),
        bias=like(call.bias, out_columns), lora_hidden=like(call.lora_hidden, tokens, rank),
        lora_out_factor=like(call.lora_out_factor, rank, out_columns),
        dropout_keep=None if call.dropout_keep is None else (torch.rand(tokens, out_columns, generator=g) >= 0.3).to(device),
        noise_offset=(5, 8 if call.noise_offset[1] % contract.NORMALS_PER_CALL == 0 else 7))


def _check(key: tuple, call: PerturbedMatmul, config: dict) -> str | None:
    """Run the variant (launch ``config``) and the slab path on the check problem; None when they agree,
    else what went wrong."""
    problem = check_problem(call, config)
    tokens, m, n = problem.out_shape[0], *problem.weight.shape
    with torch.no_grad():
        fused = launch_fused(problem, config)
        if STATE.corrupt is not None:
            fused = STATE.corrupt(fused)
        slab = slab_perturbed_matmul(problem)
    scale = slab.double().abs().max().clamp_min(1e-30)
    difference = ((fused.double() - slab.double()).abs().max() / scale).item()
    if difference <= TOLERANCE[call.out_dtype]:  # NaN compares False: a non-finite result fails
        return None
    return (f"Flat-LoRA fused kernel check failed: {variant_name(key)} disagrees with the slab path on a "
            f"{tokens}-token problem over a {m} x {n} W: max |fused - slab| / max |slab| = {difference:.3g}, "
            f"allowed {TOLERANCE[call.out_dtype]:.3g}.")
