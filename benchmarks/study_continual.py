"""Continual learning with LoRA on human word ratings: one adapter through a sequence, and one adapter per task.

    python benchmarks/study_continual.py                 # the committed run (see docs/sharpness-study.md)
    python benchmarks/study_continual.py --preset tiny   # a smoke run (CI, seconds)
    python benchmarks/study_continual.py --preset sharpness  # seed 0 again, sharpness with 8 Lanczos steps

Tasks (``benchmarks/lexicon_tasks.py``), in this order: Warriner valence → arousal → dominance (1..9,
regression) → NRC emotion association (ten yes/no labels, multi-label classification). The model is
the main job's (packaged MiniLM-L6 with LoRA on every linear layer, mean pooling), with one head per
task; training uses ``benchmarks/compare_methods.py``'s loop and methods (LoRA, Flat-LoRA, SAM on the
LoRA factors, merged-weight SAM) with the sigma/rho that its validation grid chose on the main job.

* **One adapter** (``sequential``): one LoRA trained on the tasks in turn (a fresh optimizer, cosine
  schedule and Flat-LoRA noise schedule per stage; each head trained in its own stage only). After every
  stage, every task's held-out metric (Pearson r for the ratings, macro ROC AUC over the ten labels for
  NRC) on the tasks seen so far and the ones to come: the matrix ``R[stage][task]``; average performance
  (the mean of the last row) and backward transfer (the mean over the first three tasks of
  ``R[4][task] − R[task][task]``, negative = forgetting). Sharpness of the merged model on the valence
  loss (fixed valence words, the valence head of stage 1 for every stage, so only the merged encoder
  weights change): the base model (stage 0) and after each stage — top Hessian eigenvalue (Lanczos),
  median dominant eigenvalue over batches, ε-sharpness. Ranks 4 and 8.
* **One adapter per task** (``per-task``): a fresh LoRA per task; each adapter's representation is
  then scored on every task by a ridge-regression probe fitted on that task's training words (the base
  model's probe is the reference row): the transfer matrix.

Writes ``<out-dir>/continual[-tiny].json``, a Markdown table and figures next to it.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare_methods as cm  # noqa: E402  (the methods, the training loop, the main job)
import lexicon_tasks as lexicons  # noqa: E402
from common import RESULTS, write_record  # noqa: E402
from study_out_of_domain import mean_std, pyplot, ranks, save, study_parser  # noqa: E402

job = cm.job
TASKS = ("warriner_valence", "warriner_arousal", "warriner_dominance", "nrc_emotion")
METHODS = ("lora", "flat_lora", "sam", "merged_sam")


@dataclass(frozen=True)
class Preset:
    ranks: tuple[int, ...]     # the largest with every method, the others with ``low_rank_methods``
    low_rank_methods: tuple[str, ...]
    seeds: int
    stage_steps: int
    per_task_seeds: int
    batch: int
    train_entries: int         # training words per task (a seeded subset of its train split)
    test_entries: int          # held-out words per task
    sharpness_seeds: int       # seeds whose sequence is measured (rank 8: every method; other ranks: LoRA)
    sharpness_entries: int     # valence training words the sharpness is measured on
    dominant_batch: int        # words per batch of the median dominant eigenvalue
    lanczos_steps: int
    epsilon: float
    epsilon_steps: int


PRESETS = {
    "full": Preset(ranks=(4, 8), low_rank_methods=("lora", "flat_lora"), seeds=3, stage_steps=12, per_task_seeds=2,
                   batch=16, train_entries=400, test_entries=200, sharpness_seeds=1, sharpness_entries=32,
                   dominant_batch=8, lanczos_steps=3, epsilon=5e-4, epsilon_steps=2),
    # seed 0 of "full" again (same training), measured with more Lanczos steps; no per-task adapters
    "sharpness": Preset(ranks=(4, 8), low_rank_methods=("lora",), seeds=1, stage_steps=12, per_task_seeds=0,
                        batch=16, train_entries=400, test_entries=200, sharpness_seeds=1, sharpness_entries=32,
                        dominant_batch=8, lanczos_steps=8, epsilon=5e-4, epsilon_steps=2),
    "tiny": Preset(ranks=(4,), low_rank_methods=(), seeds=1, stage_steps=1, per_task_seeds=1, batch=4,
                   train_entries=12, test_entries=8,
                   sharpness_seeds=1, sharpness_entries=4, dominant_batch=2, lanczos_steps=1, epsilon=5e-4,
                   epsilon_steps=1),
}


class MultiHead(job.Regressor):
    """The main job's regressor with one head per task; :meth:`use` points ``head`` at a task's head."""

    def __init__(self, encoder: torch.nn.Module, hidden: int, outputs: dict[str, int]):
        super().__init__(encoder, hidden)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, count) for name, count in outputs.items()})
        self.use(next(iter(outputs)))

    def use(self, task: str) -> "MultiHead":
        self.head = self.heads[task]
        return self


def load_data(preset: Preset) -> tuple[dict, dict]:
    """(tasks by name, {name: {"train": [...], "test": [...]}}): seeded subsets; the three Warriner tasks
    share their words (same lexicon, same order, same seed)."""
    tasks = {name: lexicons.load_task(name) for name in TASKS}
    sizes = {"train": preset.train_entries, "test": preset.test_entries}
    data = {name: {part: random.Random(part).sample(task.split(part), size) for part, size in sizes.items()}
            for name, task in tasks.items()}
    return tasks, data


def loss_for(task: lexicons.Task):
    def loss(model, enc, target):
        output = model.use(task.name)(enc["input_ids"], enc["attention_mask"])
        if task.kind == "multilabel":
            return torch.nn.functional.binary_cross_entropy_with_logits(output, target)
        return torch.nn.functional.mse_loss(output, target)
    return loss


def macro_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over labels (with both classes present) of the ROC AUC (Mann-Whitney, ties counted half)."""
    aucs = []
    for column in range(labels.shape[1]):
        positive = labels[:, column] > 0.5
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            rank_sum = float(ranks(scores[:, column])[positive].sum())
            aucs.append((rank_sum - n_pos * (n_pos - 1) / 2) / (n_pos * n_neg))
    return statistics.fmean(aucs)


