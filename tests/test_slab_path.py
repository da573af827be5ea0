"""The slab path, the per-call choice of path and the fused-kernel guard, on the Triton interpreter.

The slab path writes ``W + diag(c) Z`` a bounded slab at a time and lets ``torch.mm`` multiply; these
tests hold it (and the fused kernels, through the same calls) to the float64 oracle, check that the
workspace bound holds by counting what the path allocates, that ``auto`` follows the committed table,
and that the guard stops, warns or stays out of the way as ``FLATLORA_FUSED_CHECK`` says.
"""

import dataclasses
import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import flatlora_kernels as fk
from flatlora_kernels import paths, reference
from flatlora_kernels.backends import BACKEND_ENV, _unavailable_reason
from flatlora_kernels.matmul_call import PerturbedMatmul
from flatlora_kernels.quant4bit import PackedWeight4bit
from flatlora_kernels.testing import checking_fused_guard

from .helpers import (DTYPES, REL_TOL, SHAPES, assert_close_rel, float64_flat_lora, make_inputs, packed_weight,
                      peft_lora_layer, rel_err, run_both)

pytestmark = pytest.mark.skipif(_unavailable_reason("triton", torch.device("cpu")) is not None,
                                reason="the Triton interpreter is not available")

from flatlora_kernels.triton_ops import fused_guard, slab  # noqa: E402  (imports triton)
from flatlora_kernels.triton_ops import perturbed_matmul as fused  # noqa: E402

# Small enough that every test shape takes several slabs in both directions (a dX slab needs
# out_features x 32 columns: 70 x 32 float32 = 8960 bytes for the widest shape here).
SMALL_SLAB = 12_000


