"""The layers a flatness measure looks at, and evaluating the model with their forwards swapped.

A :class:`Target` is one measured linear layer: a PEFT LoRA ``Linear`` (one active, unmerged adapter)
or, with ``include_all_linear=True``, a plain ``nn.Linear``. It hands out its parts and its merged
weight ``W' = W + s·BA``. :func:`patched_forwards` gives each target a temporary forward (an explicit
merged weight, regenerated noise, or another adapter); :func:`mean_loss` then averages the user's
``loss_fn(model, batch)`` over the batches. The helpers shared by every measure (argument checks,
eval mode, progress bars) live here too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear

from .. import checks
from ..layer import logical_weight

LossFn = Callable[[torch.nn.Module, object], torch.Tensor]


@dataclass
class Target:
    """One measured linear layer: its qualified name in the model and the module itself."""

    name: str
    module: torch.nn.Module

    def parts(self):
        """(logical weight (m, n), bias, lora_A, lora_B, scaling) with the LoRA factors possibly None."""
        module = self.module
        if isinstance(module, LoraLinear):
            adapter = module.active_adapters[0]
            return (logical_weight(module), module.get_base_layer().bias, module.lora_A[adapter].weight,
                    module.lora_B[adapter].weight, module.scaling[adapter])
        return module.weight, module.bias, None, None, 0.0

    def merged(self) -> torch.Tensor:
        """The merged weight ``W + s·BA`` in fp32, detached."""
        weight, _, lora_A, lora_B, scaling = self.parts()
        merged = weight.detach().float()
        if lora_A is not None:
            merged = merged + scaling * (lora_B.detach().float() @ lora_A.detach().float())
        return merged


def merged_targets(model: torch.nn.Module, include_all_linear: bool = False) -> list[Target]:
    """The LoRA linear layers of ``model`` (and, if asked, every other ``nn.Linear``), in module order."""
    targets, inside_lora = [], set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            if len(module.active_adapters) != 1 or module.merged:
                raise ValueError(f"{name}: flatness needs exactly one active, unmerged adapter")
            targets.append(Target(name, module))
            inside_lora.update(id(m) for m in module.modules())
    if include_all_linear:
        targets += [Target(n, m) for n, m in model.named_modules()
                    if type(m) is torch.nn.Linear and id(m) not in inside_lora]
    if not targets:
        raise ValueError("the model has no LoRA linear layers to measure (pass include_all_linear=True "
                         "to measure its plain linear layers)")
    return targets


@contextlib.contextmanager
def patched_forwards(targets: list[Target], forward_for: Callable[[int, Target], Callable]):
    """Temporarily give each target layer its own forward (instance attribute), then restore it."""
    try:
        for index, target in enumerate(targets):
            target.module.forward = forward_for(index, target)
        yield
    finally:
        for target in targets:
            target.module.__dict__.pop("forward", None)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluate without dropout, then give the model back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def mean_loss(model: torch.nn.Module, loss_fn: LossFn, batches: Sequence) -> torch.Tensor:
    """``loss_fn(model, batch)`` averaged over ``batches`` (a scalar tensor, differentiable)."""
    total = None
    for batch in batches:
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError("loss_fn(model, batch) must return a scalar tensor")
        total = loss if total is None else total + loss
    return total / len(batches)


def checked_batches(batches: Iterable, **positive: int) -> list:
    """``batches`` as a non-empty list, after checking that each keyword argument is a positive int."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the measures need at least one batch")
    for name, value in positive.items():
        checks.positive_int(name, value)
    return batches


def progress_bar(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """``iterable`` wrapped in a transient tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
