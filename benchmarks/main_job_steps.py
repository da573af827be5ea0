"""The main job's training step, LoRA against Flat-LoRA, interleaved in one process.

`examples/finetune_minilm.py` trains LoRA, then Flat-LoRA, each for ~15 s in its own process; on a
shared machine the speed drifts between the two runs, and their wall-time ratio moved between x1.07
and x1.43 over four runs of the same code. This benchmark takes the same model (MiniLM-L6, LoRA r = 8
on every encoder linear layer), data and batch size, builds both methods side by side, and alternates
blocks of steps between them, so both see the same machine state; it reports the median step time of
each and their ratio. ``--busy N`` runs N busy-loop processes meanwhile (the loaded-machine figure).

    python benchmarks/main_job_steps.py [--steps 60] [--block 5] [--busy 0]
                                        [--out benchmarks/results/main-job-steps.json]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, write_record

sys.path.insert(0, str(ROOT / "examples"))
import finetune_minilm as job  # noqa: E402

import flatlora_kernels as fk  # noqa: E402


def _spin() -> None:
    while True:
        pass


def make_trainer(method: str, batches, sigma: float, seed: int, total_steps: int):
    """A closure running one training step of ``method`` ("lora" or "flat_lora") on the next batch."""
    _, model = job.build(seed, 8)
    ctl = fk.apply_flat_lora(model, sigma=sigma, total_steps=total_steps, seed=seed) if method == "flat_lora" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    cursor = itertools.count()

    def step() -> float:
        enc, target = batches[next(cursor) % len(batches)]
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(enc["input_ids"], enc["attention_mask"]), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctl is not None:
            ctl.step()
        return time.perf_counter() - start

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="measured steps per method")
    parser.add_argument("--block", type=int, default=5, help="steps per method before switching")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes to run meanwhile")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "main-job-steps.json")
    args = parser.parse_args()
    if args.steps < 1 or args.block < 1:
        parser.error("--steps and --block must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, _ = job.build(0, 8)
    train, _ = job.load_lexicon()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for start in range(0, len(order) - args.batch + 1, args.batch):
        items = [train[i] for i in order[start:start + args.batch]]
        batches.append((tokenizer([t for t, _ in items], padding=True, return_tensors="pt"),
                        torch.tensor([y for _, y in items])))
    tokens = statistics.mean(int(enc["attention_mask"].sum()) for enc, _ in batches)
    methods = ("lora", "flat_lora")
    steppers = {m: make_trainer(m, batches, args.sigma, 0, args.warmup + args.steps) for m in methods}
    spinners = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        for m in methods:
            for _ in range(args.warmup):
                steppers[m]()
        times = {m: [] for m in methods}
        while len(times["flat_lora"]) < args.steps:
            for m in methods:
                times[m] += [steppers[m]() for _ in range(min(args.block, args.steps - len(times[m])))]
    finally:
        for p in spinners:
            p.terminate()
    medians = {m: statistics.median(times[m]) * 1e3 for m in methods}
    row = {"threads": torch.get_num_threads(), "busy_processes": args.busy, "tokens_per_batch": tokens,
           "backend": fk.backend_name("cpu"), "lora_ms": medians["lora"], "flat_lora_ms": medians["flat_lora"],
           "ratio": medians["flat_lora"] / medians["lora"],
           "ratio_of_totals": sum(times["flat_lora"]) / sum(times["lora"])}
    print(f"{row['threads']} threads, {args.busy} busy process(es), {tokens:.0f} tokens per batch: "
          f"LoRA {row['lora_ms']:.1f} ms, Flat-LoRA {row['flat_lora_ms']:.1f} ms per step (medians of "
          f"{args.steps}): x{row['ratio']:.2f} (totals x{row['ratio_of_totals']:.2f})")
    path = write_record(args.out, "main_job_steps", torch.device("cpu"), vars(args) | {"out": str(args.out)}, [row])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
