"""docs/benchmarks.md is generated: its template (benchmarks/page.md) with each table rendered,
beside its command, from the result file in benchmarks/results (benchmarks/render_page.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def render_page():
    spec = importlib.util.spec_from_file_location("render_page", ROOT / "benchmarks" / "render_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_is_what_the_result_files_give() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert page == render_page().render(), "docs/benchmarks.md is stale: run python benchmarks/render_page.py"


def test_every_table_comes_from_a_result_file_and_every_result_file_is_shown() -> None:
    """The template writes no table of its own, and names each result file once."""
    template = (ROOT / "benchmarks" / "page.md").read_text()
    assert not [line for line in template.splitlines() if line.startswith("|")], "a table typed into the template"
    assert "```bash" not in template, "a command typed into the template: it comes with its result file"
    named = re.findall(r"^\{table ([a-z0-9_]+)\}$", template, re.M)
    assert len(named) == len(set(named))
    assert sorted(named) == sorted(p.stem for p in RESULTS.glob("*.json")), "a result file the page does not show"


def test_a_table_follows_its_result_file(tmp_path: Path) -> None:
    """Change a number in a result file: the rendered page changes with it, beside its command."""
    module = render_page()
    results = tmp_path / "results"
    results.mkdir()
    for path in RESULTS.glob("*.json"):
        (results / path.name).write_text(path.read_text())
    data = json.loads((results / "micro_batch_statistics.json").read_text())
    data["results"][0]["micro_batch_over_fixed"] = 9.87654
    data["command"] = "python benchmarks/micro_batch_statistics.py --rounds 3"
    (results / "micro_batch_statistics.json").write_text(json.dumps(data))
    page = module.render(results=results)
    assert "| 9.877x [" in page and page != module.render()
    assert "```bash\n.venv/bin/python benchmarks/micro_batch_statistics.py --rounds 3\n```\n\n| model |" in page
