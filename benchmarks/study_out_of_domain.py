"""Out of domain: train on VADER valence, then score other people's ratings of other words, untrained.

    python benchmarks/study_out_of_domain.py                 # the committed run (see docs/sharpness-study.md)
    python benchmarks/study_out_of_domain.py --preset tiny   # a smoke run (CI, seconds)

The main job's model (the packaged MiniLM-L6, LoRA r=8 on every linear layer, a regression head;
``examples/finetune_minilm.py``) is trained on VADER's valence ratings by LoRA, Flat-LoRA, merged-weight
SAM and RWP (merged scope) with ``benchmarks/compare_methods.py``'s loop and methods. Without further
training its prediction is then correlated (Pearson and Spearman) with

* Warriner et al.'s valence (1..9), labMT happiness (1..9) and AFINN valence (−5..5), on words of each
  lexicon's test split (``benchmarks/lexicon_tasks.py``) that VADER's training and validation splits do
  not contain: new words, rated by other people on other scales;
* Warriner's valence as rated by each rater group alone (men/women, younger/older, lower/higher education).

Protocol: sigma (Flat-LoRA, RWP) and rho (merged SAM) are chosen from ``GRID`` by the validation MSE
of one run (seed 0, full training set), then every method trains with its choice on the full training
split (``--seeds`` seeds) and on 10% and 3% of it for longer (small-data regime: the held-out MSE is
recorded along the way, so the curves show where LoRA starts to overfit). Writes
``<out-dir>/out-of-domain[-tiny].json`` (``benchmarks/common.write_record``), a Markdown table and two
figures next to it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_methods as cm  # noqa: E402  (the methods, the training loop, the main job's splits)
import lexicon_tasks as lexicons  # noqa: E402
from compare_methods import mean_std  # noqa: E402
from common import RESULTS, write_record  # noqa: E402

job = cm.job
METHODS = ("lora", "flat_lora", "merged_sam", "rwp_merged")
# method -> (hyper-parameter, validation grid: sigma spans the paper's range 0.01-0.20; merged SAM's rho is
# the one compare_methods' validation grid chose on the same split, to keep the run within the CPU budget)
GRID = {"lora": (None, [None]), "flat_lora": ("sigma", [0.01, 0.05, 0.20]),
        "merged_sam": ("rho", [cm.committed_choices()["merged_sam"]]), "rwp_merged": ("sigma", [0.01, 0.05, 0.20])}
OUT_OF_DOMAIN = ("warriner_valence", "labmt_happiness", "afinn_valence")


@dataclass(frozen=True)
class Preset:
    steps: int                 # full training split
    seeds: int
    grid_steps: int
    small_fractions: tuple[float, ...]
    small_steps: int           # long enough for LoRA to overfit the small splits
    small_seeds: int
    curve_every: int           # steps between points of the small-data curves
    curve_entries: int         # test entries scored at each curve point
    eval_entries: int          # validation and VADER test entries
    ood_entries: int           # entries of each out-of-domain lexicon
    batch: int
    grid_ends_only: bool = False  # the smoke run tries each grid's first and last value only


PRESETS = {
    "full": Preset(steps=30, seeds=5, grid_steps=30, small_fractions=(0.1, 0.03), small_steps=60, small_seeds=1,
                   curve_every=15, curve_entries=128, eval_entries=300, ood_entries=400, batch=16),
    "tiny": Preset(steps=2, seeds=2, grid_steps=1, small_fractions=(0.1, 0.03), small_steps=4, small_seeds=1,
                   curve_every=2, curve_entries=8, eval_entries=16, ood_entries=16, batch=4,
                   grid_ends_only=True),
}


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), for Spearman's correlation."""
    order = torch.argsort(values)
    sorted_values = values[order]
    result = torch.empty_like(values, dtype=torch.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        result[order[start:end + 1]] = (start + end) / 2.0
        start = end + 1
    return result


def correlations(pred: torch.Tensor, target: torch.Tensor) -> dict:
    pearson = torch.corrcoef(torch.stack([pred.double(), target.double()]))[0, 1].item()
    spearman = torch.corrcoef(torch.stack([ranks(pred), ranks(target)]))[0, 1].item()
    return {"pearson": pearson, "spearman": spearman, "n": len(pred)}


def out_of_domain_sets(preset: Preset) -> tuple[dict, dict]:
    """({lexicon: [(word, target)]}, {rater group: [(word, target)]}): test-split words of each lexicon that
    are not in VADER's training or validation split, a seeded subset of ``ood_entries`` each."""
    vader = lexicons.load_task("vader_valence")
    seen = {word for part in ("train", "validation") for word, _ in vader.split(part)}
    sets, groups = {}, {}
    for name in OUT_OF_DOMAIN:
        task = lexicons.load_task(name)
        unseen = [(word, y) for word, y in task.split("test") if word not in seen]
        sets[name] = random.Random(name).sample(unseen, min(preset.ood_entries, len(unseen)))
        if task.groups:
            words = [word for word, _ in sets[name]]
            groups = {group: [(w, values[w]) for w in words if w in values] for group, values in task.groups.items()}
    return sets, groups


def score(model, tokenizer, vader_test, sets, groups) -> dict:
    """In-domain test MSE and r, and the correlations out of domain, from one prediction per word."""
    words = sorted({w for data in [vader_test, *sets.values()] for w, _ in data})
    pred = dict(zip(words, job.predict(model, tokenizer, words, torch.device("cpu")).tolist()))

    def against(data):
        return correlations(torch.tensor([pred[w] for w, _ in data]), torch.tensor([y for _, y in data]))

    vader_pred = torch.tensor([pred[w] for w, _ in vader_test])
    vader_target = torch.tensor([y for _, y in vader_test])
    return {"vader_test_mse": torch.mean((vader_pred - vader_target) ** 2).item(), "vader": against(vader_test),
            "out_of_domain": {name: against(data) for name, data in sets.items()},
            "rater_groups": {group: against(data) for group, data in groups.items()}}


def run(name, value, seed, data, steps, args, preset, evaluation, curve_data=None) -> dict:
    """Train one method (compare_methods' model, methods and loop) and score it."""
    tokenizer, model = job.build(seed, args.rank)
    method, controller = cm.make_method(name, value, model, seed, steps)
    curve, recent = [], []

    def on_step(step, loss):
        recent.append(loss)
        if curve_data is not None and (step % preset.curve_every == 0 or step == steps):
            mse, _ = job.evaluate(model, tokenizer, curve_data, torch.device("cpu"))
            curve.append({"step": step, "train_loss": statistics.fmean(recent), "test_mse": mse})
            recent.clear()

    wall = cm.train_loop(model, tokenizer, method, controller, data, steps, preset.batch, args.lr, seed,
                         on_step=on_step)
    row = {"method": name, "value": value, "seed": seed, "steps": steps, "train_size": len(data), "wall_s": wall}
    if evaluation is None:  # a grid run: validation MSE only
        row["validation_mse"], _ = job.evaluate(model, tokenizer, args.validation, torch.device("cpu"))
    else:
        row.update(score(model, tokenizer, *evaluation))
    if curve:
        row["curve"] = curve
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per regime and method: mean ± std over seeds of each correlation, and its difference from LoRA's
    at the same seed (paired)."""
    summary = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        mine = [r for r in rows if r["regime"] == regime]
        lora = {r["seed"]: r for r in mine if r["method"] == "lora"}
        for name in METHODS:
            runs = [r for r in mine if r["method"] == name]
            entry = {"regime": regime, "method": name, "value": runs[0]["value"], "seeds": len(runs)}
            metrics = {"vader_test_mse": lambda r: r["vader_test_mse"], "vader_r": lambda r: r["vader"]["pearson"]}
            metrics.update({f"{lex}_r": (lambda lex: lambda r: r["out_of_domain"][lex]["pearson"])(lex)
                            for lex in runs[0]["out_of_domain"]})
            metrics.update({f"{lex}_spearman": (lambda lex: lambda r: r["out_of_domain"][lex]["spearman"])(lex)
                            for lex in runs[0]["out_of_domain"]})
            metrics.update({f"group_{g}_r": (lambda g: lambda r: r["rater_groups"][g]["pearson"])(g)
                            for g in runs[0]["rater_groups"]})
            for key, get in metrics.items():
                entry[key] = mean_std([get(r) for r in runs])
                entry[key + "_vs_lora"] = mean_std([get(r) - get(lora[r["seed"]]) for r in runs])
            entry["wall_s"] = mean_std([r["wall_s"] for r in runs])
            summary.append(entry)
    return summary


def markdown(summary: list[dict], config: dict) -> str:
    lexicon_keys = [f"{lex}_r" for lex in OUT_OF_DOMAIN]
    lines = [f"MiniLM-L6 + LoRA r={config['rank']} trained on VADER valence ({config['steps']} steps of "
             f"{config['batch']}; small-data regimes {config['small_steps']} steps); Pearson r, mean ± std over "
             "seeds; "
             "Δ: paired difference from LoRA at the same seed.", "",
             "| regime | method | σ/ρ | seeds | VADER test r | " + " | ".join(OUT_OF_DOMAIN) + " | Δ "
             + " | Δ ".join(OUT_OF_DOMAIN) + " |", "|---" * (5 + 2 * len(OUT_OF_DOMAIN)) + "|"]
    for e in summary:
        value = "–" if e["value"] is None else f"{e['value']:g}"
        cells = [f"{e[k][0]:.3f} ± {e[k][1]:.3f}" for k in ["vader_r", *lexicon_keys]]
        deltas = [f"{e[k + '_vs_lora'][0]:+.3f} ± {e[k + '_vs_lora'][1]:.3f}" for k in lexicon_keys]
        lines.append(f"| {e['regime']} | {e['method']} | {value} | {e['seeds']} | " + " | ".join(cells + deltas) + " |")
    groups = [k for k in summary[0] if k.startswith("group_") and k.endswith("_r")]
    lines += ["", "Warriner valence by rater group (Pearson r, full training set):", "",
              "| method | " + " | ".join(g[6:-2] for g in groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for e in summary:
        if e["regime"] == "full":
            lines.append(f"| {e['method']} | " + " | ".join(f"{e[g][0]:.3f} ± {e[g][1]:.3f}" for g in groups) + " |")
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def figures(summary: list[dict], rows: list[dict], stem: Path) -> None:
    plt = pyplot()

    regimes = list(dict.fromkeys(e["regime"] for e in summary))
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4), squeeze=False)
    keys = ["vader_r"] + [f"{lex}_r" for lex in OUT_OF_DOMAIN]
    for ax, regime in zip(axes[0], regimes):
        entries = [e for e in summary if e["regime"] == regime]
        width = 0.8 / len(entries)
        for i, e in enumerate(entries):
            ax.bar([k + i * width for k in range(len(keys))], [e[k][0] for k in keys], width,
                   yerr=[e[k][1] for k in keys], label=e["method"], capsize=2)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))])
        ax.set_xticklabels(["VADER (in domain)", "Warriner", "labMT", "AFINN"], fontsize=8)
        ax.set_title(f"Pearson r, {regime}")
        ax.set_ylim(bottom=max(0.0, min(e[k][0] for e in entries for k in keys) - 0.1))
    axes[0][0].legend(fontsize=8)
    save(fig, f"{stem}-correlations.png")

    curved = [r for r in rows if "curve" in r]
    small = list(dict.fromkeys(r["regime"] for r in curved))
    fig, axes = plt.subplots(1, max(1, len(small)), figsize=(5.5 * max(1, len(small)), 4), squeeze=False)
    for ax, regime in zip(axes[0], small):
        for name in METHODS:
            runs = [r["curve"] for r in curved if r["regime"] == regime and r["method"] == name]
            steps = [p["step"] for p in runs[0]]
            for key, style in (("test_mse", "-"), ("train_loss", ":")):
                mean = [statistics.fmean(run[i][key] for run in runs) for i in range(len(steps))]
                ax.plot(steps, mean, style, label=f"{name} {key.replace('_', ' ')}")
        ax.set_title(f"{regime}: held-out MSE (solid) and training loss (dotted)")
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    save(fig, f"{stem}-curves.png")


def study_parser(doc: str, presets, out_dir: Path) -> argparse.ArgumentParser:
    """The options both studies share: the preset, CPU threads, where results go."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(presets), default="full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=out_dir)
    return parser


