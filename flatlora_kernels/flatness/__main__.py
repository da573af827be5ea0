"""Command line of the flatness toolkit, ``python -m flatlora_kernels.flatness`` (see :func:`main`).

Loads a task file's ``flatness_task(adapter_dir) -> (model, loss_fn, batches)``, runs every measure on
each saved adapter, and writes ``flatness.json`` (plus the plane through the base and the first two
adapters) and the figures to ``--out``. The only module of the toolkit that parses arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .curvature import SpectralDensity, epsilon_sharpness, spectral_density, top_eigenvalues
from .plots import plot_densities, plot_plane, plot_surface_2d, plot_surfaces_1d
from .surfaces import LossSurface, lora_point, loss_plane, loss_surface, noisy_loss


def _load_task(spec: str):
    """``path/to/file.py`` (or ``module``) defining ``flatness_task(adapter_dir) -> (model, loss_fn, batches)``."""
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
