"""``FlatLoraLinear``, ``FlatSVDLinear`` (and ``FlatLoraLinear4bit``): PEFT's LoRA layers with the Flat-LoRA
perturbation in their forward pass.

What each adapter's merged weight is (the weight PEFT's ``merge`` writes, whose rows give ``c``) and how
its forward uses the base weight ``W``; Flat-LoRA replaces ``W`` by ``W + diag(c) Z`` in all of them:

* vanilla LoRA (and ``lora_bias``, whose ``s * b_B`` goes with the base bias): ``W + s B A``;
* DoRA: ``m / ||W + s B A||_row * (W + s B A)``, whose rows have norm ``|m|``; the forward divides by
  the (detached) norms of the *perturbed* ``W + diag(c) Z + s B A``, computed tile by tile;
* AdaLoRA's ``SVDLinear``: ``W + s / (ranknum + 1e-5) * B (A * E)``, vanilla LoRA with ``A * E`` for ``A``.
"""

from __future__ import annotations

import functools
import math

import torch
from peft.tuners.adalora import SVDLinear
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant

from . import checks, nonfinite
from .distributed import (_whole, check_seed_shared_across_shards, is_dtensor, is_zero3_partitioned,
                          tensor_parallel_perturbed_linear, zero3_merged_row_norms)
from .functional import SUPPORTED_DTYPES, _flat_lora_linear, _merged_row_norms, check_row_std_values
from .noise import check_seed
from .paths import check_path
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


def _adapter_unsupported_reason(layer: torch.nn.Module, adapter: str, dora_supported: bool) -> str | None:
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and not (dora_supported and type(variant) is DoraLinearVariant):
        supported = "vanilla LoRA, lora_bias" + (" and DoRA" if dora_supported else "")
        return (f"adapter {adapter!r} uses the {type(variant).__name__} variant; Flat-LoRA noise supports "
                f"{supported} on this layer type")
    return None


