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
