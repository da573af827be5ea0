"""Test-only controls of the kernels: nothing here runs in training.

:func:`forced_matmul_config` launches every perturbed matmul with one GPU configuration, also under
the Triton interpreter, so each entry of the GPU table runs on the CPU tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from .triton_ops.launch_settings import MATMUL_CONFIGS


@contextlib.contextmanager
def forced_matmul_config(name: str) -> Iterator[dict]:
    """Within the block, every perturbed-matmul launch uses ``MATMUL_CONFIGS.configs[name]``; yields it."""
    if name not in MATMUL_CONFIGS.configs:
        raise KeyError(f"no configuration named {name!r}; known: {sorted(MATMUL_CONFIGS.configs)}")
    config = MATMUL_CONFIGS.configs[name]
    with mock.patch.object(MATMUL_CONFIGS, "select", lambda *args, **kwargs: (name, config)):
        yield config
