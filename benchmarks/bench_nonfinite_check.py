"""Cost of the non-finite gradient check (``FlatLora.check_gradients``, what ``ctl.guard(optimizer)`` and
``FlatLoraCallback`` run before every optimizer step) against one training step of the main job.

    python benchmarks/bench_nonfinite_check.py            # MiniLM, LoRA r=8 on every linear, batch 32
    python benchmarks/bench_nonfinite_check.py --quick    # batch 4, few repetitions (smoke run)

The job is ``examples/finetune_minilm.py``'s: the packaged all-MiniLM-L6-v2 with LoRA r = 8 on all 36 linear
layers (72 factors), a regression head, AdamW, Flat-LoRA sigma = 0.05. One step = forward, backward,
``optimizer.step()``, ``ctl.step()`` on a batch of the VADER lexicon. The check is timed on the gradients
that step leaves; both medians come from one ``common.median_ms`` call (interleaved rounds on the CPU).
Writes ``benchmarks/results/nonfinite-check-<device>.json``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import ROOT, RESULTS, bench_device, device_label, median_ms, slug, write_record

sys.path.insert(0, str(ROOT / "examples"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.reps = 4, 3

    import finetune_minilm as job

    import flatlora_kernels as fk

    device = bench_device()
    train, _ = job.load_lexicon()
    tokenizer, model = job.build(seed=0, rank=8)
    model.to(device)
    ctl = fk.apply_flat_lora(model, sigma=0.05, total_steps=1000, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    items = train[:args.batch]
    enc = tokenizer([t for t, _ in items], padding=True, return_tensors="pt").to(device)
    target = torch.tensor([y for _, y in items], device=device)

    def backward() -> None:
        torch.nn.functional.mse_loss(model(enc["input_ids"], enc["attention_mask"]), target).backward()

    def training_step() -> None:
        backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctl.step()

    backward()  # the gradients the check reads, kept through the timing (training_step zeroes its own)
    kept = {p: p.grad.clone() for p in params}

    def check() -> None:
        for p, g in kept.items():
            p.grad = g
        assert ctl.check_gradients()

    step_ms, check_ms = median_ms([training_step, check], device, reps=args.reps)
    result = {"step_ms": step_ms, "check_ms": check_ms, "check_percent_of_step": 100 * check_ms / step_ms,
              "lora_factors": len(ctl.factors()), "threads": torch.get_num_threads()}
    print(f"{device_label(device)}: step {step_ms:.1f} ms, check {check_ms:.3f} ms "
          f"({result['check_percent_of_step']:.3f}% of a step; {result['lora_factors']} LoRA factors)")
    path = write_record(RESULTS / f"nonfinite-check-{slug(device_label(device))}.json", "nonfinite-check", device,
                        {"batch": args.batch, "rank": 8, "reps": args.reps}, [result])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
