"""Random weight perturbation (RWP) with a mixed clean/noisy gradient, on the merged weight or on A, B.

The gradient of one optimizer step is ``lambda·grad L(theta + e; B_1) + (1 - lambda)·grad L(theta; B_2)``
with filter-wise Gaussian ``e`` (row ``i`` of a matrix with ``n`` columns has std
``sigma_t·||row_i||/sqrt(n)``, Flat-LoRA's scaling), and ``B_2 = B_1`` (one batch) or a second batch.

Scopes:

* ``"merged"``: ``e`` on the merged weight ``W + s·BA`` of every LoRA layer, by this package's fused
  kernels through a :class:`flatlora_kernels.FlatLora` controller: the noise is regenerated from a seed,
  never stored, and the clean pass runs inside ``controller.noise_disabled()``. Nothing is written.
* ``"lora"``: ``e_A``, ``e_B`` on the LoRA factors (each row scaled by its own norm and fan-in), drawn
  from private generators seeded with ``layer_seed(seed, sample, index, rank_tag)`` (``index``: the
  factor's position in :attr:`RWP.params`); the factors are restored from exact copies after the pass.

Noise level, schedule (``"constant"`` by default here), resampling, seed and per-rank noise come from a
:class:`flatlora_kernels.FlatLoraConfig`, in both scopes; call :meth:`RWP.step` after each optimizer step.
Under DDP the noise is per rank with ``per_rank_noise=True`` (the default) and the gradients are
all-reduced by DDP as usual.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from .. import checks, nonfinite
from ..config import FlatLoraConfig, resolve_config, schedule_factor
from ..controller import apply_flat_lora
from ._common import Backward, LossClosure, Snapshot, check_window, generator, lora_factors, rank_tag, trainable

SCOPES = ("merged", "lora")


class RWP:
    """RWP for a PEFT model. ``lam`` (in ``[0, 1]``) weights the noisy gradient.

    Window of ``N`` micro-batches (:meth:`accumulate`), the exact weighting:

    * ``N = 1`` (one batch): ``lam·grad L(theta + e; B) + (1 - lam)·grad L(theta; B)``, two passes;
    * ``N >= 2``: micro-batches ``1..N-1`` clean, micro-batch ``N`` noisy, one pass each:
      ``lam·grad L(theta + e; B_N) + (1 - lam)/(N - 1)·sum_{k<N} grad L(theta; B_k)``. With ``N = 2``
      this is the two-batch variant (:meth:`two_batch`).

    Args:
        model: a PEFT model (its LoRA ``Linear`` layers are driven).
        config: a :class:`FlatLoraConfig`, or its fields as keywords (``sigma``, ``schedule`` defaults
            to ``"constant"``, ``total_steps``, ``resample_every``, ``seed``, ``per_rank_noise``).
        lam: weight of the noisy gradient.
        scope: ``"merged"`` or ``"lora"``.
        on_nonfinite: after the window's last backward the gradients are checked before the optimizer
            sees them: ``"raise"`` a ``FloatingPointError``, or ``"skip"`` (gradients cleared, so the
            optimizer step changes nothing, and the next :meth:`step` keeps the sample).
    """

    def __init__(self, model: torch.nn.Module, config: FlatLoraConfig | None = None, *, lam: float = 0.5,
                 scope: str = "merged", on_nonfinite: str = "raise", **options) -> None:
        config = resolve_config(config, options, defaults={"schedule": "constant"}, owner="RWP")
        config.require_total_steps()
        self.lam = checks.probability("lam", lam, include_one=True)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.on_nonfinite = nonfinite.check_policy(on_nonfinite)
        self._hold_next_step = False
        self.config = config
        self.model = model
        self.step_count = 0
        self.controller = apply_flat_lora(model, config, strict=True) if scope == "merged" else None
        self.factors = lora_factors(model) if scope == "lora" else {}

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.factors.values())

    @property
    def sigma_t(self) -> float:
        if self.controller is not None:
            return self.controller.sigma_t
        sample = self.step_count // self.config.resample_every
        return self.config.sigma * schedule_factor(self.config.schedule, sample * self.config.resample_every,
                                                   self.config.total_steps)

    @torch.no_grad()
    def factor_noise(self) -> list[torch.Tensor]:
        """``[e_A, e_B, ...]`` of the current sample for the ``"lora"`` scope (from the factors now)."""
        if self.scope != "lora":
            raise ValueError("factor_noise is for scope='lora'; the merged scope regenerates its noise in the kernels")
        sample = self.step_count // self.config.resample_every
        tag = rank_tag(self.config.per_rank_noise)
        noise = []
        for index, p in enumerate(self.factors.values()):
            dtype = torch.promote_types(p.dtype, torch.float32)
            z = torch.randn(p.shape, generator=generator(self.config.seed, sample, index, tag, p.device),
                            device=p.device, dtype=torch.float32).to(dtype)
            row_std = p.detach().to(dtype).norm(dim=1, keepdim=True) * (self.sigma_t / math.sqrt(p.shape[1]))
            noise.append((row_std * z).to(p.dtype))
        return noise

    @contextlib.contextmanager
    def clean(self) -> Iterator[None]:
        """Passes (forward and backward) at ``theta``."""
        if self.controller is None:
            yield
        else:
            with self.controller.noise_disabled():
                yield

    @contextlib.contextmanager
    def noisy(self) -> Iterator[None]:
        """Passes (forward and backward) at ``theta + e``; the factors are restored exactly on exit."""
        if self.controller is not None:
            yield
            return
        snapshot = Snapshot(self.params)
        with torch.no_grad():
            for p, e in zip(self.params, self.factor_noise()):
                p.add_(e)
        try:
            yield
        finally:
            snapshot.restore()

    def accumulate(self, closure: LossClosure, *, last: bool = True, window: int = 1,
                   backward: Backward = torch.Tensor.backward) -> torch.Tensor:
        """One micro-batch of a window of ``window`` (weighting in the class docstring); gradients add
        up in ``.grad``. Returns the loss of this micro-batch's first pass."""
        check_window(last, window)
        if window == 1:
            with self.clean():
                loss = closure()
                backward((1.0 - self.lam) * loss)
            with self.noisy():
                backward(self.lam * closure())
        elif not last:
            with self.clean():
                loss = closure()
                backward((1.0 - self.lam) / (window - 1) * loss)
        else:
            with self.noisy():
                loss = closure()
                backward(self.lam * loss)
        if last:
            finite = nonfinite.guard_gradients(f"RWP ({self.scope})", self.on_nonfinite, trainable(self.model),
                                               self.step_count)
            self._hold_next_step = not finite
        return loss.detach()

    def two_batch(self, noisy_closure: LossClosure, clean_closure: LossClosure,
                  backward: Backward = torch.Tensor.backward) -> torch.Tensor:
        """``lam·grad L(theta + e; B_1) + (1 - lam)·grad L(theta; B_2)``: the clean batch's closure,
        then the noisy one's. Returns the noisy loss."""
        self.accumulate(clean_closure, last=False, window=2, backward=backward)
        return self.accumulate(noisy_closure, last=True, window=2, backward=backward)

    def step(self) -> None:
        """Call once per optimizer step, after ``optimizer.step()``: the next sample (none after a skipped
        window)."""
        if self._hold_next_step:
            self._hold_next_step = False
            return
        self.step_count += 1
        if self.controller is not None:
            self.controller.step()

    def state_dict(self) -> dict:
        state = {"step": self.step_count, "scope": self.scope, "lam": self.lam, **self.config.to_dict()}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue a run at the saved step (the noise sequence is a function of the step; the merged
        scope's controller restores its exact sample)."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"RWP load_state_dict expects the dict from RWP.state_dict(), got {state!r:.80}")
        current = {key: value for key, value in self.state_dict().items() if key != "controller"}
        self.step_count = checks.resumed_step("RWP", state, current)
        self._hold_next_step = False
        if self.controller is not None:
            self.controller.load_state_dict(state.get("controller", {"step": self.step_count}))
