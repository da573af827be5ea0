"""Flat-LoRA on PEFT's LoRA variants (DoRA, AdaLoRA, lora_bias, LoRA-GA) and at the edges (merged
adapters, adapter switching, models it cannot drive), each against a float64 oracle."""

import pytest
import torch

import flatlora_kernels as fk


@pytest.mark.parametrize("noise_offset", [(0, 0), (5, 3)])
def test_perturbed_merged_row_norms_equal_float64(device_backend, noise_offset):
    device, _ = device_backend
    m, n, r = 37, 53, 3
    weight = torch.randn(m, n, device=device)
    lora_A, lora_B = torch.randn(r, n, device=device), torch.randn(m, r, device=device)
    row_std = torch.rand(m, device=device) * 0.7
    row_std[4] = 0.0
    norms = fk.merged_row_norms(weight, lora_A, lora_B, 0.37, seed=2**63 + 11, row_std=row_std,
                                noise_offset=noise_offset)
    r0, c0 = noise_offset
    z = fk.generate_noise(2**63 + 11, r0 + m, c0 + n)[r0:, c0:].double()
    expected = (weight.double().cpu() + row_std.double().cpu()[:, None] * z
                + 0.37 * lora_B.double().cpu() @ lora_A.double().cpu()).norm(dim=1)
    torch.testing.assert_close(norms.double().cpu(), expected, rtol=2e-6, atol=0)
    clean = fk.merged_row_norms(weight, lora_A, lora_B, 0.37)
    assert (norms - clean).abs().max() > 1e-2  # the noise is in there
    assert torch.equal(norms[4], clean[4])  # c_i = 0 leaves row i alone


def test_perturbed_merged_row_norms_check_their_arguments():
    weight, lora_A, lora_B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="row_std must be a float32 tensor of shape \\(6,\\)"):
        fk.merged_row_norms(weight, lora_A, lora_B, 1.0, seed=1, row_std=torch.ones(5))
    with pytest.raises(TypeError, match="seed"):
        fk.merged_row_norms(weight, lora_A, lora_B, 1.0, seed=None, row_std=torch.ones(6))
    with pytest.raises(ValueError, match="row_std must hold finite values"):
        fk.merged_row_norms(weight, lora_A, lora_B, 1.0, seed=1, row_std=torch.full((6,), float("nan")))
