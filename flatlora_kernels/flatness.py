"""Flatness of a LoRA model in the full weight space of its merged weights ``W' = W + s·BA``.

Every measure looks at the LoRA-targeted linear layers (optionally all linear layers), evaluates the
user's ``loss_fn(model, batch)`` averaged over ``batches``, and returns plain dataclasses that
``dataclasses.asdict`` turns into JSON-ready dicts. All of them are deterministic for a given seed.

* :func:`top_eigenvalues`: the largest Hessian eigenvalues w.r.t. the merged weights (power
  iteration with deflation, or Lanczos), from Hessian-vector products (double backward);
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani et al., 2019);
* :func:`epsilon_sharpness`: Keskar et al.'s largest loss rise in a box, by projected ascent;
* :func:`loss_surface`: 1-D / 2-D surfaces along random filter-normalised directions. The directions
  are Flat-LoRA noise regenerated from seeds inside the fused kernels, never stored, so a surface of
  a large model needs no extra weight-sized memory;
* :func:`loss_plane`: the plane through three adapters on one base (e.g. base, LoRA, Flat-LoRA);
* :func:`noisy_loss`: the average loss under Flat-LoRA's own perturbation at several sigma.

Curvature measures (eigenvalues, density, sharpness) differentiate through explicitly merged
weights and are meant for models whose merged target weights fit in memory twice; eigenvalues and
density need double backward through the model (for transformers models load them with
``attn_implementation="eager"``: fused attention kernels have no second derivative).

A direction from seed ``s`` gives layer ``k`` the perturbation ``d_k = diag(||W'_k,i|| / sqrt(n)) Z(seed_k)``,
with ``seed_k = layer_seed(s, 0, k, 0)``: each filter is scaled to its own norm, since ``||Z_i||`` is
about ``sqrt(n)``. This is Li et al.'s filter normalisation with the expected noise norm, and Flat-LoRA's
own noise at ``sigma = 1``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

from . import checks
from .functional import _flat_lora_linear, generate_noise
from .layer import logical_weight
from .noise import layer_seed

LossFn = Callable[[torch.nn.Module, object], torch.Tensor]


# ----------------------------------------------------------------------------- the layers measured
@dataclass
class _Target:
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
        weight, _, lora_A, lora_B, scaling = self.parts()
        merged = weight.detach().float()
        if lora_A is not None:
            merged = merged + scaling * (lora_B.detach().float() @ lora_A.detach().float())
        return merged


def merged_targets(model: torch.nn.Module, include_all_linear: bool = False) -> list[_Target]:
    """The LoRA linear layers of ``model`` (and, if asked, every other ``nn.Linear``), in module order."""
    targets, inside_lora = [], set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            if len(module.active_adapters) != 1 or module.merged:
                raise ValueError(f"{name}: flatness needs exactly one active, unmerged adapter")
            targets.append(_Target(name, module))
            inside_lora.update(id(m) for m in module.modules())
    if include_all_linear:
        targets += [_Target(n, m) for n, m in model.named_modules()
                    if type(m) is torch.nn.Linear and id(m) not in inside_lora]
    if not targets:
        raise ValueError("the model has no LoRA linear layers to measure (pass include_all_linear=True "
                         "to measure its plain linear layers)")
    return targets


@contextlib.contextmanager
def _patched(targets: list[_Target], forward_for: Callable[[int, _Target], Callable]):
    """Temporarily give each target layer its own forward (instance attribute), then restore it."""
    try:
        for index, target in enumerate(targets):
            target.module.forward = forward_for(index, target)
        yield
    finally:
        for target in targets:
            target.module.__dict__.pop("forward", None)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Evaluate without dropout, then give the model back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _mean_loss(model, loss_fn: LossFn, batches: Sequence, create_graph: bool = False) -> torch.Tensor:
    total = None
    for batch in batches:
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError("loss_fn(model, batch) must return a scalar tensor")
        total = loss if total is None else total + loss
    return total / len(batches)


def _check_common(batches, **positive) -> list:
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the measures need at least one batch")
    for name, value in positive.items():
        checks.positive_int(name, value)
    return batches


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


# ------------------------------------------------------------------- Hessian-vector products
class _MergedHessian:
    """Loss as a function of per-layer offsets ``delta`` added to the merged weights; HVPs at delta = 0."""

    def __init__(self, model, loss_fn, batches, targets):
        self.model, self.loss_fn, self.batches, self.targets = model, loss_fn, batches, targets
        self.merged = [t.merged() for t in targets]
        self.dim = sum(m.numel() for m in self.merged)

    def _forward_for(self, deltas):
        def make(index, target):
            _, bias, _, _, _ = target.parts()
            weight = self.merged[index] + deltas[index]
            return lambda x, *a, **k: F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        return make

    def loss_at(self, deltas, create_graph=False) -> torch.Tensor:
        with _patched(self.targets, self._forward_for(deltas)):
            return _mean_loss(self.model, self.loss_fn, self.batches, create_graph)

    def zeros(self):
        return [torch.zeros_like(m, requires_grad=True) for m in self.merged]

    def gradient(self) -> list[torch.Tensor]:
        deltas = self.zeros()
        return list(torch.autograd.grad(self.loss_at(deltas), deltas))

    def hvp(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        deltas = self.zeros()
        grads = torch.autograd.grad(self.loss_at(deltas), deltas, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        return [h.detach() for h in torch.autograd.grad(dot, deltas)]

    def random(self, generator, rademacher=False) -> list[torch.Tensor]:
        if rademacher:
            return [(torch.randint(0, 2, m.shape, generator=generator) * 2 - 1).to(m) for m in self.merged]
        return [torch.randn(m.shape, generator=generator).to(m) for m in self.merged]


def _dot(a, b) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _axpy(alpha, x, y):
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def _normalised(v):
    norm = math.sqrt(_dot(v, v))
    return [x / norm for x in v]


# ----------------------------------------------------------------------------------- eigenvalues
@dataclass
class EigenResult:
    eigenvalues: list[float]          # largest first
    iterations: list[int]             # HVPs spent on each (power) or in total (lanczos, one entry)
    converged: list[bool]
    method: str
    tol: float
    dimension: int                    # number of merged-weight entries measured
    layers: list[str] = field(default_factory=list)


def top_eigenvalues(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, k: int = 1, *,
                    method: str = "power", max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                    include_all_linear: bool = False, progress: bool = True) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues of the mean loss w.r.t. the merged weights.

    ``method="power"``: power iteration with deflation, each stopped when the relative change of its
    Rayleigh quotient falls below ``tol`` (or after ``max_iter`` HVPs). ``method="lanczos"``:
    ``max_iter`` Lanczos steps with full reorthogonalisation, converged when the Ritz residual bound of
    each of the ``k`` values is below ``tol`` times its magnitude.
    """
    batches = _check_common(batches, k=k, max_iter=max_iter)
    if method not in ("power", "lanczos"):
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    targets = merged_targets(model, include_all_linear)
    hess = _MergedHessian(model, loss_fn, batches, targets)
    generator = torch.Generator().manual_seed(seed)
    layers = [t.name for t in targets]
    if method == "lanczos":
        steps = min(max_iter, hess.dim)
        alphas, betas, _ = _lanczos(hess, _normalised(hess.random(generator)), steps, progress)
        ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        top = torch.argsort(ritz, descending=True)[:k]
        beta_last = betas[-1] if len(betas) == len(alphas) else 0.0
        residuals = [abs(beta_last * float(vectors[-1, i])) for i in top]
        values = [float(ritz[i]) for i in top]
        return EigenResult(values, [len(alphas)], [r <= tol * max(abs(v), 1e-12) for r, v in zip(residuals, values)],
                           method, tol, hess.dim, layers)
    values, iterations, converged, found = [], [], [], []
    for _ in range(k):
        v = _normalised(hess.random(generator))
        eig, done, used = 0.0, False, 0
        for used in _progress(range(1, max_iter + 1), progress, f"power iteration {len(values) + 1}/{k}"):
            hv = hess.hvp(v)
            for lam, u in zip(values, found):  # deflate the eigenpairs already found
                hv = _axpy(-lam * _dot(u, v), u, hv)
            new_eig = _dot(v, hv)
            norm = math.sqrt(_dot(hv, hv))
            if norm == 0.0:
                eig, done = 0.0, True
                break
            v = [h / norm for h in hv]
            if used > 1 and abs(new_eig - eig) <= tol * max(abs(new_eig), 1e-12):
                eig, done = new_eig, True
                break
            eig = new_eig
        values.append(eig)
        iterations.append(used)
        converged.append(done)
        found.append(v)
    return EigenResult(values, iterations, converged, method, tol, hess.dim, layers)