@pytest.fixture
def triton_path(monkeypatch, request):
    """The Triton backend, ``FLATLORA_PATH`` forced to the parameter, a small slab bound."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.setenv(paths.PATH_ENV, request.param)
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, str(SMALL_SLAB))
    return request.param


both_paths = pytest.mark.parametrize("triton_path", ["slab", "fused"], indirect=True)


@both_paths
@pytest.mark.parametrize("lead,n,m,r", SHAPES)
@pytest.mark.parametrize("dtype,lora_dtype", DTYPES)
def test_both_paths_match_float64(triton_path, lead, n, m, r, dtype, lora_dtype):
    inputs = make_inputs("cpu", lead, n, m, r, dtype, lora_dtype)
    y, y64, grads, grads64 = run_both(*inputs)
    assert y.dtype == dtype and y.shape == (*lead, m)
    assert_close_rel(y, y64, dtype, f"{triton_path} y")
    for name, g, g64 in zip(("x", "lora_A", "lora_B", "bias"), grads, grads64):
        assert_close_rel(g, g64, dtype, f"{triton_path} grad {name}")


@both_paths
@pytest.mark.parametrize("dtype,lora_dtype", DTYPES[:3])
@pytest.mark.parametrize("offset", [(5, 8), (3, 7)])
def test_offsets_dropout_and_no_lora(triton_path, dtype, lora_dtype, offset):
    """A tensor-parallel block at a noise offset (column offset a multiple of 4, and not), with LoRA
    dropout; and the perturbed base layer alone."""
    x, weight, bias, lora_A, lora_B, row_std = make_inputs("cpu", (23,), 45, 38, 3, dtype, lora_dtype)
    torch.manual_seed(5)
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.75, seed=99, row_std=row_std, dropout_p=0.4,
                            noise_offset=offset)
    torch.manual_seed(5)
    keep = torch.rand(x.shape) >= 0.4
    y64, leaves = float64_flat_lora(x, weight, bias, lora_A, lora_B, 0.75, 99, row_std, keep, 0.4, offset)
    assert_close_rel(y, y64, dtype, "y")
    dy = torch.randn(y.shape)
    for g, g64 in zip(torch.autograd.grad(y, [x, lora_A, lora_B, bias], dy.to(y.dtype)),
                      torch.autograd.grad(y64, list(leaves), dy.double())):
        assert_close_rel(g, g64, dtype, "gradient")
    base = fk.flat_lora_linear(x, weight, bias, None, None, 0.0, seed=99, row_std=row_std, noise_offset=offset)
    base64 = float64_flat_lora(x, weight, bias, torch.zeros(1, 45), torch.zeros(38, 1), 0.0, 99, row_std,
                               noise_offset=offset)[0]
    assert_close_rel(base, base64, dtype, "base layer alone")
    assert rel_err(base64, float64_flat_lora(x, weight, bias, torch.zeros(1, 45), torch.zeros(38, 1), 0.0, 99,
                                             row_std)[0]) > 10 * REL_TOL[dtype], "the offset must change the noise"


@both_paths
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_strided_operands(triton_path, autocast_dtype):
    """fp32 operands under autocast; x strided both ways, W a transposed (Conv1D) view, strided c."""
    m, n = 26, 35
    x = torch.randn(n, 22)[:, ::2].t().requires_grad_()
    weight = torch.randn(n, m).t()
    lora_A = (torch.randn(n, 3) / 6).t().requires_grad_()
    lora_B = torch.randn(3, m).t().requires_grad_()
    row_std = torch.rand(2 * m)[::2] + 0.2
    bias = torch.randn(m, requires_grad=True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, seed=11, row_std=row_std)
    assert y.dtype == autocast_dtype
    y64, leaves = float64_flat_lora(x, weight, bias, lora_A, lora_B, 0.5, 11, row_std)
    assert_close_rel(y, y64, autocast_dtype, "y")
    grads = torch.autograd.grad(y.float().sum(), [x, lora_A, lora_B, bias])
    assert [g.dtype for g in grads] == [torch.float32] * 4
    for g, g64 in zip(grads, torch.autograd.grad(y64.sum(), list(leaves))):
        assert_close_rel(g, g64, autocast_dtype, "grad")


@pytest.mark.parametrize("triton_path", ["slab"], indirect=True)
def test_slab_path_leaves_w_alone_and_saves_nothing_weight_sized(triton_path):
    m, n = 40, 30
    x, weight, bias, lora_A, lora_B, row_std = make_inputs("cpu", (7,), n, m, 4, torch.bfloat16, torch.float32)
    before, version = weight.clone(), weight._version
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 0.5, seed=3, row_std=row_std, dropout_p=0.1)
    y.float().sum().backward()
    assert saved
    for t in saved:
        assert t.numel() < m * n or t.data_ptr() == weight.data_ptr(), f"saved {tuple(t.shape)}"
    assert torch.equal(weight, before) and weight._version == version


def _call(weight, tokens, dtype, forward, r=3, seed=0, path="auto"):
    """One direction of the layer on ``weight`` with fresh operands: bias forward, dropout mask for dX."""
    g = torch.Generator().manual_seed(seed)
    m, n = weight.shape
    out_columns = m if forward else n
    return PerturbedMatmul(
        torch.randn(tokens, n if forward else m, generator=g).to(dtype), weight, transpose_weight=forward,
        seed=2**63 + 77, row_std=0.2 * torch.rand(m, generator=g) + 0.05, out_dtype=dtype,
        bias=torch.randn(m, generator=g).to(dtype) if forward else None,
        lora_hidden=torch.randn(tokens, r, generator=g) / 4, lora_out_factor=torch.randn(r, out_columns, generator=g),
        scaling=0.7, dropout_keep=None if forward else torch.rand(tokens, out_columns, generator=g) >= 0.3,
        keep_scale=1.0 if forward else 1 / 0.7, path=path, noise_offset=(2, 4))


# The slab path rounds the GEMM's result to the compute dtype before adding the LoRA term in float32
# and rounding again (as PEFT does): up to one more rounding than the reference's single one.
ULPS = {torch.float32: 2.0**-19, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("forward", [True, False])
def test_slab_function_into_a_poisoned_output_equals_the_reference(dtype, forward, monkeypatch):
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, str(SMALL_SLAB))
    m, n = 45, 70
    call = _call(torch.randn(m, n).to(dtype), 19, dtype, forward)
    out = torch.full((19, m if forward else n), float("nan"), dtype=dtype)
    ours = slab.slab_perturbed_matmul(call, out=out)
    assert ours.data_ptr() == out.data_ptr() and torch.isfinite(ours).all()
    ref = reference.perturbed_matmul(call)
    assert rel_err(ours, ref) <= ULPS[dtype], rel_err(ours, ref)


@pytest.mark.parametrize("n,quant_type", [(77, "fp4"), (256, "nf4")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slab_path_over_a_4bit_base(n, quant_type, dtype, monkeypatch):
    """45 x 77: blocks straddle rows; 45 x 256: rows of whole blocks. Against the reference on the
    dequantized weight; the packed buffers stay as they were."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, str(SMALL_SLAB))
    weight = packed_weight(45, n, quant_type=quant_type, blocksize=64, dtype=dtype)
    before = [t.clone() for t in (weight.packed, weight.absmax)]
    for forward in (True, False):
        call = _call(weight, 13, dtype, forward)
        ours = slab.slab_perturbed_matmul(call)
        ref = reference.perturbed_matmul(dataclasses.replace(call, weight=weight.dequantize()))
        assert rel_err(ours, ref) <= ULPS[dtype], (forward, rel_err(ours, ref))
    assert torch.equal(weight.packed, before[0]) and torch.equal(weight.absmax, before[1])


