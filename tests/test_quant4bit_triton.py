"""The fused Triton path for 4-bit (QLoRA) bases, run on the interpreter: NF4/FP4 tiles dequantized in
registers, against the reference on the explicitly dequantized weight plus materialised noise."""

import dataclasses

import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels import noise as contract
from flatlora_kernels import reference
from flatlora_kernels.backends import BACKEND_ENV, _unavailable_reason, get_backend
from flatlora_kernels.matmul_call import PerturbedMatmul
from flatlora_kernels.quant4bit import PackedWeight4bit
from flatlora_kernels.testing import forced_matmul_config
from flatlora_kernels.triton_ops.launch_settings import MATMUL_CONFIGS, MatmulConfigTable
from flatlora_kernels.triton_ops.perturbed_matmul import perturbed_matmul_triton
from flatlora_kernels.triton_ops.row_norms import merged_row_norms_triton

from .helpers import packed_weight, rel_err

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif(_unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="the Triton interpreter is not available")

# Same rounding points as the reference (dequantize in float32, round to the weight's dtype, add
# c·Z in float32, round to the compute dtype); only the float32 summation order of the K-term dot
# products differs: a few ulp of the output in 16-bit, more in float32. Relative to each output's max.
ULPS = {torch.float32: 2.0**-19, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SEED = 2**63 + 12345


def operands(m, n, tokens, dtype, forward, r=3):
    """Fresh random activations, per-row noise std, bias and LoRA factors for one direction."""
    g = torch.Generator().manual_seed(tokens * m + n + forward)
    a = torch.randn(tokens, n if forward else m, generator=g).to(dtype)
    out_columns = m if forward else n
    return dict(
        a=a, row_std=0.2 * torch.rand(m, generator=g) + 0.05,
        bias=torch.randn(m, generator=g).to(dtype) if forward else None,
        lora_hidden=torch.randn(tokens, r, generator=g), lora_out_factor=torch.randn(r, out_columns, generator=g),
        dropout_keep=None if forward else torch.rand(tokens, out_columns, generator=g) >= 0.3,
        keep_scale=1.0 if forward else 1 / 0.7)


def both(weight, forward, ops, dtype, seed=SEED, noise_offset=(0, 0)):
    """The fused kernel on the packed weight (into a poisoned output) and the reference on its
    explicitly dequantized copy, for one direction."""
    call = PerturbedMatmul(weight=weight, transpose_weight=forward, seed=seed, out_dtype=dtype, scaling=0.7,
                           noise_offset=noise_offset, **ops)
    out = torch.full(call.out_shape, float("nan"), dtype=dtype)
    ours = perturbed_matmul_triton(call, out=out)
    assert ours.data_ptr() == out.data_ptr() and torch.isfinite(ours).all()
    return ours, reference.perturbed_matmul(dataclasses.replace(call, weight=weight.dequantize()))


def assert_ulp_close(ours, ref, dtype, what):
    assert ours.dtype == ref.dtype == dtype
    err = rel_err(ours, ref)
    assert err <= ULPS[dtype], f"{what}: relative error {err:.3g} > {ULPS[dtype]:.3g}"


def snapshot(weight):
    return [t.clone() for t in (weight.packed, weight.absmax, weight.codebook)]


def assert_unchanged(weight, before):
    assert all(torch.equal(t, b) for t, b in zip((weight.packed, weight.absmax, weight.codebook), before))


# Double quantization is undone when the weight is read (PackedWeight4bit.from_bnb): the kernels see
# float32 scales either way, so the second shape runs without it only.
LAYOUTS = [(q, b, d, 45, 77) for q in ("nf4", "fp4") for b in (64, 128) for d in (False, True)] + [
    (q, b, False, 29, 256) for q in ("nf4", "fp4") for b in (64, 128)]


@pytest.mark.parametrize("quant_type,blocksize,double,m,n", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_forward_dx_and_norms_equal_the_dequantized_reference(quant_type, blocksize, double, dtype, m, n):
    """45 x 77: tiles are cut at odd edges, rows (77) are not a multiple of the block so blocks
    straddle rows, and m·n is odd (the last byte holds one code). 29 x 256: rows of whole blocks,
    the kernels' fast path (a byte per two codes, a scale per tile row)."""
    tokens = 19
    weight = packed_weight(m, n, quant_type=quant_type, blocksize=blocksize, double=double, dtype=dtype)
    before = snapshot(weight)
    for forward in (True, False):
        ours, ref = both(weight, forward, operands(m, n, tokens, dtype, forward), dtype)
        assert_ulp_close(ours, ref, dtype, "forward" if forward else "dX")
    lora_A, lora_B = torch.randn(4, n), torch.randn(m, 4)
    norms = merged_row_norms_triton(weight, lora_A, lora_B, 0.3, out=torch.full((m,), float("nan")))
    torch.testing.assert_close(norms, reference.merged_row_norms(weight.dequantize(), lora_A, lora_B, 0.3),
                               rtol=2e-6, atol=0)
    assert_unchanged(weight, before)


@pytest.mark.parametrize("quant_type,m,n", [("nf4", 45, 77), ("fp4", 29, 256)])
def test_tiles_dequantize_bit_for_bit(quant_type, m, n):
    """Without noise or LoRA, one-hot tokens read W back exactly (one product per output, the rest
    zeros): each element of the in-register tiles equals bitsandbytes' dequantization, forward
    (``I @ W^T``) and dX (``I @ W``), on both paths (blocks straddling rows, rows of whole blocks)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight = packed_weight(m, n, quant_type=quant_type, blocksize=64, dtype=dtype)
        expected = weight.dequantize()
        for forward in (True, False):
            eye = torch.eye(n if forward else m, dtype=dtype)
            read = perturbed_matmul_triton(PerturbedMatmul(eye, weight, transpose_weight=forward, seed=SEED,
                                                           row_std=None, out_dtype=dtype))
            assert torch.equal(read.t() if forward else read, expected), (dtype, forward)


@pytest.mark.parametrize("weight_dtype,compute_dtype", [(torch.bfloat16, torch.float32),
                                                        (torch.float16, torch.bfloat16),
                                                        (torch.float32, torch.float16)])
@pytest.mark.parametrize("noise", [True, False])
def test_weight_and_compute_dtypes_differ(weight_dtype, compute_dtype, noise):
    """Dequantized values round to the weight's dtype first, then (plus noise) to the compute dtype,
    as bitsandbytes' dequantization followed by the layer's cast does. 33 x 128: whole blocks per row."""
    m, n = 33, 128
    weight = packed_weight(m, n, quant_type="nf4", blocksize=64, double=False, dtype=weight_dtype)
    for forward in (True, False):
        ops = operands(m, n, 21, compute_dtype, forward)
        if not noise:
            ops["row_std"] = None
        ours, ref = both(weight, forward, ops, compute_dtype)
        assert_ulp_close(ours, ref, compute_dtype, f"{'forward' if forward else 'dX'}, noise={noise}")


@pytest.mark.parametrize("config", sorted(MATMUL_CONFIGS.configs))
def test_every_gpu_configuration_reads_4bit_weights(config):
    """Each GPU launch configuration, forced on the interpreter, over 4-bit weights spanning
    several W tiles and K steps at its block sizes (70 tokens): 130 x 75 (blocks straddle rows, odd
    m·n) and 130 x 192 (rows of whole blocks of 64, narrower than some tiles)."""
    dtype = torch.float32 if config.startswith("fp32") else torch.bfloat16
    m, tokens = 130, 70
    for n in (75, 192):
        weight = packed_weight(m, n, quant_type="fp4" if "decode" in config else "nf4", dtype=dtype)
        with forced_matmul_config(config):
            for forward in (True, False):
                ours, ref = both(weight, forward, operands(m, n, tokens, dtype, forward), dtype)
                assert_ulp_close(ours, ref, dtype, f"{config} {'forward' if forward else 'dX'} n={n}")


def test_tolerance_catches_a_misread_layout():
    """The comparisons above can fail: the same codes read with their nibbles swapped, or another
    seed's noise, land far outside the tolerance."""
    m, n, dtype = 45, 77, torch.bfloat16
    weight = packed_weight(m, n, dtype=dtype)
    ops = operands(m, n, 19, dtype, True)
    ours, ref = both(weight, True, ops, dtype)
    swapped = dataclasses.replace(weight, packed=(weight.packed << 4) | (weight.packed >> 4))
    misread, _ = both(swapped, True, ops, dtype)
    other_seed, _ = both(weight, True, ops, dtype, seed=SEED + 1)
    assert rel_err(misread, ref) > 10 * ULPS[dtype] and rel_err(other_seed, ref) > 10 * ULPS[dtype]
    assert rel_err(ours, ref) <= ULPS[dtype]


def test_a_4bit_block_of_a_larger_weight_takes_its_noise_offset():
    """With ``noise_offset`` (a tensor-parallel shard) the 4-bit kernels perturb with the logical
    weight's noise there, as the reference does, and not with the noise at (0, 0)."""
    m, n, dtype = 45, 77, torch.float32
    weight = packed_weight(m, n, quant_type="fp4")
    for forward in (True, False):
        ops = operands(m, n, 19, dtype, forward)
        ours, ref = both(weight, forward, ops, dtype, noise_offset=(1000, 37))
        assert_ulp_close(ours, ref, dtype, "forward" if forward else "dX")
        at_origin, _ = both(weight, forward, ops, dtype)
        assert rel_err(ours, at_origin) > 100 * ULPS[dtype]


def test_the_layer_op_routes_4bit_weights_to_the_fused_kernel(monkeypatch):
    """Through ``flat_lora_linear`` and ``merged_row_norms`` with the Triton backend, a 4-bit base never
    takes the row-block path (which would call ``dequantize_rows``), and forward, gradients and
    norms equal those of the reference backend; the native backend hands 4-bit weights to the reference."""
    m, n = 37, 53
    weight = packed_weight(m, n, quant_type="fp4", blocksize=128)
    before = snapshot(weight)
    x = torch.randn(2, 9, n, requires_grad=True)
    lora_A = (0.1 * torch.randn(4, n)).requires_grad_()
    lora_B = (0.1 * torch.randn(m, 4)).requires_grad_()
    bias, row_std = torch.randn(m), 0.1 * torch.rand(m)
    results = {}
    backends = ["triton", "reference"] + (["native"] if _unavailable_reason("native", torch.device("cpu")) is None
                                          else [])
    for backend in backends:
        monkeypatch.setenv(BACKEND_ENV, backend)
        with monkeypatch.context() as patch:
            if backend == "triton":
                patch.setattr(PackedWeight4bit, "dequantize_rows",
                              lambda *args: pytest.fail("the Triton backend dequantized rows in torch"))
            if backend == "native":  # row blocks in torch, their noise from the C++ generator
                patch.setattr(contract, "reference_noise_block",
                              lambda *args, **kwargs: pytest.fail("the native backend made noise in torch"))
            assert get_backend("cpu", weight).name == backend
            torch.manual_seed(4)
            y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, seed=SEED, row_std=row_std, dropout_p=0.2)
            grads = torch.autograd.grad(y.square().sum(), [x, lora_A, lora_B])
            results[backend] = (y, *grads, fk.merged_row_norms(weight, lora_A, lora_B, 0.5))
    for backend in (b for b in backends if b != "reference"):
        for ours, ref in zip(results[backend], results["reference"]):
            assert_ulp_close(ours, ref, torch.float32, f"layer op, {backend}")
    assert_unchanged(weight, before)


def test_malformed_packed_weights_are_refused():
    weight = packed_weight(6, 10, double=False)
    with pytest.raises(ValueError, match="packed must be a contiguous 1-D torch.uint8 tensor of at least 30"):
        dataclasses.replace(weight, packed=weight.packed[:-1])
    with pytest.raises(ValueError, match="absmax must be a contiguous 1-D torch.float32"):
        dataclasses.replace(weight, absmax=weight.absmax.half())
    with pytest.raises(ValueError, match="codebook must be"):
        dataclasses.replace(weight, codebook=weight.codebook[:8])
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        dataclasses.replace(weight, blocksize=0)
    with pytest.raises(TypeError, match="not torch.float64"):
        dataclasses.replace(weight, dtype=torch.float64)
    with pytest.raises(ValueError, match="block sizes are even"):
        perturbed_matmul_triton(PerturbedMatmul(
            torch.randn(2, 10), dataclasses.replace(weight, blocksize=3, absmax=torch.ones(20)), transpose_weight=True,
            seed=1, row_std=None, out_dtype=torch.float32))


def test_4bit_weights_swap_the_configuration_that_spills():
    names = [name for name, _ in MATMUL_CONFIGS.distinct(torch.bfloat16, weight_4bit=True)]
    assert names == ["16bit-bulk-narrow", "16bit-decode"]
    assert MATMUL_CONFIGS.distinct(torch.float32, weight_4bit=True) == MATMUL_CONFIGS.distinct(torch.float32)
    with pytest.raises(ValueError, match="unknown configurations \\['nonexistent'\\]"):
        MatmulConfigTable(MATMUL_CONFIGS.configs, MATMUL_CONFIGS.entries, MATMUL_CONFIGS.interpreter,
                          {"16bit-decode": "nonexistent"})
