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


def test_compare_variants_tiny_preset(tmp_path):
    """The Table-5 comparison runs end to end; its paired differences are those of its own runs."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_variants.py"), "--preset", "tiny",
                           "--threads", "1", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads((tmp_path / "compare-variants-tiny.json").read_text())
    summary, runs = record["results"]["summary"], record["results"]["runs"]
    assert [e["variant"] for e in summary] == ["lora", "dora", "pissa", "lora_ga", "adalora"]
    for entry in summary:
        arms = {r["method"]: r for r in runs if r["variant"] == entry["variant"] and r["seed"] == 0}
        assert entry["diff_mse_mean"] == arms["flat_lora"]["mse"] - arms["lora"]["mse"]
        assert entry["sigma"] == arms["flat_lora"]["value"] == record["config"]["chosen"][entry["variant"]]
    assert all(r["frozen_unchanged"] for r in runs)
    assert (tmp_path / "compare-variants-tiny.md").exists() and (tmp_path / "compare-variants-tiny.png").exists()


def test_every_table5_variant_is_adopted_whole(monkeypatch):
    """Each variant of the comparison trains under noise in every LoRA layer (strict: nothing skipped), and
    AdaLoRA's allocator runs beside it."""
    import flatlora_kernels as fk

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import finetune_minilm as job
    from lora_variants import NAMES, make_variant

    from peft.tuners.tuners_utils import BaseTunerLayer

    data = job.load_lexicon()[0][:64]
    for name in NAMES:
        variant = make_variant(name, 4, 10, job.TARGETS, data, batch_size=8, seed=0)
        tokenizer, model = job.build(0, 4, peft_config=variant.peft_config, prepare=variant.prepare)
        lora_layers = [m for m in model.encoder.modules() if isinstance(m, BaseTunerLayer)]
        ctl = fk.apply_flat_lora(model.encoder, sigma=0.05, schedule="constant", strict=True)
        assert len(ctl.layers) == len(lora_layers) == 36, name  # 6 blocks x (query, key, value, 3 dense)
        if variant.after_optimizer_step is not None:
            enc = tokenizer(["good", "awful day"], padding=True, return_tensors="pt")
            model(enc["input_ids"], enc["attention_mask"]).square().mean().backward()
            variant.after_optimizer_step(model, 1)
            assert model.encoder.base_model.rankallocator.ipt, "AdaLoRA's allocator must have scored the factors"
