"""The README's main job and the quick start run end to end (the main job two steps each), so they never
rot, and print what a newcomer should see: progress bars and results, no library warnings or weight-loading
reports."""

import importlib.util
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "examples" / "finetune_minilm.py"
TRAINING_BAR = re.compile(r"^\s*(lora|flat_lora): +\d+%\|")


@pytest.fixture(scope="module")
def main_job_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("main_job")
    proc = subprocess.run([sys.executable, str(MAIN_JOB), "--steps", "2", "--cpu", "--json", str(out / "minilm.json"),
                           "--save-dir", str(out / "adapters")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, out


def test_minilm_main_job_smoke(main_job_run):
    proc, out = main_job_run
    assert "bitwise unchanged" in proc.stdout
    results = {r["method"]: r for r in json.loads((out / "minilm.json").read_text())["results"]}
    assert results.keys() == {"lora", "flat_lora"}
    for r in results.values():
        assert r["frozen_unchanged"] and r["test_size"] > 1000 and r["train_size"] > 5000
    for method in results:
        assert (out / "adapters" / method / "adapter_model.safetensors").exists()


def test_main_job_prints_only_progress_bars_and_the_table(main_job_run):
    proc, _ = main_job_run
    console_lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip()]
    assert any(TRAINING_BAR.match(line) for line in console_lines)
    assert [line for line in console_lines if not TRAINING_BAR.match(line)] == []
    table = [line for line in proc.stdout.splitlines() if line.strip()]
    assert table[0].startswith("task:") and table[1].startswith("device:") and table[-1].startswith("Flat-LoRA / LoRA")
    assert len(table) == 6  # task, device, header, one row per method, ratio


def test_flatness_task_loads_a_saved_adapter_quietly(main_job_run, monkeypatch, caplog):
    """The flatness CLI's task for the main job: the saved adapter and head, no load report."""
    _, out = main_job_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the script would set, undone after the test
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    spec = importlib.util.spec_from_file_location("finetune_minilm_under_test", MAIN_JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    transformers_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    transformers_logger.addHandler(caplog.handler)
    try:
        model, loss_fn, batches = job.flatness_task(str(out / "adapters" / "flat_lora"), entries=6, batch_size=4)
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert [len(b[2]) for b in batches] == [4, 2]
    assert math.isfinite(loss_fn(model, batches[0]).item())


def test_quickstart_runs_and_prints_no_warnings():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "frozen weights bitwise unchanged: True" in proc.stdout
    assert proc.stderr == ""