def _lanczos(hess: _MergedHessian, v, steps: int, progress: bool):
    """Lanczos with full reorthogonalisation; returns (alphas, betas, basis)."""
    basis, alphas, betas = [v], [], []
    for step in _progress(range(steps), progress, "lanczos"):
        w = hess.hvp(basis[-1])
        alpha = _dot(w, basis[-1])
        alphas.append(alpha)
        for q in basis:  # full reorthogonalisation keeps the Ritz values honest in fp32
            w = _axpy(-_dot(w, q), q, w)
        beta = math.sqrt(max(_dot(w, w), 0.0))
        betas.append(beta)
        if beta < 1e-10 or step == steps - 1:
            break
        basis.append([x / beta for x in w])
    return alphas, betas, basis


def _tridiagonal(alphas, betas) -> torch.Tensor:
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: n - 1], dtype=torch.float64)
    return t + torch.diag(off, 1) + torch.diag(off, -1)


# ------------------------------------------------------------------------------ spectral density
@dataclass
class SpectralDensity:
    grid: list[float]
    density: list[float]              # integrates to 1 over the grid
    nodes: list[list[float]]          # Ritz values of each probe
    weights: list[list[float]]        # their quadrature weights (each probe's sum to 1)
    num_probes: int
    lanczos_steps: int
    kernel_width: float
    dimension: int


