"""Speed of the CPU noise generator: nanoseconds per normal of ``fk.generate_noise`` on 1 and 2 threads.

Two sizes: the issue's ``generate_noise(123, 4096, 4096)`` (a fresh 64 MiB output, so first-touch page
faults are included) and a 64 x 4096 block (1 MiB: the output stays in cache, i.e. the generator
itself), each against ``torch.randn`` of the same shape; medians of ``common.median_ms`` (the three
callables alternate, so drift on a shared machine hits all alike). Backend: the default on the CPU
(native when built).

    python benchmarks/noise_cpu_speed.py [--reps 7] [--out benchmarks/results/noise-cpu-speed.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, median_ms, write_record

import flatlora_kernels as fk

SHAPES = [(4096, 4096), (64, 4096)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "noise-cpu-speed.json")
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m, n in SHAPES:
            reps = args.reps * max(1, 4096 // m)  # more rounds for the small block, similar total time
            noise_ms, randn_ms = median_ms([lambda: fk.generate_noise(123, m, n), lambda: torch.randn(m, n)], device,
                                           reps=reps)
            row = {"threads": threads, "out": m, "in": n, "backend": fk.backend_name("cpu"),
                   "noise_ns_per_normal": noise_ms * 1e6 / (m * n), "randn_ns_per_normal": randn_ms * 1e6 / (m * n)}
            rows.append(row)
            print(f"{threads} thread(s), {m} x {n}: generate_noise {row['noise_ns_per_normal']:.2f} ns/normal, "
                  f"torch.randn {row['randn_ns_per_normal']:.2f}")
    path = write_record(args.out, "noise_cpu_speed", device, vars(args) | {"out": str(args.out)}, rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
