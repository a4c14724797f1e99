"""Render docs/benchmarks.md from its template (benchmarks/page.md) and the result files.

Usage:
    python benchmarks/render_page.py            # rewrite docs/benchmarks.md
    python benchmarks/render_page.py --check    # exit 1 if the page is not what the results give

Each line ``{table NAME}`` of the template becomes the command stored in
``benchmarks/results/NAME.json`` (a ``bash`` block) followed by the table of its results, so
every number on the page stands beside the command that made it and comes from a result file.
A result file is either a benchmark's own record (``FORMATS``: ``micro_batch_statistics``,
``micro_batch_statistics_jax``, ``statistics_efficiency``, formatted here) or the table a
benchmark printed:
``{"command": ..., "columns": [...], "rows": [[cell, ...], ...]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "benchmarks" / "page.md"
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
PLACEHOLDER = re.compile(r"^\{table ([a-z0-9_]+)\}$", re.M)


def table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table; every row must have a cell per column."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {row}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def micro_batch_statistics(result: dict[str, Any]) -> str:
    """The statistics sources' cost against the fixed Accumulator (the Monitor's against the plain
    loop), with their quartiles; a result without a column shows a dash in it."""

    def cell(r: dict[str, Any], key: str, base: str, digits: int) -> str:
        if f"{key}_over_{base}" not in r:
            return "-"
        low, high = r[f"{key}_iqr"]
        return f"{r[f'{key}_over_{base}']:.{digits}f}x [{low:.{digits}f}, {high:.{digits}f}]"

    rows = [[r["model"], f"{r['fixed_ms_per_window']:.1f}", cell(r, "micro_batch", "fixed", 3),
             cell(r, "norm_test", "fixed", 3), cell(r, "monitor", "plain", 3), cell(r, "read_once", "plain", 3),
             cell(r, "per_sample", "fixed", 2)]
            for r in result["results"]]
    return table(["model", "fixed ms/window", "`NoiseScalePlanner`, micro-batch source / fixed [quartiles]",
                  "`NormTest`, micro-batch source / fixed [quartiles]",
                  "`Monitor`, micro-batch source / plain loop [quartiles]",
                  "one read of each added gradient / plain loop [quartiles]",
                  "`NoiseScalePlanner`, per-sample source / fixed [quartiles]"], rows)


def statistics_efficiency(result: dict[str, Any]) -> str:
    """Windows each source needs for the noise scale, one row per (inputs, micro-batches per window)."""
    by_key = {(r["inputs"], r["k"], r["source"]): r for r in result["rows"]}
    keys = list(dict.fromkeys((r["inputs"], r["k"]) for r in result["rows"]))
    rows = []
    for inputs, k in keys:
        micro, per_sample = by_key[inputs, k, "micro_batch"], by_key[inputs, k, "per_sample"]
        rows.append([inputs, str(k), str(micro["windows_for_b_simple_within_20pct"]),
                     str(per_sample["windows_for_b_simple_within_20pct"]), f"{micro['trace_bias_se']:.1f}",
                     f"{per_sample['trace_bias_se']:.1f}", f"{micro['true_b_simple']:.1f}"])
    return table(["inputs", "micro-batches per window", "windows needed, `micro_batch`", "windows needed, `per_sample`",
                  "trace bias (standard errors), `micro_batch`", "trace bias, `per_sample`", "true `B_simple`"], rows)


def micro_batch_statistics_jax(result: dict[str, Any]) -> str:
    """The JAX statistics sources' cost against the fixed train step: one column per measured
    source (each ``<source>_over_fixed`` with its ``<source>_iqr``), in the file's order."""
    keys = [k[: -len("_over_fixed")] for k in result["results"][0] if k.endswith("_over_fixed")]
    labels = [k.replace("_", " ").replace("micro batch", "micro-batch").replace("per sample", "per-sample")
              for k in keys]
    rows = [[r["model"], f"{r['fixed_ms_per_window']:.1f}",
             *(f"{r[k + '_over_fixed']:.3f}x [{r[k + '_iqr'][0]:.3f}, {r[k + '_iqr'][1]:.3f}]" for k in keys)]
            for r in result["results"]]
    return table(["model", "fixed ms/window", *(f"{label} / fixed [IQR]" for label in labels)], rows)


FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "micro_batch_statistics": micro_batch_statistics,
    "micro_batch_statistics_jax": micro_batch_statistics_jax,
    "statistics_efficiency": statistics_efficiency,
}


def command(text: str) -> str:
    """The command as run from the repository root with its virtual environment."""
    return "\n".join(".venv/bin/" + line if line.startswith("python ") else line for line in text.splitlines())


def section(name: str, results: Path = RESULTS) -> str:
    """The command block and the table of ``results/NAME.json``."""
    path = results / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the benchmark that writes it, or drop {{table {name}}}")
    result = json.loads(path.read_text())
    body = FORMATS[name](result) if name in FORMATS else table(result["columns"], result["rows"])
    return f"```bash\n{command(result['command'])}\n```\n\n{body}"


def render(template: Path = TEMPLATE, results: Path = RESULTS) -> str:
    """The page: the template with every ``{table NAME}`` line replaced by its section."""
    return PLACEHOLDER.sub(lambda match: section(match.group(1), results), template.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare: exit 1 if the page differs")
    args = parser.parse_args()
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            sys.exit(f"{PAGE.relative_to(ROOT)} is not what the results give: run python benchmarks/render_page.py")
        return
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(page)
    tmp.replace(PAGE)


if __name__ == "__main__":
    main()
