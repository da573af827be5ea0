"""Train with it: swap Flat-LoRA into a PEFT model and drive the paper's noise schedule.

    ctl = apply_flat_lora(peft_model, sigma=0.05, total_steps=1000)
    for batch in loader:              # one optimizer step (any number of micro-batches)
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); optimizer.zero_grad()
        ctl.step()                    # after optimizer.step(): next sample, next sigma_t

Procedure (as the public Flat-LoRA code): ``sigma_t = sigma * f(t / total_steps)`` with ``t`` the
number of optimizer steps taken; a new sample (seed and filter norms ``c``, computed from the
merged weights at that moment) every ``resample_every`` steps; every micro-batch of a
gradient-accumulation window sees the same noise, because nothing changes it until ``step()``.

Seeds: layer ``k`` (LoRA layers in ``named_modules`` order) of sample ``s`` uses
``mix(mix(mix(mix(seed) ^ s) ^ k) ^ rank_tag)`` where ``mix`` is the SplitMix64 finaliser and
``rank_tag`` is ``rank + 1`` with ``per_rank_noise`` and 0 without. The global torch RNG is never
touched, so two identical runs give identical adapters.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Union

import torch
from peft.tuners.lora import Linear as LoraLinear

from .layer import FlatLoraLinear
from .noise import layer_seed, split_seed

Schedule = Union[str, Callable[[int, "int | None"], float]]
SCHEDULES = ("cosine", "linear", "constant")


def schedule_factor(schedule: Schedule, step: int, total_steps: int | None) -> float:
    """``f(t)``: the fraction of ``sigma`` used after ``step`` optimizer steps."""
    if callable(schedule):
        value = schedule(step, total_steps)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"the schedule callable returned {value!r} at step {step}; expected a finite number >= 0")
        return float(value)
    if schedule == "constant":
        return 1.0
    progress = min(step / total_steps, 1.0)
    if schedule == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def _current_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class FlatLora:
    """Owns the Flat-LoRA layers of one model and the noise schedule. Made by :func:`apply_flat_lora`."""

    def __init__(self, layers: dict[str, FlatLoraLinear], *, sigma: float, schedule: Schedule,
                 total_steps: int | None, resample_every: int, seed: int, per_rank_noise: bool) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or a callable (step, total_steps) -> factor, "
                             f"got {schedule!r}")
        _check_positive_int("total_steps", total_steps, allow_none=True)
        if schedule in ("cosine", "linear") and total_steps is None:
            raise ValueError(f"the {schedule!r} schedule needs total_steps (the number of optimizer steps)")
        _check_positive_int("resample_every", resample_every)
        split_seed(seed)
        if not isinstance(per_rank_noise, bool):
            raise TypeError(f"per_rank_noise must be a bool, got {per_rank_noise!r}")
        self.layers = layers
        self.sigma = float(sigma)
        self.schedule = schedule
        self.total_steps = total_steps
        self.resample_every = resample_every
        self.seed = seed
        self.per_rank_noise = per_rank_noise
        self.step_count = 0
        self.sigma_t = 0.0
        self.resample()

    @property
    def sample_index(self) -> int:
        return self.step_count // self.resample_every

    def sigma_at(self, step: int) -> float:
        return self.sigma * schedule_factor(self.schedule, step, self.total_steps)

    def resample(self) -> None:
        """Draw the current sample again: seeds from the sample index, ``c`` from the weights now."""
        self.sigma_t = self.sigma_at(self.sample_index * self.resample_every)
        rank_tag = _current_rank() + 1 if self.per_rank_noise else 0
        for index, layer in enumerate(self.layers.values()):
            layer.sample_noise(layer_seed(self.seed, self.sample_index, index, rank_tag), self.sigma_t)

    def step(self) -> None:
        """Call once per optimizer step, after ``optimizer.step()``."""
        self.step_count += 1
        if self.step_count % self.resample_every == 0:
            self.resample()

    def clear(self) -> None:
        """Remove the noise from every layer (until the next :meth:`step` or :meth:`resample`)."""
        for layer in self.layers.values():
            layer.clear_noise()

    def state_dict(self) -> dict:
        return {"step": self.step_count, "sigma": self.sigma, "total_steps": self.total_steps,
                "resample_every": self.resample_every, "seed": self.seed, "per_rank_noise": self.per_rank_noise,
                "schedule": self.schedule if isinstance(self.schedule, str) else "callable",
                "layers": list(self.layers)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: restore the step count and redraw the sample it was using."""
        mine = self.state_dict()
        for key in ("sigma", "total_steps", "resample_every", "seed", "per_rank_noise", "schedule", "layers"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"Flat-LoRA state was saved with {key}={state[key]!r}, this run has {mine[key]!r}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.step_count = step
        self.resample()

    def __repr__(self) -> str:
        return (f"FlatLora(layers={len(self.layers)}, sigma={self.sigma}, schedule={self.schedule!r}, "
                f"step={self.step_count}, sigma_t={self.sigma_t:.4g})")


def apply_flat_lora(peft_model: torch.nn.Module, sigma: float = 0.05, schedule: Schedule = "cosine",
                    total_steps: int | None = None, resample_every: int = 1, seed: int = 0,
                    per_rank_noise: bool = True) -> FlatLora:
    """Swap every PEFT LoRA ``Linear`` of ``peft_model`` for :class:`FlatLoraLinear`, in place.

    Also adopts layers that are already ``FlatLoraLinear`` (from :func:`register_flat_lora`).
    Other modules, LoRA ``Embedding``/``Conv`` layers included, are left alone. Returns the
    controller; call its :meth:`FlatLora.step` after each optimizer step.

    Args:
        sigma: the noise level (paper: 0.05 for language models, 0.15 for CLIP ViT).
        schedule: ``"cosine"`` (the public code's), ``"linear"``, ``"constant"``, or a callable
            ``(step, total_steps) -> factor``.
        total_steps: optimizer steps in the run (needed by ``"cosine"`` and ``"linear"``).
        resample_every: optimizer steps between noise samples (1 in every published run).
        seed: 64-bit base seed; per-layer seeds are derived from it.
        per_rank_noise: under ``torch.distributed``, an independent sample on every rank.
    """
    layers: dict[str, FlatLoraLinear] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, FlatLoraLinear):
            if getattr(module, "flat_lora_controlled", False):
                raise ValueError(f"apply_flat_lora was already called on this model ({name} is controlled); "
                                 "keep using the FlatLora object it returned")
            layers[name] = module
        elif type(module) is LoraLinear:
            layers[name] = FlatLoraLinear.from_lora_linear(module)
    if not layers:
        raise ValueError("the model has no PEFT LoRA Linear layers: wrap it with peft.get_peft_model "
                         "(or load an adapter with PeftModel.from_pretrained) first")
    controller = FlatLora(layers, sigma=sigma, schedule=schedule, total_steps=total_steps,
                          resample_every=resample_every, seed=seed, per_rank_noise=per_rank_noise)
    for layer in layers.values():
        layer.flat_lora_controlled = True
    return controller


def register_flat_lora(config):
    """Make ``get_peft_model(model, config)`` create :class:`FlatLoraLinear` layers directly.

    Uses PEFT's custom-module registration for ``nn.Linear`` (and GPT-2's ``Conv1D``, which needs
    ``fan_in_fan_out=True`` as in plain PEFT). Returns ``config``. Noise still comes from
    :func:`apply_flat_lora`.
    """
    mapping = {torch.nn.Linear: FlatLoraLinear}
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        pass
    else:
        mapping[Conv1D] = FlatLoraLinear
    config._register_custom_module(mapping)
    return config
