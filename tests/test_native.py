"""The native C++ ops: the same Philox stream bit for bit, three implementations agreeing, clear errors."""

import numpy as np
import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels import noise as contract
from flatlora_kernels.native import native_available

from .helpers import PHILOX_KAT

pytestmark = pytest.mark.skipif(not native_available(), reason="native extension not built")


def _C():
    from flatlora_kernels import _C

    return _C


def test_native_is_the_cpu_default(monkeypatch):
    monkeypatch.delenv("FLATLORA_BACKEND", raising=False)
    assert fk.backend_name("cpu") == "native"


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_native_philox_known_answers(counter, key, expected):
    seed = key[0] | key[1] << 32
    words = _C().philox_words(seed - 2**64 if seed >= 2**63 else seed, torch.tensor([counter]))
    assert tuple(words[0].tolist()) == expected


def test_native_philox_stream_matches_reference_bits():
    gen = np.random.default_rng(2)
    counters = torch.from_numpy(gen.integers(0, 2**32, size=(257, 4), dtype=np.int64))
    for seed in (0, 1, 2**32 + 3, 2**64 - 1):
        words = _C().philox_words(seed - 2**64 if seed >= 2**63 else seed, counters)
        expected = torch.stack(contract.philox4x32(seed, *counters.unbind(1)), 1)
        assert torch.equal(words, expected)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 53), (70, 1030)])
@pytest.mark.parametrize("seed", [0, 2**63 + 9, 2**64 - 1])
def test_native_triton_and_reference_noise_agree(shape, seed, monkeypatch):
    expected = contract.reference_noise(seed, *shape)
    monkeypatch.setenv("FLATLORA_BACKEND", "native")
    native = fk.generate_noise(seed, *shape)
    torch.testing.assert_close(native, expected, rtol=0, atol=1e-5)
    if fk.backends.triton_unavailable_reason(torch.device("cpu")) is None:
        monkeypatch.setenv("FLATLORA_BACKEND", "triton")
        torch.testing.assert_close(fk.generate_noise(seed, *shape), native, rtol=0, atol=1e-5)


def test_native_noise_is_blocked_like_the_whole():
    """Blocks of rows (the memory bound) are seams, not changes: a tall matrix crosses several."""
    n = 9
    rows = 3 * _C().block_rows(n) + 5
    z = fk.generate_noise(4, rows, n)
    for start in (0, _C().block_rows(n) - 2, rows - 4):
        torch.testing.assert_close(z[start:start + 4], contract.reference_noise_block(4, start, start + 4, 0, n),
                                   rtol=0, atol=1e-5)


def _matmul_args(**override):
    args = dict(a=torch.randn(4, 6), weight=torch.randn(5, 6), transpose_weight=True, seed=3,
                row_std=torch.rand(5), bias=torch.randn(5), lora_left=torch.randn(4, 2), lora_right=torch.randn(2, 5),
                scaling=1.0, keep=None, keep_scale=1.0, out_dtype="float32", noise_row_offset=0, noise_col_offset=0)
    args.update(override)
    return list(args.values())


BAD_NATIVE_CALLS = [
    ("float64 input", lambda C: C.perturbed_matmul_cpu(*_matmul_args(a=torch.randn(4, 6).double())), "float32"),
    ("meta weight", lambda C: C.perturbed_matmul_cpu(*_matmul_args(weight=torch.randn(5, 6, device="meta"))),
     "CPU tensor"),
    ("wrong K", lambda C: C.perturbed_matmul_cpu(*_matmul_args(a=torch.randn(4, 7))), "columns"),
    ("3-D weight", lambda C: C.perturbed_matmul_cpu(*_matmul_args(weight=torch.randn(5, 6, 1))), "2-D"),
    ("row_std shape", lambda C: C.perturbed_matmul_cpu(*_matmul_args(row_std=torch.rand(4))), "row_std"),
    ("row_std dtype", lambda C: C.perturbed_matmul_cpu(*_matmul_args(row_std=torch.rand(5).half())), "row_std"),
    ("bias shape", lambda C: C.perturbed_matmul_cpu(*_matmul_args(bias=torch.randn(6))), "bias"),
    ("lora shape", lambda C: C.perturbed_matmul_cpu(*_matmul_args(lora_right=torch.randn(3, 5))), "LoRA factors"),
    ("half lora", lambda C: C.perturbed_matmul_cpu(*_matmul_args(lora_right=None)), "come together"),
    ("keep dtype", lambda C: C.perturbed_matmul_cpu(*_matmul_args(keep=torch.ones(4, 5))), "bool mask"),
    ("out dtype", lambda C: C.perturbed_matmul_cpu(*_matmul_args(out_dtype="float64")), "out_dtype"),
    ("norm shapes", lambda C: C.merged_row_norms_cpu(torch.randn(5, 6), torch.randn(2, 7), torch.randn(5, 2), 1.0),
     "do not fit"),
    ("noise shape", lambda C: C.generate_noise_cpu(0, -1, 4, 0, 0), "index space"),
    ("noise offset", lambda C: C.generate_noise_cpu(0, 2, 4, -1, 0), "index space"),
    ("matmul noise offset", lambda C: C.perturbed_matmul_cpu(*_matmul_args(noise_col_offset=2**34 - 5)), "index space"),
    ("counters", lambda C: C.philox_words(0, torch.zeros(3, 3, dtype=torch.long)), "counters"),
]


@pytest.mark.parametrize("what,call,match", BAD_NATIVE_CALLS, ids=[c[0] for c in BAD_NATIVE_CALLS])
def test_native_ops_reject_bad_inputs(what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(_C())