def metric(task: lexicons.Task, scores: torch.Tensor, data) -> float:
    target = torch.tensor([y for _, y in data])
    if task.kind == "multilabel":
        return macro_auc(scores, target)
    return torch.corrcoef(torch.stack([scores.double(), target.double()]))[0, 1].item()


def pooled_features(model: MultiHead, tokenizer, words, batch_size=256) -> torch.Tensor:
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(words), batch_size):
            enc = tokenizer(list(words[start:start + batch_size]), padding=True, return_tensors="pt")
            chunks.append(model.pooled(enc["input_ids"], enc["attention_mask"]).float())
    model.train()
    return torch.cat(chunks)


def features_by_word(model, tokenizer, data, parts) -> dict[str, torch.Tensor]:
    """One forward pass for every distinct word of the given parts of every task."""
    words = sorted({w for splits in data.values() for part in parts for w, _ in splits[part]})
    return dict(zip(words, pooled_features(model, tokenizer, words)))


def head_scores(model: MultiHead, tasks, data, features) -> dict[str, float]:
    """Every task's held-out metric through its own head, from ``features_by_word``."""
    result = {}
    with torch.no_grad():
        for name, task in tasks.items():
            x = torch.stack([features[w] for w, _ in data[name]["test"]])
            result[name] = metric(task, model.heads[name](x).squeeze(-1), data[name]["test"])
    return result


def probe_scores(tasks, data, features, ridge: float = 1e-3) -> dict[str, float]:
    """Every task's held-out metric from a ridge-regression probe on the pooled ``features`` (train and
    test words), fitted on the task's training words (``ridge`` times the summed feature variance as the
    penalty)."""
    result = {}
    for name, task in tasks.items():
        x = torch.stack([features[w] for w, _ in data[name]["train"]]).double()
        y = torch.tensor([t for _, t in data[name]["train"]], dtype=torch.float64).reshape(len(x), -1)
        mean = x.mean(0)
        penalty = ridge * float((x - mean).var(0).mean()) * len(x)
        weights = torch.linalg.solve((x - mean).T @ (x - mean) + penalty * torch.eye(x.shape[1], dtype=x.dtype),
                                     (x - mean).T @ (y - y.mean(0)))
        test = torch.stack([features[w] for w, _ in data[name]["test"]]).double()
        scores = ((test - mean) @ weights + y.mean(0)).squeeze(-1)
        result[name] = metric(task, scores, data[name]["test"])
    return result


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def new_model(seed: int, rank: int, tasks, **load) -> tuple:
    """Tokenizer and a MultiHead around a fresh LoRA on the packaged MiniLM (the main job's ``build``;
    ``load``: e.g. eager attention, which the Hessian measures need for double backward)."""
    tokenizer, regressor = job.build(seed, rank, **load)
    encoder = regressor.encoder
    return tokenizer, MultiHead(encoder, encoder.config.hidden_size, {n: t.outputs for n, t in tasks.items()})


