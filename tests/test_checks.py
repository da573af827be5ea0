"""The shared argument checks and the one seed form."""

import math

import numpy as np
import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels import checks, noise
from flatlora_kernels.integration import layer_seed as layer_seed_from_integration


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


def test_layer_seeds_are_distinct_and_stable_across_import_paths():
    seeds = {noise.layer_seed(3, s, k, r) for s in range(4) for k in range(8) for r in range(3)}
    assert len(seeds) == 4 * 8 * 3 and all(0 <= s < 2**64 for s in seeds)
    assert layer_seed_from_integration is noise.layer_seed
