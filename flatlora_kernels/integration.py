"""Deprecated import path, kept for one release: the config lives in :mod:`flatlora_kernels.config`, the
controller in :mod:`flatlora_kernels.controller`."""

import warnings

warnings.warn("flatlora_kernels.integration is deprecated and will be removed in the next release: import from "
              "flatlora_kernels.config / flatlora_kernels.controller (or the package itself)",
              DeprecationWarning, stacklevel=2)

from .config import SCHEDULES, FlatLoraConfig, Schedule, schedule_factor  # noqa: F401
from .noise import layer_seed  # noqa: F401
from .controller import FlatLora, apply_flat_lora, register_flat_lora  # noqa: F401
