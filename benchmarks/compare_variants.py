"""Flat-LoRA on top of the LoRA variants of the paper's Table 5 (DoRA, AdaLoRA, PiSSA, LoRA-GA), on the main job.

    python benchmarks/compare_variants.py                  # the full comparison (about 15 min on 2 free CPU cores)
    python benchmarks/compare_variants.py --preset tiny    # a smoke run (CI)

Every variant (``benchmarks/lora_variants.py``) trains the main job's model (MiniLM-L6 regressing VADER
valence, LoRA rank 8 on every encoder linear layer) with the same data order, optimizer, step budget and
seeds, without and with Flat-LoRA. Protocol, as ``compare_methods.py``'s: the validation split is carved from
the training entries; each variant's sigma is chosen from ``SIGMA_GRID`` by the validation MSE of one run
(seed 0); every seed then trains both arms on the training split and is evaluated on the held-out test
split. The table gives each arm's test MSE and Pearson r (mean ± std over seeds) and the paired difference
Flat-LoRA − variant (mean ± std of the per-seed differences: the two arms of a seed share the initialisation
and the data order).

Writes ``<out-dir>/compare-variants[-tiny].json`` (``benchmarks/common.write_record``), a Markdown table and a
figure next to it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_methods as methods  # noqa: E402  (splits, the training run, the presets)
from common import RESULTS  # noqa: E402
from lora_variants import NAMES  # noqa: E402

SIGMA_GRID = [0.05, 0.10]


def paired_summary(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: each arm's metrics (mean ± std over seeds), the per-seed difference Flat-LoRA − variant,
    and Flat-LoRA's wall time relative to the variant's."""
    summary = []
    for variant in variants:
        arms = {arm: {r["seed"]: r for r in rows if r["variant"] == variant and r["method"] == arm}
                for arm in ("lora", "flat_lora")}
        seeds = sorted(arms["lora"].keys() & arms["flat_lora"].keys())
        entry = {"variant": variant, "seeds": len(seeds), "sigma": arms["flat_lora"][seeds[0]]["value"]}
        for key in ("mse", "pearson", "wall_s"):
            for arm, by_seed in arms.items():
                entry[f"{arm}_{key}_mean"], entry[f"{arm}_{key}_std"] = methods.mean_std(
                    [by_seed[s][key] for s in seeds])
            entry[f"diff_{key}_mean"], entry[f"diff_{key}_std"] = methods.mean_std(
                [arms["flat_lora"][s][key] - arms["lora"][s][key] for s in seeds])
        entry["time_ratio"] = entry["flat_lora_wall_s_mean"] / entry["lora_wall_s_mean"]
        summary.append(entry)
    return summary


