"""One policy for non-finite values, shared by Flat-LoRA and every sharpness-aware method.

``on_nonfinite="raise"`` (the default everywhere) stops the run with a ``FloatingPointError`` that names
the tensor, the step and the likely cause; ``"skip"`` makes the step change nothing: the gradients of
every parameter the optimizer would update are cleared (``p.grad = None``, which torch optimizers skip
entirely, state included) and the method's own state (step count, noise sample) does not advance.

The check runs where it is cheap and early: on the gradients of a window, after its last backward and
before the optimizer writes them into the weights. It costs one reduction per tensor and one
device-to-host read for the whole set (:func:`first_nonfinite`).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch

POLICIES = ("raise", "skip")

# What usually puts NaN/inf into a gradient when the weights are still finite.
GRADIENT_CAUSES = ("likely causes: a NaN/inf in the input batch; a loss that overflowed; or, under float16 "
                   "without a GradScaler, a noise level (sigma) or radius (rho) too large for float16")
# What usually puts NaN/inf into the weights themselves.
WEIGHT_CAUSES = ("likely cause: the learning rate is too large (the last optimizer step overflowed the "
                 "factors), or a non-finite gradient reached the optimizer unchecked")


def check_policy(on_nonfinite: str) -> str:
    """``on_nonfinite`` if it is ``"raise"`` or ``"skip"``; a ``ValueError`` otherwise."""
    if on_nonfinite not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
    return on_nonfinite


def first_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or inf, or None when all are finite.

    The fast path is one max-abs reduction per tensor (``_foreach_norm`` with ``ord=inf`` propagates NaN)
    and a single read of the result; only a failing set is searched tensor by tensor.
    """
    if not named:
        return None
    tensors = [t.detach() for _, t in named]
    peaks = torch._foreach_norm(tensors, float("inf"))
    if bool(torch.stack([p.float().to(peaks[0].device) for p in peaks]).isfinite().all()):
        return None
    return next(name for (name, _), t in zip(named, tensors) if not bool(torch.isfinite(t).all()))


def clear_gradients(params: Iterable[torch.Tensor]) -> None:
    """``p.grad = None`` for every parameter: a torch optimizer step then changes neither them nor its state."""
    for p in params:
        p.grad = None


def gradient_problem(owner: str, named_grads: Sequence[tuple[str, torch.Tensor]],
                     named_weights: Sequence[tuple[str, torch.Tensor]], step: int) -> str | None:
    """The message for the first non-finite gradient, or None when every gradient is finite. The weights
    are searched only then: a non-finite weight is the deeper cause and is named instead."""
    grad = first_nonfinite(named_grads)
    if grad is None:
        return None
    weight = first_nonfinite(named_weights)
    if weight is not None:
        return f"{owner}: {weight} holds NaN/inf at optimizer step {step + 1}; {WEIGHT_CAUSES}"
    return f"{owner}: the gradient of {grad} holds NaN/inf at optimizer step {step + 1}; {GRADIENT_CAUSES}"


def report(policy: str, message: str, *, skipped: str = "this step is skipped (it changes nothing)") -> None:
    """Raise ``FloatingPointError(message)``, or warn that the step is skipped."""
    if policy == "raise":
        raise FloatingPointError(message + ". Pass on_nonfinite='skip' to skip such steps instead")
    warnings.warn(f"{message}: {skipped}", RuntimeWarning, stacklevel=3)


def guard_gradients(owner: str, policy: str, params: dict[str, torch.Tensor], step: int,
                    clear: Iterable[torch.Tensor] = ()) -> bool:
    """Check ``params``' gradients (and the parameters) before an optimizer step: True when finite. Otherwise
    raise, or (``"skip"``) clear the gradients of ``params`` and ``clear`` and return False."""
    named_grads = [(name, p.grad) for name, p in params.items() if p.grad is not None]
    message = gradient_problem(owner, named_grads, list(params.items()), step)
    if message is None:
        return True
    report(policy, message)
    clear_gradients(list(params.values()) + list(clear))
    return False
