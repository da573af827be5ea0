"""The benchmark scripts run end to end at tiny size, so they never rot, and write the shared record."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT_KEYS = {"device", "device_type", "torch", "triton", "cuda", "python", "git_commit", "utc"}


def read_record(path: Path, benchmark: str) -> dict:
    """A ``flatlora-bench/1`` record of ``benchmark``, with its environment block checked."""
    record = json.loads(path.read_text())
    assert record["schema"] == "flatlora-bench/1" and record["benchmark"] == benchmark
    assert ENVIRONMENT_KEYS <= record["environment"].keys(), record["environment"]
    assert record["environment"]["git_commit"], "the commit that produced a result must be recorded"
    return record


def test_layer_benchmark_tiny(tmp_path):
    out = tmp_path / "layer.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layer.py"), "--preset", "tiny",
                           "--reps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_record(out, "layer")["results"]
    assert len(rows) == 2 * 2 * 3  # tiny preset: 2 shapes x 2 token counts x 3 methods
    assert {r["method"] for r in rows} == {"lora", "materialized", "flat_lora"}
    for r in rows:
        for name in ("fwd", "bwd", "fwdbwd"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_ratio"] > 0
        if r["method"] == "lora":  # the baseline of every ratio
            assert r["fwdbwd_ratio"] == 1.0


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
    (row,) = read_record(out, "native_cpu")["results"]
    assert row["fwdbwd_ratio"] == row["native_fwdbwd_ms"] / row["lora_fwdbwd_ms"] > 0
    assert row["noise_matrix_mib"] >= 8 * row["block_buffer_mib"]
    assert row["peak_extra_mib_native"] <= 4 * row["block_buffer_mib"] + 1.0, row
    assert row["peak_extra_mib_reference"] >= row["noise_matrix_mib"], row


def test_table7_tiny_preset(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table7.py"), "--preset", "tiny", "--steps", "2",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (path,) = tmp_path.glob("table7-tiny-*.json")
    record = read_record(path, "table7")
    assert record["config"]["grad_accum"] == [16, 1]
    rows = record["results"]
    assert [(r["grad_accum"], r["method"]) for r in rows] == [
        (ga, m) for ga in (16, 1) for m in ("lora", "public_flat_lora", "flat_lora")]
    for ga in (16, 1):
        methods = {r["method"]: r for r in rows if r["grad_accum"] == ga}
        for m in methods.values():
            assert {"peak_memory_gb", "step_time_s", "changed_fraction", "relative_drift"} <= m.keys()
            assert m["step_time_ratio"] == m["step_time_s"] / methods["lora"]["step_time_s"]
        # the point of the product: the public procedure moves frozen bf16 weights, ours never does
        assert methods["flat_lora"]["changed_fraction"] == 0 and methods["flat_lora"]["relative_drift"] == 0
        assert methods["lora"]["changed_fraction"] == 0
        assert methods["public_flat_lora"]["changed_fraction"] > 0
    assert path.with_suffix(".md").exists() and path.with_suffix(".png").exists()
