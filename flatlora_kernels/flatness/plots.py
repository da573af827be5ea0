"""Figures of the flatness measures (matplotlib, imported only when a figure is drawn).

Each function takes the dataclasses the measures return (or their ``asdict`` round trip) and writes
one PNG or PDF; none shows a window (the Agg backend).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .curvature import SpectralDensity
from .surfaces import LossPlane, LossSurface


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported on first use: the measures need no matplotlib."""
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
    """Filled contour of a loss plane with its three corners marked and named by ``labels``."""
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
