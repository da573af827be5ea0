"""summary.md for the GPU suite: measured ratios beside issue 13's goals and benchmarks/NOTES.md's predictions.

    python benchmarks/gpu_summary.py RESULTS_DIR [--part quick --steps STEPS.tsv] [--dry-run]

Reads what ``benchmarks/gpu_suite.sh`` leaves in RESULTS_DIR: ``flatlora-bench/1`` records
(``paths-*.json`` from bench_paths.py, ``layer-*.json`` from bench_layer.py, ``table7-*.json``,
``suite-*.json``, ``kernel-budget.json``), ``pytest-benchmark.json`` and the junit report
``tests-cuda.xml``. With ``--steps`` (the suite's tab-separated step log) it first writes
``suite-<part>.json``, the record of that part's steps. Then it writes ``summary.md`` over everything
in the folder, so a summary made after both parts, or here over the fetched files of both device
calls, covers the whole suite; and from a ``paths`` record, ``path_table.json``: the measured table
that ``path="auto"`` reads once it is committed as ``flatlora_kernels/triton_ops/path_table.json``.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from common import SCHEMA, bench_device, write_record
from flatlora_kernels.paths import TABLE_SCHEMA, load_path_table

# Keep in step with benchmarks/NOTES.md: what it predicted for each goal before any GPU run.
NOTES_PREDICTIONS = {
    "layer": "§1.10 (static sm_90 SASS): the fused bulk bf16 K-loop takes 1.37 / 1.46 × its tensor-core time "
             "(forward / dX) with the noise issued under the wgmma, so about 1.4-1.5× cuBLAS at any bulk token "
             "count; §2: the slab path's extra work falls as 1/tokens",
    "step": "none in NOTES.md",
    "memory": "none in NOTES.md (nothing m×n is allocated or saved by design)",
    "changed": "none in NOTES.md (0 by construction: W is only read)",
    "norms": "Plan: the rank-16 fp32 dot costs about as much as the W read at H100 bandwidth, so about 2× one read",
}


KNOWN = {"layer", "paths", "table7", "gpu_suite"}  # the records summarised in their own tables below


@dataclass
class Goal:
    """One of issue 13's goals: ``value`` (None when not measured) must not exceed ``limit``."""

    name: str
    target: str
    limit: float
    value: float | None
    detail: str
    prediction: str
    on_gpu: bool

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        verdict = "met" if self.value <= self.limit else "not met"
        return verdict if self.on_gpu else f"{verdict} (CPU: not the goal's setting)"

    def row(self) -> str:
        return f"| {self.name} | {self.target} | {self.detail} | {self.verdict()} | {self.prediction} |"


def load(results_dir: Path) -> tuple[dict[str, list[dict]], dict | None]:
    """The folder's flatlora-bench/1 records by benchmark name, and the pytest-benchmark JSON (or None)."""
    records: dict[str, list[dict]] = {}
    pytest_json = None
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            records.setdefault(data["benchmark"], []).append(data)
        elif isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
            pytest_json = data
    return records, pytest_json


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped of a junit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def _max_with_detail(values: dict[str, float], unit: str = "×") -> tuple[float | None, str]:
    if not values:
        return None, "not measured"
    detail = ", ".join(f"{key}: {value:.3g}{unit}" for key, value in values.items())
    return max(values.values()), f"max {max(values.values()):.3g}{unit} ({detail})"