def test_a_slab_is_the_perturbed_weight_block():
    """One slab read back: exactly ``(W + c Z)[r0:r1, c0:c1]`` rounded once, at a noise offset."""
    m, n, seed = 37, 100, 5
    weight = torch.randn(m, n)
    row_std = torch.rand(m)
    block = slab.write_perturbed_slab(weight, seed, row_std, (3, 30), (32, 96), torch.empty(27, 64),
                                      noise_offset=(4, 12))
    z = fk.generate_noise(seed, m, n, noise_offset=(4, 12))
    torch.testing.assert_close(block, (weight + row_std[:, None] * z)[3:30, 32:96], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 32"):
        slab.write_perturbed_slab(weight, seed, row_std, (0, 1), (5, 9), torch.empty(1, 4))


class AllocationCounter(TorchDispatchMode):
    """Bytes of the storages that torch ops allocate while it is active, live at once: the peak.

    Kernel launches run with it off (the interpreter's host copies are not the path's: a GPU kernel
    allocates nothing)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        known = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        result = func(*args, **(kwargs or {}))
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in known and storage not in self.tracked and storage.nbytes():
                    self.tracked.add(storage)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return result

    def _freed(self, nbytes):
        self.live -= nbytes


@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_slab_bound_holds(forward, dtype, monkeypatch):
    """What the slab path allocates beyond its output and the cast input stays within the bound (the slab)
    plus one float32 epilogue block of the same bound, while the perturbed weight is 3.75 to 7.5 times it."""
    m, n, tokens, bound = 96, 320, 300, 16384  # a dX slab needs 96 x 32 x 4 = 12288 bytes
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, str(bound))
    assert m * n * dtype.itemsize >= 3 * bound
    kernel = slab._perturbed_slab_kernel

    class Unwatched:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                with _disable_current_modes():
                    return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(slab, "_perturbed_slab_kernel", Unwatched())
    call = dataclasses.replace(_call(torch.randn(m, n).to(dtype), tokens, torch.float32, forward), out_dtype=dtype)
    out = torch.empty(tokens, m if forward else n, dtype=dtype)
    with AllocationCounter() as counter:
        slab.slab_perturbed_matmul(call, out=out)
    cast_input = call.a.numel() * dtype.itemsize if dtype != torch.float32 else 0
    assert counter.peak > 0
    assert counter.peak - cast_input <= 2 * bound + 4096, (counter.peak, cast_input)


def test_a_slab_that_cannot_fit_is_refused_clearly(monkeypatch):
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, "100")
    call = PerturbedMatmul(torch.randn(4, 40), torch.randn(30, 40), transpose_weight=True, seed=0,
                           row_std=torch.ones(30), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="FLATLORA_SLAB_BYTES=100 cannot hold one slab of a 30 x 40 weight"):
        slab.slab_perturbed_matmul(call)
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="FLATLORA_SLAB_BYTES='lots' is not a positive number of bytes"):
        slab.slab_bytes()


TABLE = {"schema": paths.TABLE_SCHEMA, "source": "test", "classes": {
    "default": [{"dtype": "fp32", "max_weight_elements": None, "slab_from_tokens": None},
                {"dtype": "any", "max_weight_elements": 1000, "slab_from_tokens": 64},
                {"dtype": "any", "max_weight_elements": None, "slab_from_tokens": 16}],
    "cuda-elsewhere": [{"dtype": "any", "max_weight_elements": None, "slab_from_tokens": 1}]}}


def test_auto_takes_the_path_the_table_says(monkeypatch, tmp_path):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    monkeypatch.delenv(paths.PATH_ENV, raising=False)
    committed = paths.load_path_table()
    assert committed["classes"]["default"][0]["slab_from_tokens"] == 1024  # the initial guess
    assert paths.path_name("cpu", 1023, 4096, 4096) == "fused" and paths.path_name("cpu", 1024, 4096, 4096) == "slab"
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps(TABLE))
    monkeypatch.setattr(paths, "TABLE_FILE", table_file)
    assert paths.load_path_table() == TABLE
    # bf16 on a 30 x 30 (900-element) weight: slab from 64 tokens; 40 x 30: from 16; fp32: never
    assert [paths.path_name("cpu", t, 30, 30) for t in (63, 64)] == ["fused", "slab"]
    assert [paths.path_name("cpu", t, 40, 30) for t in (15, 16)] == ["fused", "slab"]
    assert paths.path_name("cpu", 10**6, 40, 30, torch.float32) == "fused"
    assert paths.path_name("cpu", 1, 40, 30, path="slab") == "slab"  # a path asked for is taken
    monkeypatch.setenv(paths.PATH_ENV, "fused")  # the environment overrides the argument
    assert paths.path_name("cpu", 10**6, 40, 30, path="slab") == "fused"
    monkeypatch.delenv(paths.PATH_ENV)
    monkeypatch.setenv(slab.SLAB_BYTES_ENV, "64")  # no slab fits: auto stays fused
    assert paths.path_name("cpu", 10**6, 40, 30) == "fused"
    table_file.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="is not a flatlora-path-table/1 table"):
        paths._read_table.__wrapped__(table_file)  # uncached: this file was read above


def test_calls_run_the_path_path_name_names(monkeypatch):
    """flat_lora_linear runs the path path_name reports, in both passes; the layer's ``path`` reaches it."""
    monkeypatch.setenv(BACKEND_ENV, "triton")
    calls = []
    real_slab, real_fused = slab.write_perturbed_slab, fused.launch_fused
    monkeypatch.setattr(slab, "write_perturbed_slab", lambda *a, **k: calls.append("slab") or real_slab(*a, **k))
    monkeypatch.setattr(fused, "launch_fused", lambda *a, **k: calls.append("fused") or real_fused(*a, **k))
    x, weight, bias, lora_A, lora_B, row_std = make_inputs("cpu", (9,), 20, 12, 2, torch.float32, torch.float32)
    for path in ("slab", "fused"):
        calls.clear()
        y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, seed=1, row_std=row_std, path=path)
        y.sum().backward()
        assert fk.path_name("cpu", 9, 12, 20, torch.float32, path) == path
        assert set(calls) == {path} and len(calls) >= 2
    with pytest.raises(ValueError, match="path='sideways' is not a path"):
        fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, seed=1, row_std=row_std, path="sideways")
    monkeypatch.setenv(paths.PATH_ENV, "diagonal")
    with pytest.raises(ValueError, match="FLATLORA_PATH='diagonal' is not a path"):
        fk.path_name("cpu", 1, 2, 2)


