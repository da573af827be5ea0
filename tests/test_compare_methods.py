"""benchmarks/compare_methods.py runs end to end at tiny size (every method, both settings, flatness)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compare_methods_tiny_preset(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_methods.py"), "--preset", "tiny",
                           "--threads", "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads((tmp_path / "compare-methods-tiny.json").read_text())
    assert record["schema"] == "flatlora-bench/1" and record["environment"]["git_commit"]
    summary = record["results"]["summary"]
    methods = {"lora", "flat_lora", "rwp_merged", "rwp_lora", "sam", "asam", "lora_sam", "merged_sam", "bilora"}
    assert {(e["setting"], e["method"]) for e in summary} == {(s, m) for s in ("full", "small") for m in methods}
    for entry in summary:
        assert entry["mse_mean"] > 0 and entry["time_vs_lora"] > 0
        if entry["setting"] == "full":
            assert "top_eigenvalue_mean" in entry and "noisy_loss_mean" in entry
    chosen = record["config"]["chosen"]
    assert all(chosen[m] in record["config"]["grid"][m] for m in methods - {"lora"})
    assert all(r["frozen_unchanged"] for r in record["results"]["runs"])
    assert (tmp_path / "compare-methods-tiny.md").exists() and (tmp_path / "compare-methods-tiny.png").exists()
