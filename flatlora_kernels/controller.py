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
from typing import Iterable, Iterator

import torch
from peft.tuners.lora import LoraLayer

from . import checks, nonfinite
from .config import FlatLoraConfig, resolve_config, schedule_factor
from .layer import FlatLoraLinear, as_flat_lora, check_not_merged, noise_unsupported_reason
from .noise import CONTRACT_VERSION, layer_seed

logger = logging.getLogger("flatlora_kernels")
SKIPPED_STEPS_LIMIT = 20


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
                 skipped: dict[str, str] | None = None, *, on_nonfinite: str = "raise") -> None:
        config.require_total_steps()
        self.layers = layers
        self.config = config
        self.skipped = dict(skipped or {})
        self.on_nonfinite = nonfinite.check_policy(on_nonfinite)
        # after this many optimizer steps in a row that left the LoRA factors unchanged (a GradScaler
        # finding inf every time, or skipped windows), say so: raise or warn as on_nonfinite says
        self.max_skipped_steps = SKIPPED_STEPS_LIMIT
        self.skipped_in_a_row = 0
        self._watching = False  # set by guard() and FlatLoraCallback: they see the optimizer step
        self._hold_next_step = False  # the window was skipped: the next step() keeps the sample
        self.step_count = 0
        self.sigma_t = 0.0
        self._factor_versions: list[int] = []  # set while watching (_set_watching)
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

    def _seeds(self) -> list[int]:
        rank_tag = _current_rank() + 1 if self.per_rank_noise else 0
        return [layer_seed(self.seed, self.sample_index, index, rank_tag) for index in range(len(self.layers))]

    def resample(self) -> None:
        """Draw the current sample again: seeds from the sample index, ``c`` from the weights now."""
        self.sigma_t = self.sigma_at(self.sample_index * self.resample_every)
        for (name, layer), seed in zip(self.layers.items(), self._seeds()):
            try:
                layer.sample_noise(seed, self.sigma_t)
            except FloatingPointError as exc:
                raise FloatingPointError(f"Flat-LoRA layer {name}, drawing the noise after optimizer step "
                                         f"{self.step_count} (sigma_t={self.sigma_t:.4g}): {exc}") from None

    def factors(self) -> dict[str, torch.nn.Parameter]:
        """The trainable adapter parameters of the adopted layers (LoRA's A and B, and where the variant has
        them the LoRA bias, AdaLoRA's E, DoRA's magnitude), by ``layer.lora_A.adapter`` name (a module's
        other parameters get their own name appended, e.g. ``layer.lora_B.adapter.bias``)."""
        found = {}
        for name, layer in self.layers.items():
            for adapter in layer.active_adapters:
                for kind in layer.adapter_layer_names:
                    container = getattr(layer, kind)
                    if adapter not in container:
                        continue
                    item = container[adapter]
                    params = [("weight", item)] if isinstance(item, torch.nn.Parameter) else item.named_parameters()
                    for param_name, p in params:
                        if p.requires_grad:
                            suffix = "" if param_name == "weight" else f".{param_name}"
                            found[f"{name}.{kind}.{adapter}{suffix}"] = p
        return found

    def _versions(self) -> list[int]:
        # every in-place write (an optimizer step included) bumps a tensor's version counter
        return [p._version for p in self.factors().values()]

    def check_gradients(self, params: Iterable[torch.Tensor] = ()) -> bool:
        """Check the LoRA gradients of the window before the optimizer steps; True when all are finite.

        Otherwise, with ``on_nonfinite="raise"``, a ``FloatingPointError`` names the layer, the step and the
        likely cause; with ``"skip"`` the gradients of the LoRA factors and of ``params`` (pass every
        parameter the optimizer updates) are cleared, so the optimizer step that follows changes neither
        the weights nor its state, the next :meth:`step` keeps the current sample, and False is returned.
        :meth:`guard` calls this from the optimizer itself; :class:`FlatLoraCallback` in the Trainer.
        """
        finite = nonfinite.guard_gradients("Flat-LoRA", self.on_nonfinite, self.factors(), self.step_count,
                                           clear=params)
        self._hold_next_step = self._hold_next_step or not finite
        return finite

    def guard(self, optimizer: torch.optim.Optimizer) -> "OptimizerGuard":
        """Check the gradients inside every ``optimizer.step()``, before it writes anything (plain loops)::

            ctl = apply_flat_lora(model, sigma=0.05, total_steps=1000, on_nonfinite="skip")
            ctl.guard(optimizer)          # once; or `with ctl.guard(optimizer):` around the loop

        A skipped window changes nothing (see :meth:`check_gradients`). With a ``GradScaler`` the check runs
        only when the scaler lets the step through; the steps it skips are counted, and
        ``max_skipped_steps`` of them in a row raise or warn. Returns a handle with ``remove()``.
        """
        return OptimizerGuard(self, optimizer)

    def _set_watching(self, on: bool) -> None:
        """guard() and FlatLoraCallback see every optimizer step: while they do, step() counts the steps that
        left the LoRA factors unchanged (walking the factors costs ~1.6 ms a step on the main job, so only
        then)."""
        self._watching = on
        self._factor_versions = self._versions() if on else []

    def _count_skipped_steps(self) -> None:
        if not self._watching:
            return
        versions = self._versions()
        moved = versions != self._factor_versions
        self._factor_versions = versions
        self.skipped_in_a_row = 0 if moved else self.skipped_in_a_row + 1
        if self.skipped_in_a_row == self.max_skipped_steps:
            nonfinite.report(self.on_nonfinite, f"Flat-LoRA: the last {self.skipped_in_a_row} optimizer steps (up to "
                             f"step {self.step_count}) all left the LoRA factors unchanged: a GradScaler finding "
                             f"inf every time, or every window skipped for non-finite gradients; "
                             f"{nonfinite.GRADIENT_CAUSES}", skipped="training goes on")

    def step(self) -> None:
        """Call once per optimizer step, after ``optimizer.step()``. After a window skipped for non-finite
        gradients it changes nothing (same step count, same sample)."""
        self._count_skipped_steps()
        if self._hold_next_step:
            self._hold_next_step = False
            return
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
        """The step, the config, the noise contract version and the current sample itself (every layer's
        seed and ``c``, O(out_features) each), so a resumed run continues with this exact sample."""
        sample = {name: {"seed": layer.noise_seed,
                         "row_std": None if layer.noise_row_std is None else layer.noise_row_std.detach().clone()}
                  for name, layer in self.layers.items()}
        return {"step": self.step_count, **self.config.to_dict(), "layers": list(self.layers),
                "noise_contract": CONTRACT_VERSION, "sample": sample}

    def load_state_dict(self, state: dict, *, allow_config_change: bool = False) -> None:
        """Continue a run from :meth:`state_dict`: the step count and the exact sample it was using, whatever
        the adapter weights are when this is called.

        The saved seed, sigma, schedule, total_steps, resample interval, per-rank setting, noise contract
        version and layers must be this run's, or it is an error that names both values. With
        ``allow_config_change=True`` a changed setting (e.g. sigma on purpose) is accepted with a warning,
        and the sample is drawn anew with this run's config from the weights loaded now (load them first).
        """
        if not isinstance(state, dict):
            raise TypeError(f"Flat-LoRA load_state_dict expects the dict from FlatLora.state_dict(), "
                            f"got {type(state).__name__} ({state!r:.80})")
        if not isinstance(allow_config_change, bool):
            raise TypeError(f"allow_config_change must be a bool, got {allow_config_change!r}")
        if "step" not in state:
            raise ValueError(f"Flat-LoRA state has no 'step' entry (keys: {sorted(state)}): pass the dict "
                             "from FlatLora.state_dict()")
        saved_layers = state.get("layers", list(self.layers))
        if list(saved_layers) != list(self.layers):
            raise ValueError(f"Flat-LoRA state was saved for the layers {list(saved_layers)}, this run drives "
                             f"{list(self.layers)}")
        current = self.state_dict()
        saved = {"noise_contract": 1, **state}  # states written before the contract was versioned
        changed = {key: (saved[key], current[key]) for key in current.keys() - {"step", "sample", "layers"}
                   if key in saved and saved[key] != current[key]}
        if changed and not allow_config_change:
            raise ValueError("Flat-LoRA state does not match this run: " + "; ".join(
                f"{key}={old!r} saved, {new!r} now" for key, (old, new) in sorted(changed.items()))
                + " (pass allow_config_change=True to continue with this run's settings on purpose)")
        self.step_count = checks.nonnegative_int("step", state["step"])
        self._hold_next_step = False
        if changed or "sample" not in state:
            reason = ("changed settings " + ", ".join(sorted(changed)) if changed
                      else "the state holds no sample (saved by flatlora-kernels 0.1)")
            warnings.warn(f"Flat-LoRA: {reason}: the noise sample is drawn anew from the weights loaded now",
                          UserWarning, stacklevel=2)
            self.resample()
        else:
            self._restore_sample(state["sample"])
        self._set_watching(self._watching)

    def _restore_sample(self, sample: dict) -> None:
        if not isinstance(sample, dict):
            raise ValueError(f"Flat-LoRA state's sample must be a dict of layer name -> seed and row_std, "
                             f"got {sample!r:.80}")
        self.sigma_t = self.sigma_at(self.sample_index * self.resample_every)
        for (name, layer), seed in zip(self.layers.items(), self._seeds()):
            entry = sample.get(name)
            if not isinstance(entry, dict) or entry.keys() != {"seed", "row_std"}:
                raise ValueError(f"Flat-LoRA state's sample for {name} must be a dict with 'seed' and 'row_std', "
                                 f"got {entry!r:.80}")
            # the seed is a function of the config, the sample index and this rank; the saved one may be
            # another rank's, so it is derived again rather than read
            try:
                layer.restore_noise(seed, entry["row_std"], self.sigma_t)
            except ValueError as exc:
                raise ValueError(f"Flat-LoRA state's sample for {name}: {exc}") from None

    def __repr__(self) -> str:
        return (f"FlatLora(layers={len(self.layers)}, skipped={len(self.skipped)}, sigma={self.sigma}, "
                f"schedule={self.schedule!r}, step={self.step_count}, sigma_t={self.sigma_t:.4g})"
                + _skipped_lines(self.skipped))