def main(argv=None) -> None:
    parser = study_parser(__doc__, PRESETS, RESULTS / "out-of-domain")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()
    fit, val, _, test = cm.splits(0.1)
    small = {f"{round(100 * f)}%": cm.splits(f)[2] for f in preset.small_fractions}
    args.validation = val[:preset.eval_entries]
    vader_test = random.Random("vader").sample(test, min(preset.eval_entries, len(test)))
    sets, groups = out_of_domain_sets(preset)
    evaluation = (vader_test, sets, groups)
    print(f"VADER fit {len(fit)} / validation {len(args.validation)} / test {len(vader_test)}; small "
          + ", ".join(f"{k} {len(v)}" for k, v in small.items()) + "; out of domain "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), flush=True)

    grid_rows = []
    for name in METHODS:
        hyper, values = GRID[name]
        values = values[:1] + values[-1:] if preset.grid_ends_only and len(values) > 1 else values
        for value in values if hyper and len(values) > 1 else []:
            row = run(name, value, 0, fit, preset.grid_steps, args, preset, None)
            grid_rows.append(row)
            print(f"grid {name} {hyper}={value}: validation MSE {row['validation_mse']:.4f} ({row['wall_s']:.0f} s)",
                  flush=True)
    chosen = {name: values[0] for name, (_, values) in GRID.items()}
    for row in grid_rows:
        best = min((r for r in grid_rows if r["method"] == row["method"]), key=lambda r: r["validation_mse"])
        chosen[row["method"]] = best["value"]

    rows = []
    regimes = [("full", fit, preset.steps, preset.seeds)] + [
        (key, data, preset.small_steps, preset.small_seeds) for key, data in small.items()]
    curve_data = vader_test[:preset.curve_entries]
    for regime, data, steps, seeds in regimes:
        for seed in range(seeds):
            for name in METHODS:
                row = run(name, chosen[name], seed, data, steps, args, preset, evaluation,
                          curve_data=None if regime == "full" else curve_data)
                rows.append({"regime": regime, **row})
                print(f"{regime} seed {seed} {name}: VADER r {row['vader']['pearson']:.3f}; "
                      + ", ".join(f"{k} r {v['pearson']:.3f}" for k, v in row["out_of_domain"].items())
                      + f" ({row['wall_s']:.0f} s)", flush=True)

    summary = summarise(rows)
    config = {"preset": args.preset, "steps": preset.steps, "seeds": preset.seeds, "batch": preset.batch,
              "lr": args.lr, "rank": args.rank, "grid": {k: v[1] for k, v in GRID.items()},
              "grid_steps": preset.grid_steps, "chosen": chosen, "small_steps": preset.small_steps,
              "small_seeds": preset.small_seeds, "threads": args.threads,
              "sizes": {"fit": len(fit), "validation": len(args.validation), "vader_test": len(vader_test),
                        **{f"small_{k}": len(v) for k, v in small.items()},
                        **{f"ood_{k}": len(v) for k, v in sets.items()},
                        **{f"group_{k}": len(v) for k, v in groups.items()}},
              "total_wall_s": time.perf_counter() - clock}
    stem = "out-of-domain" + ("" if args.preset == "full" else f"-{args.preset}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = write_record(args.out_dir / f"{stem}.json", "study_out_of_domain", "cpu", config,
                       {"summary": summary, "runs": rows, "grid": grid_rows})
    table = markdown(summary, config)
    (args.out_dir / f"{stem}.md").write_text(table)
    figures(summary, rows, args.out_dir / stem)
    print(table)
    print(f"wrote {out} ({config['total_wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
