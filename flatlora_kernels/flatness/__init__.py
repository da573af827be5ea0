"""Flatness of a LoRA model in the full weight space of its merged weights ``W' = W + s·BA``.

Every measure looks at the LoRA-targeted linear layers (optionally all linear layers), evaluates the
user's ``loss_fn(model, batch)`` averaged over ``batches``, and returns plain dataclasses that
``dataclasses.asdict`` turns into JSON-ready dicts. All of them are deterministic for a given seed.

* :func:`top_eigenvalues`: the largest Hessian eigenvalues w.r.t. the merged weights (power
  iteration with deflation, Lanczos, or block Lanczos for repeated eigenvalues), from Hessian-vector
  products (double backward);
* :func:`median_dominant_eigenvalue`: the median over batches of each batch's top eigenvalue (Kaddour et al.);
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani et al., 2019); :func:`eigenvalue_outliers`
  counts its Ritz values beyond the bulk;
* :func:`epsilon_sharpness`: Keskar et al.'s largest loss rise in a box, by projected ascent;
* :func:`loss_surface`: 1-D / 2-D surfaces along random filter-normalised directions, regenerated
  from seeds inside the fused kernels and never stored;
* :func:`loss_plane`: the plane through three adapters on one base (e.g. base, LoRA, Flat-LoRA);
* :func:`noisy_loss`: the average loss under Flat-LoRA's own perturbation at several sigma;
* ``plot_*``: the figures (matplotlib is imported only when one is drawn).

The modules: :mod:`.targets` (which layers are measured, their merged weights, swapping their
forwards), :mod:`.curvature` (Hessian-vector products, eigenvalues, spectral density, sharpness),
:mod:`.surfaces` (regenerated-noise surfaces, the loss plane, the noisy loss), :mod:`.plots` and the
command line in :mod:`.__main__` (``python -m flatlora_kernels.flatness``; :func:`main` is loaded on
first access so that importing the toolkit parses no arguments and imports no plotting library).
"""

from .curvature import (DominantEigenvalues, EigenResult, Outliers, Sharpness, SpectralDensity, eigenvalue_outliers,
                        epsilon_sharpness, median_dominant_eigenvalue, spectral_density, top_eigenvalues)
from .plots import plot_densities, plot_plane, plot_surface_2d, plot_surfaces_1d
from .surfaces import (LossPlane, LossSurface, NoisyLoss, direction_seed, lora_point, loss_plane, loss_surface,
                       materialised_direction, noisy_loss)
from .targets import LossFn, merged_targets

__all__ = ["DominantEigenvalues", "EigenResult", "LossFn", "LossPlane", "LossSurface", "NoisyLoss", "Outliers",
           "Sharpness", "SpectralDensity", "direction_seed", "eigenvalue_outliers", "epsilon_sharpness", "lora_point", "loss_plane", "loss_surface", "main",
           "materialised_direction", "median_dominant_eigenvalue", "merged_targets", "noisy_loss", "plot_densities", "plot_plane",
           "plot_surface_2d", "plot_surfaces_1d", "spectral_density", "top_eigenvalues"]


def __getattr__(name: str):
    if name == "main":  # the command line imports argparse: only on demand
        from .__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