def goals(records: dict[str, list[dict]], pytest_json: dict | None) -> list[Goal]:
    """Issue 13's goals, each with what this folder's results measured."""
    goal_list = []
    layers = [(rec, row) for rec in records.get("layer", []) for row in rec["results"] if row["method"] == "flat_lora"]
    layers += [(rec, row) for rec in records.get("paths", []) for row in best_paths(rec["results"])]
    layer_gpu = all(rec["environment"]["device_type"] == "cuda" for rec, _ in layers)
    for name, target, limit, tokens in (("layer fwd+bwd, 1024 tokens", "≤ 1.10× PEFT LoRA", 1.10, {1024}),
                                        ("layer fwd+bwd, 4096–16384 tokens", "≤ 1.05× PEFT LoRA", 1.05,
                                         set(range(4096, 16385)))):
        value, detail = _max_with_detail({f"{r['in']}→{r['out']} t{r['tokens']}"
                                          + (f" {r['method']}" if r["method"] != "flat_lora" else ""): r["fwdbwd_ratio"]
                                          for _, r in layers if r["tokens"] in tokens})
        goal_list.append(Goal(name, target, limit, value, detail, NOTES_PREDICTIONS["layer"], layer_gpu))
    table7 = [(rec, row) for rec in records.get("table7", []) for row in rec["results"] if row["method"] == "flat_lora"]
    t7_gpu = bool(table7) and all(rec["environment"]["device_type"] == "cuda" and rec["config"]["preset"] == "7b"
                                  for rec, _ in table7)
    steps = {f"{rec['config']['preset']} accum {r['grad_accum']}": r["step_time_ratio"]
             for rec, r in table7 if r["grad_accum"] == 16}
    memory = {f"{rec['config']['preset']} accum {r['grad_accum']}": r["memory_delta_gb"] for rec, r in table7}
    changed = {f"{rec['config']['preset']} accum {r['grad_accum']}": r["changed_fraction"] for rec, r in table7}
    for name, target, limit, values, unit, key in (
            ("7B step time, accumulation 16", "≤ 1.02× LoRA", 1.02, steps, "×", "step"),
            ("peak memory over LoRA", "≤ +0.02 GB", 0.02, memory, " GB", "memory"),
            ("changed frozen elements", "0", 0.0, changed, "", "changed")):
        value, detail = _max_with_detail(values, unit)
        goal_list.append(Goal(name, target, limit, value, detail, NOTES_PREDICTIONS[key], t7_gpu))
    norms_gpu = bool(pytest_json) and pytest_json["environment"]["device_type"] == "cuda"
    backend = "triton" if norms_gpu else "native"
    norms = {f"{b['extra_info']['out']}x{b['extra_info']['in']} {backend}": b["extra_info"]["ratio_to_baseline"]
             for b in (pytest_json or {}).get("benchmarks", [])
             if b["extra_info"].get("op") == "row_norms" and b["extra_info"].get("backend") == backend
             and b["extra_info"].get("ratio_to_baseline") is not None}
    value, detail = _max_with_detail(norms)
    goal_list.append(Goal("merged row norms", "≤ 1.3× one read of W", 1.3, value, detail, NOTES_PREDICTIONS["norms"],
                          norms_gpu))
    return goal_list