def fsdp_wrapped_class(cls: type) -> type | None:
    """The class FSDP2's ``fully_shard`` wrapped when ``cls`` is the ``FSDP<Cls>`` class it made, else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    bases = cls.__bases__
    if len(bases) == 2 and bases[0] is FSDPModule and cls.__name__ == f"FSDP{bases[1].__name__}":
        return bases[1]
    return None


def _layer_class(layer: torch.nn.Module) -> type:
    """The layer's class, seen through FSDP2's wrapper class."""
    return fsdp_wrapped_class(type(layer)) or type(layer)


@functools.lru_cache(maxsize=None)
def _fsdp_class(cls: type, fsdp_cls: type) -> type:
    """FSDP2's wrapper class for ``cls``, made as ``fully_shard`` makes ``fsdp_cls`` (its wrapper of another class)."""
    return type(f"FSDP{cls.__name__}", fsdp_cls.__bases__[:1] + (cls,),
                {k: v for k, v in vars(fsdp_cls).items() if k == "__deepcopy__"})


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
    dense float weight (``nn.Linear`` or GPT-2 ``Conv1D``) with vanilla LoRA, ``lora_bias`` or DoRA
    adapters, AdaLoRA's ``SVDLinear`` over such a weight, and PEFT's ``lora.bnb.Linear4bit`` over an
    NF4/FP4 weight with vanilla LoRA or ``lora_bias`` adapters; each also as the ``FSDP<Cls>`` class
    FSDP2's ``fully_shard`` makes of it. A merged adapter is an error (:func:`check_not_merged`), not a reason.
    """
    layer_cls = _layer_class(layer)
    kind = next((cls for cls in FLAT_LORA_LAYERS if layer_cls in (cls, cls.peft_class)), None)
    if kind is None:
        if isinstance(layer, LoraLinear):
            return "a subclass of peft.tuners.lora.Linear, whose forward Flat-LoRA cannot vouch for"
        return ("not a LoRA Linear layer (Embedding and Conv LoRA, 8-bit and other quantized bases are not "
                "supported); Flat-LoRA perturbs the weights of LoRA Linear layers only")
    reason = _base_weight_reason(layer)
    if reason is not None:
        return reason
    for adapter in layer.active_adapters:
        reason = _adapter_unsupported_reason(layer, adapter, kind.dora_supported)
        if reason is not None:
            return reason
    return None


def check_not_merged(layer: torch.nn.Module, name: str = "") -> None:
    """Raise when an adapter is merged into the layer's base weight: noise there would count ``s B A`` twice
    in ``c`` and the forward would skip the LoRA path that carries it."""
    if layer.merged:
        where = f" {name}" if name else ""
        raise RuntimeError(f"LoRA layer{where} has merged adapters {layer.merged_adapters} (merge_adapter()): "
                           "Flat-LoRA trains unmerged adapters; call model.unmerge_adapter() first")


class _FlatLoraNoise:
    """The noise state and the perturbed forward, shared by the dense, AdaLoRA and 4-bit layers.

    A subclass names the PEFT layer it replaces (``peft_class``), how its frozen weight enters the
    fused op (``_weight_operand``) and its adapters' LoRA factors (``_lora_factors``).

    The sample: ``noise_seed`` and ``noise_sigma`` (from the controller; ``noise_seed`` None: no sample),
    ``noise_adapter``, the adapter whose merged weight gave ``c``, and ``noise_row_std``, that ``c``
    (None where the layer holds no weights for the active adapter: then it is PEFT's base layer alone).
    """

    peft_class: type
    peft_name: str  # how users know the class it replaces
    dora_supported: bool = False
    noise_seed: int | None
    noise_sigma: float
    noise_adapter: str | None
    noise_row_std: torch.Tensor | None
    _path: str = "auto"

    @property
    def path(self) -> str:
        """How the Triton backend forms the perturbed product: "auto" (default), "fused" or "slab"
        (:mod:`flatlora_kernels.paths`; ``FLATLORA_PATH`` overrides it)."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = check_path(value)

    def _reset_noise_state(self) -> None:
        self.noise_seed = None
        self.noise_sigma = 0.0
        self.noise_adapter = None
        self.noise_row_std = None
        self._seed_checked_across_shards: int | None = None  # the seed last found shared by every shard's rank
        self._base_is_zero3 = False  # a DeepSpeed ZeRO-3 partitioned base weight (set with each sample)

    @classmethod
    def from_lora_linear(cls, layer: torch.nn.Module, *, path: str = "auto"):
        """Turn an existing PEFT layer of ``cls.peft_class`` (or FSDP2's wrapper of it) into this class in
        place (same object, same parameters and hooks) and return it; ``path`` as :attr:`path`."""
        check_path(path)
        if isinstance(layer, cls):
            raise ValueError(f"layer is already a {cls.__name__}")
        if _layer_class(layer) is not cls.peft_class:
            raise TypeError(f"expected a {cls.peft_name}, got {type(layer).__module__}.{type(layer).__qualname__}")
        reason = _base_weight_reason(layer)
        if reason is not None:
            raise TypeError(f"cannot train this layer with Flat-LoRA noise: {reason}")
        fsdp_cls = type(layer) if type(layer) is not cls.peft_class else None
        layer.__class__ = cls if fsdp_cls is None else _fsdp_class(cls, fsdp_cls)
        layer._reset_noise_state()
        layer.path = path
        return layer

    @property
    def noise_active(self) -> bool:
        return self.noise_row_std is not None

    def _weight_operand(self):
        raise NotImplementedError

    def _lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` of the adapter's vanilla LoRA form ``W + s B A`` (differentiable in A and B)."""
        return self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]

    def _bias(self, adapter: str) -> torch.Tensor | None:
        """The base bias plus, with ``lora_bias``, the LoRA bias as PEFT adds it (``s * b_B``)."""
        bias = self.get_base_layer().bias
        if self.lora_bias.get(adapter, False):
            bias = bias + self.scaling[adapter] * self.lora_B[adapter].bias
        return bias

    def _is_dora(self, adapter: str) -> bool:
        return type(getattr(self, "lora_variant", {}).get(adapter)) is DoraLinearVariant

    def _noise_adapter(self) -> str | None:
        """The single active adapter that noise applies to (None when this layer has no weights for it),
        or a clear error."""
        active = list(self.active_adapters)
        if len(active) != 1:
            raise ValueError(f"Flat-LoRA noise needs exactly one active adapter, got {active}")
        adapter = active[0]
        if adapter not in self.lora_A:
            return None
        reason = _adapter_unsupported_reason(self, adapter, self.dora_supported)
        if reason is not None:
            raise NotImplementedError(reason)
        return adapter

    def _merged_row_norms(self, adapter: str) -> torch.Tensor:
        """Row norms of the adapter's merged weight (the one PEFT's ``merge`` writes), float32."""
        if self._base_is_zero3 and (self._is_dora(adapter) or isinstance(self, SVDLinear)):
            # their forward and factors (A * E, the magnitude) read partitioned parameters outside PEFT's calls
            raise NotImplementedError("DoRA and AdaLoRA over DeepSpeed ZeRO-3 partitioned weights are not supported "
                                      "by Flat-LoRA (vanilla LoRA and lora_bias are)")
        if self._is_dora(adapter):
            # m / ||W + sBA|| * (W + sBA) has rows of norm |m|
            return _whole(self.lora_magnitude_vector[adapter].weight).detach().float().abs()
        lora_A, lora_B, scaling = self._lora_factors(adapter)
        if self._base_is_zero3:  # outside a forward ZeRO-3 holds a flat slice of W per rank
            return zero3_merged_row_norms(self.get_base_layer().weight, self.fan_in_fan_out, lora_A, lora_B, scaling)
        return _merged_row_norms(self._weight_operand(), lora_A, lora_B, scaling)

    @torch.no_grad()
    def sample_noise(self, seed: int, sigma: float) -> None:
        """Draw a new perturbation for the active adapter: keep ``seed`` and ``c = sigma * ||W'||_row / sqrt(n)``
        with ``W'`` the adapter's merged weight, computed now and frozen until the next call. ``sigma == 0``
        clears the noise. A layer without weights for the active adapter keeps the sample but adds no noise."""
        check_seed(seed)
        sigma = checks.sigma(sigma)
        check_not_merged(self)
        if sigma == 0:
            self.clear_noise()
            return
        adapter = self._noise_adapter()
        row_std = None
        self._base_is_zero3 = is_zero3_partitioned(self.get_base_layer().weight)
        if adapter is not None:
            row_std = self._merged_row_norms(adapter) * (sigma / math.sqrt(self.in_features))
            # norms times sigma >= 0: finiteness is the only thing left to check
            if not bool(torch.isfinite(row_std).all()):
                raise FloatingPointError(self._nonfinite_noise_cause(adapter, self.get_base_layer().weight, sigma))
        self.noise_seed, self.noise_sigma, self.noise_adapter, self.noise_row_std = seed, sigma, adapter, row_std

    @torch.no_grad()
    def restore_noise(self, seed: int, row_std: torch.Tensor | None, sigma: float = 0.0) -> None:
        """Set a sample saved earlier (its seed and ``c``) exactly as it was: nothing is recomputed from the
        weights, so it does not matter what they are now. ``row_std=None`` clears the noise, except on a
        layer without weights for the active adapter, which keeps the sample. ``sigma`` is the sample's, for
        the redraw a later :meth:`set_adapter` makes."""
        check_seed(seed)
        sigma = checks.sigma(sigma)
        if row_std is None:
            self._reset_noise_state()
            if sigma > 0 and self._noise_adapter() is None:
                self.noise_seed, self.noise_sigma = seed, sigma
            return
        if not isinstance(row_std, torch.Tensor) or row_std.dtype != torch.float32 \
                or tuple(row_std.shape) != (self.out_features,):
            raise ValueError(f"row_std must be a float32 tensor of shape ({self.out_features},), got {row_std!r:.80}")
        check_row_std_values(row_std)
        base_weight = self.get_base_layer().weight
        self._base_is_zero3 = is_zero3_partitioned(base_weight)
        self.noise_seed, self.noise_sigma, self.noise_adapter = seed, sigma, self._noise_adapter()
        self.noise_row_std = row_std.detach().clone().to(base_weight.device)

    def _nonfinite_noise_cause(self, adapter: str, weight, sigma: float) -> str:
        factors = list(self._lora_factors(adapter)[:2])
        if self._is_dora(adapter):
            factors.append(self.lora_magnitude_vector[adapter].weight)
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            return f"the LoRA factors of adapter {adapter!r} hold NaN/inf; {nonfinite.WEIGHT_CAUSES}"
        if isinstance(weight, torch.Tensor) and not bool(torch.isfinite(weight).all()):
            return "the frozen base weight holds NaN/inf (check how the model was loaded or modified)"
        return (f"the noise std c = sigma * row norm / sqrt(in_features) overflows float32 at sigma={sigma:g}: "
                "sigma (or the schedule's factor) is far too large")

    def clear_noise(self) -> None:
        """Drop the current sample: the layer is plain LoRA until the next :meth:`sample_noise`."""
        self.noise_seed = None
        self.noise_row_std = None

    def set_adapter(self, adapter_names, *args, **kwargs) -> None:
        """PEFT's ``set_adapter``; a layer holding a sample redraws ``c`` (same seed and sigma) for the new
        adapter, so no step trains with another adapter's ``c``. With several adapters active the forward
        raises instead."""
        super().set_adapter(adapter_names, *args, **kwargs)
        active = list(self.active_adapters)
        if getattr(self, "noise_seed", None) is not None and len(active) == 1 and active[0] != self.noise_adapter:
            self.sample_noise(self.noise_seed, self.noise_sigma)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.training or self.noise_seed is None or self.disable_adapters:
            return super().forward(x, *args, **kwargs)
        check_not_merged(self)
        if kwargs.get("adapter_names") is not None:
            raise ValueError("mixed-adapter batches (adapter_names=...) cannot be trained with Flat-LoRA noise")
        if args or any(v is not None for v in kwargs.values()):
            raise TypeError(f"{type(self).__name__} got extra forward arguments it cannot pass on: "
                            f"{len(args)} positional, keywords {sorted(kwargs)}")
        adapter = self._noise_adapter()
        if adapter != self.noise_adapter:
            raise RuntimeError(f"the Flat-LoRA sample of this layer was drawn for adapter {self.noise_adapter!r}, "
                               f"but {adapter!r} is active (changed without set_adapter); call the controller's "
                               "resample()")
        if adapter is None:
            return super().forward(x)
        if self._base_is_zero3:  # found when the sample was drawn: reading the weight here would gather it
            return self._zero3_forward(x, self.noise_row_std)
        weight = self._weight_operand()
        row_std = self.noise_row_std
        if row_std.device != weight.device:
            row_std = self.noise_row_std = row_std.to(weight.device)
        if is_dtensor(weight):
            if self._is_dora(adapter):
                raise NotImplementedError("DoRA over a tensor-parallel base layer is not supported by Flat-LoRA")
            return self._tensor_parallel_forward(x, weight, row_std)
        if self._is_dora(adapter):
            return self._dora_forward(x, weight, row_std, adapter)
        dropout = self.lora_dropout[adapter]
        dropout_p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
        lora_A, lora_B, scaling = self._lora_factors(adapter)
        # row_std was checked once, when the sample was drawn
        return _flat_lora_linear(x, weight, self._bias(adapter), lora_A, lora_B, scaling, seed=self.noise_seed,
                                 row_std=row_std, dropout_p=dropout_p,
                                 path=self.path)

    def _dora_forward(self, x: torch.Tensor, weight: torch.Tensor, row_std: torch.Tensor, adapter: str) -> torch.Tensor:
        """PEFT's DoRA forward with ``W + diag(c) Z`` for ``W``, in its two forms.

        ``g = m / ||W + diag(c) Z + s B A||_row`` (norms detached, as DoRA prescribes). Without dropout
        ``y = g * (x W'^T + s x A^T B^T) + b``: the fused op once. With dropout ``x_d`` on the LoRA path,
        ``y = x W'^T + b + (g - 1) * x_d W'^T + g * s * x_d A^T B^T``: the perturbed base matmul twice.
        The result has the dtype of the perturbed matmul's output, as PEFT's has the base layer's.
        """
        lora_A, lora_B, scaling = self._lora_factors(adapter)
        seed = self.noise_seed
        norms = _merged_row_norms(weight, lora_A, lora_B, scaling, seed=seed, row_std=row_std)
        gain = self.lora_magnitude_vector[adapter].weight / norms
        bias = self.get_base_layer().bias
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, torch.nn.Identity):
            z = _flat_lora_linear(x, weight, None, lora_A, lora_B, scaling, seed=seed, row_std=row_std,
                                   path=self.path)
            y = gain * z if bias is None else gain * z + bias
            return y.to(z.dtype)
        x_lora = dropout(x)
        base = _flat_lora_linear(x, weight, bias, None, None, 0.0, seed=seed, row_std=row_std, path=self.path)
        base_dropped = _flat_lora_linear(x_lora, weight, None, None, None, 0.0, seed=seed, row_std=row_std,
                                        path=self.path)
        lora = (x_lora.to(lora_A.dtype) @ lora_A.t()) @ lora_B.t()
        return (base + (gain - 1) * base_dropped + (gain * scaling) * lora).to(base.dtype)

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
                                     noise_offset=offset, path=self.path)

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
                                     seed=self.noise_seed, row_std=row_std, path=self.path)

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
    kernels (plus ``s * b_B`` with ``lora_bias``; a DoRA adapter's forward is DoRA's on the perturbed
    weight, see the module docstring); in eval mode, with no sample or with disabled adapters, it
    is exactly PEFT's forward. A merged adapter is refused while training with noise.
    """

    peft_class = LoraLinear
    peft_name = "peft.tuners.lora.Linear"
    dora_supported = True

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, *args, path: str = "auto", **kwargs) -> None:
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        self.path = path
        if type(self.get_base_layer()).__name__ == "Conv1D" and not self.fan_in_fan_out:
            raise ValueError("a Conv1D base layer stores its weight as (in, out): set fan_in_fan_out=True "
                             "in the LoraConfig, as plain PEFT expects")
        self._reset_noise_state()

    def logical_weight(self) -> torch.Tensor:
        """The frozen base weight as an ``(out_features, in_features)`` view (see :func:`logical_weight`)."""
        return logical_weight(self)

    _weight_operand = logical_weight


class FlatSVDLinear(_FlatLoraNoise, SVDLinear):
    """Drop-in replacement for AdaLoRA's ``peft.tuners.adalora.SVDLinear`` that trains under Flat-LoRA noise.

    Its update ``s / (ranknum + 1e-5) * B (A * E)`` is vanilla LoRA with ``A * E`` for ``A``, so the
    forward is the fused op's and ``c`` comes from ``W + s / (ranknum + 1e-5) * B (A * E)``. The rank
    allocator (``update_and_allocate``, which masks ``E``) runs on the same parameters as in plain
    AdaLoRA; call it before the controller's ``step()`` so the next ``c`` sees the masked ``E``.
    """

    peft_class = SVDLinear
    peft_name = "peft.tuners.adalora.SVDLinear"

    def _lora_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        # float32 ranknum + 1e-5, as PEFT divides by it
        rank = float(self.ranknum[adapter].detach() + 1e-5)
        return self.lora_A[adapter] * self.lora_E[adapter], self.lora_B[adapter], self.scaling[adapter] / rank

    _weight_operand = logical_weight


FLAT_LORA_LAYERS: tuple[type, ...] = (FlatLoraLinear, FlatSVDLinear)

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
    layer_cls = _layer_class(layer)
    for cls in FLAT_LORA_LAYERS:
        if layer_cls is cls:
            return layer
        if layer_cls is cls.peft_class:
            return cls.from_lora_linear(layer)
    raise TypeError(f"{type(layer).__qualname__}: {noise_unsupported_reason(layer)}")
