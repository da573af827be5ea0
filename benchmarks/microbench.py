"""The cases of the pytest-benchmark tests in this folder (``test_bench_*.py``): what runs where, and
how each is timed against its group's baseline.

A *group* is one op at one size (and pass): pytest-benchmark prints each group as one table. Its
first case is the *baseline* (PEFT or plain-torch LoRA for the layer and the native op,
``torch.randn`` for the noise, one fp32 read of W for the merged norms); the others are Flat-LoRA on
every backend that can run on the device, and for layers the materialise-then-matmul approach.

Sizes follow the device: the Llama-7B layer shapes when CUDA is present, tiny ones on the CPU;
``FLATLORA_BENCH_SIZE=tiny|7b`` overrides. Triton runs on the CPU only under its interpreter, which
takes 0.2 to 1 s for even the tiny cases (about 10³ times the native op), so there it gets only the
smallest case of each op, a fixed 3 rounds after 1 warm-up round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from common import bench_device, device_label
from flatlora_kernels.backends import BACKENDS, _unavailable_reason

SIZE_ENV = "FLATLORA_BENCH_SIZE"
SIZES = ("tiny", "7b")
INTERPRETER_MAX_WORK = 2**17  # tokens x m x n (or m x n) up to which Triton runs under the interpreter


def bench_size() -> str:
    """'7b' on CUDA and 'tiny' on the CPU, unless FLATLORA_BENCH_SIZE says otherwise."""
    size = os.environ.get(SIZE_ENV) or ("7b" if bench_device().type == "cuda" else "tiny")
    if size not in SIZES:
        raise ValueError(f"{SIZE_ENV}={size!r}: choose one of {', '.join(SIZES)}")
    return size


@dataclass
class Case:
    """One benchmark: ``method`` (with a Flat-LoRA ``backend``, or None for torch code) in ``group``."""

    group: str
    method: str
    baseline: str
    device: str
    backend: str | None = None
    info: dict = field(default_factory=dict)  # shapes, tokens, dtype, pass: copied into extra_info

    @property
    def label(self) -> str:
        return self.method if self.backend is None else f"{self.method}-{self.backend}"

    @property
    def interpreted(self) -> bool:
        return self.backend == "triton" and self.device != "cuda"

    def extra_info(self) -> dict:
        return {**self.info, "device": device_label(torch.device(self.device)), "method": self.method,
                "backend": self.backend or "torch", "baseline": self.baseline}


def flat_backends(device: torch.device, work: int) -> list[str]:
    """The Flat-LoRA backends that can run on ``device``; Triton under the interpreter only for small ``work``."""
    too_big_to_interpret = device.type != "cuda" and work > INTERPRETER_MAX_WORK
    return [name for name in BACKENDS if _unavailable_reason(name, device) is None
            and not (name == "triton" and too_big_to_interpret)]


def group_cases(group: str, device: torch.device, baseline: str, torch_methods: list[str], work: int,
                info: dict) -> list[Case]:
    """The baseline first (so that it is timed first), then ``torch_methods``, then Flat-LoRA per backend."""
    cases = [Case(group, method, baseline, device.type, info=info) for method in [baseline, *torch_methods]]
    cases += [Case(group, "flat_lora", baseline, device.type, backend, info) for backend in flat_backends(device, work)]
    return cases


def params(cases: list[Case]) -> list:
    """pytest parameters, one per case, each marked with its pytest-benchmark group."""
    return [pytest.param(case, id=f"{case.group}-{case.label}".replace(" ", "-"),
                         marks=pytest.mark.benchmark(group=case.group)) for case in cases]


class Medians:
    """pytest-benchmark medians (seconds) measured in this session, by group and case label."""

    def __init__(self):
        self.groups: dict[str, dict[str, float]] = {}
        self.baselines: dict[str, str] = {}

    def record(self, case: Case, median: float | None) -> float | None:
        """Keep ``case``'s median; return its ratio to the group's baseline, or None when either is
        unknown (pytest-benchmark disabled, or the baseline deselected from this session)."""
        self.baselines[case.group] = case.baseline
        group = self.groups.setdefault(case.group, {})
        if median is not None:
            group[case.label] = median
        base = group.get(case.baseline)
        return None if median is None or base is None else median / base

    def summary_lines(self) -> list[str]:
        """One line per measured group: the baseline's median, then each other case's ratio to it."""
        lines = []
        for name, medians in self.groups.items():
            base = medians.get(self.baselines[name])
            others = [f"{label} {median * 1e3:.3f} ms" + (f" x{median / base:.2f}" if base else "")
                      for label, median in medians.items() if label != self.baselines[name]]
            head = f"{self.baselines[name]} {base * 1e3:.3f} ms" if base else f"{self.baselines[name]} not measured"
            if medians:
                lines.append(f"{name}: {head} | " + " | ".join(others))
        return lines
