"""The benchmarks never rot: the GPU suite's dry run (bench_layer.py, table7.py, the pytest-benchmark
run and the summary, at tiny size on the CPU), the pytest-benchmark smoke run, the native CPU
benchmark; every JSON is a record of the shared schema. Every ratio a script writes is checked on
hand-made timings whose ratios are worked out here."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlora_kernels.native import native_available

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT_KEYS = {"device", "device_type", "noise_contract", "torch", "triton", "cuda", "python", "git_commit", "utc"}


def read_record(path: Path, benchmark: str) -> dict:
    """A ``flatlora-bench/1`` record of ``benchmark``, with its environment block checked."""
    record = json.loads(path.read_text())
    assert record["schema"] == "flatlora-bench/1" and record["benchmark"] == benchmark
    assert ENVIRONMENT_KEYS <= record["environment"].keys(), record["environment"]
    assert record["environment"]["git_commit"], "the commit that produced a result must be recorded"
    return record


def test_native_cpu_benchmark_and_memory_bound(tmp_path):
    """The native op's measured extra memory stays under its documented bound of 4 block buffers,
    on a layer whose noise matrix is 8 times a block, while the reference holds several matrices."""
    if not native_available():
        pytest.skip("native extension not built")
    out = tmp_path / "native.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_native_cpu.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = read_record(out, "native_cpu")["results"]
    assert row["native_fwdbwd_ms"] > 0 and row["lora_fwdbwd_ms"] > 0
    assert row["noise_matrix_mib"] >= 8 * row["block_buffer_mib"]
    assert row["peak_extra_mib_native"] <= 4 * row["block_buffer_mib"] + 1.0, row
    assert row["peak_extra_mib_reference"] >= row["noise_matrix_mib"], row


def test_pytest_benchmarks_smoke():
    """CI's run of the pytest-benchmark tests: every case once, untimed (``--benchmark-disable``)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert re.search(r"\b\d+ passed", proc.stdout) and " failed" not in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``gpu_suite.sh quick --dry-run`` and ``full --dry-run``, each into its own $OUT as on the device."""
    outs = {}
    for part in ("quick", "full"):
        out = outs[part] = tmp_path_factory.mktemp(part)
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), part, "--dry-run"],
                              env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return outs


def test_gpu_suite_dry_run_steps(dry_run):
    for part, out in dry_run.items():
        files = sorted(p.name for p in out.iterdir())
        assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files
        steps = {s["step"]: s for s in read_record(out / f"suite-{part}.json", "gpu_suite")["results"]}
        assert steps["install"]["status"] == "skipped"
        expected = {"quick": {"tests-cuda", "bench-paths", "table7-short", "kernel-budget"},
                    "full": {"build-cuda-extension", "bench-layer", "table7", "pytest-benchmark", "qlora-layer"}}
        assert set(steps) == {"install"} | expected[part]
        assert list(steps)[:2] == (["install", "tests-cuda"] if part == "quick" else ["install", "build-cuda-extension"])
        if part == "full":
            assert steps["build-cuda-extension"]["status"] == "skipped"
        for name in expected[part] - {"kernel-budget", "build-cuda-extension"}:
            assert steps[name]["status"] == "passed" and steps[name]["exit_code"] == 0, steps[name]
        summary = (out / "summary.md").read_text()
        assert "CPU dry run" in summary and "## Goals" in summary
    budget = read_record(dry_run["quick"] / "suite-quick.json", "gpu_suite")["results"][-1]
    assert budget["step"] == "kernel-budget" and budget["status"] == "passed", budget
    read_record(dry_run["quick"] / "kernel-budget.json", "kernel_budget")
    assert "0 failed, 0 errors" in (dry_run["quick"] / "summary.md").read_text()  # the junit counts


def test_layer_record_from_dry_run(dry_run):
    (path,) = dry_run["full"].glob("layer-*.json")
    rows = read_record(path, "layer")["results"]
    assert len(rows) == 2 * 2 * 3  # tiny preset: 2 shapes x 2 token counts x 3 methods
    assert {r["method"] for r in rows} == {"lora", "materialized", "flat_lora"}
    for r in rows:
        for name in ("fwd", "bwd", "fwdbwd"):
            assert r[f"{name}_ms"] > 0 and r[f"{name}_ratio"] > 0


