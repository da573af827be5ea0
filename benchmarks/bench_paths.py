"""One LoRA layer, forward+backward, on each GPU path against PEFT's LoRA: where the slab path overtakes
the fused kernels (issue 20).

    python benchmarks/bench_paths.py                 # GPU: 4096x4096 and 4096->11008, tokens 64..16384
    python benchmarks/bench_paths.py --preset tiny   # CPU smoke run (the interpreter; seconds)

bf16 base weight, fp32 LoRA r = 8 (the paper's setting), four methods on the same weights:

1. ``lora``: PEFT's LoRA layer (cuBLAS), the baseline of every ratio;
2. ``public``: the public code's procedure: ``torch.normal`` noise scaled by ``c``, added into ``W`` in place,
   PEFT's forward and backward, the noise subtracted again;
3. ``fused``: :class:`~flatlora_kernels.FlatLoraLinear` with ``path="fused"``;
4. ``slab``: the same layer with ``path="slab"``.

Times are medians of forward+backward from ``common.median_ms`` (``triton.testing.do_bench`` on a GPU);
``peak_extra_mib`` is the peak of allocated GPU memory during one forward+backward above what was allocated
before it (None on the CPU). Writes one ``flatlora-bench/1`` record, ``paths-<device>.json``, one row per
(shape, tokens, method): {"in", "out", "tokens", "method", "backend", "fwdbwd_ms", "fwdbwd_ratio",
"peak_extra_mib"}; its config names the device class the ``auto`` table is keyed by.
"""

from __future__ import annotations

from typing import Callable

import torch

import flatlora_kernels as fk
from bench_layer import make_layer
from common import RESULTS, layer_bench_arguments, median_ms, slug, write_record
from flatlora_kernels.paths import device_class

PRESETS = {
    "7b": dict(shapes=[(4096, 4096), (4096, 11008)], tokens=[64, 256, 1024, 4096, 16384]),
    "tiny": dict(shapes=[(40, 24), (24, 56)], tokens=[8, 24]),
}
METHODS = ("lora", "public", "fused", "slab")  # the first is the baseline of every ratio
SIGMA = 0.05


def fwdbwd_callable(n: int, m: int, tokens: int, method: str, device: torch.device,
                    dtype: torch.dtype = torch.bfloat16) -> Callable[[], object]:
    """One forward+backward of ``method`` on an ``n -> m`` layer with ``tokens`` tokens."""
    layer = make_layer(n, m, device, dtype, flat=method in ("fused", "slab"))
    if method in ("fused", "slab"):
        layer.path = method
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, m, device=device, dtype=dtype)
    inputs = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    if method != "public":
        return lambda: torch.autograd.grad(layer(x), inputs, dy)
    weight = layer.base_layer.weight
    row_std = SIGMA * fk.merged_row_norms(weight, inputs[1], inputs[2], layer.scaling["default"]) / n**0.5

    def public():
        noise = torch.normal(0.0, 1.0, weight.shape, device=device, dtype=weight.dtype) * row_std[:, None].to(dtype)
        weight.data.add_(noise)
        grads = torch.autograd.grad(layer(x), inputs, dy)
        weight.data.sub_(noise)
        return grads

    return public


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated GPU memory during one call above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    fn()  # warm: kernels compiled, cuBLAS workspace allocated
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def bench_shape(n: int, m: int, tokens: int, device: torch.device, reps: int) -> list[dict]:
    fns = [fwdbwd_callable(n, m, tokens, method, device) for method in METHODS]
    peaks = [peak_extra_mib(fn, device) for fn in fns]
    times = median_ms(fns, device, reps)
    return [{"in": n, "out": m, "tokens": tokens, "method": method,
             "backend": fk.backend_name(device) if method in ("fused", "slab") else "torch",
             "fwdbwd_ms": ms, "fwdbwd_ratio": ms / times[0], "peak_extra_mib": peak}
            for method, ms, peak in zip(METHODS, times, peaks)]


def main() -> None:
    args, device, preset_name, label = layer_bench_arguments(__doc__.splitlines()[0], PRESETS, default_reps=5)
    preset = PRESETS[preset_name]
    print(f"device: {label} | backend: {fk.backend_name(device)} | class {device_class(device)}")
    print(f"{'in':>6} {'out':>6} {'tokens':>6} " + " ".join(f"{m:>15}" for m in METHODS))
    rows = []
    for n, m in preset["shapes"]:
        for tokens in preset["tokens"]:
            shape_rows = bench_shape(n, m, tokens, device, args.reps)
            rows += shape_rows
            print(f"{n:>6} {m:>6} {tokens:>6} " + " ".join(f"{r['fwdbwd_ms']:8.3f} ({r['fwdbwd_ratio']:4.2f})"
                                                         for r in shape_rows))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    config = {"preset": preset_name, **preset, "dtype": "bfloat16", "lora_dtype": "float32", "r": 8,
              "methods": list(METHODS), "baseline": METHODS[0], "timer": "median_ms", "cpu_reps": args.reps,
              "device_class": device_class(device), "sigma": SIGMA}
    out = write_record(args.out or RESULTS / f"paths-{slug(label)}.json", "paths", device, config, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
