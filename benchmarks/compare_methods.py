"""LoRA, Flat-LoRA and the sharpness-aware neighbours on the main job (MiniLM-L6, VADER valence regression).

    python benchmarks/compare_methods.py                  # the full comparison (estimated 30-40 min, 2 free CPU cores)
    python benchmarks/compare_methods.py --preset tiny    # a smoke run (CI)

Every method trains the same model (``examples/finetune_minilm.py``'s ``build``) with the same data
order, optimizer (AdamW, cosine learning rate), step budget and seeds; the only difference is the
method. Two settings: the full training set and a small-data one (a fixed fraction of it).

Protocol:

1. A validation split is carved from the training entries (``adler32(text) % 10 == 0``); training
   uses the rest; the test split (examples/finetune_minilm.py's) is only used for the final numbers.
2. Each method's hyper-parameter (sigma for Flat-LoRA and RWP, rho for the SAM family and Bi-LoRA) is
   chosen from ``GRID`` by the validation MSE of one run (seed 0, full setting), and reused for every
   seed and for the small-data setting.
3. For every setting and seed: test MSE and Pearson r and the wall time of the training loop; for
   seed 0 of the full setting, each method in a fresh process, the peak extra RSS of its training loop
   (VmHWM reset once the model is built); for the first ``--flatness-seeds`` seeds (full preset: 3) of
   the full setting, the top Hessian eigenvalue of the training loss w.r.t. the merged weights and the training
   loss under Flat-LoRA noise (sigma 0.05), both from :mod:`flatlora_kernels.flatness`.

Writes ``<out-dir>/compare-methods[-tiny].json`` (``benchmarks/common.write_record``), a Markdown table
and a figure next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune_minilm as job  # noqa: E402  (the main job: data, model, evaluation)
from common import RESULTS, reset_peak_rss, status_kib, write_record  # noqa: E402
from lora_variants import make_variant  # noqa: E402

import flatlora_kernels as fk  # noqa: E402

# method -> (hyper-parameter, validation grid)
GRID = {
    "lora": (None, [None]),
    "flat_lora": ("sigma", [0.05, 0.10]),
    "rwp_merged": ("sigma", [0.05, 0.10]),
    "rwp_lora": ("sigma", [0.05, 0.20]),
    "sam": ("rho", [0.01, 0.05]),
    "asam": ("rho", [0.1, 0.5]),
    "lora_sam": ("rho", [0.003, 0.01]),
    "merged_sam": ("rho", [0.01, 0.05]),
    "bilora": ("rho", [0.01, 0.05]),
}
RWP_LAMBDA = 0.5
BILORA_ASCENT_LR = 1.0
FLATNESS_SIGMA = 0.05


@dataclass(frozen=True)
class Preset:
    steps: int
    seeds: int
    grid_steps: int
    small_fraction: float
    eval_entries: int | None     # None: the whole split
    flatness_entries: int
    flatness_seeds: int          # seeds of the full setting measured for flatness
    eigen_iters: int
    noise_samples: int
    isolate_memory: bool         # full setting, seed 0: each method in a fresh process, for its peak memory


PRESETS = {
    "full": Preset(steps=80, seeds=5, grid_steps=80, small_fraction=0.1, eval_entries=None, flatness_entries=128,
                   flatness_seeds=3, eigen_iters=10, noise_samples=2, isolate_memory=True),
    "tiny": Preset(steps=2, seeds=1, grid_steps=1, small_fraction=0.1, eval_entries=16, flatness_entries=8,
                   flatness_seeds=1, eigen_iters=1, noise_samples=1, isolate_memory=False),
}


def committed_choices() -> dict:
    """Each method's sigma/rho as chosen on the validation split by the committed full run."""
    record = json.loads((ROOT / "benchmarks" / "results" / "compare-methods" / "compare-methods.json").read_text())
    return record["config"]["chosen"]


def splits(small_fraction: float):
    """(fit, validation, small, test) lists of (text, target)."""
    train, test = job.load_lexicon()
    fit = [item for item in train if zlib.adler32(item[0].encode()) % 10 != 0]
    val = [item for item in train if zlib.adler32(item[0].encode()) % 10 == 0]
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(1234)).tolist()
    small = [fit[i] for i in order[:max(1, round(small_fraction * len(fit)))]]
    return fit, val, small, test


def lora_factor_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]


