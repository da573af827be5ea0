"""Deprecated import path, kept for one release: the Trainer callback lives in :mod:`flatlora_kernels.callback`."""

import warnings

warnings.warn("flatlora_kernels.trainer is deprecated and will be removed in the next release: "
              "import from flatlora_kernels.callback (or the package itself)", DeprecationWarning, stacklevel=2)

from .callback import FlatLoraCallback  # noqa: F401
