"""pytest-benchmark: the native CPU op (``flat_lora_linear`` on the native backend, fp32), fwd / bwd /
fwd+bwd, against the same LoRA linear without noise in plain torch autograd, at the sizes of
``bench_native_cpu.py`` (its memory measurements stay in that script): the first (tokens 1024,
1024 -> 1024) by default, all of them at size 7b (seconds per call on a small CPU)."""

import pytest
import torch

import flatlora_kernels as fk
from bench_native_cpu import CASES, flat, make, plain_lora
from common import PASSES, pass_callables
from microbench import Case, bench_size, params

pytestmark = pytest.mark.skipif(not fk.native_available(), reason="the native extension is not built")


def native_cases():
    cases = []
    for tokens, n, m, r in CASES if bench_size() == "7b" else CASES[:1]:
        for name in PASSES:
            group = f"native_cpu {name} {n}->{m} t{tokens}"
            info = {"op": "native_cpu", "pass": name, "in": n, "out": m, "r": r, "tokens": tokens, "dtype": "float32"}
            cases += [Case(group, "lora", "lora", "cpu", info=info),
                      Case(group, "flat_lora", "lora", "cpu", "native", info)]
    return cases


@pytest.mark.parametrize("case", params(native_cases()), indirect=True)
def test_native_cpu(case, measure):
    tokens, n, m, r = (case.info[key] for key in ("tokens", "in", "out", "r"))
    x, weight, lora_A, lora_B, row_std, dy = make(tokens, n, m, r)
    if case.backend is None:
        forward = lambda: plain_lora(x, weight, lora_A, lora_B)  # noqa: E731
    else:
        forward = lambda: flat(x, weight, lora_A, lora_B, row_std)  # noqa: E731
    measure(case, pass_callables(forward, (x, lora_A, lora_B), dy)[case.info["pass"]])
