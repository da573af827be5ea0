"""``FlatLoraLinear``: PEFT's LoRA ``Linear`` with the Flat-LoRA perturbation in its forward pass."""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import Linear as LoraLinear

from . import checks
from .functional import SUPPORTED_DTYPES, _flat_lora_linear, check_row_std, merged_row_norms
from .noise import check_seed


def logical_weight(layer: LoraLinear) -> torch.Tensor:
    """The frozen base weight of a PEFT LoRA ``Linear`` as an ``(out_features, in_features)`` view.

    GPT-2's ``Conv1D`` stores it as ``(in, out)`` (PEFT's ``fan_in_fan_out``); noise indices
    ``(i, j)`` and filter norms always refer to this logical matrix.
    """
    weight = layer.get_base_layer().weight
    return weight.t() if layer.fan_in_fan_out else weight


def _adapter_unsupported_reason(layer: LoraLinear, adapter: str) -> str | None:
    if adapter in getattr(layer, "lora_variant", {}):
        return (f"adapter {adapter!r} uses the {type(layer.lora_variant[adapter]).__name__} variant (e.g. DoRA); "
                "Flat-LoRA noise supports vanilla LoRA only")
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True, which Flat-LoRA noise does not support"
    return None


def noise_unsupported_reason(layer: torch.nn.Module) -> str | None:
    """Why the fused Flat-LoRA path cannot drive this PEFT LoRA layer, or None when it can.

    It can drive PEFT's ``lora.Linear`` itself (not subclasses, whose forward may differ) over a
    dense float weight (``nn.Linear`` or GPT-2 ``Conv1D``), with vanilla LoRA adapters.
    """
    if not isinstance(layer, LoraLinear):
        return "not a LoRA Linear layer; Flat-LoRA perturbs the dense weights of LoRA Linear layers only"
    if type(layer) not in (LoraLinear, FlatLoraLinear):
        return "a subclass of peft.tuners.lora.Linear, whose forward Flat-LoRA cannot vouch for"
    weight = layer.get_base_layer().weight
    if not isinstance(weight, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        return (f"its base weight ({type(layer.get_base_layer()).__name__}) is {getattr(weight, 'dtype', weight)!r}, "
                "not a dense float32/bfloat16/float16 matrix (quantized bases are not supported)")
    for adapter in layer.active_adapters:
        reason = _adapter_unsupported_reason(layer, adapter)
        if reason is not None:
            return reason
    return None


class FlatLoraLinear(LoraLinear):
    """Drop-in replacement for ``peft.tuners.lora.Linear`` that trains under Flat-LoRA noise.

    Only ``forward`` differs from PEFT: parameters, state-dict keys, ``merge``/``unmerge`` and
    ``merge_and_unload`` are PEFT's own, and the noise is never merged. The noise state (the
    layer's seed and the per-row std ``c``) lives in plain attributes, outside the state dict.

    While a sample is active (:meth:`sample_noise`) and the module is in training mode, the
    forward pass computes ``x (W + diag(c) Z(seed))^T + bias + s * B A dropout(x)`` with fused
    kernels; in eval mode, with no sample, with disabled adapters or a merged adapter, it is
    exactly PEFT's LoRA forward.
    """

    noise_seed: int | None
    noise_row_std: torch.Tensor | None

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        if type(self.get_base_layer()).__name__ == "Conv1D" and not self.fan_in_fan_out:
            raise ValueError("a Conv1D base layer stores its weight as (in, out): set fan_in_fan_out=True "
                             "in the LoraConfig, as plain PEFT expects")
        self._reset_noise_state()

    def _reset_noise_state(self) -> None:
        self.noise_seed = None
        self.noise_row_std = None

    @classmethod
    def from_lora_linear(cls, layer: LoraLinear) -> "FlatLoraLinear":
        """Turn an existing PEFT LoRA ``Linear`` into a ``FlatLoraLinear`` in place (same object,
        same parameters and hooks) and return it."""
        if isinstance(layer, cls):
            raise ValueError("layer is already a FlatLoraLinear")
        if type(layer) is not LoraLinear:
            raise TypeError(f"expected a peft.tuners.lora.Linear, got {type(layer).__module__}."
                            f"{type(layer).__qualname__}")
        layer.__class__ = cls
        layer._reset_noise_state()
        return layer

    @property
    def noise_active(self) -> bool:
        return self.noise_row_std is not None

    def logical_weight(self) -> torch.Tensor:
        """The frozen base weight as an ``(out_features, in_features)`` view (see :func:`logical_weight`)."""
        return logical_weight(self)

    def _noise_adapter(self) -> str:
        """The single vanilla LoRA adapter that noise applies to, or a clear error."""
        active = list(self.active_adapters)
        if len(active) != 1:
            raise ValueError(f"Flat-LoRA noise needs exactly one active adapter, got {active}")
        adapter = active[0]
        if adapter not in self.lora_A:
            raise ValueError(f"active adapter {adapter!r} has no LoRA weights in this layer")
        reason = _adapter_unsupported_reason(self, adapter)
        if reason is not None:
            raise NotImplementedError(reason)
        return adapter

    @torch.no_grad()
    def sample_noise(self, seed: int, sigma: float) -> None:
        """Draw a new perturbation: keep ``seed`` and ``c = sigma * ||W + s B A||_row / sqrt(n)``,
        computed now and frozen until the next call. ``sigma == 0`` clears the noise."""
        check_seed(seed)
        sigma = checks.sigma(sigma)
        if sigma == 0:
            self._reset_noise_state()
            return
        adapter = self._noise_adapter()
        weight = self.logical_weight()
        norms = merged_row_norms(weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 self.scaling[adapter])
        row_std = norms * (sigma / math.sqrt(weight.shape[1]))
        check_row_std(row_std, weight)
        self.noise_seed = seed
        self.noise_row_std = row_std

    def clear_noise(self) -> None:
        """Drop the current sample: the layer is plain LoRA until the next :meth:`sample_noise`."""
        self._reset_noise_state()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (self.noise_active and self.training) or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) cannot be trained with Flat-LoRA noise")
        if args or any(v is not None for v in kwargs.values()):
            raise TypeError(f"FlatLoraLinear got extra forward arguments it cannot pass on: "
                            f"{len(args)} positional, keywords {sorted(kwargs)}")
        adapter = self._noise_adapter()
        weight = self.logical_weight()
        dropout = self.lora_dropout[adapter]
        dropout_p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
        row_std = self.noise_row_std
        if row_std.device != weight.device:
            row_std = self.noise_row_std = row_std.to(weight.device)
        # row_std was checked once, when the sample was drawn
        return _flat_lora_linear(
            x, weight, self.get_base_layer().bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            self.scaling[adapter], seed=self.noise_seed, row_std=row_std, dropout_p=dropout_p)

    def __repr__(self) -> str:
        return "flatlora." + super().__repr__().removeprefix("lora.")
