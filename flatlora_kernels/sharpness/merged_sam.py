"""SAM on the merged weight ``W' = W + s·BA`` of every LoRA layer, without an m×n tensor.

For a linear layer the gradient of the merged weight is ``G = dYᵀ X`` (``X``: the layer's input rows,
``dY``: the gradient of its output rows, over every token of the first pass). SAM's perturbation
``e_W = rho·G/||G||``, normalised over all LoRA layers together, enters the second forward only as

    x e_Wᵀ = (rho/||G||) · (x Xᵀ) dY          and   ||G||²_F = Σ (X Xᵀ) ∘ (dY dYᵀ)

so the method keeps ``X`` and ``dY`` (``T·(m + n)`` numbers per layer for ``T`` first-pass tokens) and
``T×T`` Gram matrices, never ``m×n``; the backward of the extra term is autograd's
``(rho/||G||)·(dY' dYᵀ) X``. Extra cost of the second pass per layer: about ``2·T'·T·(m + n)`` flops
against the layer's own ``2·T'·m·n``, and ``T·(m + n)`` memory against ``m·n`` for a materialised
``e_W``: worth it while ``T < m·n/(m + n)`` (192 tokens for a 384×384 layer, 2048 for 4096×4096);
beyond that, materialising ``e_W`` would be cheaper in time and memory.

With gradient accumulation the first pass of every micro-batch is recorded (``G`` is the window's
accumulated gradient; ``e_W`` does not depend on the loss scale) and the second pass runs on the
last micro-batch. Under DDP ``X`` and ``dY`` are gathered from every rank, so ``e_W`` comes from the
all-reduced gradient and is the same on every rank. Nothing is written to any weight.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .. import checks, nonfinite
from ..nonfinite import check_policy, clear_gradients
from ._common import Backward, LossClosure, all_gather_rows, lora_layers, nonfinite_norm, sam_window, trainable


class _Record:
    """The first-pass inputs and output gradients of one layer, one entry per forward call."""

    def __init__(self) -> None:
        self.entries: list[list[torch.Tensor | None]] = []

    def rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        done = [(x, dy) for x, dy in self.entries if dy is not None]
        if not done:
            return None
        return torch.cat([x for x, _ in done]), torch.cat([dy for _, dy in done])


class MergedSAM:
    """SAM in the full weight space of a PEFT model's LoRA layers (``nn.Linear``/``Conv1D`` bases).

    ::

        msam = fk.MergedSAM(peft_model, rho=0.05)
        with msam.capture():                  # first pass: records X and dY of every LoRA layer
            loss_fn(model).backward()
        optimizer.zero_grad()
        with msam.perturbed():                # second pass at W + s·BA + e_W
            loss_fn(model).backward()
        optimizer.step()

    or ``msam.accumulate(closure, last=..., window=...)`` per micro-batch (the gradients it leaves are
    those of the second pass). ``on_nonfinite`` as in :class:`flatlora_kernels.SAMPerturber`.
    """

    def __init__(self, model: torch.nn.Module, rho: float = 0.05, *, on_nonfinite: str = "raise") -> None:
        self.rho = checks.positive_real("rho", rho)
        self.on_nonfinite = check_policy(on_nonfinite)
        self.model = model
        self.layers = lora_layers(model)
        self.records = {name: _Record() for name in self.layers}
        self._capturing = False
        self.second_passes = 0  # completed perturbed passes: the step number in messages

    @property
    def params(self) -> list[torch.Tensor]:
        return list(trainable(self.model).values())

    def _capture_hook(self, name: str):
        record = self.records[name]

        def hook(module, args, output):
            if not (self._capturing and output.requires_grad):
                return None
            entry = [args[0].detach().reshape(-1, args[0].shape[-1]), None]
            record.entries.append(entry)

            def keep_grad(grad):
                entry[1] = grad.detach().reshape(-1, grad.shape[-1])

            output.register_hook(keep_grad)
            return None

        return hook

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record ``X`` and ``dY`` of every LoRA layer for the passes (forward and backward) inside;
        records accumulate until the next :meth:`perturbed` consumes them."""
        handles = [layer.register_forward_hook(self._capture_hook(name)) for name, layer in self.layers.items()]
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
            for handle in handles:
                handle.remove()

    def recorded_tensors(self) -> list[torch.Tensor]:
        """Every tensor the method holds (for memory checks)."""
        return [t for record in self.records.values() for entry in record.entries for t in entry if t is not None]

    @torch.no_grad()
    def _factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``(X, dY)`` per layer (gathered over ranks) and the scale ``rho/||G||``, or None to skip."""
        rows = {}
        for name, record in self.records.items():
            pair = record.rows()
            if pair is not None:
                rows[name] = tuple(all_gather_rows(t) for t in pair)
            record.entries = []
        if not rows:
            raise RuntimeError("MergedSAM recorded no gradients: run the first forward and backward inside "
                               "capture() before perturbed()")
        squared = sum(((x.double() @ x.double().t()) * (dy.double() @ dy.double().t())).sum()
                      for x, dy in rows.values())
        if not bool(torch.isfinite(squared)):
            nonfinite_norm(self.on_nonfinite, "the merged-weight gradient norm is NaN or inf at step "
                           f"{self.second_passes + 1}")
            return None
        norm = float(squared.clamp_min(0).sqrt())
        scale = self.rho / norm if norm > 0 else 0.0
        return {name: (x, dy * scale) for name, (x, dy) in rows.items()}

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[bool]:
        """The second pass at ``W + s·BA + e_W`` (forward and backward inside), gradients cleared on
        entry. Yields False, with the gradients cleared and nothing perturbed, when skipped. On exit the
        gradients of the pass are checked before any optimizer sees them (``on_nonfinite``)."""
        factors = self._factors()
        clear_gradients(self.params)
        if factors is None:
            yield False
            return

        def perturb_hook(saved_x, scaled_dy):
            def hook(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1])
                extra = (x.to(saved_x.dtype) @ saved_x.t()) @ scaled_dy
                return output + extra.reshape(output.shape).to(output.dtype)

            return hook

        handles = [self.layers[name].register_forward_hook(perturb_hook(*pair)) for name, pair in factors.items()]
        try:
            yield True
        finally:
            for handle in handles:
                handle.remove()
        nonfinite.guard_gradients("MergedSAM (perturbed pass)", self.on_nonfinite, trainable(self.model),
                                  self.second_passes)
        self.second_passes += 1

    def accumulate(self, closure: LossClosure, *, last: bool = True, window: int = 1,
                   backward: Backward = torch.Tensor.backward) -> torch.Tensor:
        """One micro-batch: record and backpropagate ``L_k / window``; on the last one, clear the
        gradients and backpropagate ``L(W' + e_W; B_N)``, ``e_W`` from the window's accumulated
        merged-weight gradient. Returns the clean loss of this micro-batch."""
        return sam_window(self, closure, last, window, backward, self.capture)

    def step(self) -> None:
        """Nothing to advance between steps."""

    def state_dict(self) -> dict:
        return {"rho": self.rho}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rho", self.rho) != self.rho:
            raise ValueError(f"MergedSAM state was saved with rho={state['rho']}, this run has {self.rho}")
