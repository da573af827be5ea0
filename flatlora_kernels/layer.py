"""``FlatLoraLinear`` (and ``FlatLoraLinear4bit``): PEFT's LoRA layers with the Flat-LoRA perturbation in
their forward pass."""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import Linear as LoraLinear

from . import checks, nonfinite
from .distributed import (check_seed_shared_across_shards, is_dtensor, is_zero3_partitioned,
                          tensor_parallel_perturbed_linear, zero3_merged_row_norms)
from .functional import SUPPORTED_DTYPES, _flat_lora_linear, check_row_std_values, merged_row_norms
from .noise import check_seed
from .quant4bit import CODEBOOKS, PackedWeight4bit, is_4bit_weight

try:  # PEFT defines its 4-bit LoRA layer only where bitsandbytes is installed
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
except ImportError:
    LoraLinear4bit = None


def logical_weight(layer: LoraLinear) -> torch.Tensor:
    """The frozen base weight of a PEFT LoRA ``Linear`` as an ``(out_features, in_features)`` view.

    GPT-2's ``Conv1D`` stores it as ``(in, out)`` (PEFT's ``fan_in_fan_out``); noise indices
    ``(i, j)`` and filter norms always refer to this logical matrix.
    """
    weight = layer.get_base_layer().weight
    return weight.t() if layer.fan_in_fan_out else weight


def _adapter_unsupported_reason(layer: torch.nn.Module, adapter: str) -> str | None:
    if adapter in getattr(layer, "lora_variant", {}):
        return (f"adapter {adapter!r} uses the {type(layer.lora_variant[adapter]).__name__} variant (e.g. DoRA); "
                "Flat-LoRA noise supports vanilla LoRA only")
    if layer.lora_bias.get(adapter, False):
        return f"adapter {adapter!r} has lora_bias=True, which Flat-LoRA noise does not support"
    return None


def _base_weight_reason(layer: torch.nn.Module) -> str | None:
    weight = layer.get_base_layer().weight
    base = type(layer.get_base_layer()).__name__
    if LoraLinear4bit is not None and isinstance(layer, LoraLinear4bit):
        state = getattr(weight, "quant_state", None)
        if not is_4bit_weight(weight) or state.quant_type not in CODEBOOKS:
            return (f"its 4-bit base weight ({base}) is not a quantized NF4/FP4 Params4bit "
                    f"(quant_type {getattr(state, 'quant_type', None)!r})")
        return None
    if not isinstance(weight, torch.Tensor) or weight.dtype not in SUPPORTED_DTYPES:
        return (f"its base weight ({base}) is {getattr(weight, 'dtype', weight)!r}, not a dense "
                "float32/bfloat16/float16 matrix or a bitsandbytes 4-bit one (8-bit and other quantized "
                "bases are not supported)")
    return None


def noise_unsupported_reason(layer: torch.nn.Module) -> str | None:
    """Why the Flat-LoRA path cannot drive this PEFT LoRA layer, or None when it can.

    It can drive PEFT's ``lora.Linear`` itself (not subclasses, whose forward may differ) over a
    dense float weight (``nn.Linear`` or GPT-2 ``Conv1D``), and PEFT's ``lora.bnb.Linear4bit`` over
    an NF4/FP4 weight, with vanilla LoRA adapters.
    """
    kind = next((cls for cls in FLAT_LORA_LAYERS if type(layer) in (cls, cls.peft_class)), None)
    if kind is None:
        if isinstance(layer, LoraLinear):
            return "a subclass of peft.tuners.lora.Linear, whose forward Flat-LoRA cannot vouch for"
        return "not a LoRA Linear layer; Flat-LoRA perturbs the weights of LoRA Linear layers only"
    reason = _base_weight_reason(layer)
    if reason is not None:
        return reason
    for adapter in layer.active_adapters:
        reason = _adapter_unsupported_reason(layer, adapter)
        if reason is not None:
            return reason
    return None