def sharpness(states, valence_head, rank, tasks, data, tokenizer, preset: Preset) -> list[dict]:
    """Sharpness of the merged model on the valence loss at each saved LoRA state (see the docstring)."""
    from flatlora_kernels import flatness

    _, measured = new_model(0, rank, tasks, attn_implementation="eager")
    measured.use("warriner_valence").head.load_state_dict(valence_head)
    words = data["warriner_valence"]["train"][:preset.sharpness_entries]

    def batches(size):
        out = []
        for start in range(0, len(words), size):
            items = words[start:start + size]
            enc = tokenizer([w for w, _ in items], padding=True, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in items])))
        return out

    def loss_fn(model, batch):
        ids, mask, target = batch
        return torch.nn.functional.mse_loss(model(ids, mask), target)

    whole, small = batches(len(words)), batches(preset.dominant_batch)
    rows = []
    parameters = dict(measured.named_parameters())
    for stage, state in enumerate(states):
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)
        start = time.perf_counter()
        top = flatness.top_eigenvalues(measured, loss_fn, whole, k=1, method="lanczos", max_iter=preset.lanczos_steps,
                                       tol=1e-2, progress=False)
        dominant = flatness.median_dominant_eigenvalue(measured, loss_fn, small, method="lanczos",
                                                       max_iter=preset.lanczos_steps, tol=1e-2, progress=False)
        sharp = flatness.epsilon_sharpness(measured, loss_fn, whole, preset.epsilon, steps=preset.epsilon_steps,
                                           progress=False)
        rows.append({"stage": stage, "top_eigenvalue": top.eigenvalues[0], "top_converged": top.converged[0],
                     "median_dominant_eigenvalue": dominant.median, "dominant_values": dominant.values,
                     "epsilon_sharpness": sharp.keskar, "valence_loss": sharp.base_loss,
                     "wall_s": time.perf_counter() - start})
    return rows


def configure_method(name, value, model, seed, steps, controller):
    """compare_methods' method for one stage; Flat-LoRA is applied once and its schedule restarted per stage."""
    if name == "flat_lora" and controller is not None:
        state = controller.state_dict()
        state["step"] = 0
        controller.load_state_dict(state)
        return None, controller
    return cm.make_method(name, value, model, seed, steps)


def sequential(name, value, seed, rank, tasks, data, preset, measure) -> dict:
    tokenizer, model = new_model(seed, rank, tasks)
    before = job.frozen_digest(model)
    states, matrix, controller, walls = [lora_state(model)], [], None, []
    for stage, task_name in enumerate(TASKS):
        method, controller = configure_method(name, value, model, seed, preset.stage_steps, controller)
        walls.append(cm.train_loop(model, tokenizer, method, controller, data[task_name]["train"], preset.stage_steps,
                                   preset.batch, 1e-3, seed + 100 * stage, loss_fn=loss_for(tasks[task_name])))
        if controller is not None:
            controller.clear()  # evaluate and measure without noise
        states.append(lora_state(model))
        matrix.append(head_scores(model, tasks, data, features_by_word(model, tokenizer, data, ["test"])))
    last = matrix[-1]
    row = {"method": name, "value": value, "seed": seed, "rank": rank, "matrix": matrix,
           "average": statistics.fmean(last.values()),
           "backward_transfer": statistics.fmean(last[t] - matrix[i][t] for i, t in enumerate(TASKS[:-1])),
           "train_wall_s": sum(walls), "frozen_unchanged": job.frozen_digest(model) == before}
    if measure:
        row["sharpness"] = sharpness(states, model.heads["warriner_valence"].state_dict(), rank, tasks, data,
                                     tokenizer, preset)
    return row


def per_task(name, value, seed, rank, tasks, data, preset) -> list[dict]:
    rows = []
    for task_name in TASKS:
        tokenizer, model = new_model(seed, rank, tasks)
        method, controller = cm.make_method(name, value, model, seed, preset.stage_steps)
        wall = cm.train_loop(model, tokenizer, method, controller, data[task_name]["train"], preset.stage_steps,
                             preset.batch, 1e-3, seed, loss_fn=loss_for(tasks[task_name]))
        if controller is not None:
            controller.clear()
        features = features_by_word(model, tokenizer, data, ["train", "test"])
        rows.append({"method": name, "value": value, "seed": seed, "rank": rank, "trained_on": task_name,
                     "own_head": head_scores(model, {task_name: tasks[task_name]}, data, features)[task_name],
                     "probe": probe_scores(tasks, data, features), "train_wall_s": wall})
    return rows