def best_paths(rows: list[dict]) -> list[dict]:
    """Per (shape, tokens) of a ``paths`` record, the row of the faster of the fused and slab paths."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["in"], r["out"], r["tokens"])
        if r["method"] in ("fused", "slab") and (key not in best or r["fwdbwd_ms"] < best[key]["fwdbwd_ms"]):
            best[key] = r
    return list(best.values())


def crossovers(rows: list[dict]) -> dict[tuple[int, int], int | None]:
    """Per (in, out) shape: the smallest measured token count from which the slab path is at least as fast
    as the fused kernels at that and every larger measured count (None: the fused kernels win at the largest)."""
    by_shape: dict[tuple[int, int], dict[int, dict[str, float]]] = {}
    for r in rows:
        if r["method"] in ("fused", "slab"):
            by_shape.setdefault((r["in"], r["out"]), {}).setdefault(r["tokens"], {})[r["method"]] = r["fwdbwd_ms"]
    result = {}
    for shape, by_tokens in by_shape.items():
        crossover = None
        for tokens in sorted(by_tokens, reverse=True):
            if by_tokens[tokens]["slab"] > by_tokens[tokens]["fused"]:
                break
            crossover = tokens
        result[shape] = crossover
    return result


def measured_path_table(record: dict, committed: dict) -> dict:
    """The ``auto`` table with this ``paths`` record's device class measured: one bf16 row per shape, by
    weight size (the largest shape's row has no size limit), then the committed default rows for what was
    not measured (other dtypes); every other class as committed."""
    found = sorted(crossovers(record["results"]).items(), key=lambda item: item[0][0] * item[0][1])
    rows = [{"dtype": "16bit", "max_weight_elements": None if i == len(found) - 1 else n * m,
             "slab_from_tokens": tokens} for i, ((n, m), tokens) in enumerate(found)]
    env = record["environment"]
    source = (f"measured by benchmarks/bench_paths.py on {env['device']} (commit {env['git_commit']}, {env['utc']}): "
              "bf16 fwd+bwd crossover of the slab path over the fused kernels per shape; other dtypes keep the "
              "default class's rows")
    return {"schema": TABLE_SCHEMA, "source": source,
            "classes": {**committed["classes"], record["config"]["device_class"]: rows + committed["classes"]["default"]}}


def paths_section(rec: dict) -> list[str]:
    """The crossover table of one ``paths`` record: each method's time beside PEFT LoRA's, and peak memory."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rec["results"]:
        cells.setdefault((r["in"], r["out"], r["tokens"]), {})[r["method"]] = r
    rows = []
    for (n, m, tokens), by_method in cells.items():
        row = [f"{n}→{m}", tokens, f"{by_method['lora']['fwdbwd_ms']:.3g}"]
        row += [f"{by_method[k]['fwdbwd_ratio']:.2f}×" for k in ("public", "fused", "slab")]
        row.append("slab" if by_method["slab"]["fwdbwd_ms"] <= by_method["fused"]["fwdbwd_ms"] else "fused")
        row.append(" / ".join("-" if by_method[k]["peak_extra_mib"] is None else f"{by_method[k]['peak_extra_mib']:.0f}"
                              for k in ("lora", "public", "fused", "slab")))
        rows.append(row)
    lines = [f"## GPU paths: layer fwd+bwd against PEFT LoRA (bench_paths.py, {rec['environment']['device']})", ""]
    lines += table(["shape", "tokens", "LoRA ms", "public", "fused", "slab", "faster path",
                    "peak extra MiB (LoRA / public / fused / slab)"], rows)
    found = crossovers(rec["results"])
    lines += [f"- slab from {'never (fused wins at the largest count)' if t is None else f'{t} tokens'} on {n}→{m}"
              for (n, m), t in found.items()]
    lines += [f"- measured `auto` table for class `{rec['config']['device_class']}`: path_table.json here; commit it "
              "as flatlora_kernels/triton_ops/path_table.json", ""]
    return lines


def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""])


def environment_line(env: dict) -> str:
    return (f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
            f"commit {env['git_commit']} | {env['utc']}")


