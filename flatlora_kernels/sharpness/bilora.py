"""Bi-LoRA: an auxiliary LoRA pair carries a SAM-like perturbation, at the cost of one gradient per step.

Every LoRA layer gets an auxiliary pair ``B2 (m×r2)``, ``A2 (r2×n)`` outside the model's parameters; in
training its forward is ``y = LoRA(x) + x (B2 A2)ᵀ``, so the one backward pass gives the main factors
their descent gradient at ``W + s·BA + B2 A2`` and the auxiliary pair its gradient too. After the
window's last backward the pair takes a gradient *ascent* step, ``P2 <- P2 + ascent_lr·grad P2``, and is
then scaled back (both factors by ``sqrt(rho/norm)``) if the global norm ``sqrt(Σ_l ||B2 A2||²_F)``
exceeds ``rho``; the norm comes from ``r2×r2`` Grams, ``||BA||²_F = Σ (BᵀB)∘(AAᵀ)``, never ``m×n``.
``A2`` starts Gaussian (std ``1/sqrt(n)``, from a private generator seeded by ``seed``) and ``B2`` at
zero, so the perturbation starts at zero. In eval mode, after :meth:`BiLoRA.remove`, and in anything
saved with ``save_pretrained``, the pair is absent: it is dropped at inference.

Under DDP the auxiliary gradients are averaged over the ranks before the ascent step, so the
perturbation is the same on every rank.
"""

from __future__ import annotations

import math

import torch

from .. import checks, nonfinite
from ._common import (Backward, LossClosure, all_reduce_mean_, check_window, generator, lora_layers,
                      active_adapter, trainable)


class BiLoRA:
    """Bi-LoRA for a PEFT model.

    Args:
        model: a PEFT model; hooks are added to its LoRA ``Linear`` layers.
        rho: the radius: ``sqrt(Σ ||B2 A2||²_F) <= rho`` after every ascent step (> 0).
        ascent_lr: step size of the ascent on the auxiliary pair (> 0).
        rank: ``r2``; default: each layer's LoRA rank.
        seed: seeds ``A2``'s initialisation (the global RNG is not used).
        on_nonfinite: before the ascent step, the window's gradients (main and auxiliary) are checked:
            ``"raise"`` a ``FloatingPointError``, or ``"skip"`` (no ascent, every gradient cleared, so the
            optimizer step that follows changes nothing).
    """

    def __init__(self, model: torch.nn.Module, rho: float = 0.05, *, ascent_lr: float = 0.1,
                 rank: int | None = None, seed: int = 0, on_nonfinite: str = "raise") -> None:
        self.rho = checks.positive_real("rho", rho)
        self.on_nonfinite = nonfinite.check_policy(on_nonfinite)
        self.model = model
        self.ascent_lr = checks.positive_real("ascent_lr", ascent_lr)
        rank = checks.optional_positive_int("rank", rank)
        self.pairs: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.handles = []
        self.step_count = 0
        for index, (name, layer) in enumerate(lora_layers(model).items()):
            adapter = active_adapter(layer, name)
            lora_A = layer.lora_A[adapter].weight
            r2 = rank or lora_A.shape[0]
            n, m = layer.in_features, layer.out_features
            gen = generator(seed, 0, index, 0, lora_A.device)
            a2 = torch.randn((r2, n), generator=gen, device=lora_A.device) / math.sqrt(n)
            pair = (torch.nn.Parameter(a2.to(lora_A.dtype)),
                    torch.nn.Parameter(torch.zeros((m, r2), device=lora_A.device, dtype=lora_A.dtype)))
            self.pairs[name] = pair
            self.handles.append(layer.register_forward_hook(self._hook(pair)))

    @staticmethod
    def _hook(pair):
        a2, b2 = pair

        def hook(module, args, output):
            if not module.training:
                return None
            x = args[0].to(a2.dtype)
            return output + ((x @ a2.t()) @ b2.t()).to(output.dtype)

        return hook

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.pairs.values() for p in pair]

    @torch.no_grad()
    def perturbation_norm(self) -> float:
        """``sqrt(Σ_l ||B2 A2||²_F)`` from ``r2×r2`` Gram matrices."""
        total = sum(((b.double().t() @ b.double()) * (a.double() @ a.double().t())).sum()
                    for a, b in self.pairs.values())
        return float(torch.as_tensor(total).clamp_min(0).sqrt())

    @torch.no_grad()
    def ascent_step(self) -> bool:
        """Ascend along the accumulated auxiliary gradients, clip to ``rho``, clear the gradients. False when
        a gradient (main or auxiliary) is not finite and the step is skipped (``on_nonfinite="skip"``)."""
        params = self.parameters()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise RuntimeError("Bi-LoRA's auxiliary pair has no gradient: run the training forward and "
                               "backward (model.train()) before ascent_step()")
        all_reduce_mean_(grads)
        auxiliary = {f"{name}.auxiliary_{kind}": p for name, pair in self.pairs.items() for kind, p in zip("AB", pair)}
        checked = {**trainable(self.model), **auxiliary}
        if not nonfinite.guard_gradients("Bi-LoRA", self.on_nonfinite, checked, self.step_count):
            return False
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=self.ascent_lr)
                p.grad = None
        norm = self.perturbation_norm()
        if norm > self.rho:
            shrink = math.sqrt(self.rho / norm)
            for p in params:
                p.mul_(shrink)
        self.step_count += 1
        return True

    def accumulate(self, closure: LossClosure, *, last: bool = True, window: int = 1,
                   backward: Backward = torch.Tensor.backward) -> torch.Tensor:
        """One micro-batch: backpropagate ``L_k / window`` (main and auxiliary gradients at once); after
        the last one, the auxiliary ascent step. Returns the loss."""
        check_window(last, window)
        loss = closure()
        backward(loss / window)
        if last:
            self.ascent_step()
        return loss.detach()

    def step(self) -> None:
        """Nothing to advance after the optimizer step (the ascent happens in :meth:`accumulate`)."""

    def remove(self) -> None:
        """Drop the auxiliary pair from the model's forward for good (inference)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def state_dict(self) -> dict:
        return {"step": self.step_count, "rho": self.rho, "ascent_lr": self.ascent_lr,
                "pairs": {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in self.pairs.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["pairs"].keys() != self.pairs.keys():
            raise ValueError("Bi-LoRA state was saved for different LoRA layers")
        for name, (a, b) in self.pairs.items():
            saved_a, saved_b = state["pairs"][name]
            a.copy_(saved_a)
            b.copy_(saved_b)
        self.step_count = checks.nonnegative_int("step", state["step"])
