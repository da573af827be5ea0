"""Merged filter norms ||W_i + s B_i A|| against float64 torch."""

import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels.triton_ops.row_norms import merged_row_norms_triton

from .helpers import REL_TOL, rel_err


def _oracle(weight, lora_A, lora_B, scaling):
    return torch.linalg.vector_norm(weight.double() + scaling * lora_B.double() @ lora_A.double(), dim=1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 53, 3), (70, 19, 8), (33, 130, 17)])
@pytest.mark.parametrize("w_dtype,lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_row_norms_match_float64(device_backend, shape, w_dtype, lora_dtype):
    device, _ = device_backend
    m, n, r = shape
    weight = torch.randn(m, n, device=device).to(w_dtype)
    lora_A = torch.randn(r, n, device=device).to(lora_dtype)
    lora_B = torch.randn(m, r, device=device).to(lora_dtype)
    norms = fk.merged_row_norms(weight, lora_A, lora_B, 0.37)
    assert norms.dtype == torch.float32 and norms.shape == (m,)
    # Inputs are exact in their dtype; only fp32 accumulation separates us from float64.
    err = rel_err(norms, _oracle(weight, lora_A, lora_B, 0.37))
    assert err < 1e-5, err


def test_row_norms_of_transposed_view(device_backend):
    """fan_in_fan_out layers hand the kernel W.t(): strides, not copies."""
    device, _ = device_backend
    stored = torch.randn(45, 29, device=device)  # (in, out) as Conv1D stores it
    lora_A, lora_B = torch.randn(4, 45, device=device), torch.randn(29, 4, device=device)
    norms = fk.merged_row_norms(stored.t(), lora_A, lora_B, 2.0)
    assert rel_err(norms, _oracle(stored.t(), lora_A, lora_B, 2.0)) < 1e-5


def test_row_norms_detect_a_wrong_update(device_backend):
    """The tolerance above is meaningful: dropping the low-rank term is caught."""
    device, _ = device_backend
    weight = torch.randn(20, 40, device=device)
    lora_A, lora_B = torch.randn(2, 40, device=device), 0.1 * torch.randn(20, 2, device=device)
    norms = fk.merged_row_norms(weight, lora_A, lora_B, 1.0)
    assert rel_err(norms, _oracle(weight, lora_A, lora_B * 0, 1.0)) > 100 * REL_TOL[torch.float32]


def test_triton_row_norms_write_every_row():
    if fk.backends.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    weight, lora_A, lora_B = torch.randn(35, 21), torch.randn(3, 21), torch.randn(35, 3)
    out = torch.full((35,), float("nan"))
    merged_row_norms_triton(weight, lora_A, lora_B, 0.5, out=out)
    assert torch.isfinite(out).all()
    assert rel_err(out, _oracle(weight, lora_A, lora_B, 0.5)) < 1e-5


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(4, 5), torch.randn(2, 6), torch.randn(4, 2), 1.0), "lora_A"),
    (lambda: (torch.randn(4, 5), torch.randn(2, 5), torch.randn(3, 2), 1.0), "lora_B"),
    (lambda: (torch.randn(4, 5), torch.randn(0, 5), torch.randn(4, 0), 1.0), "rank 0"),
    (lambda: (torch.randn(4, 5, 1), torch.randn(2, 5), torch.randn(4, 2), 1.0), "2-D"),
    (lambda: (torch.randn(4, 5).double(), torch.randn(2, 5), torch.randn(4, 2), 1.0), "dtype"),
    (lambda: (torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2), float("nan")), "scaling"),
    (lambda: (torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2), None), "scaling"),
    (lambda: (torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2, device="meta"), 1.0), "lora_B is on meta"),
])
def test_row_norms_bad_inputs(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fk.merged_row_norms(*args())
