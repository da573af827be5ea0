"""flat_lora_linear: forward and every gradient against float64 oracles, on every backend."""

import dataclasses

import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels.backends import BACKEND_ENV
from flatlora_kernels.matmul_call import PerturbedMatmul
from flatlora_kernels.testing import forced_matmul_config
from flatlora_kernels.triton_ops.launch_settings import MATMUL_CONFIGS

from .helpers import (DTYPES, REL_TOL, SHAPES, assert_close_rel, float64_flat_lora, make_inputs, peft_lora_layer,
                      rel_err, run_both)

@pytest.mark.parametrize("lead,n,m,r", SHAPES)
@pytest.mark.parametrize("dtype,lora_dtype", DTYPES)
def test_forward_and_gradients_match_float64(device_backend, lead, n, m, r, dtype, lora_dtype):
    device, _ = device_backend
    inputs = make_inputs(device, lead, n, m, r, dtype, lora_dtype)
    y, y64, grads, grads64 = run_both(*inputs)
    assert y.dtype == dtype and y.shape == (*lead, m)
    assert_close_rel(y, y64, dtype, "y")
    for name, g, g64 in zip(("x", "lora_A", "lora_B", "bias"), grads, grads64):
        assert_close_rel(g, g64, dtype, f"grad {name}")


@pytest.mark.parametrize("with_lora", [True, False])
@pytest.mark.parametrize("dtype,lora_dtype", DTYPES[:3])
@pytest.mark.parametrize("offset", [(5, 8), (3, 7), (2, 4)])  # column offset a multiple of 8, and not
def test_a_block_at_a_noise_offset_is_perturbed_as_that_block_of_the_whole(device_backend, offset, dtype, lora_dtype,
                                                                          with_lora):
    """A tensor-parallel shard: the op on a block of the weight with ``noise_offset`` equals the float64
    oracle whose noise is cut from the whole matrix; with and without LoRA factors, both directions."""
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (11,), 45, 21, 3, dtype, lora_dtype)
    if not with_lora:
        lora_A = lora_B = None
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.75, seed=99, row_std=row_std, noise_offset=offset)
    y64, leaves = float64_flat_lora(x, weight, bias, lora_A if with_lora else torch.zeros(1, 45),
                                    lora_B if with_lora else torch.zeros(21, 1), 0.75, 99, row_std,
                                    noise_offset=offset)
    assert_close_rel(y, y64, dtype, "y")
    wrong = float64_flat_lora(x, weight, bias, torch.zeros(1, 45), torch.zeros(21, 1), 0.75, 99, row_std)[0]
    assert rel_err(y64, wrong) > 10 * REL_TOL[dtype], "the offset must change the noise"
    dy = torch.randn(y.shape, device=device)
    inputs = [t for t in (x, lora_A, lora_B, bias) if t is not None]
    grads = torch.autograd.grad(y, inputs, dy.to(y.dtype))
    grads64 = torch.autograd.grad(y64, [leaves[0]] + ([leaves[1], leaves[2]] if with_lora else []) + [leaves[3]],
                                  dy.double())
    for g, g64 in zip(grads, grads64):
        assert_close_rel(g, g64, dtype, "gradient")


@pytest.mark.parametrize("dtype,lora_dtype", DTYPES[:2])
@pytest.mark.parametrize("bias", [True, False])
def test_dropout_on_the_lora_path(device_backend, dtype, lora_dtype, bias):
    device, _ = device_backend
    inputs = make_inputs(device, (23,), 45, 38, 4, dtype, lora_dtype, bias=bias)
    y, y64, grads, grads64 = run_both(*inputs, dropout_p=0.4)
    assert_close_rel(y, y64, dtype, "y")
    for g, g64 in zip(grads, grads64):
        assert_close_rel(g, g64, dtype, "grad")


