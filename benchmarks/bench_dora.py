"""What Flat-LoRA costs on top of DoRA, next to what it costs on top of LoRA: one layer, forward+backward.

    python benchmarks/bench_dora.py                 # 2048 -> 2048, 512 tokens, r = 8, float32
    python benchmarks/bench_dora.py --quick         # small, for a smoke run

Four layers built from the same weights: PEFT's LoRA, Flat-LoRA on it, PEFT's DoRA (``use_dora=True``)
and Flat-LoRA on it (``DoRA(W + diag(c) Z, A, B, m)``, whose DoRA norms of the perturbed weight
regenerate Z once more per forward). The times are medians of forward+backward with gradients to
the input and the trainable parameters, all four measured together (``common.median_ms``), so
the ratios ``flat_dora / dora`` and ``flat_lora / lora`` come from the same machine state.
Writes ``benchmarks/results/dora-<device>.json``.
"""

from __future__ import annotations

import argparse
import copy

import torch

from common import RESULTS, bench_device, device_label, median_ms, slug, write_record

import flatlora_kernels as fk

METHODS = ("lora", "flat_lora", "dora", "flat_dora")


def build(n: int, m: int, r: int, dora: bool, device: torch.device):
    from peft import LoraConfig
    from peft.tuners import lora

    torch.manual_seed(0)
    base = torch.nn.Linear(n, m, device=device).requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=2 * r, use_dora=dora)
    layer = lora.Linear(base, "default", config=config, r=r, lora_alpha=2 * r, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.01)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 -> 256 layer and 64 tokens")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    device = bench_device()
    n = m = 256 if args.quick else 2048
    tokens, r = (64 if args.quick else 512), 8
    layers = {}
    for dora in (False, True):
        plain = build(n, m, r, dora, device)
        flat = fk.layer.FlatLoraLinear.from_lora_linear(copy.deepcopy(plain))
        flat.sample_noise(seed=1, sigma=0.05)
        layers["dora" if dora else "lora"] = plain
        layers["flat_dora" if dora else "flat_lora"] = flat
    x = torch.randn(tokens, n, device=device, requires_grad=True)
    grad_y = torch.randn(tokens, m, device=device)

    def step(layer):
        inputs = [x] + [p for p in layer.parameters() if p.requires_grad]
        return lambda: torch.autograd.grad(layer(x), inputs, grad_y)

    times = median_ms([step(layers[name]) for name in METHODS], device, reps=args.reps)
    ms = dict(zip(METHODS, times))
    results = [{"method": name, "fwdbwd_ms": round(ms[name], 3)} for name in METHODS]
    ratios = {"flat_dora/dora": ms["flat_dora"] / ms["dora"], "flat_lora/lora": ms["flat_lora"] / ms["lora"],
              "dora/lora": ms["dora"] / ms["lora"]}
    results.append({"ratios": {k: round(v, 3) for k, v in ratios.items()}})
    config = {"in_features": n, "out_features": m, "tokens": tokens, "r": r, "dtype": "float32",
              "backend": fk.backend_name(device), "threads": torch.get_num_threads(), "reps": args.reps}
    path = write_record(RESULTS / f"dora-{slug(device_label(device))}{'-quick' if args.quick else ''}.json",
                        "dora", device, config, results)
    for name in METHODS:
        print(f"{name:>10}: {ms[name]:8.2f} ms")
    print("  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), "->", path)


if __name__ == "__main__":
    main()
