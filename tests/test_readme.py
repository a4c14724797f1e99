"""The README stays short and its numbers stay true; the repository speaks of the software only.

- The README is under 300 lines: walk-throughs, tables and results live in docs/.
- Every number with a unit the README quotes (``1.13x``, ``40 MiB``, ``12 min``...) is found in
  the benchmarks page (docs/benchmarks.md) or the experiment's report (docs/reproduce/report.md),
  where it stands beside the command that makes it.
- No tracked file speaks of how the project was developed (its work history, our own tracker's
  numbers); other projects' references such as pytorch/pytorch#123 are fine.
- Tables and statements that copy something else agree with it: the benchmarks page's table of
  the statistics sources with the result file the benchmark wrote, the FSDP2 page with
  examples/fsdp2.py, the stated default statistics source with the code.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
NUMBER_SOURCES = [DOCS / "benchmarks.md", DOCS / "reproduce" / "report.md"]

# A number with a unit: a ratio (1.13x), a share (74 %), a size (40 MiB), a time (0.43 ms, 12 min).
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:(x)\b|\s?(%|MiB|GiB|MB|GB|ms|us|µs)(?!\w)|\s(min|s)\b)")
# Words about the project's development. The alternatives are spelled so that this file does
# not match itself: "session[s]" and "this[ ]session" match the plain words.
DEVELOPMENT = re.compile(r"\b(session [0-9]+|this[ ]session|session[s]|issue [0-9]+|fault[ ]campaign|"
                         r"was[ ]lent|lent[ ]to[ ]this)\b", re.I)


def numbers(text: str) -> set[tuple[str, str]]:
    """The (number, unit) pairs quoted in ``text``."""
    return {(match.group(1), next(unit for unit in match.groups()[1:] if unit)) for match in NUMBER.finditer(text)}


def test_the_readme_is_under_300_lines() -> None:
    lines = README.read_text().count("\n")
    assert lines < 300, f"README.md has {lines} lines: move walk-throughs and tables to docs/ and link them"


def test_the_number_pattern_finds_what_it_should() -> None:
    text = "1.128x and 48.30x; 74 % of 40 MiB in 0.43 ms, 12 min 20 s; not 32 x 4, 2x128, 40-256-256-10 or 1e-3"
    assert numbers(text) == {("1.128", "x"), ("48.30", "x"), ("74", "%"), ("40", "MiB"), ("0.43", "ms"),
                             ("12", "min"), ("20", "s")}


def test_every_number_the_readme_quotes_is_in_the_benchmarks_or_the_report() -> None:
    quoted = numbers(README.read_text())
    assert quoted, "the README quotes no measured number: the pattern or the README changed"
    sources = set().union(*(numbers(page.read_text()) for page in NUMBER_SOURCES))
    missing = sorted(f"{number}{unit}" for number, unit in quoted - sources)
    assert not missing, (f"README.md quotes {missing}, which neither docs/benchmarks.md nor docs/reproduce/report.md "
                         "has: take the number from there (or add it there beside its command)")


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as error:  # pragma: no cover - a copy without git
        pytest.skip(f"not a git checkout ({error}): the tracked files are unknown")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_file_speaks_of_the_projects_development() -> None:
    found = []
    for path in tracked_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files (plots), and tracked files deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if DEVELOPMENT.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "say what the software does, not how it was made (history is git's):\n" + "\n".join(found)


def test_the_development_pattern_matches_what_it_should() -> None:
    # spelled apart, so that this file does not match itself
    session, issue, lent = "sess" + "ion", "iss" + "ue", "le" + "nt"
    for text in (f"as {session} 6 measured", f"no GPU was {lent} to this {session}", f"Faults ({issue} 11)",
                 f"over two {session}s", "the fault " + "campaign"):
        assert DEVELOPMENT.search(text), text
    for text in ('@pytest.fixture(scope="session")', "sqlalchemy.orm.Session", "Lightning-AI issue #19987",
                 "pytorch/pytorch#123", "the issues asynchronously"):
        assert not DEVELOPMENT.search(text), text


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows of the table whose header line starts with ``header``, as lists of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_statistics_sources_table_is_the_benchmarks_result_file() -> None:
    result = json.loads((ROOT / "benchmarks" / "results" / "statistics_efficiency.json").read_text())
    by_key = {(row["inputs"], row["k"], row["source"]): row for row in result["rows"]}
    table = markdown_table((DOCS / "benchmarks.md").read_text(), "| inputs | micro-batches per window")
    assert len(table) * 2 == len(by_key), "one row of the page per (inputs, k) of the result file"
    for inputs, k, *cells in table:
        micro, per_sample = by_key[inputs, int(k), "micro_batch"], by_key[inputs, int(k), "per_sample"]
        assert cells == [str(micro["windows_for_b_simple_within_20pct"]),
                         str(per_sample["windows_for_b_simple_within_20pct"]),
                         f"{micro['trace_bias_se']:.1f}", f"{per_sample['trace_bias_se']:.1f}",
                         f"{micro['true_b_simple']:.1f}"], (inputs, k)


def test_the_fsdp2_page_shows_the_example_as_it_is() -> None:
    page = (DOCS / "integrations" / "fsdp2.md").read_text()
    block = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert block == (ROOT / "examples" / "fsdp2.py").read_text()


def test_the_stated_default_statistics_source_is_the_codes() -> None:
    from gradaccum import NoiseScalePlanner, NormTest, NormTestPlanner

    page = (DOCS / "noise-scale.md").read_text()
    stated = re.search(r"default to\s+`source=\"(\w+)\"`", page)
    assert stated, "docs/noise-scale.md says which source the rules and planners default to"
    for cls in (NormTest, NoiseScalePlanner, NormTestPlanner):
        default = next(f.default for f in fields(cls) if f.name == "source")
        assert default == stated.group(1), f"{cls.__name__} defaults to source={default!r}: update docs/noise-scale.md"


def test_the_readmes_links_point_at_files() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert targets
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