def test_tolerances_catch_wrong_noise(device_backend):
    """Another seed's noise lies far outside the tolerance: the comparisons above can fail."""
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (9,), 40, 30, 2, torch.bfloat16, torch.float32)
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, seed=1, row_std=row_std)
    y64_other, _ = float64_flat_lora(x, weight, bias, lora_A, lora_B, 0.5, 2, row_std)
    assert rel_err(y, y64_other) > 3 * REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_agrees_with_reference(backend, dtype, monkeypatch):
    reason = fk.backends._unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    inputs = make_inputs("cpu", (3, 7), 61, 29, 5, dtype, torch.float32)
    results = {}
    for backend in (backend, "reference"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        torch.manual_seed(3)
        y = fk.flat_lora_linear(*inputs[:5], 0.6, seed=77, row_std=inputs[5], dropout_p=0.25)
        results[backend] = (y, *torch.autograd.grad(y.float().square().sum(), [inputs[0], inputs[3], inputs[4]]))
    # Same rounding points; only the fp32 summation order (and FMA contraction of W + c*Z)
    # differs. In 16-bit dtypes that is at most ~2 ulp of the output; in fp32 it grows with the
    # K-term sums, so 16 ulp. Measured against each tensor's own scale.
    ulps = {torch.float32: 2.0**-19, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    ours_name = next(k for k in results if k != "reference")
    for ours, ref in zip(results[ours_name], results["reference"]):
        assert ours.dtype == ref.dtype
        assert rel_err(ours, ref) <= ulps, rel_err(ours, ref)


def test_backward_regenerates_the_forward_noise(device_backend):
    """Read W + eps back through both passes: forward with one-hot tokens, dX with one-hot dY."""
    device, _ = device_backend
    m, n, seed = 21, 38, 2**63 + 5
    weight = torch.randn(m, n, device=device)
    lora_A = torch.zeros(2, n, device=device, requires_grad=True)
    lora_B = torch.zeros(m, 2, device=device, requires_grad=True)
    row_std = torch.ones(m, device=device)
    z = fk.generate_noise(seed, m, n, device=device)
    eye_n = torch.eye(n, device=device)
    y = fk.flat_lora_linear(eye_n, weight, None, lora_A, lora_B, 1.0, seed=seed, row_std=row_std)
    torch.testing.assert_close(y.t() - weight, z, rtol=0, atol=1e-5)
    x = torch.randn(m, n, device=device, requires_grad=True)
    out = fk.flat_lora_linear(x, weight, None, lora_A, lora_B, 1.0, seed=seed, row_std=row_std)
    (grad_x,) = torch.autograd.grad(out, x, torch.eye(m, device=device))
    torch.testing.assert_close(grad_x - weight, z, rtol=0, atol=1e-5)


def test_noise_of_a_row_ignores_token_count_and_order(device_backend):
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (13,), 50, 27, 3, torch.float32, torch.float32)
    call = lambda inp: fk.flat_lora_linear(inp, weight, bias, lora_A, lora_B, 0.5, seed=9,  # noqa: E731
                                           row_std=row_std).detach()
    full = call(x)
    perm = torch.randperm(13, device=device)
    torch.testing.assert_close(call(x[perm]), full[perm], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(call(x[4:5]), full[4:5], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(call(x.repeat(3, 1)), full.repeat(3, 1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("in_features,out_features", [(130, 75), (128, 192)])
@pytest.mark.parametrize("config", sorted(MATMUL_CONFIGS.configs))
def test_every_gpu_configuration_on_the_interpreter(config, in_features, out_features, monkeypatch):
    """Each entry of the GPU configuration table, forced on the CPU at shapes that span several W tiles
    and K steps, 70 tokens: forward and gradients against float64, and token independence of the
    noise (a single token, and a shuffled batch, see the same W + eps as the full batch). 130 x 75 cuts
    every K step short; 128 x 192 has whole K steps in both directions (``EVEN_K``: unmasked K, the last
    prefetch re-reads the last step) with a partial output tile."""
    reason = fk.backends._unavailable_reason("triton", torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    dtype = torch.float32 if config.startswith("fp32") else torch.bfloat16
    x, weight, bias, lora_A, lora_B, row_std = make_inputs("cpu", (70,), in_features, out_features, 3, dtype,
                                                           torch.float32)
    with forced_matmul_config(config):
        y, y64, grads, grads64 = run_both(x, weight, bias, lora_A, lora_B, row_std)
        call = lambda inp: fk.flat_lora_linear(inp, weight, bias, lora_A, lora_B, 0.75, seed=1234,  # noqa: E731
                                               row_std=row_std).detach()
        single, shuffled = call(x[41:42]), call(x.flip(0))
    assert_close_rel(y, y64, dtype, "y")
    for name, g, g64 in zip(("x", "lora_A", "lora_B", "bias"), grads, grads64):
        assert_close_rel(g, g64, dtype, f"grad {name}")
    assert_close_rel(single, y64[41:42], dtype, "one token alone")
    assert_close_rel(shuffled, y64.flip(0), dtype, "shuffled tokens")


def test_the_custom_op_takes_the_fields_of_one_call_in_order():
    """The registered op rebuilds its PerturbedMatmul positionally: its schema must list the fields
    in order (the noise offset as two ints), and the call must reject half a LoRA term."""
    names = [arg.name for arg in torch.ops.flatlora.perturbed_matmul.default._schema.arguments]
    fields = [field.name for field in dataclasses.fields(PerturbedMatmul)]
    assert fields[-1] == "noise_offset"
    assert names == fields[:-1] + ["noise_row_offset", "noise_col_offset"]
    with pytest.raises(ValueError, match="lora_hidden and lora_out_factor come together"):
        PerturbedMatmul(torch.ones(2, 3), torch.ones(4, 3), transpose_weight=True, seed=0, row_std=None,
                        out_dtype=torch.float32, lora_hidden=torch.ones(2, 1))


def test_configuration_table_covers_every_class_and_routes_tokens():
    for key in MATMUL_CONFIGS.CLASSES:
        assert MATMUL_CONFIGS.entries[key] in MATMUL_CONFIGS.configs
    assert MATMUL_CONFIGS.classify(torch.bfloat16, 4096, 4096) == ("16bit", "wide", "bulk")
    assert MATMUL_CONFIGS.classify(torch.float16, 64, 100) == ("16bit", "narrow", "decode")
    assert MATMUL_CONFIGS.classify(torch.float32, 65, 128) == ("fp32", "wide", "bulk")
    with pytest.raises(KeyError, match="no configuration named"):
        with forced_matmul_config("nonexistent"):
            pass


@pytest.mark.parametrize("row_std_kind", ["none", "zeros"])
def test_without_noise_it_is_plain_peft_lora(device_backend, row_std_kind):
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, _ = make_inputs("cpu", (4, 6), 31, 22, 4, torch.float32, torch.float32)
    layer = peft_lora_layer(weight, bias, lora_A.detach(), lora_B.detach(), alpha=8).to(device)
    x = x.detach().to(device).requires_grad_()
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected.sum(), [x, layer.lora_A["default"].weight])
    row_std = None if row_std_kind == "none" else torch.zeros(22, device=device)
    lora_A = layer.lora_A["default"].weight
    y = fk.flat_lora_linear(x, layer.base_layer.weight.detach(), layer.base_layer.bias, lora_A,
                            layer.lora_B["default"].weight, layer.scaling["default"], seed=0, row_std=row_std)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(torch.autograd.grad(y.sum(), [x, lora_A]), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_nothing_weight_sized_is_saved_and_weight_is_untouched(device_backend):
    device, _ = device_backend
    m, n, tokens = 40, 30, 7
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (tokens,), n, m, 4, torch.bfloat16,
                                                           torch.float32)
    before = weight.clone()
    version = weight._version
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, seed=3, row_std=row_std, dropout_p=0.1)
    y.float().sum().backward()
    assert saved, "the op saved nothing; the hook did not see it"
    for t in saved:
        if t.numel() >= m * n:
            assert t.data_ptr() == weight.data_ptr(), f"a weight-sized tensor {tuple(t.shape)} was saved"
    assert torch.equal(weight, before) and weight._version == version


def test_non_contiguous_operands(device_backend):
    device, _ = device_backend
    m, n, r = 26, 35, 3
    x_store = torch.randn(n, 2 * 11, device=device)
    x = x_store[:, ::2].t().requires_grad_()  # (11, n), strided both ways
    w_store = torch.randn(n, m, device=device)  # Conv1D layout: logical W is its transpose
    a_store = torch.randn(n, r, device=device) / 6
    b_store = torch.randn(r, m, device=device)
    lora_A = a_store.t().requires_grad_()
    lora_B = b_store.t().requires_grad_()
    row_std = torch.rand(2 * m, device=device)[::2]
    y, y64, grads, grads64 = run_both(x, w_store.t(), None, lora_A, lora_B, row_std)
    assert_close_rel(y, y64, torch.float32, "y")
    for g, g64 in zip(grads, grads64):
        assert_close_rel(g, g64, torch.float32, "grad")


def test_zero_tokens(device_backend):
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (0,), 12, 9, 2, torch.float32, torch.float32)
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, seed=0, row_std=row_std)
    assert y.shape == (0, 9)
    y.sum().backward()
    assert x.grad.shape == (0, 12) and torch.equal(lora_A.grad, torch.zeros_like(lora_A))


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast(device_backend, autocast_dtype):
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (2, 9), 47, 31, 4, torch.float32, torch.float32)
    with torch.autocast(device.type, dtype=autocast_dtype):
        y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, seed=11, row_std=row_std)
        peft_y = peft_lora_layer(weight, bias, lora_A.detach(), lora_B.detach(), 2).to(device)(x)
    assert y.dtype == peft_y.dtype == autocast_dtype
    grads = torch.autograd.grad(y.float().sum(), [x, lora_A, lora_B, bias])
    assert [g.dtype for g in grads] == [torch.float32] * 4
    y64, leaves = float64_flat_lora(x, weight, bias, lora_A, lora_B, 0.5, 11, row_std)
    assert_close_rel(y, y64, autocast_dtype, "y")
    for g, g64 in zip(grads, torch.autograd.grad(y64.sum(), list(leaves))):
        assert_close_rel(g, g64, autocast_dtype, "grad")