def markdown(summary: list[dict], config: dict) -> str:
    lines = [f"MiniLM-L6 on VADER valence, {config['steps']} steps of {config['batch']}, rank {config['rank']}, "
             f"{config['seeds']} seeds; sigma chosen per variant on the validation split from {SIGMA_GRID}. "
             "Δ: Flat-LoRA minus the variant alone, per seed (same initialisation and data order), mean ± std.",
             "", "| variant | σ | test MSE | + Flat-LoRA | Δ MSE | test r | + Flat-LoRA | Δ r | time ×variant |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(entry, key, fmt, signed=False):
        return f"{entry[key + '_mean']:{'+' if signed else ''}{fmt}} ± {entry[key + '_std']:{fmt}}"

    for e in summary:
        lines.append(f"| {e['variant']} | {e['sigma']:g} | {cell(e, 'lora_mse', '.4f')} | "
                     f"{cell(e, 'flat_lora_mse', '.4f')} | {cell(e, 'diff_mse', '.4f', signed=True)} | "
                     f"{cell(e, 'lora_pearson', '.3f')} | {cell(e, 'flat_lora_pearson', '.3f')} | "
                     f"{cell(e, 'diff_pearson', '.3f', signed=True)} | {e['time_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def figure(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["variant"] for e in summary]
    x = torch.arange(len(names)).tolist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for offset, arm, color in ((-0.2, "lora", "#888888"), (0.2, "flat_lora", "#3b75af")):
        left.bar([i + offset for i in x], [e[f"{arm}_mse_mean"] for e in summary], width=0.4, color=color,
                 yerr=[e[f"{arm}_mse_std"] for e in summary], capsize=3,
                 label="variant alone" if arm == "lora" else "+ Flat-LoRA")
    left.set_xticks(x, names)
    left.set_title("test MSE (mean ± std over seeds)")
    low = min(e[f"{arm}_mse_mean"] - e[f"{arm}_mse_std"] for e in summary for arm in ("lora", "flat_lora"))
    left.set_ylim(bottom=max(0.0, low * 0.95))
    left.legend()
    right.bar(x, [e["diff_mse_mean"] for e in summary], yerr=[e["diff_mse_std"] for e in summary], capsize=3,
              color="#c4553b")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(x, names)
    right.set_title("Δ test MSE, Flat-LoRA − variant (per seed; < 0: Flat-LoRA better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = methods.comparison_parser(__doc__, RESULTS / "compare-variants")
    parser.add_argument("--variants", nargs="+", choices=NAMES, default=list(NAMES))
    args = parser.parse_args(argv)
    preset = methods.PRESETS[args.preset]
    steps = args.steps or preset.steps
    seeds = args.seeds or preset.seeds
    if args.threads:
        torch.set_num_threads(args.threads)
    fit, val, _, test = methods.splits(preset.small_fraction)
    if preset.eval_entries:
        val, test = val[:preset.eval_entries], test[:preset.eval_entries]
    print(f"fit {len(fit)} / validation {len(val)} / test {len(test)} entries; {steps} steps of {args.batch}, "
          f"{seeds} seeds, variants {args.variants}", flush=True)
    clock = time.perf_counter()

    grid_steps = preset.grid_steps if args.steps is None else steps
    grid_rows, chosen = [], {}
    for variant in args.variants:
        for sigma in SIGMA_GRID:
            row = methods.train_run("flat_lora", sigma, 0, fit, val, grid_steps, args, preset, variant=variant)
            grid_rows.append({"variant": variant, **row})
            print(f"grid {variant} sigma={sigma}: validation MSE {row['mse']:.4f} ({row['wall_s']:.1f} s)", flush=True)
        chosen[variant] = min((r for r in grid_rows if r["variant"] == variant), key=lambda r: r["mse"])["value"]

    rows = []
    for seed in range(seeds):
        for variant in args.variants:
            for arm, value in (("lora", None), ("flat_lora", chosen[variant])):
                row = methods.train_run(arm, value, seed, fit, test, steps, args, preset, variant=variant)
                rows.append({"variant": variant, **row})
                print(f"seed {seed} {variant} {'+ Flat-LoRA' if value else 'alone'}: test MSE {row['mse']:.4f}, "
                      f"r {row['pearson']:.3f}, {row['wall_s']:.1f} s", flush=True)
    if not all(r["frozen_unchanged"] for r in rows + grid_rows):
        raise SystemExit("a frozen weight changed")

    summary = paired_summary(rows, args.variants)
    config = {"preset": args.preset, "steps": steps, "grid_steps": grid_steps, "seeds": seeds, "batch": args.batch,
              "lr": args.lr, "rank": args.rank, "sigma_grid": SIGMA_GRID, "chosen": chosen,
              "sizes": {"fit": len(fit), "validation": len(val), "test": len(test)},
              "total_wall_s": time.perf_counter() - clock}
    methods.publish(args.out_dir, "compare-variants", args.preset, config,
                    {"summary": summary, "runs": rows, "grid": grid_rows}, markdown(summary, config),
                    lambda path: figure(summary, path))

if __name__ == "__main__":
    main()