def test_table7_record_from_dry_run(dry_run):
    (path,) = dry_run["full"].glob("table7-tiny-*.json")
    record = read_record(path, "table7")
    assert record["config"]["grad_accum"] == [16, 1]
    rows = record["results"]
    assert [(r["grad_accum"], r["method"]) for r in rows] == [
        (ga, m) for ga in (16, 1) for m in ("lora", "public_flat_lora", "flat_lora")]
    for ga in (16, 1):
        methods = {r["method"]: r for r in rows if r["grad_accum"] == ga}
        for m in methods.values():
            assert {"peak_memory_gb", "step_time_s", "changed_fraction", "relative_drift", "step_time_ratio",
                    "memory_delta_gb"} <= m.keys()
        # the point of the product: the public procedure moves frozen bf16 weights, ours never does
        assert methods["flat_lora"]["changed_fraction"] == 0 and methods["flat_lora"]["relative_drift"] == 0
        assert methods["lora"]["changed_fraction"] == 0
        assert methods["public_flat_lora"]["changed_fraction"] > 0
    # the chart and Markdown stay in the suite's scratch folder: the device tool brings back 8 files at most
    assert not path.with_suffix(".md").exists() and not path.with_suffix(".png").exists()
    (short,) = dry_run["quick"].glob("table7-tiny-*.json")
    assert read_record(short, "table7")["config"]["grad_accum"] == [16]


def test_paths_record_and_measured_auto_table_from_dry_run(dry_run, monkeypatch):
    """bench_paths.py: every method on every shape and token count, LoRA the baseline; the summary's
    crossover table, and path_table.json in the dispatcher's schema with the run's device class."""
    (path,) = dry_run["quick"].glob("paths-*.json")
    record = read_record(path, "paths")
    rows = record["results"]
    assert len(rows) == 2 * 2 * 4 and {r["method"] for r in rows} == {"lora", "public", "fused", "slab"}
    for r in rows:
        assert r["fwdbwd_ms"] > 0 and r["peak_extra_mib"] is None  # no GPU memory on the CPU
        if r["method"] == "lora":
            assert r["fwdbwd_ratio"] == 1.0
    assert "## GPU paths" in (dry_run["quick"] / "summary.md").read_text()
    table = json.loads((dry_run["quick"] / "path_table.json").read_text())
    from flatlora_kernels import paths

    assert table["schema"] == paths.TABLE_SCHEMA and "bench_paths.py" in table["source"]
    measured = table["classes"][record["config"]["device_class"]]
    assert [row["max_weight_elements"] for row in measured[:2]] == [40 * 24, None]  # by weight size
    assert table["classes"]["default"] == paths.load_path_table()["classes"]["default"]


def test_crossover_is_where_the_slab_path_wins_from_then_on(monkeypatch):
    """Hand-made timings: the slab path wins at 1024 and above (a win at 64 alone is no crossover), the
    fused kernels win at the largest count on the other shape."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_summary

    times = {(4096, 4096): {64: (1.0, 0.9), 256: (2.0, 2.5), 1024: (4.0, 3.9), 4096: (9.0, 8.0)},
             (4096, 11008): {64: (1.0, 1.5), 256: (2.0, 2.5), 1024: (4.0, 3.0), 4096: (9.0, 9.5)}}
    rows = [{"in": n, "out": m, "tokens": t, "method": method, "fwdbwd_ms": ms}
            for (n, m), by_tokens in times.items() for t, pair in by_tokens.items()
            for method, ms in zip(("fused", "slab"), pair)]
    assert gpu_summary.crossovers(rows) == {(4096, 4096): 1024, (4096, 11008): None}
    record = {"results": rows, "config": {"device_class": "sm90"},
              "environment": {"device": "H200", "git_commit": "abc", "utc": "now"}}
    committed = {"schema": "flatlora-path-table/1", "source": "x", "classes": {
        "default": [{"dtype": "any", "max_weight_elements": None, "slab_from_tokens": 1024}]}}
    table = gpu_summary.measured_path_table(record, committed)
    assert table["classes"]["sm90"] == [
        {"dtype": "16bit", "max_weight_elements": 4096 * 4096, "slab_from_tokens": 1024},
        {"dtype": "16bit", "max_weight_elements": None, "slab_from_tokens": None},
        {"dtype": "any", "max_weight_elements": None, "slab_from_tokens": 1024}]
    best = {(r["in"], r["tokens"], r["out"]): r["method"] for r in gpu_summary.best_paths(rows)}
    assert best[(4096, 64, 4096)] == "slab" and best[(4096, 256, 11008)] == "fused"


def test_pytest_benchmark_json_from_dry_run(dry_run):
    """Every case carries its sizes and a ratio to its group's baseline, timed in the same session."""
    data = json.loads((dry_run["full"] / "pytest-benchmark.json").read_text())
    assert ENVIRONMENT_KEYS <= data["environment"].keys()
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
        assert "data" not in bench["stats"]
        info = bench["extra_info"]
        assert {"op", "device", "method", "backend", "baseline", "dtype", "ratio_to_baseline"} <= info.keys()
    assert {name.split()[0] for name in groups} == {"layer", "noise", "row_norms"}
    for benches in groups.values():
        base, *others = benches
        assert base["extra_info"]["method"] == base["extra_info"]["baseline"]
        expected_backends = {"reference", "native"} if native_available() else {"reference"}
        assert {b["extra_info"]["backend"] for b in others} >= expected_backends
        for bench in others:
            expected = bench["stats"]["median"] / base["stats"]["median"]
            assert bench["extra_info"]["ratio_to_baseline"] == pytest.approx(expected, rel=1e-12)