def test_bias_gradient_only_when_required(device_backend):
    device, _ = device_backend
    x, weight, bias, lora_A, lora_B, row_std = make_inputs(device, (5,), 14, 10, 2, torch.float32, torch.float32)
    frozen_bias = bias.detach()
    y = fk.flat_lora_linear(x, weight, frozen_bias, lora_A, lora_B, 1.0, seed=0, row_std=row_std)
    y.sum().backward()
    assert frozen_bias.grad is None and lora_A.grad is not None


def _valid():
    return dict(x=torch.randn(3, 8), weight=torch.randn(5, 8), bias=torch.randn(5), lora_A=torch.randn(2, 8),
                lora_B=torch.randn(5, 2), scaling=1.0, seed=0, row_std=torch.rand(5), dropout_p=0.0)


BAD_INPUTS = [
    (dict(x=torch.randn(3, 7)), ValueError, "last dimension"),
    (dict(x=torch.randn(3, 8).double()), TypeError, "x has dtype"),
    (dict(x=torch.tensor(1.0)), ValueError, "last dimension"),
    (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(5, 8).requires_grad_()), ValueError, "frozen"),
    (dict(weight=torch.randn(5, 8).to(torch.int32)), TypeError, "weight has dtype"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A"),
    (dict(lora_B=torch.randn(5, 3)), ValueError, "lora_B"),
    (dict(row_std=torch.rand(4)), ValueError, "row_std must be a float32 tensor of shape"),
    (dict(row_std=torch.rand(5).double()), ValueError, "row_std must be a float32"),
    (dict(row_std=torch.tensor([0.1, float("nan"), 0.1, 0.1, 0.1])), ValueError, "finite"),
    (dict(row_std=torch.tensor([0.1, float("inf"), 0.1, 0.1, 0.1])), ValueError, "finite"),
    (dict(row_std=torch.tensor([0.1, -0.1, 0.1, 0.1, 0.1])), ValueError, "negative"),
    (dict(row_std=0.05), TypeError, "row_std"),
    (dict(seed=-3), ValueError, "seed"),
    (dict(seed=0.5), TypeError, "seed"),
    (dict(seed=None), TypeError, "seed"),
    (dict(scaling=float("inf")), ValueError, "scaling"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(x=torch.randn(3, 8, device="meta")), ValueError, "x is on meta"),
    (dict(lora_B=None), ValueError, "come together"),
    (dict(noise_offset=(-1, 0)), ValueError, "row offset"),
    (dict(noise_offset=(0, 2**34 - 4)), ValueError, "index space"),
    (dict(noise_offset=4), TypeError, "noise_offset"),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(override, error, match):
    kwargs = {**_valid(), **override}
    with pytest.raises(error, match=match):
        fk.flat_lora_linear(kwargs.pop("x"), kwargs.pop("weight"), kwargs.pop("bias"), kwargs.pop("lora_A"),
                            kwargs.pop("lora_B"), kwargs.pop("scaling"), **kwargs)


def test_unknown_or_unavailable_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="FLATLORA_BACKEND"):
        fk.backend_name("cpu")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    if fk.backends.triton_unavailable_reason(torch.device("cpu")) is not None:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fk.backend_name("cpu")
    else:
        assert fk.backend_name("cpu") == "triton"


def test_backend_name_probes_once_per_device_type_and_env_value(monkeypatch):
    probes = []
    real_probe = fk.backends.native_unavailable_reason
    monkeypatch.setattr(fk.backends, "native_unavailable_reason", lambda d: probes.append(d.type) or real_probe(d))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    fk.backends._resolve_backend.cache_clear()
    try:
        first = fk.backend_name("cpu")
        assert all(fk.backend_name(d) == first for d in ("cpu", torch.device("cpu", 0), "cpu"))
        assert probes == ["cpu"]
        monkeypatch.setenv(BACKEND_ENV, "reference")  # another env value is another key
        assert fk.backend_name("cpu") == "reference"
        monkeypatch.delenv(BACKEND_ENV)
        assert fk.backend_name("cpu") == first and probes == ["cpu"]
    finally:
        fk.backends._resolve_backend.cache_clear()
