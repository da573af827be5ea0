"""One LoRA layer, forward / backward / both: PEFT's LoRA, "materialise the noise then cuBLAS", ours.

    python benchmarks/bench_layer.py                 # GPU: 7B shapes, tokens 256..16384
    python benchmarks/bench_layer.py --preset tiny   # CPU smoke run (seconds)

bf16 base weight, fp32 LoRA r=8 (the paper's setting). Times are medians (triton's do_bench on
a GPU, wall-clock repetitions on the CPU); ratios are against PEFT's LoRA layer measured in the
same run. Writes benchmarks/results/layer-<device>.json: a list of
{"in", "out", "tokens", "method", "fwd_ms", "bwd_ms", "fwdbwd_ms", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear

import flatlora_kernels as fk
from common import RESULTS, device_label, slug

PRESETS = {
    "7b": dict(shapes=[(4096, 4096), (4096, 11008), (11008, 4096)], tokens=[256, 1024, 4096, 16384]),
    "tiny": dict(shapes=[(96, 80), (80, 160)], tokens=[16, 64]),
}

def median_ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def make_layer(n: int, m: int, device: torch.device, dtype: torch.dtype, flat: bool) -> LoraLinear:
    base = torch.nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
    torch.nn.init.normal_(base.weight, std=0.02)
    layer = LoraLinear(base, "default", config=LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
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


def bench_case(n, m, tokens, method, device, dtype, reps):
    torch.manual_seed(0)
    layer = make_layer(n, m, device, dtype, flat=method == "flat_lora")
    module = MaterializedNoise(layer) if method == "materialized" else layer
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, m, device=device, dtype=dtype)
    fwd = median_ms(lambda: module(x), device, reps)
    y = module(x)
    bwd = median_ms(lambda: y.backward(dy, retain_graph=True), device, reps)
    both = median_ms(lambda: module(x).backward(dy), device, reps)
    gemm_flops = 4 * tokens * n * m  # the two big GEMMs (forward and dX); W gets no gradient
    return {"in": n, "out": m, "tokens": tokens, "method": method, "fwd_ms": fwd, "bwd_ms": bwd,
            "fwdbwd_ms": both, "fwdbwd_tflops": gemm_flops / (both * 1e-3) / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="7b on a GPU (default there), tiny on the CPU (default there)")
    parser.add_argument("--reps", type=int, default=20, help="CPU repetitions per timing")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset or ("7b" if device.type == "cuda" else "tiny")]
    dtype = torch.bfloat16
    rows = []
    print(f"device: {device_label(device)} | backend for ours: {fk.backend_name(device)}")
    print(f"{'in':>6} {'out':>6} {'tokens':>6} {'method':>13} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'x LoRA':>7}")
    for n, m in preset["shapes"]:
        for tokens in preset["tokens"]:
            base = None
            for method in ("lora", "materialized", "flat_lora"):
                row = bench_case(n, m, tokens, method, device, dtype, args.reps)
                base = base or row["fwdbwd_ms"]
                row["ratio_to_lora"] = row["fwdbwd_ms"] / base
                rows.append(row)
                print(f"{n:>6} {m:>6} {tokens:>6} {method:>13} {row['fwd_ms']:9.3f} {row['bwd_ms']:9.3f} "
                      f"{row['fwdbwd_ms']:9.3f} {row['ratio_to_lora']:7.2f}")
    label = device_label(device)
    out = args.out or RESULTS / f"layer-{slug(label)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": label, "torch": torch.__version__, "backend": fk.backend_name(device)}
    out.write_text(json.dumps([{**meta, **row} for row in rows], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
