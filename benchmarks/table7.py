"""The paper's Table 7 setting: memory, time and weight drift of LoRA, public Flat-LoRA and ours.

    python benchmarks/table7.py                    # GPU: Llama-2-7B shapes (needs >= 40 GB), accumulation 16 and 1
    python benchmarks/table7.py --preset 1b        # smaller Llama shapes for smaller GPUs
    python benchmarks/table7.py --preset tiny      # CPU smoke run (what CI runs)

A Llama-shaped model with random weights (no download), bf16 backbone, fp32 LoRA r = 8, alpha = 16 on
q, k, v, o, gate, up, down; micro-batch 2 of 512 tokens; AdamW. Three methods, measured in one run:

1. ``lora``: plain PEFT LoRA;
2. ``public_flat_lora``: the public code's procedure, re-implemented here: at the start of each
   accumulation window every LoRA layer forms ``W + s·BA`` in memory for its row norms, the global RNG is
   seeded from wall-clock digits, an m×n ``torch.normal`` draw is added into ``W`` in place, and after the
   window's last backward the RNG is re-seeded, the same draw made again and subtracted;
3. ``flat_lora``: ours (``apply_flat_lora``): noise regenerated in the matmuls, ``W`` never written.

For each: peak memory (max allocated and reserved on a GPU, peak RSS growth on the CPU), median time per
optimizer step after warm-up, ratios against LoRA from the same run, and after the run the fraction of
frozen target-weight elements that changed and ``||W - W0|| / ||W0||``. Writes one ``flatlora-bench/1``
record to benchmarks/results/table7-<preset>-<device>.json, one row per (accumulation, method):
{"grad_accum", "method", "peak_memory_gb", "peak_reserved_gb", "step_time_s", "changed_fraction",
"relative_drift", "step_time_ratio", "memory_delta_gb"} (ratio and delta against LoRA), plus a
Markdown table and a PNG chart beside it. On the CPU the memory figures are allocator noise: the tiny preset is a
smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

import flatlora_kernels as fk
from common import RESULTS, bench_device, device_label, reset_peak_rss, slug, status_kib, write_record

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               vocab_size=32000, seq=512, steps=12, warmup=3),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
               vocab_size=32000, seq=512, steps=12, warmup=3),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=256, seq=32, steps=4, warmup=1),
}
METHODS = ("lora", "public_flat_lora", "flat_lora")
SIGMA = 0.05


def build_model(preset: dict, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
                         num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
                         num_key_value_heads=preset["num_attention_heads"], vocab_size=preset["vocab_size"],
                         max_position_embeddings=max(preset["seq"], 64))
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it will run: cheap even at 7B on a GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    for name, p in model.named_parameters():  # fp32 LoRA on a bf16 backbone, as the public config
        if p.requires_grad:
            p.data = p.data.float()
    return model


class PublicFlatLora:
    """The public code's procedure (see the module docstring), as faithfully as we can state it."""

    def __init__(self, model, total_steps: int):
        self.layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        self.total_steps = total_steps
        self.step_count = 0
        self.seed = None

    @torch.no_grad()
    def _noise(self, layer, sigma_t: float) -> torch.Tensor:
        w = layer.base_layer.weight
        merged = w.float() + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        std = (sigma_t * merged.norm(dim=1, keepdim=True) / math.sqrt(w.shape[1])).to(w.dtype)
        return torch.normal(0.0, std.repeat(1, w.shape[1]))

    @torch.no_grad()
    def begin_window(self) -> None:
        sigma_t = SIGMA * 0.5 * (1 - math.cos(math.pi * self.step_count / self.total_steps))
        self.sigma_t = sigma_t
        self.seed = int(str(time.time()).replace(".", "")[-8:])  # wall-clock digits, as the public code
        torch.manual_seed(self.seed)
        for layer in self.layers:
            layer.base_layer.weight.add_(self._noise(layer, sigma_t))

    @torch.no_grad()
    def end_window(self) -> None:
        torch.manual_seed(self.seed)
        for layer in self.layers:
            layer.base_layer.weight.sub_(self._noise(layer, self.sigma_t))
        self.step_count += 1


