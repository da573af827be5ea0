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


def test_table7_tiny_preset(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table7.py"), "--preset", "tiny", "--steps", "2",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "table7-tiny-cpu.json").read_text())
    assert [r["grad_accum"] for r in results] == [16, 1]
    for res in results:
        assert {"device", "torch", "triton", "preset", "grad_accum", "methods"} <= res.keys()
        methods = res["methods"]
        assert set(methods) == {"lora", "public_flat_lora", "flat_lora"}
        for m in methods.values():
            assert {"peak_memory_gb", "step_time_s", "changed_fraction", "relative_drift"} <= m.keys()
        # the point of the product: the public procedure moves frozen bf16 weights, ours never does
        assert methods["flat_lora"]["changed_fraction"] == 0 and methods["flat_lora"]["relative_drift"] == 0
        assert methods["lora"]["changed_fraction"] == 0
        assert methods["public_flat_lora"]["changed_fraction"] > 0
    assert (tmp_path / "table7-tiny-cpu.md").exists() and (tmp_path / "table7-tiny-cpu.png").exists()