def make_method(name: str, value, model, seed: int, steps: int):
    """(per-micro-batch method or None, Flat-LoRA controller or None) for one run."""
    if name == "flat_lora":
        return None, fk.apply_flat_lora(model.encoder, sigma=value, total_steps=steps, seed=seed)
    factors = lora_factor_params(model)
    method = {
        "lora": lambda: None,
        "rwp_merged": lambda: fk.RWP(model.encoder, sigma=value, lam=RWP_LAMBDA, scope="merged", seed=seed),
        "rwp_lora": lambda: fk.RWP(model.encoder, sigma=value, lam=RWP_LAMBDA, scope="lora", seed=seed),
        "sam": lambda: fk.SAMPerturber(factors, rho=value),
        "asam": lambda: fk.SAMPerturber(factors, rho=value, adaptive=True),
        "lora_sam": lambda: fk.SAMPerturber(factors, rho=value, per_tensor=True),
        "merged_sam": lambda: fk.MergedSAM(model.encoder, rho=value),
        "bilora": lambda: fk.BiLoRA(model.encoder, rho=value, ascent_lr=BILORA_ASCENT_LR, seed=seed),
    }[name]()
    return method, None


def flatness(model, preset: Preset) -> dict:
    """Top Hessian eigenvalue and the loss under Flat-LoRA noise, through the main job's flatness task."""
    from flatlora_kernels.flatness import noisy_loss, top_eigenvalues

    with tempfile.TemporaryDirectory() as tmp:
        model.encoder.save_pretrained(tmp)
        torch.save(model.head.state_dict(), Path(tmp) / "head.pt")
        measured, loss_fn, batches = job.flatness_task(tmp, entries=preset.flatness_entries,
                                                       batch_size=preset.flatness_entries)
    eigen = top_eigenvalues(measured, loss_fn, batches, k=1, max_iter=preset.eigen_iters, tol=1e-3, progress=False)
    noisy = noisy_loss(measured, loss_fn, batches, [FLATNESS_SIGMA], num_samples=preset.noise_samples,
                       progress=False)
    return {"top_eigenvalue": eigen.eigenvalues[0], "eigen_converged": eigen.converged[0],
            "noisy_loss": noisy.mean[0], "clean_loss": noisy.base_loss}


def regression_loss(model, enc, target) -> torch.Tensor:
    """The main job's objective: MSE of the regressor's prediction."""
    return torch.nn.functional.mse_loss(model(enc["input_ids"], enc["attention_mask"]), target)


def train_loop(model, tokenizer, method, controller, data, steps: int, batch_size: int, lr: float, seed: int,
               loss_fn=regression_loss, on_step=None, after_optimizer_step=None) -> float:
    """``steps`` optimizer steps of AdamW (cosine learning rate, no weight decay) on (text, target) ``data`` in
    a seeded order, through ``method.accumulate`` when there is a method, advancing ``method`` and the
    Flat-LoRA ``controller`` after each step; ``after_optimizer_step(model, step)`` right after the optimizer
    step, while the gradients are still there (AdaLoRA's rank allocator), and ``on_step(step, loss)`` at the
    end of each. Returns the wall seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(len(data), generator=order), 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(data), generator=order), 0
        batch = [data[i] for i in perm[cursor:cursor + batch_size].tolist()]
        cursor += batch_size
        enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        target = torch.tensor([y for _, y in batch])

        def closure():
            return loss_fn(model, enc, target)

        if method is None:
            loss = closure()
            loss.backward()
        else:
            loss = method.accumulate(closure)
        opt.step()
        sched.step()
        if after_optimizer_step is not None:
            after_optimizer_step(model, step)
        opt.zero_grad(set_to_none=True)
        for advancing in (method, controller):
            if advancing is not None:
                advancing.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return time.perf_counter() - start


def train_run(name: str, value, seed: int, data, evaluation, steps: int, args, preset: Preset,
              measure_flatness: bool = False, measure_memory: bool = False, variant: str = "lora") -> dict:
    """Train one method from the same start and data order; evaluate on ``evaluation``. Peak memory is
    only meaningful in a fresh process (``measure_memory``): a used one reuses memory it already holds.
    ``variant`` is the LoRA variant trained (``lora_variants.NAMES``; the main job's plain LoRA by default)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    lora = make_variant(variant, args.rank, steps, job.TARGETS, data, args.batch, seed)
    tokenizer, model = job.build(seed, args.rank, peft_config=lora.peft_config, prepare=lora.prepare)
    before = job.frozen_digest(model)
    method, controller = make_method(name, value, model, seed, steps)
    rss_start = reset_peak_rss()
    wall = train_loop(model, tokenizer, method, controller, data, steps, args.batch, args.lr, seed,
                      after_optimizer_step=lora.after_optimizer_step)
    peak_extra_mib = (status_kib("VmHWM") - rss_start) / 1024
    if isinstance(method, fk.BiLoRA):
        method.remove()  # dropped at inference
    mse, pearson = job.evaluate(model, tokenizer, evaluation, torch.device("cpu"))
    row = {"method": name, "value": value, "seed": seed, "steps": steps, "train_size": len(data), "mse": mse,
           "pearson": pearson, "wall_s": wall, "frozen_unchanged": job.frozen_digest(model) == before}
    if measure_memory:
        row["peak_extra_rss_mib"] = peak_extra_mib
    if measure_flatness:
        row.update(flatness(model, preset))
    return row


def choose(rows: list[dict]) -> dict:
    """The grid value with the lowest validation MSE, per method."""
    best = {}
    for row in rows:
        if row["method"] not in best or row["mse"] < best[row["method"]]["mse"]:
            best[row["method"]] = row
    return {name: row["value"] for name, row in best.items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], chosen: dict, methods: list[str]) -> list[dict]:
    """Per method and setting: metric mean ± std, time and memory relative to LoRA, flatness."""
    summary = []
    for setting in ("full", "small"):
        base = [r for r in rows if r["setting"] == setting and r["method"] == "lora"]
        base_wall = statistics.fmean(r["wall_s"] for r in base)
        base_mem = [r["peak_extra_rss_mib"] for r in base if "peak_extra_rss_mib" in r]
        for name in methods:
            mine = [r for r in rows if r["setting"] == setting and r["method"] == name]
            entry = {"setting": setting, "method": name, "hyper": GRID[name][0], "value": chosen[name],
                     "runs": len(mine)}
            for key in ("mse", "pearson", "wall_s", "peak_extra_rss_mib", "top_eigenvalue", "noisy_loss"):
                values = [r[key] for r in mine if key in r]
                if values:
                    entry[key + "_mean"], entry[key + "_std"] = mean_std(values)
            entry["time_vs_lora"] = entry["wall_s_mean"] / base_wall
            if base_mem and "peak_extra_rss_mib_mean" in entry:
                entry["memory_vs_lora"] = entry["peak_extra_rss_mib_mean"] / statistics.fmean(base_mem)
            summary.append(entry)
    return summary