def spectral_density(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, *, num_probes: int = 4,
                     lanczos_steps: int = 30, grid_size: int = 400, kernel_width: float | None = None, seed: int = 0,
                     include_all_linear: bool = False, progress: bool = True) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature with Rademacher probes, smoothed with
    Gaussians of width ``kernel_width`` (default: 1% of the spectral range)."""
    batches = _check_common(batches, num_probes=num_probes, lanczos_steps=lanczos_steps, grid_size=grid_size)
    targets = merged_targets(model, include_all_linear)
    hess = _MergedHessian(model, loss_fn, batches, targets)
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in _progress(range(num_probes), progress, "SLQ probes"):
        alphas, betas, _ = _lanczos(hess, _normalised(hess.random(generator, rademacher=True)),
                                    min(lanczos_steps, hess.dim), progress=False)
        ritz, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        nodes.append(ritz.tolist())
        weights.append((vectors[0] ** 2).tolist())
    flat = [x for probe in nodes for x in probe]
    low, high = min(flat), max(flat)
    spread = max(high - low, 1e-12)
    width = kernel_width or 0.01 * spread
    grid = torch.linspace(low - 5 * width, high + 5 * width, grid_size, dtype=torch.float64)
    density = torch.zeros_like(grid)
    for probe_nodes, probe_weights in zip(nodes, weights):
        for node, weight in zip(probe_nodes, probe_weights):
            density += weight * torch.exp(-0.5 * ((grid - node) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    density /= num_probes
    return SpectralDensity(grid.tolist(), density.tolist(), nodes, weights, num_probes, lanczos_steps, width, hess.dim)


# -------------------------------------------------------------------------------- eps-sharpness
@dataclass
class Sharpness:
    epsilon: float
    base_loss: float
    max_loss: float
    increase: float                   # max_loss - base_loss (>= 0)
    keskar: float                     # 100 * increase / (1 + base_loss), Keskar et al.'s normalisation
    steps: int


def epsilon_sharpness(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, epsilon: float, *,
                      steps: int = 10, include_all_linear: bool = False, progress: bool = True) -> Sharpness:
    """Largest loss rise for merged-weight offsets in the box ``|delta_j| <= epsilon (|w'_j| + 1)``,
    found by ``steps`` steps of projected sign-gradient ascent from ``delta = 0``."""
    batches = _check_common(batches, steps=steps)
    epsilon = checks.positive_real("epsilon", epsilon)
    targets = merged_targets(model, include_all_linear)
    hess = _MergedHessian(model, loss_fn, batches, targets)
    radius = [epsilon * (m.abs() + 1) for m in hess.merged]
    with torch.no_grad():
        base = float(hess.loss_at([torch.zeros_like(m) for m in hess.merged]))
    deltas = [torch.zeros_like(m) for m in hess.merged]
    best = base
    for _ in _progress(range(steps), progress, f"eps-sharpness {epsilon:g}"):
        leaves = [d.clone().requires_grad_() for d in deltas]
        grads = torch.autograd.grad(hess.loss_at(leaves), leaves)
        # a step of a quarter of the box along the sign of the gradient, projected back into the box
        deltas = [torch.maximum(torch.minimum(d + 0.25 * r * g.sign(), r), -r) for d, r, g in zip(deltas, radius, grads)]
        with torch.no_grad():
            best = max(best, float(hess.loss_at(deltas)))
    return Sharpness(epsilon, base, best, best - base, 100.0 * (best - base) / (1.0 + base), steps)


# ---------------------------------------------------------------------------------- loss surfaces
@dataclass
class LossSurface:
    alphas: list[float]
    betas: list[float] | None         # None for a 1-D surface
    losses: list[list[float]]         # [len(alphas)][len(betas) or 1]
    seeds: list[int]
    base_loss: float
    layers: list[str]


def _filter_scales(targets: list[_Target]) -> list[torch.Tensor]:
    """``||W'_i|| / sqrt(n)`` per row: the filter-normalised scale of a noise direction."""
    from .functional import merged_row_norms

    scales = []
    for t in targets:
        weight, _, lora_A, lora_B, scaling = t.parts()
        if lora_A is None:
            norms = torch.linalg.vector_norm(weight.detach().float(), dim=1)
        else:
            norms = merged_row_norms(weight.detach(), lora_A.detach(), lora_B.detach(), scaling)
        scales.append(norms / math.sqrt(weight.shape[1]))
    return scales


def _regenerated_forward(target: _Target, terms: list[tuple[int, torch.Tensor]]):
    """Forward of one layer at ``W' + sum_k c_k Z(seed_k)``: the first term rides on the layer's own
    weights, each further one on a stride-0 zero weight, so no weight-sized tensor is made.
    ``c_k`` may be negative (a signed step along the direction), hence the internal flag."""
    weight, bias, lora_A, lora_B, scaling = target.parts()
    m, n = weight.shape

    def forward(x, *args, **kwargs):
        a = lora_A if lora_A is not None else x.new_zeros(1, n)
        b = lora_B if lora_B is not None else x.new_zeros(m, 1)
        (seed, row_std), *rest = terms
        y = _flat_lora_linear(x, weight.detach(), bias, a, b, scaling, seed=seed, row_std=row_std)
        zero = weight.new_zeros(()).expand(m, n)
        for seed, row_std in rest:
            y = y + _flat_lora_linear(x, zero, None, x.new_zeros(1, n), x.new_zeros(m, 1), 0.0, seed=seed,
                                      row_std=row_std)
        return y

    return forward


def direction_seed(seed: int, layer_index: int) -> int:
    """The noise seed of one layer's slice of the direction named by ``seed``."""
    return layer_seed(seed, 0, layer_index, 0)


def _loss_with_terms(model, loss_fn, batches, targets, terms_for) -> float:
    with torch.no_grad(), _patched(targets, lambda i, t: _regenerated_forward(t, terms_for(i))):
        return float(_mean_loss(model, loss_fn, batches))


def loss_surface(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, seeds: Sequence[int],
                 alphas: Sequence[float], betas: Sequence[float] | None = None, *, include_all_linear: bool = False,
                 progress: bool = True) -> LossSurface:
    """Loss at ``W' + alpha d(seeds[0])`` (1-D), or ``+ beta d(seeds[1])`` on a grid (2-D), with
    filter-normalised directions regenerated from the seeds (see the module docstring)."""
    batches = _check_common(batches)
    seeds = list(seeds)
    if len(seeds) not in (1, 2) or (len(seeds) == 2) != (betas is not None):
        raise ValueError("pass one seed for a 1-D surface, or two seeds and betas for a 2-D one")
    alphas = [float(a) for a in alphas]
    betas_list = [float(b) for b in betas] if betas is not None else [0.0]
    if not alphas or not betas_list:
        raise ValueError("alphas (and betas) must not be empty")
    targets = merged_targets(model, include_all_linear)
    scales = _filter_scales(targets)
    with _eval_mode(model):
        base = _loss_with_terms(model, loss_fn, batches, targets, lambda i: [(0, None)])
        losses = []
        for alpha in _progress(alphas, progress, "loss surface"):
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
    batches = _check_common(batches, num_samples=num_samples)
    sigmas = [checks.sigma(s, "each of sigmas") for s in sigmas]
    targets = merged_targets(model, include_all_linear)
    scales = _filter_scales(targets)
    with _eval_mode(model):
        base = _loss_with_terms(model, loss_fn, batches, targets, lambda i: [(0, None)])
        means, stds = [], []
        for sigma in _progress(list(sigmas), progress, "noisy loss"):
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
    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]         # loss at P0 + alpha (P1 - P0) + beta (P2 - P0)
    corner_losses: list[float]        # at P0, P1, P2


