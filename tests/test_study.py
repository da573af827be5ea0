"""The sharpness study's pieces: the lexicon tasks, the rank and AUC helpers, and both experiments end to
end at tiny size (benchmarks/study_out_of_domain.py, benchmarks/study_continual.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lexicon_tasks  # noqa: E402

ALL_TASKS = sorted(lexicon_tasks.LOADERS)


@pytest.fixture(scope="module")
def tasks():
    return {name: lexicon_tasks.load_task(name) for name in ALL_TASKS}


def test_every_task_loads_with_targets_on_its_scale(tasks):
    expected_sizes = {"vader_valence": 7506, "warriner_valence": 13915, "labmt_happiness": 10222,
                      "afinn_valence": 3382, "nrc_emotion": 6468}
    for name, task in tasks.items():
        assert len(task.targets) == expected_sizes.get(name, 13915), name
        values = [v for y in task.targets.values() for v in (y if isinstance(y, tuple) else (y,))]
        assert -1.0 <= min(values) < max(values) <= 1.0, name
        assert len(task.labels) == task.outputs
    assert tasks["warriner_valence"].targets["vacation"] > 0.8 > 0 > tasks["warriner_valence"].targets["murder"]
    assert tasks["afinn_valence"].targets["abandon"] == pytest.approx(-0.4)  # -2 on -5..5
    nrc = tasks["nrc_emotion"]
    assert nrc.kind == "multilabel" and nrc.outputs == 10
    assert nrc.targets["abandoned"] == tuple(float(label in {"anger", "fear", "negative", "sadness"})
                                             for label in lexicon_tasks.NRC_LABELS)
    groups = tasks["warriner_arousal"].groups
    assert set(groups) == set(lexicon_tasks.WARRINER_GROUPS.values())
    assert all(len(values) > 13000 for values in groups.values())


def test_splits_partition_by_word_and_match_the_main_job(tasks):
    import compare_methods
    import finetune_minilm

    for task in tasks.values():
        parts = {part: {w for w, _ in task.split(part)} for part in lexicon_tasks.SPLITS}
        assert sum(len(p) for p in parts.values()) == len(task.targets)
        for a, b in combinations(parts.values(), 2):
            assert not a & b
        assert 0.15 < len(parts["test"]) / len(task.targets) < 0.25
    vader = tasks["vader_valence"]
    job_train, job_test = finetune_minilm.load_lexicon()
    assert {w for w, _ in vader.split("test")} == {w for w, _ in job_test}
    fit, val, _, _ = compare_methods.splits(0.1)
    assert {w for w, _ in vader.split("train")} == {w for w, _ in fit}
    assert {w for w, _ in vader.split("validation")} == {w for w, _ in val}
    assert len(job_train) + len(job_test) == len(vader.targets) + 14  # entries listed twice are one word
    assert vader.targets["lol"] == pytest.approx((0.725 + 0.45) / 2)
    warriner_test = {w for w, _ in tasks["warriner_valence"].split("test")}
    labmt_test = {w for w, _ in tasks["labmt_happiness"].split("test")}
    shared = tasks["warriner_valence"].targets.keys() & tasks["labmt_happiness"].targets.keys()
    # a word's split is its own, whichever lexicon it comes from
    assert {w for w in shared if w in warriner_test} == {w for w in shared if w in labmt_test}
    with pytest.raises(ValueError, match="part must be one of"):
        vader.split("dev")


def test_overlaps_count_shared_words(tasks):
    chosen = [tasks["vader_valence"], tasks["afinn_valence"], tasks["warriner_valence"]]
    shared = lexicon_tasks.overlaps(chosen)
    for a in chosen:
        assert shared[a.name, a.name] == len(a.targets)
        for b in chosen:
            assert shared[a.name, b.name] == shared[b.name, a.name] == len(a.targets.keys() & b.targets.keys())
    assert 0 < shared["vader_valence", "afinn_valence"] < len(tasks["afinn_valence"].targets)


def test_a_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "afinn" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"'afinn' package.*flatlora-kernels\[experiments\]"):
        lexicon_tasks.load_task("afinn_valence")
    with pytest.raises(ValueError, match="unknown task"):
        lexicon_tasks.load_task("anew")


def test_ranks_and_macro_auc_against_brute_force():
    from scipy.stats import rankdata

    import study_continual
    import study_out_of_domain

    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (40,), generator=generator).float()  # many ties
    assert torch.equal(study_out_of_domain.ranks(values), torch.tensor(rankdata(values.numpy()) - 1.0))
    scores = torch.randint(0, 5, (30, 3), generator=generator).float()
    labels = (torch.rand(30, 3, generator=generator) < 0.4).float()
    labels[:, 2] = 0.0  # one class only: left out of the mean
    expected = []
    for column in range(2):
        pos = scores[labels[:, column] > 0.5, column]
        neg = scores[labels[:, column] < 0.5, column]
        pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
        expected.append(float(sum(pairs)) / len(pairs))
    assert study_continual.macro_auc(scores, labels) == pytest.approx(sum(expected) / 2)


def run_script(name, out_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--preset", "tiny", "--out-dir",
                           str(out_dir)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_out_of_domain_tiny_preset(tmp_path):
    run_script("study_out_of_domain.py", tmp_path)
    record = json.loads((tmp_path / "out-of-domain-tiny.json").read_text())
    assert record["schema"] == "flatlora-bench/1"
    summary = record["results"]["summary"]
    methods = {"lora", "flat_lora", "merged_sam", "rwp_merged"}
    assert {(e["regime"], e["method"]) for e in summary} == {(r, m) for r in ("full", "10%", "3%") for m in methods}
    chosen = record["config"]["chosen"]
    assert all(chosen[m] in record["config"]["grid"][m] for m in methods)
    for row in record["results"]["runs"]:
        assert set(row["out_of_domain"]) == {"warriner_valence", "labmt_happiness", "afinn_valence"}
        assert all(-1 <= c["pearson"] <= 1 and c["n"] == 16 for c in row["out_of_domain"].values())
        assert len(row["rater_groups"]) == 6
        assert ("curve" in row) == (row["regime"] != "full")
    for suffix in (".md", "-correlations.png", "-curves.png"):
        assert (tmp_path / f"out-of-domain-tiny{suffix}").exists()


def test_continual_tiny_preset(tmp_path):
    run_script("study_continual.py", tmp_path)
    record = json.loads((tmp_path / "continual-tiny.json").read_text())
    results = record["results"]
    assert {r["method"] for r in results["sequential"]} == {"lora", "flat_lora", "sam", "merged_sam"}
    for row in results["sequential"]:
        assert len(row["matrix"]) == 4 and all(len(stage) == 4 for stage in row["matrix"])
        assert row["average"] == pytest.approx(sum(row["matrix"][-1].values()) / 4)
        assert row["frozen_unchanged"]
        stages = row["sharpness"]
        assert [s["stage"] for s in stages] == [0, 1, 2, 3, 4]
        assert all(s["epsilon_sharpness"] >= 0 for s in stages)
    assert len(results["per_task"]) == 16 and len(results["base_probe"]) == 4
    for suffix in (".md", "-matrix.png", "-sharpness.png"):
        assert (tmp_path / f"continual-tiny{suffix}").exists()
