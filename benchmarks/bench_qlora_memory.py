"""Peak memory and time of one QLoRA layer's forward+backward: plain QLoRA, ours, and the public approach.

    python benchmarks/bench_qlora_memory.py            # 4096 -> 11008 (a Llama-2-7B MLP projection), 256 tokens
    python benchmarks/bench_qlora_memory.py --quick    # small, for a smoke run

The public Flat-LoRA code adds noise into the stored weight, which a 4-bit weight cannot hold; to
perturb a QLoRA layer it would have to dequantize the weight and add an m×n noise tensor to it
("public" here: ``dequantize_4bit`` + ``torch.normal`` + ``F.linear``). Ours perturbs
``dequant(W4) + c·Z`` a bounded block of rows at a time (:class:`FlatLoraLinear4bit`). Each method
runs in a fresh process; the figure is the growth of its peak resident set (Linux ``VmHWM``, reset
first) over one forward+backward, on the CPU, or of ``max_memory_allocated`` on a GPU. The times
are medians of forward+backward, the three methods measured together in this process
(``common.median_ms``: ``do_bench`` on a GPU, interleaved rounds on the CPU). NF4 with double
quantization, bf16 compute, LoRA r = 8 in fp32. Writes ``benchmarks/results/qlora-memory-<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from common import RESULTS, device_label, median_ms, reset_peak_rss, slug, status_kib, write_record

METHODS = ("qlora", "flat_lora", "public")


def build(n: int, m: int, device: torch.device):
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners import lora

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(n, m, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
    base.weight = bnb.nn.Params4bit((0.02 * torch.randn(m, n)).to(torch.bfloat16), requires_grad=False,
                                    quant_type="nf4", compress_statistics=True)
    base = base.to(device).requires_grad_(False)  # .to quantizes
    layer = lora.bnb.Linear4bit(base, "default", config=LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    layer.lora_A.float()  # fp32 LoRA, as in the paper's setting
    layer.lora_B.float()
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.01)
    return layer


def public_forward(layer, x: torch.Tensor, sigma: float = 0.05) -> torch.Tensor:
    """What the public procedure needs for a 4-bit base: the dequantized weight plus an m×n noise tensor."""
    import bitsandbytes as bnb

    weight = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    std = sigma * weight.float().norm(dim=1, keepdim=True) / weight.shape[1] ** 0.5
    noisy = weight + torch.normal(torch.zeros_like(weight, dtype=torch.float32), std.expand_as(weight)).to(weight.dtype)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return torch.nn.functional.linear(x, noisy) + (layer.scaling["default"] * (x.float() @ a.t()) @ b.t()).to(x.dtype)


def method_layer(method: str, n: int, m: int, device: torch.device):
    """The layer ``method`` runs, and its forward: PEFT's, ours (with a noise sample drawn), or the public one."""
    import flatlora_kernels as fk

    layer = build(n, m, device)
    if method == "flat_lora":
        fk.FlatLoraLinear4bit.from_lora_linear(layer).sample_noise(seed=1, sigma=0.05)
    return (lambda x: public_forward(layer, x)) if method == "public" else layer


def probe(method: str, tokens: int, n: int, m: int) -> float:
    """Peak memory growth (MiB) of one forward+backward of ``method``, in this (fresh) process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    forward = method_layer(method, n, m, device)
    x = torch.randn(tokens, n, dtype=torch.bfloat16, device=device, requires_grad=True)
    dy = torch.randn(tokens, m, dtype=torch.bfloat16, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = reset_peak_rss() * 1024
    forward(x).backward(dy)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return (status_kib("VmHWM") * 1024 - before) / 2**20


def measure(method: str, tokens: int, n: int, m: int) -> float:
    # glibc keeps freed chunks below its (self-raising) mmap threshold in the heap, so RSS would count
    # allocator caching; a fixed 128 KiB threshold makes every large buffer an mmap, returned on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run([sys.executable, __file__, "--probe", method, str(tokens), str(n), str(m)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the {method} probe failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def time_methods(tokens: int, n: int, m: int, device: torch.device, reps: int) -> list[float]:
    """Median ms of one forward+backward (gradients of x and the LoRA factors) for each of :data:`METHODS`."""
    x = torch.randn(tokens, n, dtype=torch.bfloat16, device=device, requires_grad=True)
    dy = torch.randn(tokens, m, dtype=torch.bfloat16, device=device)

    def step(forward):
        return lambda: forward(x).backward(dy)

    return median_ms([step(method_layer(method, n, m, device)) for method in METHODS], device, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small layer, for a smoke run")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds on the CPU (a GPU uses do_bench)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--probe", nargs=4, metavar=("METHOD", "TOKENS", "IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        method, *sizes = args.probe
        print(probe(method, *map(int, sizes)))
        return
    n, m = (256, 640) if args.quick else (4096, 11008)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = {"in": n, "out": m, "tokens": args.tokens, "dense_bf16_weight_mib": m * n * 2 / 2**20,
           "fp32_noise_matrix_mib": m * n * 4 / 2**20}
    for method in METHODS:
        row[f"peak_mib_{method}"] = measure(method, args.tokens, n, m)
        print(f"{method:>10}: peak growth {row[f'peak_mib_{method}']:9.1f} MiB over one forward+backward")
    for method, ms in zip(METHODS, time_methods(args.tokens, n, m, device, args.reps)):
        row[f"fwdbwd_ms_{method}"] = ms
        print(f"{method:>10}: {ms:9.2f} ms per forward+backward (median)")
    for method in ("flat_lora", "public"):
        row[f"extra_mib_{method}_over_qlora"] = row[f"peak_mib_{method}"] - row["peak_mib_qlora"]
        row[f"time_ratio_{method}_to_qlora"] = row[f"fwdbwd_ms_{method}"] / row["fwdbwd_ms_qlora"]
    out = args.out or RESULTS / f"qlora-memory-{slug(device_label(device))}.json"
    write_record(out, "qlora_memory", device, {"quick": args.quick, "tokens": args.tokens, "quant_type": "nf4",
                                                "double_quant": True, "compute_dtype": "bfloat16", "r": 8,
                                                "reps": args.reps}, [row])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