def loss_plane(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, points: Sequence, alphas: Sequence[float],
               betas: Sequence[float], *, progress: bool = True) -> LossPlane:
    """Loss on the plane through three points of merged-weight space sharing ``model``'s base weights,
    each an adapter (:func:`lora_point`) or None for the base model alone. Points combine as LoRA
    factors (rank 3r), so no weight-sized tensor is formed."""
    batches = _check_common(batches)
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
        with torch.no_grad(), _patched(targets, forward_at(coefficients)):
            return float(_mean_loss(model, loss_fn, batches))

    with _eval_mode(model):
        corners = [loss(c) for c in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
        grid = [[loss((1 - a - b, a, b)) for b in betas] for a in _progress(list(alphas), progress, "loss plane")]
    return LossPlane([float(a) for a in alphas], [float(b) for b in betas], grid, corners)


# -------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_surfaces_1d(surfaces: dict[str, LossSurface], path) -> None:
    """Overlay 1-D surfaces (one curve per label) and save to ``path`` (PNG or PDF)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, s in surfaces.items():
        ax.plot(s.alphas, [row[0] for row in s.losses], marker=".", label=label)
    ax.set_xlabel("alpha (filter-normalised direction)")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_surface_2d(surface: LossSurface, path, title: str = "") -> None:
    """Contour and 3-D surface of a 2-D loss surface, side by side."""
    plt = _pyplot()
    losses = torch.tensor(surface.losses)
    a, b = torch.meshgrid(torch.tensor(surface.alphas), torch.tensor(surface.betas), indexing="ij")
    fig = plt.figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    contour = ax.contour(a.numpy(), b.numpy(), losses.numpy(), levels=15)
    ax.clabel(contour, fontsize=6)
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    ax3 = fig.add_subplot(1, 2, 2, projection="3d")
    ax3.plot_surface(a.numpy(), b.numpy(), losses.numpy(), cmap="viridis")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_densities(densities: dict[str, SpectralDensity], path) -> None:
    """Hessian eigenvalue densities (log scale), one curve per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, d in densities.items():
        ax.semilogy(d.grid, [max(v, 1e-12) for v in d.density], label=label)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_plane(plane: LossPlane, path, labels: Sequence[str] = ("P0", "P1", "P2")) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    a, b = torch.meshgrid(torch.tensor(plane.alphas), torch.tensor(plane.betas), indexing="ij")
    contour = ax.contourf(a.numpy(), b.numpy(), torch.tensor(plane.losses).numpy(), levels=20, cmap="viridis")
    fig.colorbar(contour, ax=ax, label="loss")
    for (x, y), label in zip(((0, 0), (1, 0), (0, 1)), labels):
        ax.plot(x, y, "w^")
        ax.annotate(label, (x, y), color="white", xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"towards {labels[1]}")
    ax.set_ylabel(f"towards {labels[2]}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------- command line
def _load_task(spec: str):
    """``path/to/file.py`` (or ``module``) defining ``flatness_task(adapter_dir) -> (model, loss_fn, batches)``."""
    import importlib
    import importlib.util
    from pathlib import Path

    if spec.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("flatness_task_module", Path(spec).resolve())
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    if not hasattr(module, "flatness_task"):
        raise SystemExit(f"{spec} defines no flatness_task(adapter_dir) -> (model, loss_fn, batches)")
    return module.flatness_task


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and draw the flatness of saved adapters:

        python -m flatlora_kernels.flatness --task examples/finetune_minilm.py \\
            --adapter runs/lora --adapter runs/flat_lora --out benchmarks/results/flatness-minilm
    """
    import argparse
    import json
    from dataclasses import asdict
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m flatlora_kernels.flatness", description=main.__doc__)
    parser.add_argument("--task", required=True, help="a .py file or module defining flatness_task(adapter_dir)")
    parser.add_argument("--adapter", action="append", required=True, help="a saved adapter directory (repeatable)")
    parser.add_argument("--label", action="append", help="a name per adapter (default: the directory name)")
    parser.add_argument("--out", type=Path, required=True, help="output directory for JSON and figures")
    parser.add_argument("--quick", action="store_true", help="small grids and few iterations (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    labels = args.label or [Path(a).name for a in args.adapter]
    if len(labels) != len(args.adapter):
        raise SystemExit("give one --label per --adapter")
    task = _load_task(args.task)
    quick = args.quick
    alphas = torch.linspace(-1, 1, 5 if quick else 13).tolist()
    grid2 = torch.linspace(-1, 1, 3 if quick else 7).tolist()
    args.out.mkdir(parents=True, exist_ok=True)
    report, surfaces, densities, points = {}, {}, {}, []
    for adapter, label in zip(args.adapter, labels):
        model, loss_fn, batches = task(adapter)
        model.eval()
        result = {
            "top_eigenvalues": asdict(top_eigenvalues(model, loss_fn, batches, k=1, max_iter=5 if quick else 20,
                                                      tol=1e-3, seed=args.seed)),
            "spectral_density": asdict(spectral_density(model, loss_fn, batches, num_probes=1 if quick else 2,
                                                        lanczos_steps=4 if quick else 15, seed=args.seed)),
            "epsilon_sharpness": [asdict(epsilon_sharpness(model, loss_fn, batches, eps, steps=2 if quick else 3))
                                  for eps in ((1e-3,) if quick else (1e-3, 5e-3))],
            "surface_1d": asdict(loss_surface(model, loss_fn, batches, [args.seed], alphas)),
            "surface_2d": asdict(loss_surface(model, loss_fn, batches, [args.seed, args.seed + 1], grid2, grid2)),
            "noisy_loss": asdict(noisy_loss(model, loss_fn, batches, [0.0, 0.05, 0.1, 0.2],
                                            num_samples=2 if quick else 4, seed=args.seed)),
        }
        report[label] = result
        surfaces[label] = LossSurface(**result["surface_1d"])
        densities[label] = SpectralDensity(**result["spectral_density"])
        plot_surface_2d(LossSurface(**result["surface_2d"]), args.out / f"surface2d-{label}.png", title=label)
        points.append((label, lora_point(model), model, loss_fn, batches))
        print(f"{label}: top eigenvalues {[round(v, 4) for v in result['top_eigenvalues']['eigenvalues']]}, "
              f"eps-sharpness {[round(s['increase'], 5) for s in result['epsilon_sharpness']]}, "
              f"noisy loss {[round(v, 5) for v in result['noisy_loss']['mean']]}")
    plot_surfaces_1d(surfaces, args.out / "surface1d.png")
    plot_densities(densities, args.out / "density.png")
    if len(points) >= 2:
        (label1, point1, model, loss_fn, batches), (label2, point2, *_) = points[0], points[1]
        plane_axis = torch.linspace(-0.5, 1.5, 5 if quick else 9).tolist()
        plane = loss_plane(model, loss_fn, batches, [None, point1, point2], plane_axis, plane_axis)
        report["plane"] = {"points": ["base", label1, label2], **asdict(plane)}
        plot_plane(plane, args.out / "plane.png", labels=("base", label1, label2))
    (args.out / "flatness.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}/flatness.json and figures")


if __name__ == "__main__":
    main()
