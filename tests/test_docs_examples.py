"""The README's and the documentation's Python examples run as written, each in a fresh process, so the
docs cannot drift from the code; and the README stays a front page that opens with its status line.

A fenced ``python`` block that is not meant to run is preceded by ``<!-- not-run: why -->``; it shows up
as a skipped test with that reason (``pytest -rs`` lists them), and a marker without a reason fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
README_MAX_LINES = 200


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    not_run_reason: str | None  # None: the block runs

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _marker_before(text: str, fence_start: int) -> str | None:
    """The reason of a ``not-run`` marker on the last non-blank line before the fence, or None."""
    preceding = [line for line in text[:fence_start].splitlines() if line.strip()]
    match = NOT_RUN.match(preceding[-1]) if preceding else None
    return match["reason"].strip() if match else None


def doc_examples() -> list[Example]:
    examples = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            examples.append(Example(path, text.count("\n", 0, match.start()) + 1, textwrap.dedent(match["code"]),
                                    _marker_before(text, match.start())))
    return examples


EXAMPLES = doc_examples()


def test_examples_are_found_and_most_run():
    """Guards the extraction itself: an emptied or mis-parsed doc set would make every other test vacuous."""
    runnable = [e for e in EXAMPLES if e.not_run_reason is None]
    not_run = [e for e in EXAMPLES if e.not_run_reason is not None]
    print(f"\ndocumentation examples: {len(runnable)} run, {len(not_run)} not run")
    for example in not_run:
        print(f"  not run: {example.name}: {example.not_run_reason}")
    assert any(e.path == README for e in runnable), "the README's quickstart must be a runnable python block"
    assert len(runnable) > len(not_run)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_doc_example_runs(example: Example, tmp_path):
    if example.not_run_reason is not None:
        assert example.not_run_reason, f"{example.name}: a not-run marker must say why the block does not run"
        pytest.skip(f"not-run: {example.not_run_reason}")
    script = tmp_path / "example.py"
    script.write_text(example.code, encoding="utf-8")
    # this checkout's package, whatever is installed; no hub access; the caller's thread settings
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_readme_is_a_front_page_that_opens_with_its_status():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it <= {README_MAX_LINES}"
    body = "\n".join(lines[1:]).strip()  # after the title
    first_paragraph = body.split("\n\n")[0]
    assert first_paragraph.startswith("**Status:**"), first_paragraph
    for fact in ("Triton interpreter", "native C++", "torch reference", "sm_90", "never run on a GPU"):
        assert fact in first_paragraph, f"the status line does not say {fact!r}"


def test_readme_commands_are_the_ones_ci_and_install_use():
    readme = README.read_text(encoding="utf-8")
    assert "bash scripts/install.sh && python examples/finetune_minilm.py" in readme
    test_command = "python -m pytest tests"
    assert test_command in readme
    assert re.search(rf"^{re.escape(test_command)}\b", (ROOT / ".ci" / "run").read_text(), re.M)


def test_every_docs_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, re.M))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in DOC_FILES if p != README}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "nav entries without a page"
