"""The Flat-LoRA procedure of a run: :class:`FlatLoraConfig`, the noise schedules, and the one rule by
which every entry point takes "a config object or its fields as keywords, not both" (:func:`resolve_config`).

Nothing here touches a model: :mod:`flatlora_kernels.controller` applies a config, and the callback and
the sharpness-aware methods take one through :func:`resolve_config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Union

from . import checks
from .noise import check_seed

Schedule = Union[str, Callable[[int, "int | None"], float]]
SCHEDULES = ("cosine", "linear", "constant")
# A schedule scales sigma, normally by a fraction in [0, 1]; beyond this the noise is meaningless and c
# would overflow float32.
MAX_SCHEDULE_FACTOR = 1e3


@dataclasses.dataclass(frozen=True)
class FlatLoraConfig:
    """The Flat-LoRA procedure of one run, validated once when it is made.

    Args:
        sigma: the noise level (paper: 0.05 for language models, 0.15 for CLIP ViT).
        schedule: ``"cosine"`` (the public code's), ``"linear"``, ``"constant"``, or a callable
            ``(step, total_steps) -> factor``.
        total_steps: optimizer steps in the run; ``"cosine"`` and ``"linear"`` need it by the time
            training starts (:class:`FlatLoraCallback` fills it from the Trainer's ``max_steps``).
        resample_every: optimizer steps between noise samples (1 in every published run).
        seed: 64-bit base seed; per-layer seeds are derived from it (:func:`layer_seed`).
        per_rank_noise: under ``torch.distributed``, an independent sample on every rank.
    """

    sigma: float = 0.05
    schedule: Schedule = "cosine"
    total_steps: int | None = None
    resample_every: int = 1
    seed: int = 0
    per_rank_noise: bool = True

    def __post_init__(self) -> None:
        # the dataclass is frozen: normalised values are stored through object.__setattr__, once, here
        object.__setattr__(self, "sigma", checks.sigma(self.sigma))
        if not callable(self.schedule) and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a callable (step, total_steps) -> factor, "
                             f"got {self.schedule!r}")
        object.__setattr__(self, "total_steps", checks.optional_positive_int("total_steps", self.total_steps))
        object.__setattr__(self, "resample_every", checks.positive_int("resample_every", self.resample_every))
        check_seed(self.seed)
        if not isinstance(self.per_rank_noise, bool):
            raise TypeError(f"per_rank_noise must be a bool, got {self.per_rank_noise!r}")

    def require_total_steps(self) -> None:
        """Raise if the schedule needs ``total_steps`` and none was given."""
        if self.schedule in ("cosine", "linear") and self.total_steps is None:
            raise ValueError(f"the {self.schedule!r} schedule needs total_steps (the number of optimizer steps)")

    def to_dict(self) -> dict:
        """The fields as plain values (a callable schedule is recorded as ``"callable"``)."""
        state = dataclasses.asdict(self)
        if not isinstance(self.schedule, str):
            state["schedule"] = "callable"
        return state


def schedule_factor(schedule: Schedule, step: int, total_steps: int | None) -> float:
    """``f(t)``: the fraction of ``sigma`` used after ``step`` optimizer steps."""
    if callable(schedule):
        value = schedule(step, total_steps)
        try:
            factor = checks.nonnegative_real("the schedule callable's factor", value)
        except ValueError:
            factor = math.inf
        if not factor <= MAX_SCHEDULE_FACTOR:
            raise ValueError(f"the schedule callable (schedule=) returned {value!r} at step {step}; expected the "
                             f"fraction of sigma to use: a finite number in [0, {MAX_SCHEDULE_FACTOR:g}] "
                             "(normally [0, 1])")
        return factor
    if schedule == "constant":
        return 1.0
    progress = min(step / total_steps, 1.0)
    if schedule == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def resolve_config(config: FlatLoraConfig | None, fields: dict[str, Any], *, defaults: dict[str, Any] | None = None,
                   owner: str = "Flat-LoRA") -> FlatLoraConfig:
    """The config an entry point runs with: ``config`` itself, or one made from ``fields`` (keyword
    arguments the caller collected) over ``defaults`` (the entry point's own defaults, e.g. RWP's
    constant schedule). Giving both a config and fields is an error, and so is a config of another type."""
    if config is None:
        return FlatLoraConfig(**{**(defaults or {}), **fields})
    if fields:
        raise TypeError(f"{owner}: pass either a FlatLoraConfig or its fields as keywords, not both "
                        f"(got a config and {sorted(fields)})")
    if not isinstance(config, FlatLoraConfig):
        raise TypeError(f"{owner}: config must be a FlatLoraConfig, got {type(config).__name__} ({config!r})")
    return config
