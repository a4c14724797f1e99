"""The README's and the docs pages' examples run as written, and the docs site builds strictly.

Every ```python block of a page runs, in order, in one namespace per page (a page's blocks
follow on from each other); a ``print(...)  # text`` line must print that text. Fragments that
cannot run alone (a callback inside a framework's loop) are fenced ```py and are not run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def pages_with_examples() -> list[Path]:
    return sorted(page for page in DOCS.rglob("*.md") if python_blocks(page))


FAST_PAGES = [ROOT / "README.md", DOCS / "worked_example.md"]
PAGES = FAST_PAGES + [pytest.param(page, marks=pytest.mark.slow, id=str(page.relative_to(ROOT)))
                      for page in pages_with_examples() if page not in FAST_PAGES]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files (the Monitor's CSV) write them here
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no python block"
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
    printed = capsys.readouterr().out
    expected = re.findall(r"print\(.*\)\s+# (.+)", "".join(blocks))
    for line in expected:
        assert line.strip() in printed


def test_the_docs_pages_with_examples_are_run() -> None:
    """A page that gains a python block is run by the test above (nothing is left out by a list)."""
    run = {p if isinstance(p, Path) else p.values[0] for p in PAGES}
    assert set(pages_with_examples()) <= run
    assert {DOCS / "index.md", DOCS / "jax.md", DOCS / "integrations" / "fsdp2.md"} <= run


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", readme, re.S).group(1).strip()
    assert command in ci


@pytest.mark.slow
def test_the_docs_site_builds_without_warnings(tmp_path: Path) -> None:
    """mkdocs + mkdocstrings, strict: a docstring naming a parameter the signature lacks, a page
    left out of the nav, a broken link or anchor (or any other warning) fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    page = (tmp_path / "site" / "api" / "torch" / "index.html").read_text()
    assert "Accumulator" in page and "PerSampleGradStats" in page
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()
    assert (tmp_path / "site" / "reproduce" / "report" / "index.html").is_file()