class _FlatLoraNoise:
    """The noise state and the perturbed forward, shared by the dense and the 4-bit layer.

    A subclass names the PEFT layer it replaces (``peft_class``) and how its frozen weight enters
    the fused op (``_weight_operand``).
    """

    peft_class: type
    peft_name: str  # how users know the class it replaces
    noise_seed: int | None
    noise_row_std: torch.Tensor | None

    def _reset_noise_state(self) -> None:
        self.noise_seed = None
        self.noise_row_std = None
        self._seed_checked_across_shards: int | None = None  # the seed last found shared by every shard's rank
        self._base_is_zero3 = False  # a DeepSpeed ZeRO-3 partitioned base weight (set with each sample)

    @classmethod
    def from_lora_linear(cls, layer: torch.nn.Module):
        """Turn an existing PEFT layer of ``cls.peft_class`` into this class in place (same object,
        same parameters and hooks) and return it."""
        if isinstance(layer, cls):
            raise ValueError(f"layer is already a {cls.__name__}")
        if type(layer) is not cls.peft_class:
            raise TypeError(f"expected a {cls.peft_name}, got {type(layer).__module__}.{type(layer).__qualname__}")
        reason = _base_weight_reason(layer)
        if reason is not None:
            raise TypeError(f"cannot train this layer with Flat-LoRA noise: {reason}")
        layer.__class__ = cls
        layer._reset_noise_state()
        return layer

    @property
    def noise_active(self) -> bool:
        return self.noise_row_std is not None

    def _weight_operand(self):
        raise NotImplementedError

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
        lora_A, lora_B, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        base_weight = self.get_base_layer().weight
        self._base_is_zero3 = is_zero3_partitioned(base_weight)
        if self._base_is_zero3:  # outside a forward ZeRO-3 holds a flat slice of W per rank
            norms = zero3_merged_row_norms(base_weight, self.fan_in_fan_out, lora_A, lora_B, scaling)
        else:
            norms = merged_row_norms(self._weight_operand(), lora_A, lora_B, scaling)
        row_std = norms * (sigma / math.sqrt(self.in_features))
        if not bool(torch.isfinite(row_std).all()):
            raise FloatingPointError(self._nonfinite_noise_cause(adapter, base_weight, sigma))
        check_row_std_values(row_std)
        self.noise_seed = seed
        self.noise_row_std = row_std

    @torch.no_grad()
    def restore_noise(self, seed: int, row_std: torch.Tensor | None) -> None:
        """Set a sample saved earlier (its seed and ``c``) exactly as it was: nothing is recomputed from the
        weights, so it does not matter what they are now. ``row_std=None`` clears the noise."""
        check_seed(seed)
        if row_std is None:
            self._reset_noise_state()
            return
        if not isinstance(row_std, torch.Tensor) or row_std.dtype != torch.float32 \
                or tuple(row_std.shape) != (self.out_features,):
            raise ValueError(f"row_std must be a float32 tensor of shape ({self.out_features},), got {row_std!r:.80}")
        check_row_std_values(row_std)
        base_weight = self.get_base_layer().weight
        self._base_is_zero3 = is_zero3_partitioned(base_weight)
        self.noise_seed = seed
        self.noise_row_std = row_std.detach().clone().to(base_weight.device)

    def _nonfinite_noise_cause(self, adapter: str, weight, sigma: float) -> str:
        factors = [self.lora_A[adapter].weight, self.lora_B[adapter].weight]
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            return f"the LoRA factors of adapter {adapter!r} hold NaN/inf; {nonfinite.WEIGHT_CAUSES}"
        if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):
            return "the frozen base weight holds NaN/inf (check how the model was loaded or modified)"
        return (f"the noise std c = sigma * row norm / sqrt(in_features) overflows float32 at sigma={sigma:g}: "
                "sigma (or the schedule's factor) is far too large")

    def clear_noise(self) -> None:
        """Drop the current sample: the layer is plain LoRA until the next :meth:`sample_noise`."""
        self._reset_noise_state()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not (self.noise_active and self.training) or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) cannot be trained with Flat-LoRA noise")
        if args or any(v is not None for v in kwargs.values()):
            raise TypeError(f"{type(self).__name__} got extra forward arguments it cannot pass on: "
                            f"{len(args)} positional, keywords {sorted(kwargs)}")
        adapter = self._noise_adapter()
        if self._base_is_zero3:  # found when the sample was drawn: reading the weight here would gather it
            return self._zero3_forward(x, self.noise_row_std)
        weight = self._weight_operand()
        dropout = self.lora_dropout[adapter]
        dropout_p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
        row_std = self.noise_row_std
        if row_std.device != weight.device:
            row_std = self.noise_row_std = row_std.to(weight.device)
        if is_dtensor(weight):
            return self._tensor_parallel_forward(x, weight, row_std)
        # row_std was checked once, when the sample was drawn
        return _flat_lora_linear(
            x, weight, self.get_base_layer().bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            self.scaling[adapter], seed=self.noise_seed, row_std=row_std, dropout_p=dropout_p)

    def _tensor_parallel_forward(self, x: torch.Tensor, weight: torch.Tensor, row_std: torch.Tensor) -> torch.Tensor:
        """PEFT's forward with the base layer's matmul replaced by the shard-wise perturbed one (each rank
        multiplies its shard perturbed by its block of ``Z``)."""
        seed = self.noise_seed
        if self._seed_checked_across_shards != seed:
            check_seed_shared_across_shards(seed, weight, type(self).__name__)
            self._seed_checked_across_shards = seed
        base = self.get_base_layer()

        def perturbed_local_linear(x_local, weight_local, offset):
            rows = row_std[offset[0]:offset[0] + weight_local.shape[0]]
            return _flat_lora_linear(x_local, weight_local, None, None, None, 0.0, seed=seed, row_std=rows,
                                     noise_offset=offset)

        try:
            return self._forward_with_perturbed_base(
                x, lambda x_in: tensor_parallel_perturbed_linear(x_in, weight, base.bias, perturbed_local_linear))
        except RuntimeError as exc:
            raise RuntimeError(
                f"{type(self).__name__} over a tensor-parallel base layer: {exc}. If the base layer's output "
                "layout does not match the LoRA path's, plain PEFT fails the same way (see docs/distributed.md, "
                "'Tensor parallelism', for the plans that work)") from exc

    def _zero3_forward(self, x: torch.Tensor, row_std: torch.Tensor) -> torch.Tensor:
        """PEFT's forward with the base layer's matmul replaced by the perturbed one, for ZeRO-3 partitioned
        weights: DeepSpeed gathers a module's parameters in hooks around that module's own call (and again
        before its backward), so the base layer and the LoRA modules must each be called, as plain PEFT does."""
        def perturbed_base(x_in):  # inside the base layer's call: its weight is gathered now
            return _flat_lora_linear(x_in, self.logical_weight(), self.get_base_layer().bias, None, None, 0.0,
                                     seed=self.noise_seed, row_std=row_std)

        return self._forward_with_perturbed_base(x, perturbed_base)

    def _forward_with_perturbed_base(self, x: torch.Tensor, perturbed_base) -> torch.Tensor:
        """PEFT's own forward with only the base layer's computation replaced by ``perturbed_base(x)`` for this
        call. An instance attribute shadows the class's forward, so ``nn.Module.__call__`` still runs the hooks
        others registered on the base layer (tensor-parallel layouts, ZeRO-3 gathering), and the LoRA modules
        run as in plain PEFT (the LoRA term is PEFT's, not fused into the kernel epilogue)."""
        base = self.get_base_layer()
        base.forward = lambda x_in, *args, **kwargs: perturbed_base(x_in)
        try:
            return super().forward(x)
        finally:
            del base.forward

    def __repr__(self) -> str:
        return "flatlora." + super().__repr__().removeprefix("lora.")


