"""The noise contract: Philox bits, tile independence, 64-bit indices, statistics, seed checks."""

import numpy as np
import pytest
import scipy.stats
import torch
import triton
import triton.language as tl

import flatlora_kernels as fk
from flatlora_kernels import noise as contract
from flatlora_kernels.triton_ops.noise import gaussian_tile, generate_noise_triton, philox4x32

from .helpers import DEVICES, PHILOX_KAT



@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    seed = key[0] | key[1] << 32
    out = contract.philox4x32(seed, *[torch.tensor([c]) for c in counter])
    assert tuple(int(o) for o in out) == expected


@triton.jit
def _philox_words_kernel(c_ptr, k_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    c0 = tl.load(c_ptr + 4 * i).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + 4 * i + 1).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 4 * i + 2).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 4 * i + 3).to(tl.uint32, bitcast=True)
    k0 = tl.load(k_ptr + 2 * i).to(tl.uint32, bitcast=True)
    k1 = tl.load(k_ptr + 2 * i + 1).to(tl.uint32, bitcast=True)
    o0, o1, o2, o3 = philox4x32(c0, c1, c2, c3, k0, k1)
    b0, b1, b2, b3 = tl.philox(k0.to(tl.uint64) | (k1.to(tl.uint64) << 32), c0, c1, c2, c3)
    tl.store(out_ptr + 8 * i + 0, o0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 1, o1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 2, o2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 3, o3.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 4, b0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 5, b1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 6, b2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + 8 * i + 7, b3.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_philox_bits_match_reference_and_builtin(device):
    if fk.backends.triton_unavailable_reason(torch.device(device)):
        pytest.skip("Triton cannot run on this device here")
    n = 64
    gen = np.random.default_rng(1)
    counters = gen.integers(0, 2**32, size=(n, 4), dtype=np.uint64)
    keys = gen.integers(0, 2**32, size=(n, 2), dtype=np.uint64)
    counters[0], keys[0] = (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2
    as_u32 = lambda a: torch.from_numpy(a.astype(np.uint32).view(np.int32)).to(device)  # noqa: E731
    out = torch.empty(n, 8, dtype=torch.int32, device=device)
    _philox_words_kernel[(1,)](as_u32(counters), as_u32(keys), out, N=n)
    words = out.cpu().numpy().view(np.uint32).astype(np.int64)
    for row in range(n):
        seed = int(keys[row, 0]) | int(keys[row, 1]) << 32
        ref = contract.philox4x32(seed, *[torch.tensor([int(c)]) for c in counters[row]])
        assert list(words[row, :4]) == [int(r) for r in ref], f"row {row}: ours differs from the reference"
        assert list(words[row, 4:]) == [int(r) for r in ref], f"row {row}: tl.philox differs from the reference"


SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (37, 53), (17, 130)])
def test_generate_noise_same_on_every_backend(device_backend, seed, shape):
    device, _ = device_backend
    z = fk.generate_noise(seed, *shape, device=device)
    assert z.dtype == torch.float32 and z.shape == shape and z.device.type == device.type
    expected = contract.reference_noise(seed, *shape)
    # Only ln/sqrt/sin/cos may differ in their last bits; |Z| < 6, so 1e-5 absolute is a few ulp.
    torch.testing.assert_close(z.cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("offset", [(0, 1), (3, 2), (7, 3), (1, 4), (2**31 + 5, 2**33 + 6)])
def test_noise_block_at_an_offset_is_that_block_of_the_whole(device_backend, offset):
    """What a tensor-parallel shard regenerates: every column offset modulo 4 (the Triton path without
    whole Philox calls), and 64-bit positions."""
    device, _ = device_backend
    seed, (r0, c0), (m, n) = 2**63 + 11, offset, (9, 37)
    z = fk.generate_noise(seed, m, n, device=device, noise_offset=offset)
    if r0 + c0 < 100:
        expected = contract.reference_noise(seed, r0 + m, c0 + n)[r0:, c0:]
    else:  # too far out to build the whole: the block's own Philox calls, column by column
        expected = torch.cat([contract.reference_noise_block(seed, r0, r0 + m, c0 + j, c0 + j + 1) for j in range(n)], 1)
    assert z.shape == (m, n)
    torch.testing.assert_close(z.cpu(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("offset,error", [((-1, 0), ValueError), ((0, 2**34), ValueError), ((2**32, 0), ValueError),
                                          ((0.5, 0), ValueError), (3, TypeError)])
def test_noise_offsets_outside_the_index_space_are_refused(offset, error):
    with pytest.raises(error, match="offset|index space"):
        fk.generate_noise(1, 2, 3, noise_offset=offset)


@pytest.mark.parametrize("blocks", [(16, 4), (16, 16), (32, 64), (64, 128)])
def test_noise_does_not_depend_on_tiles(blocks):
    if fk.backends.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    z = generate_noise_triton(99, 41, 70, "cpu", block_m=blocks[0], block_n=blocks[1])
    base = generate_noise_triton(99, 41, 70, "cpu", block_m=16, block_n=8)
    assert torch.equal(z, base)


@triton.jit
def _noise_block_kernel(out_ptr, row_start, col_start, seed_lo, seed_hi, R: tl.constexpr, C: tl.constexpr):
    rows = row_start + tl.arange(0, R).to(tl.int64)
    z = gaussian_tile(seed_lo, seed_hi, rows, col_start, C)
    tl.store(out_ptr + tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :], z)


@pytest.mark.parametrize("row_start,col_start", [(0, 0), (2**31 - 3, 2**31 + 4), (2**32 - 4, 2**34 - 16),
                                                 (600_000, 4096 * 3)])
def test_noise_at_64bit_indices(row_start, col_start):
    """Rows and columns whose flat index i*n + j passes 2**31 (embedding-sized and larger)."""
    if fk.backends.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    seed = 2**40 + 7
    out = torch.empty(4, 16)
    lo, hi = contract.split_seed(seed)
    _noise_block_kernel[(1,)](out, row_start, col_start, lo, hi, R=4, C=16)
    expected = contract.reference_noise_block(seed, row_start, row_start + 4, col_start, col_start + 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    # A block is a slice of the whole matrix: check the reference itself against a full build.
    if row_start == 0:
        torch.testing.assert_close(expected, contract.reference_noise(seed, 4, 16))


def test_reference_block_slices_agree():
    full = contract.reference_noise(5, 9, 23, rows_per_chunk=4)
    assert torch.equal(contract.reference_noise_block(5, 2, 7, 3, 18), full[2:7, 3:18])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())).item()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_noise_statistics(backend):
    if backend == "triton" and fk.backends.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("needs the Triton interpreter")
    m, n = 1000, 1003  # > 10**6 draws, n not a multiple of 4
    if backend == "triton":  # large tiles keep the interpreter fast; tiles do not change Z
        z = generate_noise_triton(12345, m, n, "cpu", block_m=128, block_n=512).double()
    else:
        z = contract.reference_noise(12345, m, n).double()
    count = z.numel()
    five_se = 5.0 / count**0.5
    assert abs(z.mean().item()) < five_se
    assert abs(z.var().item() - 1.0) < 5.0 * (2.0 / count) ** 0.5
    assert z.abs().max().item() <= contract.MAX_ABS_NORMAL + 1e-5
    # Third and fourth moments (skewness 0, kurtosis 3) and the tails beyond 3 and 4 sigma.
    assert abs((z**3).mean().item()) < 5.0 * (15.0 / count) ** 0.5
    assert abs((z**4).mean().item() - 3.0) < 5.0 * (96.0 / count) ** 0.5
    for k in (3.0, 4.0):
        p = 2.0 * scipy.stats.norm.sf(k)
        observed = (z.abs() > k).double().mean().item()
        assert abs(observed - p) < 5.0 * (p * (1 - p) / count) ** 0.5, f"tail beyond {k} sigma: {observed} vs {p}"
    ks = scipy.stats.kstest(z.flatten().numpy(), "norm")
    assert ks.pvalue > 1e-4, f"KS test rejects N(0,1): D={ks.statistic:.2e}, p={ks.pvalue:.2e}"
    # Neighbouring rows, neighbouring columns (inside and across Philox calls), other seeds
    # (consecutive seeds are how layers and steps differ), all uncorrelated.
    five_se_pairs = 5.0 / (m * (n - 4)) ** 0.5
    assert abs(_corr(z[1:], z[:-1])) < five_se
    for lag in (1, 2, 3, 4):
        assert abs(_corr(z[:, lag:], z[:, :-lag])) < five_se, f"column lag {lag}"
    for lane in range(4):  # one lane against the next inside the same Philox call
        cols = torch.arange(lane, n - 3, 4)
        assert abs(_corr(z[:, cols], z[:, cols + 1])) < 5.0 / (m * len(cols)) ** 0.5 + five_se_pairs
    for other_seed in (12346, 12345 + 2**32, 0):
        assert abs(_corr(z, fk.generate_noise(other_seed, m, n).double())) < five_se


def test_same_seed_same_bits_other_seed_other_bits():
    a = fk.generate_noise(3, 33, 47)
    assert torch.equal(a, fk.generate_noise(3, 33, 47))
    b = fk.generate_noise(4, 33, 47)
    assert (a != b).float().mean().item() > 0.999


def test_noise_rows_do_not_depend_on_matrix_height():
    # Z is indexed by (i, j) only: a taller matrix extends a shorter one.
    assert torch.equal(fk.generate_noise(8, 10, 21), fk.generate_noise(8, 30, 21)[:10])


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError),
                                        (True, TypeError), ("7", TypeError), (torch.tensor(3), TypeError)])
def test_bad_seeds_are_rejected(seed, error):
    with pytest.raises(error, match="seed"):
        fk.generate_noise(seed, 4, 4)


@pytest.mark.parametrize("shape", [(-1, 4), (4, 2.0), (True, 3)])
def test_bad_noise_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="features"):
        fk.generate_noise(0, *shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX approximations need a GPU")
def test_fast_math_noise_within_documented_tolerance():
    """The Z of the fused 16-bit kernels (hardware lg2/sin/cos) against the precise reference."""
    z = generate_noise_triton(2**40 + 3, 1024, 1030, "cuda", fast_math=True).cpu().double()
    ref = contract.reference_noise(2**40 + 3, 1024, 1030).double()
    assert torch.isfinite(z).all()
    err = (z - ref).abs()
    assert err.max().item() <= contract.FAST_NOISE_ATOL, err.max().item()
    assert err.mean().item() <= 1e-5, err.mean().item()
