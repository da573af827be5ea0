"""Helpers shared by the benchmarks: where results go, the one record schema, the one median timer,
device names, Linux peak-RSS reading.

Every JSON this folder writes is one record::

    {"schema": "flatlora-bench/1", "benchmark": NAME, "environment": {...}, "config": {...}, "results": [...]}

``environment`` names the device, the torch/triton/CUDA/Python versions and the git commit, so a
committed figure can always be traced to what produced it. ``$OUT`` (set by the device tool on a lent
GPU) redirects results there.

Timing (:func:`median_ms`): on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed before each
call, median); on the CPU alternating wall-clock repetitions (median). Ratios are ratios of medians
taken in the same call, so both sides of a ratio saw the same machine state.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
SCHEMA = "flatlora-bench/1"
PASSES = ("fwd", "bwd", "fwdbwd")


def bench_device() -> torch.device:
    """Where the benchmarks run: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of a device label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def median_ms(fns: Sequence[Callable[[], object]], device: torch.device, reps: int = 20) -> list[float]:
    """Median milliseconds per call of each callable, all measured together.

    CUDA: ``triton.testing.do_bench`` on each in turn (it warms up, synchronises and uses CUDA
    events; ``reps`` is unused). CPU: one warm-up call of each, then ``reps`` rounds that call each
    once in turn, so that drift on a shared machine hits every callable alike.
    """
    if device.type == "cuda":
        import triton.testing

        return [float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) for fn in fns]
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, times in zip(fns, samples):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return [1e3 * statistics.median(times) for times in samples]


def layer_bench_arguments(description: str, presets: dict[str, dict],
                          default_reps: int) -> tuple[argparse.Namespace, torch.device, str, str]:
    """The command line of the layer benchmarks (``--preset``, ``--reps``, ``--out``), parsed, with the
    device, the preset's name (``7b`` on a GPU and ``tiny`` on the CPU unless given) and the device's label."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="7b on a GPU (default there), tiny on the CPU (default there)")
    parser.add_argument("--reps", type=int, default=default_reps, help="CPU repetitions per timing")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    device = bench_device()
    return args, device, args.preset or ("7b" if device.type == "cuda" else "tiny"), device_label(device)


def pass_callables(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor],
                   grad_output: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed passes of a layer, keyed by :data:`PASSES`: forward, backward alone (through one
    forward graph kept for it) and forward+backward. Gradients go to ``inputs`` (``autograd.grad``)."""
    kept = forward()
    return {"fwd": forward,
            "bwd": lambda: torch.autograd.grad(kept, inputs, grad_output, retain_graph=True),
            "fwdbwd": lambda: torch.autograd.grad(forward(), inputs, grad_output)}


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) and return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when tracked files differ), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device | str) -> dict:
    """What produced a result: device, library versions, commit, time."""
    device = torch.device(device)
    return {"device": device_label(device), "device_type": device.type, "torch": torch.__version__,
            "triton": _version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": git_commit(),
            "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_record(path: Path, benchmark: str, device: torch.device | str, config: dict, results: list) -> Path:
    """Write one record of the shared schema (see the module docstring) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"schema": SCHEMA, "benchmark": benchmark, "environment": environment(device), "config": config,
              "results": results}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