def markdown(summary: list[dict], config: dict) -> str:
    lines = [f"MiniLM-L6 on VADER valence, {config['steps']} steps of {config['batch']}, {config['seeds']} seeds; "
             f"hyper-parameters chosen on the validation split. Time: training loop, relative to LoRA; memory: peak "
             f"extra RSS of the training loop (seed 0, full setting, a fresh process per method) relative to LoRA.",
             "", "| setting | method | σ/ρ | test MSE | test r | time ×LoRA | memory ×LoRA | top eigenvalue | "
             "loss under σ=0.05 noise |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(entry, key, fmt):
        if key + "_mean" not in entry:
            return "–"
        return f"{entry[key + '_mean']:{fmt}} ± {entry[key + '_std']:{fmt}}"

    for e in summary:
        hyper = "–" if e["hyper"] is None else f"{e['hyper']} {e['value']:g}"
        memory = f"{e['memory_vs_lora']:.2f}" if "memory_vs_lora" in e else "–"
        lines.append(f"| {e['setting']} | {e['method']} | {hyper} | {cell(e, 'mse', '.4f')} | "
                     f"{cell(e, 'pearson', '.3f')} | {e['time_vs_lora']:.2f} | {memory} | "
                     f"{cell(e, 'top_eigenvalue', '.3g')} | {cell(e, 'noisy_loss', '.4f')} |")
    return "\n".join(lines) + "\n"


def figure(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(dict.fromkeys(e["method"] for e in summary))
    for ax, setting in zip(axes[:2], ("full", "small")):
        entries = {e["method"]: e for e in summary if e["setting"] == setting}
        ax.bar(names, [entries[n]["mse_mean"] for n in names], yerr=[entries[n]["mse_std"] for n in names],
               color=["#888888" if n == "lora" else "#3b75af" for n in names], capsize=3)
        ax.set_title(f"test MSE, {setting} training set (mean ± std over seeds)")
        ax.tick_params(axis="x", rotation=45)
        low = min(entries[n]["mse_mean"] - entries[n]["mse_std"] for n in names)
        ax.set_ylim(bottom=max(0.0, low * 0.95))
    full = {e["method"]: e for e in summary if e["setting"] == "full"}
    measured = [n for n in names if "top_eigenvalue_mean" in full[n]]
    axes[2].bar(measured, [full[n]["top_eigenvalue_mean"] for n in measured],
                yerr=[full[n]["top_eigenvalue_std"] for n in measured], color="#c4553b", capsize=3)
    axes[2].set_title("top Hessian eigenvalue (merged weights)")
    axes[2].tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def comparison_parser(doc: str, out_dir: Path) -> argparse.ArgumentParser:
    """The options every comparison on the main job takes: preset, seeds, steps, batch, learning rate, rank,
    CPU threads and where the results go."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seeds", type=int, help="seeds per run (preset: full 5, tiny 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (preset: full 80, tiny 2)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--out-dir", type=Path, default=out_dir)
    return parser


def main(argv=None) -> None:
    parser = comparison_parser(__doc__, RESULTS / "compare-methods")
    parser.add_argument("--flatness-seeds", type=int, default=None,
                        help="seeds of the full setting measured for flatness (preset: full 3, tiny 1)")
    parser.add_argument("--methods", nargs="+", choices=list(GRID), default=list(GRID),
                        help="a subset, for timing (the table needs lora)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    steps = args.steps or preset.steps
    seeds = args.seeds or preset.seeds
    flatness_seeds = min(seeds, preset.flatness_seeds if args.flatness_seeds is None else args.flatness_seeds)
    if "lora" not in args.methods:
        parser.error("--methods must include lora (the reference for time and memory)")
    if args.threads:
        torch.set_num_threads(args.threads)
    fit, val, small, test = splits(preset.small_fraction)
    if preset.eval_entries:
        val, test = val[:preset.eval_entries], test[:preset.eval_entries]
    print(f"fit {len(fit)} / validation {len(val)} / small {len(small)} / test {len(test)} entries; "
          f"{steps} steps of {args.batch}, {seeds} seeds", flush=True)
    clock = time.perf_counter()

    grid_rows = []
    for name in args.methods:
        hyper, values = GRID[name]
        for value in values if hyper else []:
            row = train_run(name, value, 0, fit, val, preset.grid_steps if args.steps is None else steps, args, preset)
            grid_rows.append(row)
            print(f"grid {name} {hyper}={value}: validation MSE {row['mse']:.4f} ({row['wall_s']:.1f} s)", flush=True)
    chosen = {"lora": None, **choose(grid_rows)}

    rows = []
    for setting, data in (("full", fit), ("small", small)):
        for seed in range(seeds):
            for name in args.methods:
                measure = setting == "full" and seed < flatness_seeds
                run = (name, chosen[name], seed, data, test, steps, args, preset, measure)
                if setting == "full" and seed == 0 and preset.isolate_memory:
                    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
                        row = pool.submit(train_run, *run, measure_memory=True).result()
                else:
                    row = train_run(*run)
                rows.append({"setting": setting, **row})
                print(f"{setting} seed {seed} {name}: test MSE {row['mse']:.4f}, {row['wall_s']:.1f} s"
                      + (f", +{row['peak_extra_rss_mib']:.0f} MiB" if "peak_extra_rss_mib" in row else "")
                      + (f", top eigenvalue {row['top_eigenvalue']:.4g}" if measure else ""), flush=True)
    if not all(r["frozen_unchanged"] for r in rows + grid_rows):
        raise SystemExit("a frozen weight changed")

    summary = summarise(rows, chosen, args.methods)
    config = {"preset": args.preset, "steps": steps, "seeds": seeds, "batch": args.batch, "lr": args.lr,
              "rank": args.rank, "grid": {k: v[1] for k, v in GRID.items() if k in args.methods},
              "grid_steps": preset.grid_steps if args.steps is None else steps,
              "chosen": chosen, "rwp_lambda": RWP_LAMBDA, "bilora_ascent_lr": BILORA_ASCENT_LR,
              "flatness_sigma": FLATNESS_SIGMA, "flatness_seeds": flatness_seeds,
              "sizes": {"fit": len(fit), "validation": len(val), "small": len(small), "test": len(test)},
              "total_wall_s": time.perf_counter() - clock}
    publish(args.out_dir, "compare-methods", args.preset, config, {"summary": summary, "runs": rows, "grid": grid_rows},
            markdown(summary, config), lambda path: figure(summary, path))


def publish(out_dir: Path, name: str, preset: str, config: dict, results: dict, table: str, draw) -> Path:
    """Write a comparison's record (``<name>[-preset].json``), its Markdown table and its figure (``draw(path)``)
    side by side, and print the table."""
    stem = name + ("" if preset == "full" else f"-{preset}")
    out = write_record(out_dir / f"{stem}.json", name.replace("-", "_"), "cpu", config, results)
    (out_dir / f"{stem}.md").write_text(table)
    draw(out_dir / f"{stem}.png")
    print(table)
    print(f"wrote {out} ({config['total_wall_s']:.0f} s in all)")
    return out


if __name__ == "__main__":
    main()
