"""Test-only controls of the kernels: nothing here runs in training.

:func:`forced_matmul_config` launches every perturbed matmul with one GPU configuration, also under
the Triton interpreter, so each entry of the GPU table runs on the CPU tests; :func:`checking_fused_guard`
runs the fused-kernel guard on the CPU too and can force its check to fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from .triton_ops.launch_settings import MATMUL_CONFIGS


@contextlib.contextmanager
def forced_matmul_config(name: str) -> Iterator[dict]:
    """Within the block, every perturbed-matmul launch uses ``MATMUL_CONFIGS.configs[name]``; yields it."""
    if name not in MATMUL_CONFIGS.configs:
        raise KeyError(f"no configuration named {name!r}; known: {sorted(MATMUL_CONFIGS.configs)}")
    config = MATMUL_CONFIGS.configs[name]
    with mock.patch.object(MATMUL_CONFIGS, "select", lambda *args, **kwargs: (name, config)):
        yield config


@contextlib.contextmanager
def checking_fused_guard(devices: tuple[str, ...] = ("cpu",),
                         corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict]:
    """Within the block the fused-kernel guard (:mod:`flatlora_kernels.triton_ops.fused_guard`) also checks
    launches on ``devices`` (the interpreter on the CPU), starts from no verdicts, and passes the fused
    result of each check through ``corrupt`` (to force a mismatch); yields the verdicts."""
    from .triton_ops.fused_guard import STATE

    saved = (STATE.verdicts, STATE.devices, STATE.corrupt)
    STATE.verdicts, STATE.devices, STATE.corrupt = {}, STATE.devices | frozenset(devices), corrupt
    try:
        yield STATE.verdicts
    finally:
        STATE.verdicts, STATE.devices, STATE.corrupt = saved
