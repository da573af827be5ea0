"""pytest-benchmark: one LoRA layer, fwd / bwd / fwd+bwd, per backend, against PEFT's LoRA layer.

bf16 weight, fp32 LoRA r=8, the shapes and token counts of ``bench_layer.py``'s presets.
"""

import pytest

from bench_layer import PRESETS, RANK, layer_passes
from common import PASSES, bench_device
from microbench import bench_size, group_cases, params


def layer_cases():
    device, preset = bench_device(), PRESETS[bench_size()]
    return [case for n, m in preset["shapes"] for tokens in preset["tokens"] for name in PASSES
            for case in group_cases(f"layer {name} {n}->{m} t{tokens}", device, "lora", ["materialized"],
                                    work=tokens * n * m,
                                    info={"op": "layer", "pass": name, "in": n, "out": m, "r": RANK, "tokens": tokens,
                                          "dtype": "bfloat16", "lora_dtype": "float32"})]


@pytest.mark.parametrize("case", params(layer_cases()), indirect=True)
def test_layer(case, measure):
    info = case.info
    passes = layer_passes(info["in"], info["out"], info["tokens"], case.method, bench_device())
    measure(case, passes[info["pass"]])
