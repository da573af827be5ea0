"""Loss along regenerated-noise directions, on the plane through three adapters, and under Flat-LoRA's noise.

* :func:`loss_surface`: 1-D / 2-D surfaces along random filter-normalised directions. The directions
  are Flat-LoRA noise regenerated from seeds inside the fused kernels, never stored, so a surface of
  a large model needs no extra weight-sized memory (:func:`materialised_direction` writes one out,
  for checks on small models);
* :func:`loss_plane`: the plane through three adapters on one base (e.g. base, LoRA, Flat-LoRA),
  combined as LoRA factors (:func:`lora_point` takes an adapter's copy);
* :func:`noisy_loss`: the average loss under Flat-LoRA's own perturbation at several sigma.

A direction from seed ``s`` gives layer ``k`` the perturbation ``d_k = diag(||W'_k,i|| / sqrt(n)) Z(seed_k)``,
with ``seed_k = direction_seed(s, k) = layer_seed(s, 0, k, 0)``: each filter is scaled to its own norm,
since ``||Z_i||`` is about ``sqrt(n)``. This is Li et al.'s filter normalisation with the expected noise
norm, and Flat-LoRA's own noise at ``sigma = 1``. Everything here runs without autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .. import checks
from ..functional import _flat_lora_linear, generate_noise, merged_row_norms
from ..noise import layer_seed
from .targets import (LossFn, Target, checked_batches, eval_mode, mean_loss, merged_targets, patched_forwards,
                      progress_bar)


@dataclass
class LossSurface:
    """The loss on a 1-D or 2-D grid of steps along seeded directions (see :func:`loss_surface`)."""

    alphas: list[float]
    betas: list[float] | None         # None for a 1-D surface
    losses: list[list[float]]         # [len(alphas)][len(betas) or 1]
    seeds: list[int]
    base_loss: float
    layers: list[str]


def _filter_scales(targets: list[Target]) -> list[torch.Tensor]:
    """``||W'_i|| / sqrt(n)`` per row: the filter-normalised scale of a noise direction."""
    scales = []
    for t in targets:
        weight, _, lora_A, lora_B, scaling = t.parts()
        if lora_A is None:
            norms = torch.linalg.vector_norm(weight.detach().float(), dim=1)
        else:
            norms = merged_row_norms(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)
        scales.append(norms / math.sqrt(weight.shape[1]))
    return scales


def _regenerated_forward(target: Target, terms: list[tuple[int, torch.Tensor]]):
    """Forward of one layer at ``W' + sum_k c_k Z(seed_k)``: the first term rides on the layer's own
    weights, each further one on a stride-0 zero weight, so no weight-sized tensor is made.
    ``c_k`` may be negative (a signed step along the direction), hence the package-internal
    :func:`_flat_lora_linear`, which takes ``c`` as given."""
    weight, bias, lora_A, lora_B, scaling = target.parts()
    m, n = weight.shape

    def forward(x, *args, **kwargs):
        (seed, row_std), *rest = terms
        y = _flat_lora_linear(x, weight.detach(), bias, lora_A, lora_B, scaling, seed=seed, row_std=row_std)
        zero = weight.new_zeros(()).expand(m, n)
        for seed, row_std in rest:
            y = y + _flat_lora_linear(x, zero, None, None, None, 0.0, seed=seed, row_std=row_std)
        return y

    return forward


def direction_seed(seed: int, layer_index: int) -> int:
    """The noise seed of one layer's slice of the direction named by ``seed``."""
    return layer_seed(seed, 0, layer_index, 0)


def _loss_with_terms(model, loss_fn, batches, targets, terms_for) -> float:
    """Mean loss with layer ``i`` at ``W' + sum_k c_k Z(seed_k)`` for ``terms_for(i) = [(seed_k, c_k), ...]``."""
    with torch.no_grad(), patched_forwards(targets, lambda i, t: _regenerated_forward(t, terms_for(i))):
        return float(mean_loss(model, loss_fn, batches))


def loss_surface(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, seeds: Sequence[int],
                 alphas: Sequence[float], betas: Sequence[float] | None = None, *, include_all_linear: bool = False,
                 progress: bool = True) -> LossSurface:
    """Loss at ``W' + alpha d(seeds[0])`` (1-D), or ``+ beta d(seeds[1])`` on a grid (2-D), with
    filter-normalised directions regenerated from the seeds (see the module docstring)."""
    batches = checked_batches(batches)
    seeds = list(seeds)
    if len(seeds) not in (1, 2) or (len(seeds) == 2) != (betas is not None):
        raise ValueError("pass one seed for a 1-D surface, or two seeds and betas for a 2-D one")
    alphas = [float(a) for a in alphas]
    betas_list = [float(b) for b in betas] if betas is not None else [0.0]
    if not alphas or not betas_list:
        raise ValueError("alphas (and betas) must not be empty")
    targets = merged_targets(model, include_all_linear)
    scales = _filter_scales(targets)
    with eval_mode(model):
        base = _loss_with_terms(model, loss_fn, batches, targets, lambda i: [(0, None)])
        losses = []
        for alpha in progress_bar(alphas, progress, "loss surface"):
            row = []
            for beta in betas_list:
                def terms(i, alpha=alpha, beta=beta):
                    out = [(direction_seed(seeds[0], i), alpha * scales[i])]
                    if len(seeds) == 2:
                        out.append((direction_seed(seeds[1], i), beta * scales[i]))
                    return out
                row.append(_loss_with_terms(model, loss_fn, batches, targets, terms))
            losses.append(row)
    return LossSurface(alphas, None if betas is None else betas_list, losses, seeds, base, [t.name for t in targets])


