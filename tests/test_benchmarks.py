"""The benchmark scripts run end to end at tiny size, so they never rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_layer_benchmark_tiny(tmp_path):
    out = tmp_path / "layer.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layer.py"), "--preset", "tiny",
                           "--reps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"lora", "materialized", "flat_lora"}
    for r in rows:
        assert {"in", "out", "tokens", "fwd_ms", "bwd_ms", "fwdbwd_ms", "device"} <= r.keys()
        assert r["fwdbwd_ms"] > 0


def test_native_cpu_benchmark_and_memory_bound(tmp_path):
    """The native op's measured extra memory stays under its documented bound of 4 block buffers,
    on a layer whose noise matrix is 8 times a block, while the reference holds several matrices."""
    from flatlora_kernels.native import native_available

    if not native_available():
        import pytest

        pytest.skip("native extension not built")
    out = tmp_path / "native.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_native_cpu.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["noise_matrix_mib"] >= 8 * row["block_buffer_mib"]
    assert row["peak_extra_mib_native"] <= 4 * row["block_buffer_mib"] + 1.0, row
    assert row["peak_extra_mib_reference"] >= row["noise_matrix_mib"], row
