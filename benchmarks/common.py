"""Helpers shared by the benchmark scripts: where results go, device names, Linux peak-RSS reading."""

from __future__ import annotations

import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of a device label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


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
