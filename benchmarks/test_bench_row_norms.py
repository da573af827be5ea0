"""pytest-benchmark: merged filter norms ``||W_i + s·B_i A||`` per backend, against one read of W
(its plain fp32 row norms), the floor the norms kernel is measured against (goal: within 1.3x)."""

import pytest
import torch

import flatlora_kernels as fk
from common import bench_device
from microbench import bench_size, group_cases, params
from test_bench_noise import SHAPES

RANK = 8


def row_norm_cases():
    device = bench_device()
    return [case for m, n in SHAPES[bench_size()]
            for case in group_cases(f"row_norms {m}x{n} r{RANK}", device, "read_w", [], work=m * n,
                                    info={"op": "row_norms", "out": m, "in": n, "r": RANK, "dtype": "bfloat16",
                                          "lora_dtype": "float32"})]


@pytest.mark.parametrize("case", params(row_norm_cases()), indirect=True)
def test_row_norms(case, measure):
    m, n, device = case.info["out"], case.info["in"], bench_device()
    torch.manual_seed(0)
    weight = (torch.randn(m, n, device=device) * 0.02).to(torch.bfloat16)
    lora_A = torch.randn(RANK, n, device=device) / n**0.5
    lora_B = torch.randn(m, RANK, device=device) * 0.01
    if case.backend is None:
        measure(case, lambda: torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32))
    else:
        measure(case, lambda: fk.merged_row_norms(weight, lora_A, lora_B, 2.0))
