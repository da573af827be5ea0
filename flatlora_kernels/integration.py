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

Seeds: layer ``k`` (adopted LoRA layers in ``named_modules`` order) of sample ``s`` uses
``layer_seed(seed, s, k, rank_tag)`` (:func:`flatlora_kernels.noise.layer_seed`), with ``rank_tag``
``rank + 1`` under ``per_rank_noise`` and 0 without. The global torch RNG is never touched, so two
identical runs give identical adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from typing import Callable, Iterator, Union

import torch
from peft.tuners.lora import LoraLayer

from . import checks
from .layer import FlatLoraLinear, as_flat_lora, noise_unsupported_reason
from .noise import check_seed, layer_seed

Schedule = Union[str, Callable[[int, "int | None"], float]]
SCHEDULES = ("cosine", "linear", "constant")

logger = logging.getLogger("flatlora_kernels")


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
            return checks.nonnegative_real("the schedule callable's factor", value)
        except ValueError:
            raise ValueError(f"the schedule callable returned {value!r} at step {step}; "
                             "expected a finite number >= 0") from None
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


def _type_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _skipped_lines(skipped: dict[str, str]) -> str:
    return "".join(f"\n  skipped {name}: {reason}" for name, reason in skipped.items())


class FlatLora:
    """Owns the Flat-LoRA layers of one model and the noise schedule. Made by :func:`apply_flat_lora`.

    ``layers`` maps module names to the adopted :class:`FlatLoraLinear` layers; ``skipped`` maps the
    names of LoRA layers that train *without* noise to the reason (their type, or what they use
    that the fused kernels do not support).
    """

    def __init__(self, layers: dict[str, FlatLoraLinear], config: FlatLoraConfig,
                 skipped: dict[str, str] | None = None) -> None:
        config.require_total_steps()
        self.layers = layers
        self.config = config
        self.skipped = dict(skipped or {})
        self.step_count = 0
        self.sigma_t = 0.0
        self.resample()

    # the config's fields, read-only, as attributes of the controller
    sigma = property(lambda self: self.config.sigma)
    schedule = property(lambda self: self.config.schedule)
    total_steps = property(lambda self: self.config.total_steps)
    resample_every = property(lambda self: self.config.resample_every)
    seed = property(lambda self: self.config.seed)
    per_rank_noise = property(lambda self: self.config.per_rank_noise)

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

    @contextlib.contextmanager
    def noise_disabled(self) -> Iterator["FlatLora"]:
        """Clean passes inside: every layer is plain LoRA; on exit the exact sample (seed and ``c``,
        the same tensor objects) is back, whatever happened inside. Nests; the schedule is untouched."""
        saved = [(layer.noise_seed, layer.noise_row_std) for layer in self.layers.values()]
        self.clear()
        try:
            yield self
        finally:
            for layer, (seed, row_std) in zip(self.layers.values(), saved):
                layer.noise_seed, layer.noise_row_std = seed, row_std

    def state_dict(self) -> dict:
        return {"step": self.step_count, **self.config.to_dict(), "layers": list(self.layers)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: restore the step count and redraw the sample it was using."""
        self.step_count = checks.resumed_step("Flat-LoRA", state, self.state_dict())
        self.resample()

    def __repr__(self) -> str:
        return (f"FlatLora(layers={len(self.layers)}, skipped={len(self.skipped)}, sigma={self.sigma}, "
                f"schedule={self.schedule!r}, step={self.step_count}, sigma_t={self.sigma_t:.4g})"
                + _skipped_lines(self.skipped))


def _split_lora_layers(peft_model: torch.nn.Module) -> tuple[dict[str, LoraLayer], dict[str, str]]:
    """The model's LoRA layers that Flat-LoRA can drive, and the others with the reason for each."""
    layers: dict[str, LoraLayer] = {}
    skipped: dict[str, str] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if getattr(module, "flat_lora_controlled", False):
            raise ValueError(f"apply_flat_lora was already called on this model ({name} is controlled); "
                             "keep using the FlatLora object it returned")
        reason = noise_unsupported_reason(module)
        if reason is None:
            layers[name] = module
        else:
            skipped[name] = f"{_type_name(module)}: {reason}"
    return layers, skipped


def apply_flat_lora(peft_model: torch.nn.Module, config: FlatLoraConfig | None = None, *, strict: bool = False,
                    **options) -> FlatLora:
    """Swap every PEFT LoRA ``Linear`` of ``peft_model`` for :class:`FlatLoraLinear` (and every 4-bit
    ``lora.bnb.Linear4bit`` for ``FlatLoraLinear4bit``), in place.

    Also adopts layers that are already ``FlatLoraLinear`` (from :func:`register_flat_lora`).
    Returns the controller; call its :meth:`FlatLora.step` after each optimizer step.

    LoRA layers that Flat-LoRA cannot perturb (``Embedding``/``Conv`` LoRA, 8-bit and other quantized
    bases, DoRA and other variants, ``lora_bias``, subclasses of PEFT's ``Linear``) would train without noise: they are listed in the controller's
    ``skipped`` and ``repr``, logged, and named in a warning; with ``strict=True`` they are an error.

    Args:
        config: a :class:`FlatLoraConfig`; or give its fields as keyword arguments
            (``sigma=0.05, schedule="cosine", total_steps=None, resample_every=1, seed=0,
            per_rank_noise=True``), not both.
        strict: raise instead of warning when a LoRA layer would train without noise.
    """
    if config is None:
        config = FlatLoraConfig(**options)
    elif options:
        raise TypeError(f"pass either a FlatLoraConfig or its fields as keywords, not both (got {sorted(options)})")
    elif not isinstance(config, FlatLoraConfig):
        raise TypeError(f"config must be a FlatLoraConfig, got {type(config).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    layers, skipped = _split_lora_layers(peft_model)
    if strict and skipped:
        raise ValueError("strict=True: these LoRA layers cannot be trained with Flat-LoRA noise:\n"
                         + "\n".join(f"  {name}: {reason}" for name, reason in skipped.items()))
    if not layers:
        found = f" (it has {len(skipped)} LoRA layers Flat-LoRA cannot drive: {sorted(skipped)})" if skipped else ""
        raise ValueError("the model has no PEFT LoRA Linear layers" + found + ": wrap it with peft.get_peft_model "
                         "(or load an adapter with PeftModel.from_pretrained) first")
    config.require_total_steps()  # before any layer changes class
    layers = {name: as_flat_lora(module) for name, module in layers.items()}
    controller = FlatLora(layers, config, skipped)
    for layer in layers.values():
        layer.flat_lora_controlled = True
    logger.info("Flat-LoRA adopted %d LoRA layers and skipped %d%s", len(layers), len(skipped),
                _skipped_lines(skipped))
    if skipped:
        warnings.warn(f"{len(skipped)} LoRA layers will train WITHOUT Flat-LoRA noise (pass strict=True to make "
                      "this an error): " + "; ".join(f"{name} ({reason})" for name, reason in skipped.items()),
                      UserWarning, stacklevel=2)
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