class OptimizerGuard:
    """The hook :meth:`FlatLora.guard` puts on an optimizer (unwrapped from accelerate's wrapper): before each
    step, :meth:`FlatLora.check_gradients` with every parameter the optimizer updates. Usable as a context."""

    def __init__(self, controller: FlatLora, optimizer: torch.optim.Optimizer) -> None:
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer steps the torch one inside
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"guard expects a torch.optim.Optimizer, got {type(optimizer).__name__} "
                            f"({optimizer!r:.80})")
        self.controller = controller
        self.handle = optimizer.register_step_pre_hook(self._before_step)
        controller._set_watching(True)

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.controller.check_gradients(p for group in optimizer.param_groups for p in group["params"])

    def remove(self) -> None:
        self.handle.remove()
        self.controller._set_watching(False)

    def __enter__(self) -> "OptimizerGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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
        check_not_merged(module, name)
        reason = noise_unsupported_reason(module)
        if reason is None:
            layers[name] = module
        else:
            skipped[name] = f"{_type_name(module)}: {reason}"
    return layers, skipped


def apply_flat_lora(peft_model: torch.nn.Module, config: FlatLoraConfig | None = None, *, strict: bool = False,
                    on_nonfinite: str = "raise", **options) -> FlatLora:
    """Swap every PEFT LoRA ``Linear`` of ``peft_model`` for :class:`FlatLoraLinear` (and every 4-bit
    ``lora.bnb.Linear4bit`` for ``FlatLoraLinear4bit``), in place.

    Also adopts layers that are already ``FlatLoraLinear`` (from :func:`register_flat_lora`).
    Returns the controller; call its :meth:`FlatLora.step` after each optimizer step.

    Adopted: PEFT's ``lora.Linear`` with vanilla LoRA, ``lora_bias`` or DoRA adapters, AdaLoRA's
    ``SVDLinear`` (as ``FlatSVDLinear``), and each of them as the ``FSDP<Cls>`` class FSDP2's
    ``fully_shard`` makes when applied to the layer itself. LoRA layers that Flat-LoRA cannot perturb
    (``Embedding``/``Conv`` LoRA, 8-bit and other quantized bases, other variants, subclasses of PEFT's
    ``Linear``) would train without noise: they are listed in the controller's ``skipped`` and ``repr``,
    logged, and named in a warning; with ``strict=True`` they are an error. A model with a merged
    adapter (``merge_adapter()``) is refused: unmerge it first.

    Args:
        config: a :class:`FlatLoraConfig`; or give its fields as keyword arguments
            (``sigma=0.05, schedule="cosine", total_steps=None, resample_every=1, seed=0,
            per_rank_noise=True``), not both.
        strict: raise instead of warning when a LoRA layer would train without noise.
        on_nonfinite: ``"raise"`` or ``"skip"`` a window whose LoRA gradients hold NaN/inf
            (:meth:`FlatLora.check_gradients`, :meth:`FlatLora.guard`).
    """
    if not isinstance(peft_model, torch.nn.Module):
        raise TypeError(f"apply_flat_lora expects a PEFT model (a torch.nn.Module with LoRA layers), "
                        f"got {type(peft_model).__name__} ({peft_model!r:.80})")
    config = resolve_config(config, options, owner="apply_flat_lora")
    nonfinite.check_policy(on_nonfinite)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    layers, skipped = _split_lora_layers(peft_model)
    if strict and skipped:
        raise ValueError("strict=True: these LoRA layers cannot be trained with Flat-LoRA noise:\n"
                         + "\n".join(f"  {name}: {reason}" for name, reason in skipped.items()))
    if not layers:
        if skipped:
            raise ValueError(f"none of the model's {len(skipped)} LoRA layers can be trained with Flat-LoRA noise:"
                             + _skipped_lines(skipped) + "\nFlat-LoRA drives PEFT LoRA Linear layers (vanilla LoRA, "
                             "lora_bias, DoRA) and AdaLoRA SVDLinear layers over dense float or 4-bit bases: target "
                             "Linear modules, or train these layers without Flat-LoRA")
        raise ValueError("the model has no PEFT LoRA layers: wrap it with peft.get_peft_model "
                         "(or load an adapter with PeftModel.from_pretrained(..., is_trainable=True)) first")
    for name, module in layers.items():
        if module.in_features == 0 or module.out_features == 0:
            raise ValueError(f"LoRA layer {name} has in_features={module.in_features}, "
                             f"out_features={module.out_features}: Flat-LoRA needs both >= 1")
    config.require_total_steps()  # before any layer changes class
    layers = {name: as_flat_lora(module) for name, module in layers.items()}
    controller = FlatLora(layers, config, skipped, on_nonfinite=on_nonfinite)
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