def test_summary_combines_both_parts_and_judges_goals(dry_run, tmp_path, monkeypatch):
    """Both parts' files in one folder give one summary; goals are judged against their limits."""
    for out in dry_run.values():
        for path in out.iterdir():
            shutil.copy(path, tmp_path / path.name)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_summary

    summary = gpu_summary.summary(tmp_path, dry_run=True)
    for step in ("tests-cuda", "bench-paths", "table7-short", "bench-layer", "table7", "pytest-benchmark"):
        assert f"| {step} | passed |" in summary
    records, pytest_json = gpu_summary.load(tmp_path)
    goals = {goal.name: goal for goal in gpu_summary.goals(records, pytest_json)}
    assert goals["changed frozen elements"].value == 0
    assert goals["layer fwd+bwd, 1024 tokens"].verdict() == "not measured"  # the tiny preset has no 1024 tokens
    # a GPU-like layer record: 1.08x at 1024 tokens meets its goal, 1.2x at 4096 misses the 1.05x one
    layer = {"environment": {"device_type": "cuda"}, "results": [
        {"in": 4096, "out": 4096, "tokens": tokens, "method": "flat_lora", "fwdbwd_ratio": ratio}
        for tokens, ratio in ((1024, 1.08), (4096, 1.2), (16384, 1.01))]}
    goals = {goal.name: goal for goal in gpu_summary.goals({"layer": [layer]}, None)}
    assert goals["layer fwd+bwd, 1024 tokens"].verdict() == "met"
    assert goals["layer fwd+bwd, 4096–16384 tokens"].value == 1.2
    assert goals["layer fwd+bwd, 4096–16384 tokens"].verdict() == "not met"
    assert goals["merged row norms"].verdict() == "not measured"


def test_dora_benchmark_runs(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}  # this checkout's package
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dora.py"), "--quick", "--reps", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("dora-*-quick.json")
    *methods, ratios = read_record(path, "dora")["results"]
    assert [row["method"] for row in methods] == ["lora", "flat_lora", "dora", "flat_dora"]
    assert all(row["fwdbwd_ms"] > 0 for row in methods) and ratios["ratios"]["flat_dora/dora"] > 0


def test_main_job_steps_benchmark_runs(tmp_path):
    out = tmp_path / "steps.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "main_job_steps.py"), "--steps", "3", "--block", "2",
                           "--warmup", "1", "--busy", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = read_record(out, "main_job_steps")["results"]
    assert row["busy_processes"] == 1 and row["tokens_per_batch"] > 0
    assert row["lora_ms"] > 0 and row["flat_lora_ms"] > 0
    assert row["ratio"] == pytest.approx(row["flat_lora_ms"] / row["lora_ms"])


