"""pytest-benchmark set-up for ``python -m pytest benchmarks``.

How the ratios are made. Every case is timed by pytest-benchmark (its timer, its rounds), as a
median. Each group's baseline case is parametrised first, so pytest runs it first; its median goes
into a session-wide registry (:class:`microbench.Medians`), and every later case of the group stores
``median / baseline median`` as ``extra_info["ratio_to_baseline"]``: both medians come from the same
timer in the same session. A case whose baseline was deselected (``-k``) or that ran with
``--benchmark-disable`` stores ``None``. On CUDA every timed call ends with ``torch.cuda.synchronize()``.
The JSON of ``--benchmark-json`` gets this repository's ``environment`` block (device, versions,
commit) and loses pytest-benchmark's per-round samples (``stats.data``: megabytes for a GPU run,
more than the device tool brings back; every statistic stays). The terminal summary lists every
group's medians and ratios.
"""

import os

import torch

if not torch.cuda.is_available():  # before triton is imported: Triton cases run under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from common import bench_device, environment  # noqa: E402
from flatlora_kernels.backends import BACKEND_ENV  # noqa: E402
from microbench import Case, Medians  # noqa: E402

_MEDIANS = Medians()


@pytest.fixture
def case(request, monkeypatch) -> Case:
    """The parametrised case, with ``FLATLORA_BACKEND`` forced to its backend (if any) for the test."""
    case = request.param
    if case.backend is not None:
        monkeypatch.setenv(BACKEND_ENV, case.backend)
    else:
        monkeypatch.delenv(BACKEND_ENV, raising=False)
    return case


@pytest.fixture
def measure(benchmark):
    """``measure(case, fn)``: time ``fn`` with pytest-benchmark and fill ``extra_info`` (see the module docstring)."""

    def run(case: Case, fn) -> None:
        if case.device == "cuda":
            def timed():
                fn()
                torch.cuda.synchronize()
        else:
            timed = fn
        if case.interpreted:
            benchmark.pedantic(timed, rounds=3, warmup_rounds=1)
        else:
            benchmark(timed)
        median = benchmark.stats.stats.median if benchmark.stats is not None else None
        benchmark.extra_info.update(case.extra_info(), median_s=median,
                                    ratio_to_baseline=_MEDIANS.record(case, median))

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["environment"] = environment(bench_device())
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)


def pytest_terminal_summary(terminalreporter):
    lines = _MEDIANS.summary_lines()
    if lines:
        terminalreporter.section("Flat-LoRA benchmarks: medians, and ratios to each group's baseline (first)")
        for line in lines:
            terminalreporter.write_line(line)
