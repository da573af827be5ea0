"""SAM and adaptive SAM on the trainable parameters, globally or per tensor (the LoRA-SAM form).

With ``g`` the gradient at ``theta`` and ``rho`` the radius:

* SAM:  ``e = rho * g / ||g||``;
* ASAM: ``e_i = rho * |theta_i|**2 * g_i / || |theta| * g ||`` (scale-invariant radius; a factor at
  zero, such as LoRA's initial ``B``, is not perturbed until it moves);
* ``per_tensor=False``: ``||.||`` over all perturbed tensors together (SAM's); ``per_tensor=True``:
  each tensor by its own norm (LoRA-SAM: ``e_A = rho g_A/||g_A||``, ``e_B = rho g_B/||g_B||``).

The second forward/backward runs at ``theta + e``; then ``theta`` is written back from an exact copy
and the base optimizer steps with the gradient taken at ``theta + e``. A zero gradient norm gives
``e = 0``. Parameters without a gradient are left alone (as torch optimizers do); if none has one, or a
perturbed parameter gets none in the second pass, that is an error.

Under DDP the first backward all-reduces ``g``, so ``e`` is the same on every rank.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator

import torch

from .. import checks, nonfinite
from ..nonfinite import check_policy, clear_gradients
from ._common import Backward, LossClosure, Snapshot, nonfinite_norm, sam_window


def _norm_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class SAMPerturber:
    """The SAM/ASAM perturbation of parameter groups (dicts with ``"params"`` and ``"rho"``).

    Use it with any optimizer: :meth:`accumulate` runs one micro-batch of a gradient-accumulation
    window; :meth:`perturbed` is the second pass by hand. :class:`SAM` wraps it into an optimizer.

    Args:
        params: parameters, or parameter groups each with its own ``"rho"``.
        rho: radius (> 0) for groups that do not set one.
        adaptive: ASAM instead of SAM.
        per_tensor: normalise each tensor by its own norm instead of all together.
        on_nonfinite: ``"raise"`` (``FloatingPointError``) or ``"skip"`` (warn, no perturbation, clear
            the gradients so the optimizer step that follows changes nothing) on a NaN/inf gradient, of the
            first pass (its norm) or of the second, perturbed pass (checked before the optimizer sees it).
    """

    def __init__(self, params: Iterable, rho: float = 0.05, *, adaptive: bool = False, per_tensor: bool = False,
                 on_nonfinite: str = "raise") -> None:
        rho = checks.positive_real("rho", rho)
        params = list(params)
        if not params:
            raise ValueError("SAM got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.groups = []
        for group in groups:
            tensors = list(group["params"])
            if any(not isinstance(p, torch.Tensor) for p in tensors):
                raise TypeError("SAM params must be tensors or parameter-group dicts")
            self.groups.append({**group, "params": tensors,
                                "rho": checks.positive_real("rho", group.get("rho", rho))})
        if not isinstance(adaptive, bool) or not isinstance(per_tensor, bool):
            raise TypeError("adaptive and per_tensor must be bools")
        self.adaptive = adaptive
        self.per_tensor = per_tensor
        self.on_nonfinite = check_policy(on_nonfinite)
        self._snapshot: Snapshot | None = None
        self.second_passes = 0  # completed perturbed passes: the step number in messages

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.groups for p in group["params"]]

    @property
    def active(self) -> bool:
        """True between :meth:`perturb` and :meth:`restore`."""
        return self._snapshot is not None

    @torch.no_grad()
    def perturbations(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, e)`` for every parameter with a gradient, from the gradients now; ``[]`` when a
        gradient norm is not finite and ``on_nonfinite="skip"``."""
        entries = [(p, group["rho"]) for group in self.groups for p in group["params"] if p.grad is not None]
        if not entries:
            raise RuntimeError("SAM found no gradients: run loss.backward() before the first step "
                               "(no parameter it was given has a .grad)")
        scaled = [(p.grad * p.abs() if self.adaptive else p.grad).to(_norm_dtype(p)) for p, _ in entries]
        norms = torch.stack([torch.linalg.vector_norm(t).double() for t in scaled])
        if not bool(torch.isfinite(norms).all()):
            nonfinite_norm(self.on_nonfinite, f"the SAM gradient norm is NaN or inf at step {self.second_passes + 1}")
            return []
        if not self.per_tensor:
            norms = torch.linalg.vector_norm(norms).expand(len(entries))
        result = []
        for (p, rho), t, norm in zip(entries, scaled, norms.tolist()):
            factor = rho / norm if norm > 0 else 0.0
            direction = t * p.abs() if self.adaptive else t  # ASAM: |theta|^2 g
            result.append((p, (factor * direction).to(p.dtype)))
        return result

    @torch.no_grad()
    def perturb(self) -> bool:
        """Save ``theta`` and move to ``theta + e``; False (nothing moved) when the step is skipped."""
        if self.active:
            raise RuntimeError("SAM is already at theta + e: call restore() (second_step) before perturbing again")
        entries = self.perturbations()
        if not entries:
            clear_gradients(self.params)
            return False
        self._snapshot = Snapshot([p for p, _ in entries])
        for p, e in entries:
            p.add_(e)
        return True

    def restore(self) -> list[torch.Tensor]:
        """Write ``theta`` back, bit for bit; returns the parameters that were perturbed."""
        if not self.active:
            raise RuntimeError("SAM second step without a first step: there is no perturbation to remove")
        moved = [t for t, _ in self._snapshot.pairs]
        self._snapshot.restore()
        self._snapshot = None
        return moved

    def check_second_gradients(self, moved: list[torch.Tensor]) -> bool:
        """After the perturbed pass, before the optimizer: every perturbed parameter has a gradient, and all
        are finite (True); a non-finite one raises, or with ``"skip"`` clears the gradients (False)."""
        missing = sum(p.grad is None for p in moved)
        if missing:
            raise RuntimeError(f"{missing} perturbed parameters got no gradient in the second pass: the closure "
                               "must recompute the loss and call backward()")
        named = {f"parameter {i} {tuple(p.shape)}": p for i, p in enumerate(self.params)}
        finite = nonfinite.guard_gradients("SAM (perturbed pass)", self.on_nonfinite, named, self.second_passes)
        self.second_passes += 1
        return finite

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[bool]:
        """The second pass: at ``theta + e`` with the gradients cleared; on exit ``theta`` is restored.
        Yields False (and perturbs nothing) when the step is skipped."""
        moved_now = self.perturb()
        if moved_now:
            clear_gradients(self.params)
        try:
            yield moved_now
        except BaseException:
            if moved_now:
                self.restore()  # theta comes back even when the second pass fails
            raise
        if moved_now:
            self.check_second_gradients(self.restore())

    def accumulate(self, closure: LossClosure, *, last: bool = True, window: int = 1,
                   backward: Backward = torch.Tensor.backward) -> torch.Tensor:
        """One micro-batch of a window of ``window``: backpropagate ``L_k / window``; on the last one take
        ``e`` from the accumulated ``g = (1/N) sum_k grad L(theta; B_k)``, clear the gradients and
        backpropagate ``L(theta + e; B_N)`` (the last micro-batch only, unscaled). The optimizer then
        steps with ``grad L(theta + e; B_N)``. Returns the clean loss of this micro-batch."""
        return sam_window(self, closure, last, window, backward)

    def step(self) -> None:
        """Nothing to advance between steps (present so every method has the same interface)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around any torch optimizer.

    ``fk.SAM(params, torch.optim.AdamW, rho=0.05, adaptive=False, per_tensor=False, lr=1e-3)``::

        loss_fn().backward()
        opt.first_step(zero_grad=True)    # theta + e
        loss_fn().backward()
        opt.second_step(zero_grad=True)   # theta back (bitwise), base step with grad at theta + e

    or ``loss_fn().backward(); opt.step(closure)`` with a closure that recomputes the loss and calls
    ``backward``. ``per_tensor=True`` on the LoRA factors is LoRA-SAM. ``rho`` may differ per
    parameter group. The state dict is the base optimizer's (its groups carry ``rho``); saving or
    loading between the two steps is an error. See :class:`SAMPerturber` for ``on_nonfinite``.
    """

    def __init__(self, params: Iterable, base_optimizer_cls: type, rho: float = 0.05, *deprecated_positional,
                 adaptive: bool = False, per_tensor: bool = False, on_nonfinite: str = "raise",
                 **optimizer_kwargs) -> None:
        if deprecated_positional:  # adaptive, per_tensor, on_nonfinite were positional before 0.2
            names = ("adaptive", "per_tensor", "on_nonfinite")
            if len(deprecated_positional) > len(names):
                raise TypeError(f"SAM takes at most 3 positional arguments after params, got "
                                f"{3 + len(deprecated_positional)}")
            warnings.warn(f"SAM: passing {', '.join(names[:len(deprecated_positional)])} by position is deprecated: "
                          "use keywords (as SAMPerturber does)", DeprecationWarning, stacklevel=2)
            adaptive, per_tensor, on_nonfinite = (tuple(deprecated_positional)
                                                  + (adaptive, per_tensor, on_nonfinite)[len(deprecated_positional):])
        if not callable(base_optimizer_cls) or (isinstance(base_optimizer_cls, type)
                                                and not issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(f"SAM's base_optimizer_cls must be a torch.optim.Optimizer class such as "
                            f"torch.optim.AdamW (SAM builds it), got {base_optimizer_cls!r}")
        rho = checks.positive_real("rho", rho)
        super().__init__(params, {"rho": rho, **optimizer_kwargs})
        self.base_optimizer = base_optimizer_cls(self.param_groups, **optimizer_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.perturber = SAMPerturber(self.param_groups, rho, adaptive=adaptive, per_tensor=per_tensor,
                                      on_nonfinite=on_nonfinite)
        self._skipped = False

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``theta + e`` computed from the current gradients."""
        if self.perturber.active:
            raise RuntimeError("first_step called twice: call second_step before the next first_step")
        self.perturber.groups = self.param_groups  # rho may have been changed by a scheduler
        self._skipped = not self.perturber.perturb()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``theta`` exactly and step the base optimizer with the gradient at ``theta + e``."""
        if self._skipped:
            self._skipped = False
            self.zero_grad()
            return
        if not self.perturber.check_second_gradients(self.perturber.restore()):
            return  # the perturbed pass was not finite and on_nonfinite="skip": no base step
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """``first_step``, ``closure()`` (forward and backward at ``theta + e``), ``second_step``.
        The gradient at ``theta`` must already be there (call ``loss.backward()`` first)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward() "
                             "(SAM evaluates the gradient twice); or call first_step() and second_step()")
        self.first_step(zero_grad=True)
        if self._skipped:
            return self.second_step()
        with torch.enable_grad():
            closure()
        self.second_step()

    def state_dict(self) -> dict:
        if self.perturber.active:
            raise RuntimeError("SAM state saved between first_step and second_step, while theta is perturbed")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self.perturber.active:
            raise RuntimeError("SAM state loaded between first_step and second_step, while theta is perturbed")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
