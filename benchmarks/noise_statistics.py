"""Statistics of the contract's noise Z on >= 10^7 draws: moments, KS, tails, correlations.

Draws ``Z(seed)`` of one large matrix (default 4000 x 4003, 1.6e7 draws, n not a multiple of 8)
with the fastest backend available here (native C++ on the CPU, else the reference), and reports

* mean, variance, skewness, excess kurtosis, each with its z-score under N(0, 1) (the variance
  also against the contract's exact ``NOISE_VARIANCE`` = 1 - 5.3e-6);
* the Kolmogorov-Smirnov statistic and p-value against N(0, 1);
* the frequency of |Z| > 3 and > 4 against 2*Phi(-k), with z-scores, and the largest |Z| against
  the contract's bound ``MAX_ABS_NORMAL`` ~= 4.85;
* correlations between neighbouring elements (column lags 1 to 8: outputs of one Philox call and
  of the next call), each output of a call against the next (lanes 0-7), neighbouring rows,
  consecutive seeds, seeds 2**32 apart, and the seeds two neighbouring layers get from
  ``layer_seed``; each with its z-score (r * sqrt(N)).

A z-score beyond about 5 would mean the generator is distinguishable from N(0, 1) by that test.

    python benchmarks/noise_statistics.py [--rows 4000] [--cols 4003] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from common import RESULTS, write_record

import flatlora_kernels as fk
from flatlora_kernels import noise as contract


def correlation(a: np.ndarray, b: np.ndarray) -> dict:
    a, b = a.ravel(), b.ravel()
    r = float(np.corrcoef(a, b)[0, 1])
    return {"r": r, "n": int(a.size), "z_score": r * math.sqrt(a.size)}


def moments(z: np.ndarray) -> dict:
    count = z.size
    mean, var = float(z.mean()), float(z.var())
    skew = float(scipy.stats.skew(z.ravel()))
    kurt = float(scipy.stats.kurtosis(z.ravel()))  # excess
    return {"mean": mean, "mean_z": mean * math.sqrt(count), "variance": var,
            "variance_z": (var - 1) / math.sqrt(2 / count),
            "variance_vs_contract_z": (var - contract.NOISE_VARIANCE) / math.sqrt(2 / count),
            "skewness": skew, "skewness_z": skew / math.sqrt(6 / count),
            "excess_kurtosis": kurt, "excess_kurtosis_z": kurt / math.sqrt(24 / count)}


def tails(z: np.ndarray) -> list[dict]:
    out = []
    for k in (3.0, 4.0):
        p = 2 * scipy.stats.norm.sf(k)
        observed = float((np.abs(z) > k).mean())
        out.append({"beyond_sigma": k, "observed": observed, "expected": p,
                    "z_score": (observed - p) / math.sqrt(p * (1 - p) / z.size)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--cols", type=int, default=4003)
    parser.add_argument("--seed", type=int, default=20261124)
    parser.add_argument("--out", type=Path, default=RESULTS / "noise-statistics.json")
    args = parser.parse_args()
    draw = lambda seed: fk.generate_noise(seed, args.rows, args.cols).double().numpy()  # noqa: E731
    z = draw(args.seed)
    results = {"draws": int(z.size), "backend": fk.backend_name("cpu"), "contract_version": contract.CONTRACT_VERSION,
               "moments": moments(z), "tails": tails(z),
               "bound": {"max_abs": float(np.abs(z).max()), "contract_bound": contract.MAX_ABS_NORMAL,
                         "expected_beyond_bound_under_normal": 2 * float(scipy.stats.norm.sf(contract.MAX_ABS_NORMAL))
                         * z.size}}
    assert results["bound"]["max_abs"] <= contract.MAX_ABS_NORMAL + contract.PRECISE_NOISE_ATOL
    ks = scipy.stats.kstest(z.ravel(), "norm")
    results["ks"] = {"statistic": float(ks.statistic), "pvalue": float(ks.pvalue)}
    corr = {f"column_lag_{lag}": correlation(z[:, lag:], z[:, :-lag]) for lag in range(1, 9)}
    for lane in range(contract.NORMALS_PER_CALL):  # output `lane` of each call against the next column
        cols = np.arange(lane, args.cols - 1, contract.NORMALS_PER_CALL)
        corr[f"lane_{lane}_vs_next"] = correlation(z[:, cols], z[:, cols + 1])
    corr["row_lag_1"] = correlation(z[1:], z[:-1])
    for name, other in (("seed_plus_1", args.seed + 1), ("seed_plus_2**32", args.seed + 2**32),
                        ("neighbouring_layer", None)):
        if other is None:  # layers k and k + 1 of one sample, as the controller seeds them
            first, other = (contract.layer_seed(args.seed, 0, layer, 0) for layer in (0, 1))
            corr[name] = correlation(draw(first), draw(other))
        else:
            corr[name] = correlation(z, draw(other))
    results["correlations"] = corr
    worst = max([abs(v) for k, v in results["moments"].items() if k.endswith("_z")]
                + [abs(t["z_score"]) for t in results["tails"]] + [abs(c["z_score"]) for c in corr.values()])
    results["largest_abs_z_score"] = worst
    for key in ("moments", "tails", "bound", "ks", "correlations"):
        print(key, results[key])
    print(f"{results['draws']} draws; largest |z-score| {worst:.2f}; KS p = {ks.pvalue:.3f}")
    path = write_record(args.out, "noise_statistics", "cpu", vars(args) | {"out": str(args.out)}, [results])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
