"""Curvature of the loss in merged-weight space, from Hessian-vector products (double backward).

* :func:`top_eigenvalues`: the largest Hessian eigenvalues w.r.t. the merged weights, by power
  iteration with deflation, Lanczos or block Lanczos (which resolves repeated eigenvalues);
* :func:`median_dominant_eigenvalue`: the top eigenvalue of each batch's loss on its own, and their median
  (Kaddour et al., 2022, "When do flat minima optimizers work?");
* :func:`spectral_density`: the eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019),
  and :func:`eigenvalue_outliers`: how many of its Ritz values lie beyond the bulk;
* :func:`epsilon_sharpness`: Keskar et al.'s largest loss rise in a box, by projected ascent.

All of them differentiate through explicitly merged weights (:class:`_MergedHessian`), so they are meant
for models whose merged target weights fit in memory twice. Eigenvalues and density need double
backward through the model (load transformers models with ``attn_implementation="eager"``: fused
attention kernels have no second derivative).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from .. import checks
from .targets import LossFn, checked_batches, mean_loss, merged_targets, patched_forwards, progress_bar


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

    def loss_at(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        with patched_forwards(self.targets, self._forward_for(deltas)):
            return mean_loss(self.model, self.loss_fn, self.batches)

    def zeros(self):
        return [torch.zeros_like(m, requires_grad=True) for m in self.merged]

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
    """What :func:`top_eigenvalues` found, and how it got there."""

    eigenvalues: list[float]          # largest first
    iterations: list[int]             # HVPs spent on each (power) or in total (lanczos, block_lanczos: one entry)
    converged: list[bool]
    method: str
    tol: float
    dimension: int                    # number of merged-weight entries measured
    layers: list[str] = field(default_factory=list)


def top_eigenvalues(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, k: int = 1, *,
                    method: str = "power", max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                    block_size: int = 2, include_all_linear: bool = False, progress: bool = True) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues of the mean loss w.r.t. the merged weights.

    ``method="power"``: power iteration with deflation, each stopped when the relative change of its
    Rayleigh quotient falls below ``tol`` (or after ``max_iter`` HVPs). ``method="lanczos"``:
    ``max_iter`` Lanczos steps with full reorthogonalisation, converged when the Ritz residual bound of
    each of the ``k`` values is below ``tol`` times its magnitude. A single start vector sees one
    direction of each eigenspace, so Lanczos finds a repeated eigenvalue once (in exact arithmetic).
    ``method="block_lanczos"``: Lanczos on blocks of ``block_size`` vectors, ``max_iter`` HVPs in all
    (``max_iter // block_size`` block steps); it finds an eigenvalue up to ``block_size`` times, as
    often as it repeats. Same convergence test as Lanczos, from the block residual.
    """
    batches = checked_batches(batches, k=k, max_iter=max_iter, block_size=block_size)
    if method not in ("power", "lanczos", "block_lanczos"):
        raise ValueError(f"method must be 'power', 'lanczos' or 'block_lanczos', got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if method == "block_lanczos" and max_iter < block_size:
        raise ValueError(f"block_lanczos needs max_iter >= block_size (one block step), got max_iter={max_iter} "
                         f"and block_size={block_size}")
    targets = merged_targets(model, include_all_linear)
    hess = _MergedHessian(model, loss_fn, batches, targets)
    generator = torch.Generator().manual_seed(seed)
    layers = [t.name for t in targets]
    if method == "block_lanczos":
        values, residuals, used = _block_lanczos(hess, generator, block_size, max_iter, k, progress)
        return EigenResult(values, [used], [r <= tol * max(abs(v), 1e-12) for r, v in zip(residuals, values)],
                           method, tol, hess.dim, layers)
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
        for used in progress_bar(range(1, max_iter + 1), progress, f"power iteration {len(values) + 1}/{k}"):
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


@dataclass
class DominantEigenvalues:
    """What :func:`median_dominant_eigenvalue` found: the top eigenvalue of each batch's loss, and their median."""

    median: float
    values: list[float]               # one per batch, in the order of ``batches``
    converged: list[bool]
    method: str
    dimension: int


def median_dominant_eigenvalue(model: torch.nn.Module, loss_fn: LossFn, batches: Iterable, *, method: str = "power",
                               max_iter: int = 20, tol: float = 1e-3, seed: int = 0, include_all_linear: bool = False,
                               progress: bool = True) -> DominantEigenvalues:
    """The median over ``batches`` of the largest Hessian eigenvalue of each batch's own loss (Kaddour et
    al.'s sharpness measure): each value is :func:`top_eigenvalues` with ``k=1`` on that one batch, with
    the same ``method``, ``max_iter``, ``tol`` and ``seed``."""
    batches = checked_batches(batches, max_iter=max_iter)
    results = [top_eigenvalues(model, loss_fn, [batch], k=1, method=method, max_iter=max_iter, tol=tol, seed=seed,
                               include_all_linear=include_all_linear, progress=False)
               for batch in progress_bar(batches, progress, "dominant eigenvalue per batch")]
    values = [r.eigenvalues[0] for r in results]
    return DominantEigenvalues(statistics.median(values), values, [r.converged[0] for r in results], method,
                               results[0].dimension)


def _lanczos(hess: _MergedHessian, v, steps: int, progress: bool):
    """Lanczos with full reorthogonalisation; returns (alphas, betas, basis)."""
    basis, alphas, betas = [v], [], []
    for step in progress_bar(range(steps), progress, "lanczos"):
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


def _block_lanczos(hess: _MergedHessian, generator, block_size: int, max_hvps: int, k: int, progress: bool):
    """Block Lanczos with full reorthogonalisation: (top ``k`` Ritz values, their residual norms, HVPs used).

    With every new vector orthogonalised against the whole basis, the coefficients removed from
    ``H q_j`` are the entries ``q_i^T H q_j`` of the projected matrix, and the QR factor of what is left
    couples the next block in: collecting both gives the block tridiagonal matrix column by column. A
    vector that the QR finds (numerically) dependent is dropped, so the block may shrink (deflation).
    """
    block, _ = _qr_block([hess.random(generator) for _ in range(min(block_size, hess.dim))], [])
    basis, columns = [], []           # columns[j][i] = q_i^T H q_j for every basis vector i known then
    next_coupling: list[list[float]] = []
    last_block = (0, 0)
    for _ in progress_bar(range(max_hvps // block_size), progress, "block lanczos"):
        if not block or len(basis) + len(block) > hess.dim:
            break
        start = len(basis)
        basis += block
        products = [hess.hvp(q) for q in block]
        residuals = []
        for w in products:
            column = []
            for q in basis:  # full reorthogonalisation (twice is enough in fp32)
                coefficient = _dot(w, q)
                w = _axpy(-coefficient, q, w)
                column.append(coefficient)
            for i, q in enumerate(basis):
                again = _dot(w, q)
                w = _axpy(-again, q, w)
                column[i] += again
            columns.append(column)
            residuals.append(w)
        block, next_coupling = _qr_block(residuals, basis)  # rows: the new block, columns: this block
        for offset, column in enumerate(columns[start:]):
            column += [row[offset] for row in next_coupling]      # q_new^T H q_j, below the diagonal block
        last_block = (start, len(basis))
    size = len(basis)
    projected = torch.zeros(size, size, dtype=torch.float64)
    for j, column in enumerate(columns):
        column = column[:size]
        projected[: len(column), j] = torch.tensor(column, dtype=torch.float64)
    projected = 0.5 * (projected + projected.T)
    ritz, vectors = torch.linalg.eigh(projected)
    top = torch.argsort(ritz, descending=True)[:k]
    coupling = torch.tensor(next_coupling, dtype=torch.float64) if next_coupling else torch.zeros(0, 0)
    residual_norms = []
    for i in top:  # ||H Q y - theta Q y|| = ||coupling · (the last block's entries of y)||
        last_entries = vectors[last_block[0]:last_block[1], i]
        residual_norms.append(float(torch.linalg.vector_norm(coupling @ last_entries)) if coupling.numel() else 0.0)
    return [float(ritz[i]) for i in top], residual_norms, size


def _qr_block(vectors, basis, drop_below: float = 1e-6):
    """Modified Gram-Schmidt QR of ``vectors`` (already orthogonal to ``basis``): (orthonormal vectors kept,
    coefficient rows ``R[l][j]`` of each kept vector in each input vector). A vector whose remaining norm
    is below ``drop_below`` times the largest input norm is dependent and dropped."""
    scale = max(math.sqrt(_dot(v, v)) for v in vectors)
    kept, rows = [], []
    for j, v in enumerate(vectors):
        for l, q in enumerate(kept):
            coefficient = _dot(v, q)
            v = _axpy(-coefficient, q, v)
            rows[l][j] += coefficient
        for q in basis:  # keep the new block orthogonal to the basis as well
            v = _axpy(-_dot(v, q), q, v)
        norm = math.sqrt(_dot(v, v))
        if norm > drop_below * scale:
            kept.append([x / norm for x in v])
            rows.append([0.0] * len(vectors))
            rows[-1][j] = norm
    return kept, rows


def _tridiagonal(alphas, betas) -> torch.Tensor:
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: n - 1], dtype=torch.float64)
    return t + torch.diag(off, 1) + torch.diag(off, -1)


# ------------------------------------------------------------------------------ spectral density
@dataclass
class SpectralDensity:
    """A smoothed Hessian eigenvalue density and the quadrature it came from."""

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
    batches = checked_batches(batches, num_probes=num_probes, lanczos_steps=lanczos_steps, grid_size=grid_size)
    targets = merged_targets(model, include_all_linear)
    hess = _MergedHessian(model, loss_fn, batches, targets)
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in progress_bar(range(num_probes), progress, "SLQ probes"):
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


@dataclass
class Outliers:
    """The Ritz values of a :class:`SpectralDensity` that lie beyond its bulk (:func:`eigenvalue_outliers`)."""

    count: int                        # median over probes of the per-probe counts
    per_probe: list[int]
    values: list[list[float]]         # each probe's outlying Ritz values, largest first
    bulk_low: float                   # weighted quantiles of the SLQ measure at tail and 1 - tail
    bulk_high: float
    threshold: float                  # bulk_high + gap * (bulk_high - bulk_low)
    tail: float
    gap: float


def eigenvalue_outliers(density: SpectralDensity, *, tail: float = 0.05, gap: float = 1.0) -> Outliers:
    """How many Hessian eigenvalues stand out above the bulk of an SLQ density, by a stated rule.

    The bulk is the interval between the ``tail`` and ``1 - tail`` quantiles of the SLQ measure (every
    probe's Ritz values with their quadrature weights, probes weighted alike); a Ritz value is an outlier
    when it exceeds the bulk's upper edge by more than ``gap`` times the bulk's width. Outlying
    eigenvalues carry weight about 1/dimension each, so they do not move the quantiles, while Lanczos
    resolves the extreme eigenvalues first, so each probe's count estimates their number; ``count`` is
    the median over probes.
    """
    tail = checks.probability("tail", tail)
    if not tail < 0.5:
        raise ValueError(f"tail must be < 0.5 (the bulk lies between the tail and 1 - tail quantiles), got {tail!r}")
    gap = checks.nonnegative_real("gap", gap)
    nodes = torch.tensor([x for probe in density.nodes for x in probe], dtype=torch.float64)
    weights = torch.tensor([w for probe in density.weights for w in probe], dtype=torch.float64)
    order = torch.argsort(nodes)
    cumulative = torch.cumsum(weights[order], 0) / weights.sum()

    def quantile(q: float) -> float:
        return float(nodes[order][min(int(torch.searchsorted(cumulative, q)), len(order) - 1)])

    low, high = quantile(tail), quantile(1.0 - tail)
    threshold = high + gap * (high - low)
    values = [sorted((x for x in probe if x > threshold), reverse=True) for probe in density.nodes]
    per_probe = [len(v) for v in values]
    return Outliers(int(statistics.median_low(per_probe)), per_probe, values, low, high, threshold, tail, gap)


# -------------------------------------------------------------------------------- eps-sharpness
@dataclass
class Sharpness:
    """The result of :func:`epsilon_sharpness` for one ``epsilon``."""

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
    batches = checked_batches(batches, steps=steps)
    epsilon = checks.positive_real("epsilon", epsilon)
    targets = merged_targets(model, include_all_linear)
    hess = _MergedHessian(model, loss_fn, batches, targets)
    radius = [epsilon * (m.abs() + 1) for m in hess.merged]
    with torch.no_grad():
        base = float(hess.loss_at([torch.zeros_like(m) for m in hess.merged]))
    deltas = [torch.zeros_like(m) for m in hess.merged]
    best = base
    for _ in progress_bar(range(steps), progress, f"eps-sharpness {epsilon:g}"):
        leaves = [d.clone().requires_grad_() for d in deltas]
        grads = torch.autograd.grad(hess.loss_at(leaves), leaves)
        # a step of a quarter of the box along the sign of the gradient, projected back into the box
        deltas = [torch.maximum(torch.minimum(d + 0.25 * r * g.sign(), r), -r) for d, r, g in zip(deltas, radius, grads)]
        with torch.no_grad():
            best = max(best, float(hess.loss_at(deltas)))
    return Sharpness(epsilon, base, best, best - base, 100.0 * (best - base) / (1.0 + base), steps)
