"""The shared argument checks and the one seed form."""

import math

import numpy as np
import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels import checks, noise


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), True, "0.1", None, torch.tensor(0.1)])
def test_finite_real_rejects_non_finite_and_non_numbers(value):
    with pytest.raises(ValueError, match="scaling must be a finite real number"):
        checks.finite_real("scaling", value)


@pytest.mark.parametrize("check,good,bad", [
    (checks.finite_real, [-2.5, 0, 3, np.float32(1.5)], [math.inf]),
    (checks.nonnegative_real, [0, 0.0, 2], [-1e-9, math.inf, math.nan]),
    (checks.positive_real, [1e-12, 4], [0, -1, math.inf]),
    (lambda name, v: checks.sigma(v, name), [0, 0.05], [-0.1, math.inf, math.nan]),
    (checks.probability, [0, 0.5, 0.999], [1.0, -0.1, math.nan]),
    (lambda name, v: checks.probability(name, v, include_one=True), [0, 1.0], [1.0001, math.inf]),
    (checks.positive_int, [1, 7, np.int64(3)], [0, -2, 1.0, True]),
    (checks.nonnegative_int, [0, 5], [-1, 0.0, False]),
    (checks.optional_positive_int, [None, 2], [0, "3"]),
])
def test_each_check_accepts_its_range_and_names_the_argument(check, good, bad):
    for value in good:
        result = check("arg", value)
        assert result == (None if value is None else value) and type(result) in (int, float, type(None))
    for value in bad:
        with pytest.raises(ValueError, match=r"^arg must be .*, got "):
            check("arg", value)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1])
def test_seed_int64_round_trip_keeps_all_64_bits(seed):
    signed = noise.seed_to_int64(seed)
    assert -2**63 <= signed < 2**63
    assert noise.seed_from_int64(signed) == seed
    lo, hi = noise.split_seed(seed)
    assert lo | hi << 32 == seed


@pytest.mark.parametrize("seed,error", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError), (True, TypeError)])
def test_every_seed_entry_point_rejects_bad_seeds(seed, error):
    for entry in (noise.check_seed, noise.split_seed, noise.seed_to_int64,
                  lambda s: noise.layer_seed(s, 0, 0, 0), lambda s: fk.generate_noise(s, 2, 4)):
        with pytest.raises(error, match="seed"):
            entry(seed)


_MASK64 = 2**64 - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64_next(state: int) -> int:
    """One output of Vigna's SplitMix64 generator from ``state`` (written here, not taken from the package)."""
    z = (state + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def test_splitmix64_oracle_gives_the_published_stream():
    # SplitMix64 seeded with 0 (splitmix64.c, Java's SplittableRandom): its first four outputs
    stream = [_splitmix64_next(k * _GOLDEN_GAMMA & _MASK64) for k in range(4)]
    assert stream == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]


def test_layer_seed_is_the_documented_splitmix64_chain():
    gen = np.random.default_rng(5)
    cases = [(0, 0, 0, 0), (2**64 - 1, 7, 3, 2)] + [
        (int(gen.integers(0, 2**63)) * 2 + 1, int(gen.integers(0, 1000)), int(gen.integers(0, 64)),
         int(gen.integers(0, 9))) for _ in range(6)]
    for seed, sample, layer, rank_tag in cases:
        z = _splitmix64_next(seed)
        for part in (sample, layer, rank_tag):
            z = _splitmix64_next(z ^ part)
        assert noise.layer_seed(seed, sample, layer, rank_tag) == z, (seed, sample, layer, rank_tag)


def test_layer_seeds_are_distinct():
    seeds = {noise.layer_seed(3, s, k, r) for s in range(4) for k in range(8) for r in range(3)}
    assert len(seeds) == 4 * 8 * 3 and all(0 <= s < 2**64 for s in seeds)
