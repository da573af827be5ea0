"""Which path a perturbed matmul takes on the Triton backend: the fused kernels or the slab path.

* ``"fused"``: :mod:`~flatlora_kernels.triton_ops.perturbed_matmul`, the noise regenerated in
  registers per W tile and token tile (noise work grows with the token count; nothing extra in memory);
* ``"slab"``: :mod:`~flatlora_kernels.triton_ops.slab`, ``W + diag(c) Z`` written a bounded slab at a
  time and multiplied by ``torch.mm`` (noise work once per pass; at most ``FLATLORA_SLAB_BYTES`` extra);
* ``"auto"`` (default): the slab path from a token count on that a committed table gives per device
  class, dtype class and weight size (``triton_ops/path_table.json``; ``benchmarks/gpu_summary.py``
  writes it from a GPU run), the fused kernels below it or where a slab does not fit.

``FLATLORA_PATH`` overrides the ``path`` argument everywhere. The native and reference backends have
one form, the slab form (the native ops perturb a bounded block of rows at a time, the reference the
whole matrix at once, then the GEMM multiplies): :func:`path_name` says "slab" there, and asking them
for ``"fused"`` is an error.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from .backends import backend_name
from .matmul_call import PATHS

PATH_ENV = "FLATLORA_PATH"
TABLE_FILE = Path(__file__).resolve().parent / "triton_ops" / "path_table.json"
TABLE_SCHEMA = "flatlora-path-table/1"


def check_path(path: object, source: str = "path") -> str:
    """``path`` if it is one of :data:`PATHS`, else a clear error naming ``source``."""
    if path not in PATHS:
        raise ValueError(f"{source}={path!r} is not a path; choose one of {', '.join(PATHS)}")
    return path


def requested_path(path: str = "auto") -> str:
    """The path asked for: ``FLATLORA_PATH`` when set, else ``path``."""
    forced = os.environ.get(PATH_ENV, "").strip().lower()
    return check_path(forced, PATH_ENV) if forced else check_path(path)


def device_class(device: torch.device | str) -> str:
    """The table's key for ``device``: ``"sm90"`` for compute capability 9.0 (H100/H200), else the
    device type (``"cpu"`` under the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return device.type


def load_path_table(path: Path | str | None = None) -> dict:
    """The ``auto`` table (:data:`TABLE_FILE` unless ``path`` is given): ``{"schema", "source", "classes":
    {device class: [row, ...]}}``, each row ``{"dtype": "16bit" | "fp32" | "any", "max_weight_elements":
    int | null, "slab_from_tokens": int | null}`` (null: no limit / never); the first row that matches a
    call decides, ``"default"`` serves classes not listed."""
    return _read_table(Path(path) if path is not None else TABLE_FILE)


@functools.lru_cache(maxsize=None)  # read once per file: auto consults it on every call
def _read_table(path: Path) -> dict:
    table = json.loads(path.read_text())
    if table.get("schema") != TABLE_SCHEMA or "default" not in table.get("classes", {}):
        raise ValueError(f"{path} is not a {TABLE_SCHEMA} table with a 'default' class")
    return table


def slab_from_tokens(device: torch.device | str, dtype: torch.dtype, weight_elements: int,
                     table: dict | None = None) -> int | None:
    """The token count from which ``auto`` takes the slab path (None: never) for this device, compute
    dtype and weight size, as the table says."""
    table = load_path_table() if table is None else table
    rows = table["classes"].get(device_class(device), table["classes"]["default"])
    dtype_class = "fp32" if dtype == torch.float32 else "16bit"
    for row in rows:
        if row["dtype"] in ("any", dtype_class) and (row["max_weight_elements"] is None
                                                     or weight_elements <= row["max_weight_elements"]):
            return row["slab_from_tokens"]
    return None


def path_name(device: torch.device | str, tokens: int, out_features: int, in_features: int,
              dtype: torch.dtype = torch.bfloat16, path: str = "auto") -> str:
    """``"fused"`` or ``"slab"``: the path a :func:`~flatlora_kernels.flat_lora_linear` call takes with
    ``tokens`` rows of input on a ``(out_features, in_features)`` weight, computing in ``dtype``, when
    asked for ``path`` (``FLATLORA_PATH`` overrides it). Both passes of the call take it.

    The fused-kernel guard (:mod:`~flatlora_kernels.triton_ops.fused_guard`) may still send a fused
    call to the slab path, with a warning, when ``FLATLORA_FUSED_CHECK=warn`` and the kernel failed its check.
    """
    device = torch.device(device)
    path = requested_path(path)
    backend = backend_name(device)
    check_backend_has_path(path, backend, device)
    if backend != "triton":
        return "slab"
    return triton_path(device, tokens, out_features, in_features, dtype, path)


def check_backend_has_path(path: str, backend: str, device: torch.device) -> None:
    """A clear error when ``path`` is "fused" on a backend other than Triton (they have the slab form only)."""
    if path == "fused" and backend != "triton":
        raise ValueError(f"path 'fused' needs the Triton backend; the {backend} backend on {device.type} has "
                         "only the slab form (see flatlora_kernels.paths)")


def triton_path(device: torch.device | str, tokens: int, out_features: int, in_features: int, dtype: torch.dtype,
                path: str) -> str:
    """The Triton backend's path for a call asked to take ``path``: "auto" resolved by the table."""
    if path != "auto":
        return path
    from .triton_ops.slab import slab_extent

    threshold = slab_from_tokens(device, dtype, out_features * in_features)
    fits = all(slab_extent(out_features, in_features, dtype, forward) is not None for forward in (True, False))
    return "slab" if fits and threshold is not None and tokens >= threshold else "fused"