def run_method(method: str, preset: dict, grad_accum: int, device: torch.device) -> dict:
    model = build_model(preset, device)
    model.train()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad and "layers" in n and "weight" in n}
    snapshot = {n: p.detach().to("cpu", copy=True) for n, p in frozen.items()}
    steps, warmup = preset["steps"], preset["warmup"]
    ours = fk.apply_flat_lora(model, sigma=SIGMA, total_steps=steps) if method == "flat_lora" else None
    public = PublicFlatLora(model, steps) if method == "public_flat_lora" else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    data = torch.Generator().manual_seed(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        rss0 = reset_peak_rss()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        if public:
            public.begin_window()
        for _ in range(grad_accum):
            ids = torch.randint(0, preset["vocab_size"], (2, preset["seq"]), generator=data).to(device)
            (model(input_ids=ids, labels=ids).loss / grad_accum).backward()
        if public:
            public.end_window()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ours:
            ours.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 1e9
        reserved = torch.cuda.max_memory_reserved(device) / 1e9
    else:
        peak = (status_kib("VmHWM") - rss0) / 1e6
        reserved = None
    changed = total = 0
    diff_sq = base_sq = 0.0
    for name, p in frozen.items():  # compared where the weights live: 7B elements are slow on a CPU
        now, before = p.detach(), snapshot[name].to(device)
        changed += int((now != before).sum())
        total += now.numel()
        diff_sq += float((now.double() - before.double()).square().sum())
        base_sq += float(before.double().square().sum())
    return {"peak_memory_gb": peak, "peak_reserved_gb": reserved, "step_time_s": statistics.median(times),
            "changed_fraction": changed / total, "relative_drift": math.sqrt(diff_sq / base_sq)}


def compare_to_lora(rows: list[dict]) -> None:
    """Add each row's step-time ratio and memory delta against LoRA at the same accumulation."""
    lora = {r["grad_accum"]: r for r in rows if r["method"] == "lora"}
    for r in rows:
        base = lora[r["grad_accum"]]
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
        r["memory_delta_gb"] = r["peak_memory_gb"] - base["peak_memory_gb"]


def write_table_and_chart(rows: list[dict], title: str, stem: Path) -> None:
    """``stem``.md (one table per accumulation setting) and ``stem``.png (time and memory bars)."""
    accums = list(dict.fromkeys(r["grad_accum"] for r in rows))
    lines = []
    for grad_accum in accums:
        lines += [f"### {title}, gradient accumulation {grad_accum}", "",
                  "| method | peak GB (alloc) | step s | x LoRA time | +GB vs LoRA | changed W elements | rel. drift |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['peak_memory_gb']:.3f} | {r['step_time_s']:.3f} | "
                  f"{r['step_time_ratio']:.3f} | {r['memory_delta_gb']:+.3f} | {r['changed_fraction']:.2e} | "
                  f"{r['relative_drift']:.2e} |"
                  for r in rows if r["grad_accum"] == grad_accum]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(accums)
    for k, grad_accum in enumerate(accums):
        by_method = {r["method"]: r for r in rows if r["grad_accum"] == grad_accum}
        xs = [i + k * width for i in range(len(METHODS))]
        for ax, key in zip(axes, ("step_time_s", "peak_memory_gb")):
            ax.bar(xs, [by_method[m][key] for m in METHODS], width, label=f"accum {grad_accum}")
    for ax, name in zip(axes, ("median step time (s)", "peak memory (GB)")):
        ax.set_xticks([i + width * (len(accums) - 1) / 2 for i in range(len(METHODS))], METHODS)
        ax.set_title(name)
        ax.legend()
    fig.suptitle(f"Table 7 setting: {title}")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="7b on a GPU with >= 40 GB, tiny on the CPU")
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default: the preset's)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON, table and chart go")
    args = parser.parse_args()
    device = bench_device()
    if args.preset is None:
        big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 40e9
        args.preset = "7b" if big else ("1b" if device.type == "cuda" else "tiny")
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"], preset["warmup"] = args.steps, min(preset["warmup"], args.steps - 1)
    label = device_label(device)
    rows = []
    for grad_accum in args.grad_accum:
        for method in METHODS:
            row = {"grad_accum": grad_accum, "method": method, **run_method(method, preset, grad_accum, device)}
            rows.append(row)
            print(f"[{args.preset} ga={grad_accum}] {method:>16}: step {row['step_time_s']:.3f} s, peak "
                  f"{row['peak_memory_gb']:.3f} GB, changed {row['changed_fraction']:.2e}, "
                  f"drift {row['relative_drift']:.2e}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    compare_to_lora(rows)
    stem = args.out_dir / f"table7-{args.preset}-{slug(label)}"
    config = {"preset": args.preset, **preset, "sigma": SIGMA, "grad_accum": args.grad_accum, "methods": list(METHODS),
              "baseline": "lora", "backend": fk.backend_name(device), "micro_batch": 2, "r": 8, "lora_alpha": 16}
    write_record(stem.with_suffix(".json"), "table7", device, config, rows)
    write_table_and_chart(rows, f"{args.preset} preset on {label}", stem)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
