"""Helpers shared by the sharpness-aware methods: exact restore, seeded generators, DDP, checks."""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, ContextManager, Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear

from .. import nonfinite
from ..noise import layer_seed

LossClosure = Callable[[], torch.Tensor]
Backward = Callable[[torch.Tensor], None]


def check_window(last: bool, window: int) -> None:
    if not isinstance(last, bool):
        raise TypeError(f"last must be a bool, got {last!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window (micro-batches per optimizer step) must be a positive int, got {window!r}")


def sam_window(method, closure: LossClosure, last: bool, window: int, backward: Backward,
               first_pass: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """The SAM family's micro-batch: backpropagate ``L_k / window`` (inside ``first_pass()``); on the last
    micro-batch, the second pass inside ``method.perturbed()`` (skipped when it yields False)."""
    check_window(last, window)
    with first_pass():
        loss = closure()
        backward(loss / window)
    if last:
        with method.perturbed() as moved:
            if moved:
                backward(closure())
    return loss.detach()


def nonfinite_norm(policy: str, what: str) -> None:
    """Raise, or warn that the step is skipped, for a non-finite gradient norm of the first pass."""
    nonfinite.report(policy, f"non-finite gradient ({what}); {nonfinite.GRADIENT_CAUSES}",
                     skipped="this step is skipped (no perturbation, gradients cleared)")


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``model`` that require grad, by name (what the optimizer steps)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class Snapshot:
    """Exact copies of tensors taken before they are perturbed; :meth:`restore` writes the copies back,
    so the values are bit for bit the ones saved (never ``theta += e; theta -= e``)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            self.pairs = [(t, t.detach().clone()) for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in self.pairs:
            tensor.copy_(saved)
        self.pairs = []


def generator(seed: int, sample: int, index: int, rank_tag: int, device: torch.device) -> torch.Generator:
    """A private generator for tensor ``index`` of sample ``sample``; the global RNG is never used."""
    gen = torch.Generator(device=device)
    gen.manual_seed(layer_seed(seed, sample, index, rank_tag))
    return gen


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over the ranks in place (nothing without ``torch.distributed``)."""
    if not distributed():
        return
    world = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(world)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(rows, cols)`` tensor along the rows (row counts may differ)."""
    if not distributed():
        return t
    world = torch.distributed.get_world_size()
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch.distributed.all_gather(counts, count)
    rows = max(int(c) for c in counts)
    padded = t.new_zeros((rows, t.shape[1]))
    padded[:t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[:int(c)] for g, c in zip(gathered, counts)])


def rank_tag(per_rank: bool) -> int:
    """``rank + 1`` for per-rank randomness, 0 for randomness shared by all ranks (as Flat-LoRA)."""
    return torch.distributed.get_rank() + 1 if per_rank and distributed() else 0


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLinear]:
    """The PEFT LoRA ``Linear`` layers of ``model`` (``FlatLoraLinear`` included), by name."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    if not layers:
        raise ValueError("the model has no PEFT LoRA Linear layers: wrap it with peft.get_peft_model first")
    return layers


def active_adapter(layer: LoraLinear, name: str) -> str:
    active = list(layer.active_adapters)
    if len(active) != 1 or active[0] not in layer.lora_A:
        raise ValueError(f"{name}: the sharpness-aware methods need exactly one active LoRA adapter, got {active}")
    return active[0]


def lora_factors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable ``lora_A``/``lora_B`` weights of every LoRA layer, by parameter name."""
    factors = {}
    for name, layer in lora_layers(model).items():
        adapter = active_adapter(layer, name)
        for kind in ("lora_A", "lora_B"):
            p = getattr(layer, kind)[adapter].weight
            if p.requires_grad:
                factors[f"{name}.{kind}.{adapter}.weight"] = p
    if not factors:
        raise ValueError("no LoRA factor of the model requires grad")
    return factors
