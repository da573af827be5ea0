"""One LoRA layer, forward / backward / both: PEFT's LoRA, "materialise the noise then cuBLAS", ours.

    python benchmarks/bench_layer.py                 # GPU: 7B shapes, tokens 256..16384
    python benchmarks/bench_layer.py --preset tiny   # CPU smoke run (seconds)

bf16 base weight, fp32 LoRA r=8 (the paper's setting). Times are medians from
``common.median_ms`` (triton's do_bench on a GPU, alternating wall-clock repetitions on the CPU);
every ratio is against PEFT's LoRA layer on the same shape, measured in the same call. Writes one
``flatlora-bench/1`` record to benchmarks/results/layer-<device>.json whose results are one row per
(shape, tokens, method): {"in", "out", "tokens", "method", "backend", "<pass>_ms", "<pass>_ratio",
"fwdbwd_tflops"} for the passes fwd, bwd and fwdbwd.
"""

from __future__ import annotations

from typing import Callable

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear

import flatlora_kernels as fk
from common import PASSES, RESULTS, layer_bench_arguments, median_ms, pass_callables, slug, write_record

PRESETS = {
    "7b": dict(shapes=[(4096, 4096), (4096, 11008), (11008, 4096)], tokens=[256, 1024, 4096, 16384]),
    "tiny": dict(shapes=[(96, 80), (80, 160)], tokens=[16, 64]),
}
METHODS = ("lora", "materialized", "flat_lora")  # the first is the baseline of every ratio
RANK = 8


def make_layer(n: int, m: int, device: torch.device, dtype: torch.dtype, flat: bool) -> LoraLinear:
    """PEFT's LoRA layer on a bf16 (``dtype``) weight with fp32 adapters; ``flat`` swaps it for ours with noise on."""
    torch.manual_seed(0)  # every method gets the same weights
    base = torch.nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
    torch.nn.init.normal_(base.weight, std=0.02)
    layer = LoraLinear(base, "default", config=LoraConfig(r=RANK, lora_alpha=16), r=RANK, lora_alpha=16)
    layer.lora_A.float()
    layer.lora_B.float()
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    if flat:
        fk.FlatLoraLinear.from_lora_linear(layer).sample_noise(seed=1, sigma=0.05)
    return layer


class MaterializedNoise(torch.nn.Module):
    """Today's approach: draw the m×n noise with torch, add it to W in memory, then cuBLAS."""

    def __init__(self, layer: LoraLinear):
        super().__init__()
        self.layer = layer
        w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
        self.row_std = 0.05 * fk.merged_row_norms(w, a, b, layer.scaling["default"]) / w.shape[1] ** 0.5

    def forward(self, x):
        w = self.layer.base_layer.weight
        noisy = w + (torch.randn(w.shape, device=w.device, dtype=w.dtype) * self.row_std[:, None]).to(w.dtype)
        lora = self.layer.lora_B["default"](self.layer.lora_A["default"](x.to(torch.float32)))
        return (torch.nn.functional.linear(x, noisy) + lora * self.layer.scaling["default"]).to(x.dtype)


def layer_passes(n: int, m: int, tokens: int, method: str, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, Callable[[], object]]:
    """The fwd / bwd / fwdbwd callables of ``method`` on one layer shape and token count."""
    layer = make_layer(n, m, device, dtype, flat=method == "flat_lora")
    module = MaterializedNoise(layer) if method == "materialized" else layer
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, m, device=device, dtype=dtype)
    inputs = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    return pass_callables(lambda: module(x), inputs, dy)


def bench_shape(n: int, m: int, tokens: int, device: torch.device, reps: int) -> list[dict]:
    """One row per method; each pass times all methods in one ``median_ms`` call."""
    passes = {method: layer_passes(n, m, tokens, method, device) for method in METHODS}
    rows = [{"in": n, "out": m, "tokens": tokens, "method": method,
             "backend": fk.backend_name(device) if method == "flat_lora" else "torch"} for method in METHODS]
    for name in PASSES:
        times = median_ms([passes[method][name] for method in METHODS], device, reps)
        for row, ms in zip(rows, times):
            row[f"{name}_ms"], row[f"{name}_ratio"] = ms, ms / times[0]
    gemm_flops = 4 * tokens * n * m  # the two big GEMMs (forward and dX); W gets no gradient
    for row in rows:
        row["fwdbwd_tflops"] = gemm_flops / (row["fwdbwd_ms"] * 1e-3) / 1e12
    return rows


def main() -> None:
    args, device, preset_name, label = layer_bench_arguments(__doc__.splitlines()[0], PRESETS, default_reps=20)
    preset = PRESETS[preset_name]
    rows = []
    print(f"device: {label} | backend for ours: {fk.backend_name(device)}")
    print(f"{'in':>6} {'out':>6} {'tokens':>6} {'method':>13} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'x LoRA':>7}")
    for n, m in preset["shapes"]:
        for tokens in preset["tokens"]:
            for row in bench_shape(n, m, tokens, device, args.reps):
                rows.append(row)
                print(f"{n:>6} {m:>6} {tokens:>6} {row['method']:>13} {row['fwd_ms']:9.3f} {row['bwd_ms']:9.3f} "
                      f"{row['fwdbwd_ms']:9.3f} {row['fwdbwd_ratio']:7.2f}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    config = {"preset": preset_name, **preset, "dtype": "bfloat16", "lora_dtype": "float32", "r": RANK,
              "methods": list(METHODS), "baseline": METHODS[0], "timer": "median_ms", "cpu_reps": args.reps}
    out = write_record(args.out or RESULTS / f"layer-{slug(label)}.json", "layer", device, config, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