def summarise(sequences, adapters, base_probe) -> dict:
    out = {"sequential": [], "per_task": []}
    for rank in sorted({r["rank"] for r in sequences}):
        for name in METHODS:
            runs = [r for r in sequences if r["rank"] == rank and r["method"] == name]
            if not runs:
                continue
            entry = {"rank": rank, "method": name, "seeds": len(runs),
                     "average": mean_std([r["average"] for r in runs]),
                     "backward_transfer": mean_std([r["backward_transfer"] for r in runs]),
                     "matrix": [[statistics.fmean(r["matrix"][s][t] for r in runs) for t in TASKS]
                                for s in range(len(TASKS))]}
            measured = [r["sharpness"] for r in runs if "sharpness" in r]
            if measured:
                entry["sharpness"] = [{key: statistics.fmean(m[s][key] for m in measured)
                                       for key in ("top_eigenvalue", "median_dominant_eigenvalue", "epsilon_sharpness",
                                                   "valence_loss")} for s in range(len(measured[0]))]
            out["sequential"].append(entry)
    for name in METHODS:
        runs = [r for r in adapters if r["method"] == name]
        if runs:
            out["per_task"].append({"method": name, "seeds": len({r["seed"] for r in runs}), "transfer": [
                [statistics.fmean(r["probe"][t] for r in runs if r["trained_on"] == source) for t in TASKS]
                for source in TASKS], "own_head": [statistics.fmean(r["own_head"] for r in runs if r["trained_on"] == t)
                                                    for t in TASKS]})
    out["base_probe"] = [base_probe[t] for t in TASKS]
    return out


SHORT = {"warriner_valence": "valence", "warriner_arousal": "arousal", "warriner_dominance": "dominance",
         "nrc_emotion": "NRC (AUC)"}


def markdown(summary: dict, config: dict) -> str:
    header = " | ".join(SHORT[t] for t in TASKS)
    lines = [f"MiniLM-L6 + LoRA, {config['stage_steps']} steps of {config['batch']} per task, "
             f"{config['train_entries']} training / {config['test_entries']} held-out words per task; "
             "Pearson r (NRC: macro ROC AUC); mean over seeds.", "",
             "One adapter, in sequence: average performance after the last stage and backward transfer", "",
             "| rank | method | seeds | average | backward transfer |", "|---|---|---|---|---|"]
    for e in summary["sequential"]:
        lines.append(f"| {e['rank']} | {e['method']} | {e['seeds']} | {e['average'][0]:.3f} ± {e['average'][1]:.3f} "
                     f"| {e['backward_transfer'][0]:+.3f} ± {e['backward_transfer'][1]:.3f} |")
    for e in summary["sequential"]:
        lines += ["", f"R[stage][task], rank {e['rank']}, {e['method']}", "", f"| after | {header} |",
                  "|---" * (len(TASKS) + 1) + "|"]
        lines += [f"| {SHORT[TASKS[s]]} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                  for s, row in enumerate(e["matrix"])]
    lines += ["", "Sharpness of the merged model on the valence loss (seed 0): stage 0 = base model", "",
              "| rank | method | measure | " + " | ".join(f"stage {s}" for s in range(len(TASKS) + 1)) + " |",
              "|---" * (len(TASKS) + 4) + "|"]
    for e in summary["sequential"]:
        for key in ("top_eigenvalue", "median_dominant_eigenvalue", "epsilon_sharpness", "valence_loss"):
            if "sharpness" in e:
                lines.append(f"| {e['rank']} | {e['method']} | {key.replace('_', ' ')} | "
                             + " | ".join(f"{s[key]:.4g}" for s in e["sharpness"]) + " |")
    lines += ["", "One adapter per task: ridge probe on each adapter's features (rows: trained on)", "",
              f"| method | trained on | {header} |", "|---" * (len(TASKS) + 2) + "|",
              "| base model | – | " + " | ".join(f"{v:.3f}" for v in summary["base_probe"]) + " |"]
    for e in summary["per_task"]:
        lines += [f"| {e['method']} | {SHORT[source]} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                  for source, row in zip(TASKS, e["transfer"])]
    return "\n".join(lines) + "\n"


def figures(summary: dict, stem: Path) -> None:
    plt = pyplot()

    sequences = summary["sequential"]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.6), sharey=False)
    for ax, (t, task) in zip(axes, enumerate(TASKS)):
        for e in sequences:
            ax.plot(range(1, len(TASKS) + 1), [row[t] for row in e["matrix"]], marker="o",
                    linestyle="-" if e["rank"] == max(x["rank"] for x in sequences) else "--",
                    label=f"{e['method']} r={e['rank']}")
        ax.axvline(t + 1, color="#bbbbbb", linewidth=0.8)
        ax.set_title(SHORT[task])
        ax.set_xlabel("after stage")
    axes[0].legend(fontsize=6)
    save(fig, f"{stem}-matrix.png")

    measured = [e for e in sequences if "sharpness" in e]
    if measured:
        keys = ("top_eigenvalue", "median_dominant_eigenvalue", "epsilon_sharpness")
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6))
        for ax, key in zip(axes, keys):
            for e in measured:
                ax.plot(range(len(e["sharpness"])), [s[key] for s in e["sharpness"]], marker="o",
                        label=f"{e['method']} r={e['rank']}")
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("stage (0 = base model)")
        axes[0].legend(fontsize=7)
        save(fig, f"{stem}-sharpness.png")