def test_the_layer_takes_its_path(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    x, weight, bias, lora_A, lora_B, _ = make_inputs("cpu", (6,), 20, 12, 2, torch.float32, torch.float32)
    layer = fk.FlatLoraLinear.from_lora_linear(peft_lora_layer(weight, bias, lora_A.detach(), lora_B.detach(), 4),
                                               path="slab")
    assert layer.path == "slab"
    layer.base_layer.weight.requires_grad_(False)  # frozen, as PEFT leaves it
    layer.sample_noise(seed=3, sigma=0.5)
    calls = []
    real = slab.write_perturbed_slab
    monkeypatch.setattr(slab, "write_perturbed_slab", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(x)
    assert calls
    with pytest.raises(ValueError, match="path='both' is not a path"):
        layer.path = "both"


def test_native_and_reference_backends_have_the_slab_form_only(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert fk.path_name("cpu", 10**5, 64, 64) == "slab"
    with pytest.raises(ValueError, match="path 'fused' needs the Triton backend; the reference backend"):
        fk.path_name("cpu", 1, 64, 64, path="fused")
    x, weight, bias, lora_A, lora_B, row_std = make_inputs("cpu", (3,), 8, 5, 2, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="path 'fused' needs the Triton backend; the reference backend"):
        fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, seed=1, row_std=row_std, path="fused")
    y = fk.flat_lora_linear(x, weight, bias, lora_A, lora_B, 1.0, seed=1, row_std=row_std, path="slab")
    assert_close_rel(y, float64_flat_lora(x, weight, bias, lora_A, lora_B, 1.0, 1, row_std)[0], torch.float32, "y")


def _guarded_call(forward=True, dtype=torch.float32):
    """A fused launch through the guard, on odd shapes, and the slab path's result for it."""
    weight = torch.randn(30, 41, generator=torch.Generator().manual_seed(5)).to(dtype)
    call = _call(weight, 11, dtype, forward, seed=4, path="fused")
    return fused.perturbed_matmul_triton(call), slab.slab_perturbed_matmul(call)


def shift(t):
    return t + 0.5 * t.abs().max()


def test_the_guard_checks_each_variant_once_and_passes_good_kernels(monkeypatch):
    monkeypatch.delenv(fused_guard.CHECK_ENV, raising=False)
    checks = []
    real = fused_guard._check
    monkeypatch.setattr(fused_guard, "_check", lambda *a: checks.append(a[0]) or real(*a))
    with checking_fused_guard() as verdicts:
        for _ in range(2):
            ours, slab_result = _guarded_call()
        _guarded_call(forward=False)
        assert len(checks) == 2 and list(verdicts.values()) == [True, True]
    assert rel_err(ours, slab_result) <= ULPS[torch.float32]
    checks.clear()
    _guarded_call()  # outside the test hook, CPU calls are not checked
    assert not checks


def test_the_guard_stops_a_kernel_that_disagrees(monkeypatch):
    monkeypatch.setenv(fused_guard.CHECK_ENV, "error")
    with checking_fused_guard(corrupt=shift):
        with pytest.raises(RuntimeError) as info:
            _guarded_call(dtype=torch.bfloat16)
    message = str(info.value)
    assert "perturbed_matmul forward torch.bfloat16 interpreter" in message
    assert "on a 35-token problem over a 69 x 77 W" in message  # interpreter tiles 16 x 32 x 32
    assert "max |fused - slab| / max |slab| = 0.5" in message and "FLATLORA_FUSED_CHECK=warn" in message


def test_the_guard_in_warn_mode_falls_back_to_the_slab_path(monkeypatch):
    monkeypatch.setenv(fused_guard.CHECK_ENV, "warn")
    launches = []
    real = fused.launch_fused
    with checking_fused_guard(corrupt=shift) as verdicts:
        with pytest.warns(RuntimeWarning, match="Its calls take the slab path from now on"):
            ours, slab_result = _guarded_call()
        monkeypatch.setattr(fused, "launch_fused", lambda *a, **k: launches.append(1) or real(*a, **k))
        again, _ = _guarded_call()  # no second check, no fused launch
        assert list(verdicts.values()) == [False]
    assert not launches
    assert torch.equal(ours, slab_result) and torch.equal(again, slab_result)


def test_the_guard_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(fused_guard.CHECK_ENV, "off")
    with checking_fused_guard(corrupt=shift) as verdicts:
        _guarded_call()
        assert verdicts == {}
    monkeypatch.setenv(fused_guard.CHECK_ENV, "maybe")
    with checking_fused_guard(), pytest.raises(ValueError, match="FLATLORA_FUSED_CHECK='maybe'"):
        _guarded_call()


@pytest.mark.parametrize("config_name", ["16bit-bulk-wide", "16bit-bulk-narrow"])
@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("form", ["dense", "4-bit whole blocks", "4-bit straddling"])
@pytest.mark.parametrize("inner_blocks", [3, 3.5])
def test_the_guard_problem_compiles_to_the_callers_variant(config_name, forward, form, inner_blocks):
    """The check problem's variant key equals the call's: same K divisibility by BLOCK_K (EVEN_K drops the
    K masks), same 4-bit row/block relation, whatever the sizes the call has."""
    config = fused.MATMUL_CONFIGS.configs[config_name]
    inner = int(inner_blocks * config["BLOCK_K"]) + (0 if inner_blocks == int(inner_blocks) else 3)
    out_columns = 150
    m, n = (out_columns, inner) if forward else (inner, out_columns)
    if form == "dense":
        weight = torch.randn(m, n).to(torch.bfloat16)
    else:
        pytest.importorskip("bitsandbytes")
        blocksize = 32 if form == "4-bit whole blocks" else 128
        if form == "4-bit whole blocks":
            n = -(-n // blocksize) * blocksize
        elif n % blocksize == 0:
            n += 2
        weight = packed_weight(m, n, blocksize=blocksize, dtype=torch.bfloat16)
    inner = n if forward else m
    call = PerturbedMatmul(torch.randn(21, inner).to(torch.bfloat16), weight, transpose_weight=forward, seed=3,
                           row_std=torch.rand(m), out_dtype=torch.bfloat16)
    problem = fused_guard.check_problem(call, config)
    assert (problem.inner_size % config["BLOCK_K"] == 0) == (call.inner_size % config["BLOCK_K"] == 0)
    assert fused_guard.variant_key(problem, config_name, config) == fused_guard.variant_key(call, config_name, config)


def test_the_guard_checks_4bit_variants_with_a_4bit_problem(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv(fused_guard.CHECK_ENV, "error")
    weight = packed_weight(29, 128, quant_type="nf4", blocksize=64, dtype=torch.bfloat16)
    seen = []
    real = fused_guard._check_weight
    monkeypatch.setattr(fused_guard, "_check_weight", lambda *a: seen.append(real(*a)) or seen[-1])
    with checking_fused_guard() as verdicts:
        fused.perturbed_matmul_triton(_call(weight, 9, torch.bfloat16, False, seed=2, path="fused"))
        assert list(verdicts.values()) == [True]
    (check_weight,) = seen
    assert isinstance(check_weight, PackedWeight4bit) and check_weight.shape[1] % 64 == 0
    assert check_weight.blocksize == 64 and check_weight.dtype == torch.bfloat16