class FlatLoraLinear(_FlatLoraNoise, LoraLinear):
    """Drop-in replacement for ``peft.tuners.lora.Linear`` that trains under Flat-LoRA noise.

    Only ``forward`` differs from PEFT: parameters, state-dict keys, ``merge``/``unmerge`` and
    ``merge_and_unload`` are PEFT's own, and the noise is never merged. The noise state (the
    layer's seed and the per-row std ``c``) lives in plain attributes, outside the state dict.

    While a sample is active (:meth:`sample_noise`) and the module is in training mode, the
    forward pass computes ``x (W + diag(c) Z(seed))^T + bias + s * B A dropout(x)`` with fused
    kernels; in eval mode, with no sample, with disabled adapters or a merged adapter, it is
    exactly PEFT's LoRA forward.
    """

    peft_class = LoraLinear
    peft_name = "peft.tuners.lora.Linear"

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        if type(self.get_base_layer()).__name__ == "Conv1D" and not self.fan_in_fan_out:
            raise ValueError("a Conv1D base layer stores its weight as (in, out): set fan_in_fan_out=True "
                             "in the LoraConfig, as plain PEFT expects")
        self._reset_noise_state()

    def logical_weight(self) -> torch.Tensor:
        """The frozen base weight as an ``(out_features, in_features)`` view (see :func:`logical_weight`)."""
        return logical_weight(self)

    _weight_operand = logical_weight


FLAT_LORA_LAYERS: tuple[type, ...] = (FlatLoraLinear,)

if LoraLinear4bit is not None:
    class FlatLoraLinear4bit(_FlatLoraNoise, LoraLinear4bit):
        """Drop-in replacement for PEFT's ``lora.bnb.Linear4bit`` (QLoRA) that trains under Flat-LoRA noise.

        The perturbed weight is ``dequant(W4) + diag(c) Z``: the packed NF4/FP4 codes are read and
        dequantized tile by tile in registers by the Triton kernels (GPU, or the interpreter), else
        a bounded block of rows at a time by the reference; the noise is added there and nothing of
        size ``out x in`` is stored; the packed weight is only read. The filter norms ``c`` come
        from the dequantized weight the same way. Otherwise as :class:`FlatLoraLinear`.
        """

        peft_class = LoraLinear4bit
        peft_name = "peft.tuners.lora.bnb.Linear4bit"

        def _weight_operand(self) -> PackedWeight4bit:
            return PackedWeight4bit.from_bnb(self.get_base_layer().weight)

    FLAT_LORA_LAYERS += (FlatLoraLinear4bit,)


def as_flat_lora(layer: torch.nn.Module) -> _FlatLoraNoise:
    """The Flat-LoRA layer for a PEFT LoRA layer :func:`noise_unsupported_reason` accepts: converted in
    place, or returned as is when it already is one."""
    for cls in FLAT_LORA_LAYERS:
        if type(layer) is cls:
            return layer
        if type(layer) is cls.peft_class:
            return cls.from_lora_linear(layer)
    raise TypeError(f"{type(layer).__qualname__}: {noise_unsupported_reason(layer)}")
