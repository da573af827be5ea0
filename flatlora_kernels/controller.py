"""The controller: swap Flat-LoRA into a PEFT model and drive the paper's noise schedule.

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
import logging
import warnings
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer

from . import checks
from .config import FlatLoraConfig, resolve_config, schedule_factor
from .layer import FlatLoraLinear, as_flat_lora, noise_unsupported_reason
from .noise import CONTRACT_VERSION, layer_seed

logger = logging.getLogger("flatlora_kernels")


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
        """Step, settings, layer names and the noise contract version (the samples depend on all of them)."""
        return {"step": self.step_count, **self.config.to_dict(), "layers": list(self.layers),
                "noise_contract": CONTRACT_VERSION}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: restore the step count and redraw the sample it was using.

        A state saved under another noise contract version is refused: this build would redraw
        different noise for the same steps. (A full state from before versions were recorded, with
        ``layers`` but no ``noise_contract``, is version 1; a bare ``{"step": n}`` carries no claim.)
        """
        saved_version = state.get("noise_contract", 1 if "layers" in state else CONTRACT_VERSION)
        if saved_version != CONTRACT_VERSION:
            raise ValueError(f"Flat-LoRA state was saved under noise contract version {saved_version}; this build "
                             f"draws noise under version {CONTRACT_VERSION}, so the resumed run would not perturb "
                             "with the noise of the saved one")
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
    config = resolve_config(config, options, owner="apply_flat_lora")
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
