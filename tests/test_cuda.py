"""Realistic shapes on a GPU: 7B-sized layers, 1 to 16384 tokens, bf16, and m*n >= 2**31.

Skipped without CUDA. The Triton kernels (fused and slab paths) are compared with the reference
backend (same rounding points, materialised noise) and the noise with the reference generator;
every fused variant runs its guard check against the slab path; the slab path's memory stays bounded.
"""

import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels import noise as contract
from flatlora_kernels.backends import BACKEND_ENV

from .helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TWO_ULP = 2.0**-7


def _run(backend, monkeypatch, x, weight, bias, lora_A, lora_B, row_std, dy, path="auto"):
    monkeypatch.setenv(BACKEND_ENV, backend)
    x = x.detach().requires_grad_()
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 2.0, seed=2**63 + 11, row_std=row_std, path=path)
    grads = torch.autograd.grad(y, [x, lora_A, lora_B], dy)
    return (y, *grads)


@pytest.mark.parametrize("path", ["fused", "slab"])
@pytest.mark.parametrize("n,m", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("tokens", [1, 17, 1024, 16384])
def test_triton_matches_reference_on_7b_shapes(n, m, tokens, path, monkeypatch):
    torch.manual_seed(0)
    dev = "cuda"
    weight = (torch.randn(m, n, device=dev) * 0.02).to(torch.bfloat16)
    lora_A = (torch.randn(8, n, device=dev) / n**0.5).requires_grad_()
    lora_B = (torch.randn(m, 8, device=dev) * 0.01).requires_grad_()
    row_std = 0.05 * fk.merged_row_norms(weight, lora_A, lora_B, 2.0) / n**0.5
    x = torch.randn(tokens, n, device=dev).to(torch.bfloat16)
    dy = torch.randn(tokens, m, device=dev).to(torch.bfloat16)
    ours = _run("triton", monkeypatch, x, weight, None, lora_A, lora_B, row_std, dy, path)
    ref = _run("reference", monkeypatch, x, weight, None, lora_A, lora_B, row_std, dy)
    for name, a, b in zip(("y", "grad x", "grad A", "grad B"), ours, ref):
        tol = BF16_TWO_ULP if a.dtype == torch.bfloat16 else 1e-4
        assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.3g}"


def test_noise_on_gpu_matches_reference_embedding_sized():
    z = fk.generate_noise(5, 32000, 4096, device="cuda")
    for rows in (slice(0, 64), slice(15999, 16064), slice(31936, 32000)):
        expected = contract.reference_noise_block(5, rows.start, rows.stop, 0, 4096, device="cuda")
        torch.testing.assert_close(z[rows], expected, rtol=0, atol=1e-5)