def main(argv=None) -> None:
    args = study_parser(__doc__, PRESETS, RESULTS / "continual").parse_args(argv)
    preset = PRESETS[args.preset]
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()
    tasks, data = load_data(preset)
    chosen = cm.committed_choices()  # the main job's validation choices
    values = {name: chosen[name] for name in METHODS}
    print(f"tasks {', '.join(TASKS)}: {preset.train_entries} train / {preset.test_entries} test words each; "
          f"sigma/rho {values}", flush=True)

    sequences = []
    for seed in range(preset.seeds):
        for rank in preset.ranks:
            for name in METHODS if rank == max(preset.ranks) else preset.low_rank_methods:
                measure = seed < preset.sharpness_seeds and (rank == max(preset.ranks) or name == "lora")
                row = sequential(name, values[name], seed, rank, tasks, data, preset, measure)
                sequences.append(row)
                print(f"sequential seed {seed} rank {rank} {name}: average {row['average']:.3f}, backward transfer "
                      f"{row['backward_transfer']:+.3f} ({row['train_wall_s']:.0f} s training"
                      + (f", {sum(s['wall_s'] for s in row['sharpness']):.0f} s sharpness)" if measure else ")"),
                      flush=True)
    tokenizer, base = new_model(0, max(preset.ranks), tasks)
    base_probe = probe_scores(tasks, data, features_by_word(base, tokenizer, data, ["train", "test"]))
    adapters = []
    for seed in range(preset.per_task_seeds):
        for name in METHODS:
            adapters += per_task(name, values[name], seed, max(preset.ranks), tasks, data, preset)
            print(f"per-task seed {seed} {name}: done", flush=True)
    if not all(r["frozen_unchanged"] for r in sequences):
        raise SystemExit("a frozen weight changed")

    summary = summarise(sequences, adapters, base_probe)
    config = {"preset": args.preset, "tasks": TASKS, "methods": values, "ranks": preset.ranks, "seeds": preset.seeds,
              "per_task_seeds": preset.per_task_seeds, "stage_steps": preset.stage_steps, "batch": preset.batch,
              "train_entries": preset.train_entries, "test_entries": preset.test_entries,
              "sharpness": {"seeds": preset.sharpness_seeds, "entries": preset.sharpness_entries,
                            "dominant_batch": preset.dominant_batch, "lanczos_steps": preset.lanczos_steps,
                            "epsilon": preset.epsilon, "epsilon_steps": preset.epsilon_steps},
              "threads": args.threads, "total_wall_s": time.perf_counter() - clock}
    stem = "continual" + ("" if args.preset == "full" else f"-{args.preset}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = write_record(args.out_dir / f"{stem}.json", "study_continual", "cpu", config,
                       {"summary": summary, "sequential": sequences, "per_task": adapters, "base_probe": base_probe})
    table = markdown(summary, config)
    (args.out_dir / f"{stem}.md").write_text(table)
    figures(summary, args.out_dir / stem)
    print(table)
    print(f"wrote {out} ({config['total_wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
