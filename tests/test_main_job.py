"""The README's main job runs end to end (two steps each), so it never rots."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_minilm_main_job_smoke(tmp_path):
    out = tmp_path / "minilm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_minilm.py"), "--steps", "2", "--cpu",
                           "--json", str(out), "--save-dir", str(tmp_path / "adapters")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "bitwise unchanged" in proc.stdout
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert results.keys() == {"lora", "flat_lora"}
    for r in results.values():
        assert r["frozen_unchanged"] and r["test_size"] > 1000 and r["train_size"] > 5000
    for method in results:
        assert (tmp_path / "adapters" / method / "adapter_model.safetensors").exists()