def test_weight_with_more_than_2_31_elements(monkeypatch):
    """Pointer offsets past 2**31 in both passes: check the last rows against the reference."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    m, n, tail = 2**31 // 4096 + 64, 4096, 64
    weight = torch.empty(m, n, device="cuda", dtype=torch.bfloat16).normal_(std=0.02)
    lora_A = torch.randn(4, n, device="cuda") / 64
    lora_B = torch.randn(m, 4, device="cuda") / 64
    row_std = torch.full((m,), 0.01, device="cuda")
    x = torch.randn(8, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fk.flat_lora_linear(x, weight, None, lora_A, lora_B, 1.0, seed=3, row_std=row_std)
    noise = contract.reference_noise_block(3, m - tail, m, 0, n, device="cuda")
    w_tail = (weight[-tail:].float() + 0.01 * noise).to(torch.bfloat16).float()
    expected = x.detach().float() @ w_tail.t() + (x.detach().float() @ lora_A.t()) @ lora_B[-tail:].t()
    assert rel_err(y[:, -tail:], expected) <= BF16_TWO_ULP
    dy = torch.zeros(8, m, device="cuda", dtype=torch.bfloat16)
    dy[torch.arange(8), m - 1 - torch.arange(8, device="cuda")] = 1
    (gx,) = torch.autograd.grad(y, x, dy)
    rows = m - 1 - torch.arange(8, device="cuda")
    expected_gx = w_tail[rows - (m - tail)] + (lora_B[rows] @ lora_A)
    assert rel_err(gx, expected_gx) <= BF16_TWO_ULP


def test_native_cuda_noise_equals_what_the_triton_forward_regenerates(monkeypatch):
    """Two codes written apart: the CUDA op from csrc/philox.h, and the noise the fused Triton forward
    adds in registers, read back through the kernel with one-hot tokens (B = 0, c = 1)."""
    from flatlora_kernels.native import generate_noise_native, native_cuda_available

    if not native_cuda_available():
        pytest.skip("the native extension was built without CUDA")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    m, n, seed = 300, 1030, 2**64 - 7
    weight = torch.randn(m, n, device="cuda")
    eye = torch.eye(n, device="cuda")
    y = fk.flat_lora_linear(eye, weight, None, torch.zeros(2, n, device="cuda"), torch.zeros(m, 2, device="cuda"),
                            1.0, seed=seed, row_std=torch.ones(m, device="cuda"))
    recovered = y.t() - weight
    torch.testing.assert_close(generate_noise_native(seed, m, n, "cuda"), recovered, rtol=0, atol=2e-5)


def test_every_fused_variant_passes_its_guard_check():
    """Each configuration a GPU launches, both directions, dense W in every dtype and a 4-bit bf16 W, checked
    against the slab path by the guard as a first use would be (FLATLORA_FUSED_CHECK=error raises on a miss)."""
    from flatlora_kernels.matmul_call import PerturbedMatmul
    from flatlora_kernels.quant4bit import PackedWeight4bit
    from flatlora_kernels.testing import checking_fused_guard, forced_matmul_config
    from flatlora_kernels.triton_ops.launch_settings import MATMUL_CONFIGS
    from flatlora_kernels.triton_ops.perturbed_matmul import perturbed_matmul_triton

    codes = torch.randint(0, 256, (200 * 256 // 2,), dtype=torch.uint8, device="cuda")
    packed_weight = PackedWeight4bit(codes, torch.rand(200 * 256 // 64, device="cuda") + 0.5,
                                     torch.linspace(-1, 1, 16, device="cuda"), 64, (200, 256), torch.bfloat16)
    cases = [(dtype, torch.randn(200, 256, device="cuda").to(dtype))
             for dtype in (torch.float32, torch.bfloat16, torch.float16)] + [(torch.bfloat16, packed_weight)]
    expected = 0
    with checking_fused_guard(devices=()) as verdicts:
        for dtype, weight in cases:
            configs = MATMUL_CONFIGS.distinct(dtype, weight_4bit=isinstance(weight, PackedWeight4bit))
            expected += 2 * len(configs)
            for name, _ in configs:
                for forward in (True, False):
                    out_columns = 200 if forward else 256
                    call = PerturbedMatmul(
                        torch.randn(70, 256 if forward else 200, device="cuda").to(dtype), weight,
                        transpose_weight=forward, seed=5, row_std=torch.rand(200, device="cuda"), out_dtype=dtype,
                        bias=torch.randn(200, device="cuda").to(dtype) if forward else None,
                        lora_hidden=torch.randn(70, 8, device="cuda"),
                        lora_out_factor=torch.randn(8, out_columns, device="cuda"), scaling=0.5,
                        dropout_keep=None if forward else torch.rand(70, out_columns, device="cuda") > 0.2,
                        keep_scale=1.25, path="fused")
                    with forced_matmul_config(name):
                        perturbed_matmul_triton(call)
        assert len(verdicts) == expected and all(verdicts.values()), verdicts


def test_slab_path_memory_stays_within_its_bound():
    """Forward and dX of a 4096 -> 11008 bf16 layer at 4096 tokens: what the slab path allocates beyond
    its output (after a warm-up, so cuBLAS's workspace already exists) stays within the slab and one
    float32 epilogue block, while the perturbed weight would be 86 MiB."""
    from flatlora_kernels.matmul_call import PerturbedMatmul
    from flatlora_kernels.triton_ops.slab import slab_bytes, slab_perturbed_matmul

    n, m, tokens = 4096, 11008, 4096
    weight = (torch.randn(m, n, device="cuda") * 0.02).to(torch.bfloat16)
    for forward in (True, False):
        call = PerturbedMatmul(
            torch.randn(tokens, n if forward else m, device="cuda").to(torch.bfloat16), weight,
            transpose_weight=forward, seed=1, row_std=torch.full((m,), 0.01, device="cuda"), out_dtype=torch.bfloat16,
            lora_hidden=torch.randn(tokens, 8, device="cuda"),
            lora_out_factor=torch.randn(8, m if forward else n, device="cuda"), scaling=0.5, path="slab")
        out = torch.empty(call.out_shape, device="cuda", dtype=torch.bfloat16)
        slab_perturbed_matmul(call, out=out)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        slab_perturbed_matmul(call, out=out)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 2 * slab_bytes() + 2**20, (forward, extra / 2**20)