@pytest.fixture
def bench_modules(monkeypatch):
    """Import a benchmark script by name, as the scripts import each other (benchmarks/ on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module


def timings(per_pass: dict[str, list[float]]):
    """A stand-in for ``common.median_ms``: the given milliseconds, one call per pass in PASSES order."""
    calls = iter(per_pass.values())
    return lambda fns, device, reps=20: next(calls)


def test_layer_ratios_are_against_lora_on_the_same_shape(bench_modules, monkeypatch):
    bench_layer = bench_modules("bench_layer")
    assert bench_layer.METHODS[0] == "lora"
    monkeypatch.setattr(bench_layer, "layer_passes", lambda *args, **kwargs: {"fwd": None, "bwd": None, "fwdbwd": None})
    # per pass: lora, materialized, flat_lora
    monkeypatch.setattr(bench_layer, "median_ms", timings({"fwd": [2.0, 3.0, 5.0], "bwd": [4.0, 4.0, 6.0],
                                                           "fwdbwd": [8.0, 12.0, 10.0]}))
    rows = {r["method"]: r for r in bench_layer.bench_shape(20, 50, 10, torch.device("cpu"), reps=1)}
    ratios = {m: [rows[m][f"{p}_ratio"] for p in ("fwd", "bwd", "fwdbwd")] for m in rows}
    assert ratios == {"lora": [1.0, 1.0, 1.0], "materialized": [1.5, 1.0, 1.5], "flat_lora": [2.5, 1.5, 1.25]}
    # two GEMMs of 2·10·20·50 flops each in 10 ms: 4e4 flops / 1e-2 s = 4e6 flop/s
    assert rows["flat_lora"]["fwdbwd_tflops"] == pytest.approx(4e-6)


def test_native_cpu_ratios_and_memory_are_against_lora(bench_modules, monkeypatch):
    bench = bench_modules("bench_native_cpu")
    monkeypatch.setattr(bench, "median_ms", timings({"fwd": [4.0, 5.0], "bwd": [2.0, 3.0], "fwdbwd": [6.0, 9.0]}))
    peak_mib = {"lora": 100.0, "native": 101.5, "reference": 110.0}
    monkeypatch.setattr(bench, "probe_memory", lambda method, case: peak_mib[method])
    row = bench.measure(8, 512, 512, 4, reps=1, memory_backends=["native", "reference"])
    assert [row[f"{p}_ratio"] for p in ("fwd", "bwd", "fwdbwd")] == [1.25, 1.5, 1.5]  # native / lora
    assert row["noise_matrix_mib"] == 1.0  # 512 x 512 float32
    assert row["peak_extra_mib_native"] == 1.5 and row["peak_extra_mib_reference"] == 10.0


def test_table7_compares_each_row_to_lora_at_the_same_accumulation(bench_modules):
    table7 = bench_modules("table7")
    rows = [{"grad_accum": 1, "method": "flat_lora", "step_time_s": 0.30, "peak_memory_gb": 2.5},
            {"grad_accum": 16, "method": "lora", "step_time_s": 2.0, "peak_memory_gb": 3.0},
            {"grad_accum": 1, "method": "lora", "step_time_s": 0.25, "peak_memory_gb": 2.0},
            {"grad_accum": 16, "method": "flat_lora", "step_time_s": 2.1, "peak_memory_gb": 3.25}]
    table7.compare_to_lora(rows)
    assert [r["step_time_ratio"] for r in rows] == pytest.approx([1.2, 1.0, 1.0, 1.05])
    assert [r["memory_delta_gb"] for r in rows] == pytest.approx([0.5, 0.0, 0.0, 0.25])


def test_pytest_benchmark_ratios_wait_for_their_baseline(bench_modules):
    microbench = bench_modules("microbench")
    medians = microbench.Medians()
    base = microbench.Case(group="layer", method="lora", baseline="lora", device="cpu")
    flat = microbench.Case(group="layer", method="flat_lora", baseline="lora", device="cpu", backend="native")
    lone = microbench.Case(group="noise", method="generate", baseline="torch.randn", device="cpu")
    assert medians.record(flat, 0.003) is None  # its baseline has not run yet
    assert medians.record(base, 0.002) == 1.0
    assert medians.record(flat, 0.005) == pytest.approx(2.5)
    assert medians.record(flat, None) is None  # timing disabled
    assert medians.record(lone, 0.004) is None  # baseline deselected
    assert medians.summary_lines()[0] == "layer: lora 2.000 ms | flat_lora-native 5.000 ms x2.50"
