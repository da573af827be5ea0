"""pytest-benchmark: materialising the noise Z(seed) (fp32, m x n) per backend, against ``torch.randn``
of the same shape (torch's own generator: what the materialise-then-matmul approach draws)."""

import pytest
import torch

import flatlora_kernels as fk
from common import bench_device
from microbench import bench_size, group_cases, params

SHAPES = {"7b": [(4096, 4096), (11008, 4096), (4096, 11008)], "tiny": [(80, 96), (1024, 1024)]}  # (out, in)


def noise_cases():
    device = bench_device()
    return [case for m, n in SHAPES[bench_size()]
            for case in group_cases(f"noise {m}x{n}", device, "torch_randn", [], work=m * n,
                                    info={"op": "noise", "out": m, "in": n, "dtype": "float32"})]


@pytest.mark.parametrize("case", params(noise_cases()), indirect=True)
def test_noise(case, measure):
    m, n, device = case.info["out"], case.info["in"], bench_device()
    if case.backend is None:
        measure(case, lambda: torch.randn(m, n, device=device))
    else:
        measure(case, lambda: fk.generate_noise(7, m, n, device=device))