def summary(results_dir: Path, dry_run: bool) -> str:
    records, pytest_json = load(results_dir)
    lines = ["# GPU suite summary", ""]
    if dry_run:
        lines += ["**CPU dry run** at tiny sizes: this checks the pipeline; no figure here is a GPU measurement.", ""]
    sources = [(name, rec["environment"]) for name, recs in records.items() for rec in recs]
    sources += [("pytest-benchmark", pytest_json["environment"])] if pytest_json else []
    lines += ["## Environment", ""] + [f"- {name}: {environment_line(env)}" for name, env in sources] + [""]

    steps = [[rec["config"]["part"], s["step"], s["status"], "-" if s["exit_code"] is None else s["exit_code"],
              s["seconds"], s["note"]]
             for rec in sorted(records.get("gpu_suite", []), key=lambda rec: rec["config"]["part"] != "quick")
             for s in rec["results"]]
    lines += ["## Steps", ""] + table(["part", "step", "status", "exit", "s", "note"], steps)

    for path in sorted(results_dir.glob("tests-*.xml")):
        counts = junit_counts(path)
        lines += [f"## Test suite ({path.name})", "", ", ".join(f"{v} {k}" for k, v in counts.items()), ""]

    lines += ["## Goals (issue 13) beside the measurements and NOTES.md's predictions", ""]
    lines += ["| goal | target | measured | verdict | NOTES.md predicted |", "|---|---|---|---|---|"]
    lines += [goal.row() for goal in goals(records, pytest_json)] + [""]

    for rec in records.get("paths", []):
        lines += paths_section(rec)

    for rec in records.get("layer", []):
        rows = rec["results"]
        tokens = sorted({r["tokens"] for r in rows})
        by_shape: dict[str, dict[int, str]] = {}
        for r in rows:
            if r["method"] != "lora":
                cell = by_shape.setdefault(f"{r['in']}→{r['out']} {r['method']} ({r['backend']})", {})
                cell[r["tokens"]] = f"{r['fwdbwd_ratio']:.2f}× ({r['fwdbwd_ms']:.3g} ms)"
        lines += [f"## Layer fwd+bwd against PEFT LoRA (bench_layer.py, {rec['environment']['device']})", ""]
        lines += table(["shape, method"] + [f"{t} tokens" for t in tokens],
                       [[name] + [cells.get(t, "") for t in tokens] for name, cells in by_shape.items()])

    for rec in records.get("table7", []):
        lines += [f"## Table 7 setting ({rec['config']['preset']} preset, {rec['environment']['device']})", ""]
        lines += table(["accum", "method", "step s", "× LoRA", "peak GB", "+GB vs LoRA", "changed W", "rel. drift"],
                       [[r["grad_accum"], r["method"], f"{r['step_time_s']:.3f}", f"{r['step_time_ratio']:.3f}",
                         f"{r['peak_memory_gb']:.3f}", f"{r['memory_delta_gb']:+.3f}", f"{r['changed_fraction']:.2e}",
                         f"{r['relative_drift']:.2e}"] for r in rec["results"]])

    if pytest_json:
        groups: dict[str, list[dict]] = {}
        for bench in pytest_json["benchmarks"]:
            groups.setdefault(bench["group"], []).append(bench)
        rows = []
        for name, benches in groups.items():
            cases = [f"{b['extra_info']['method']}-{b['extra_info']['backend']} {b['stats']['median'] * 1e3:.3g} ms"
                     + (f" ({b['extra_info']['ratio_to_baseline']:.2f}×)"
                        if b["extra_info"].get("ratio_to_baseline") is not None else "") for b in benches]
            rows.append([name, benches[0]["extra_info"]["baseline"], "; ".join(cases)])
        lines += ["## Micro-benchmarks (pytest-benchmark medians; ratio to the group's baseline)", ""]
        lines += table(["group", "baseline", "cases"], rows)

    for name, recs in records.items():  # the kernel cost report, and any record this file does not know
        if name not in KNOWN:
            for rec in recs:
                lines += [f"## {name} ({rec['environment']['device']})", "", "```",
                          json.dumps(rec["results"], indent=1)[:6000], "```", ""]
    return "\n".join(lines)


def read_steps(path: Path) -> list[dict]:
    """The suite's step log: one tab-separated line per step (name, status, exit code, seconds, note)."""
    steps = []
    for line in path.read_text().splitlines():
        name, status, code, seconds, note = line.split("\t")
        steps.append({"step": name, "status": status, "exit_code": None if code == "-" else int(code),
                      "seconds": int(seconds), "note": note})
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--part", help="the suite part whose --steps log this is")
    parser.add_argument("--steps", type=Path, help="the suite's step log: write suite-<part>.json from it")
    parser.add_argument("--dry-run", action="store_true", help="mark the summary as a CPU dry run")
    args = parser.parse_args()
    if args.steps:
        if not args.part:
            parser.error("--steps needs --part")
        write_record(args.results_dir / f"suite-{args.part}.json", "gpu_suite", bench_device(),
                     {"part": args.part, "dry_run": args.dry_run}, read_steps(args.steps))
    out = args.results_dir / "summary.md"
    out.write_text(summary(args.results_dir, args.dry_run))
    print(f"wrote {out}")
    measured = load(args.results_dir)[0].get("paths", [])
    if measured:
        table_path = args.results_dir / "path_table.json"
        table_path.write_text(json.dumps(measured_path_table(measured[-1], load_path_table()), indent=1) + "\n")
        print(f"wrote {table_path}")


if __name__ == "__main__":
    main()