def materialised_direction(model: torch.nn.Module, seed: int, include_all_linear: bool = False) -> list[torch.Tensor]:
    """The direction of ``seed`` written out, layer by layer (for checks and small models only)."""
    targets = merged_targets(model, include_all_linear)
    return [scale[:, None] * generate_noise(direction_seed(seed, i), *t.parts()[0].shape, device=scale.device)
            for i, (t, scale) in enumerate(zip(targets, _filter_scales(targets)))]


# ------------------------------------------------------------------------- Flat-LoRA's own objective
@dataclass
class NoisyLoss:
    """The loss under Flat-LoRA's noise at each sigma (see :func:`noisy_loss`)."""

    sigmas: list[float]
    mean: list[float]
    std: list[float]
    num_samples: int
    base_loss: float


def noisy_loss(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, sigmas: Sequence[float], *,
               num_samples: int = 4, seed: int = 0, include_all_linear: bool = False,
               progress: bool = True) -> NoisyLoss:
    """Mean (and std over noise samples) of the loss under Flat-LoRA's perturbation
    ``c = sigma ||W'||_row / sqrt(n)`` for each ``sigma``: the quantity Flat-LoRA minimises."""
    batches = checked_batches(batches, num_samples=num_samples)
    sigmas = [checks.sigma(s, "each of sigmas") for s in sigmas]
    targets = merged_targets(model, include_all_linear)
    scales = _filter_scales(targets)
    with eval_mode(model):
        base = _loss_with_terms(model, loss_fn, batches, targets, lambda i: [(0, None)])
        means, stds = [], []
        for sigma in progress_bar(list(sigmas), progress, "noisy loss"):
            values = torch.tensor([
                _loss_with_terms(model, loss_fn, batches, targets,
                                 lambda i, k=k: [(layer_seed(seed, k, i, 0), sigma * scales[i])])
                for k in range(num_samples)], dtype=torch.float64)
            means.append(float(values.mean()))
            stds.append(float(values.std()) if num_samples > 1 else 0.0)
    return NoisyLoss(sigmas, means, stds, num_samples, base)


# ------------------------------------------------------------------- the plane through three adapters
def lora_point(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The current adapter of ``model`` as a point for :func:`loss_plane`: ``{layer: (A, B)}`` copies."""
    point = {}
    for t in merged_targets(model):
        _, _, lora_A, lora_B, _ = t.parts()
        point[t.name] = (lora_A.detach().clone(), lora_B.detach().clone())
    return point


@dataclass
class LossPlane:
    """The loss on the plane through three adapters (see :func:`loss_plane`)."""

    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]         # loss at P0 + alpha (P1 - P0) + beta (P2 - P0)
    corner_losses: list[float]        # at P0, P1, P2


def loss_plane(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, points: Sequence, alphas: Sequence[float],
               betas: Sequence[float], *, progress: bool = True) -> LossPlane:
    """Loss on the plane through three points of merged-weight space sharing ``model``'s base weights,
    each an adapter (:func:`lora_point`) or None for the base model alone. Points combine as LoRA
    factors (rank 3r), so no weight-sized tensor is formed."""
    batches = checked_batches(batches)
    if len(points) != 3:
        raise ValueError(f"loss_plane needs exactly three points, got {len(points)}")
    targets = merged_targets(model)
    names = [t.name for t in targets]
    for point in points:
        if point is not None and set(point) != set(names):
            raise ValueError("each point must give (A, B) for every LoRA layer of the model (see lora_point)")

    def forward_at(coefficients):
        def make(index, target):
            weight, bias, _, _, scaling = target.parts()
            m, n = weight.shape
            factors = [(point[target.name], c) for point, c in zip(points, coefficients) if point is not None]

            def forward(x, *args, **kwargs):
                if not factors:
                    return F.linear(x, weight, bias)
                a = torch.cat([fa.to(x.device) for (fa, _), _ in factors])
                b = torch.cat([c * fb.to(x.device) for (_, fb), c in factors], dim=1)
                return _flat_lora_linear(x, weight.detach(), bias, a, b, scaling, seed=0, row_std=None)
            return forward
        return make

    def loss(coefficients):
        with torch.no_grad(), patched_forwards(targets, forward_at(coefficients)):
            return float(mean_loss(model, loss_fn, batches))

    with eval_mode(model):
        corners = [loss(c) for c in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
        grid = [[loss((1 - a - b, a, b)) for b in betas] for a in progress_bar(list(alphas), progress, "loss plane")]
    return LossPlane([float(a) for a in alphas], [float(b) for b in betas], grid, corners)
