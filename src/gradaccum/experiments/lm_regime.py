"""The LM's noise-scale regime over one run, by both statistics sources side by side.

A larger window can save optimizer steps only where the gradient noise scale ``B_simple``
is well above the smallest batch (McCandlish et al. 2018): the LM section is sized so that it
passes ``REGIME_FACTOR`` (8) times the smallest batch for most of the run, and this module
checks it on one stated run: the baseline (micro-batches of the smallest batch, one per step,
AdamW) at the learning rate its tuning chose (on the validation split), for the section's
budget, batches drawn with replacement from the training split (seed ``cfg.seed``). At
``POINTS`` points of the run it measures ``B_simple`` by each statistics source of the
Accumulator (``"per_sample"`` and ``"micro_batch"``) at the run's parameters (nothing is
stepped), on the same micro-batches: ``WINDOWS`` windows of ``PER_WINDOW`` micro-batches, the
ratio of the averaged ``tr(Sigma)`` to the averaged ``|G|^2``. Per quarter of the run the
terms are averaged again over the quarter's points (a ratio of averages: a mean of per-point
ratios is biased).

Written beside the LM front: ``lm_regime.json`` (the points), ``lm_sources.csv`` (one row per
point, both sources' terms) and ``lm_sources.png`` (both sources' ``B_simple`` over the run).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import ExperimentConfig  # noqa: E402
from .errors import SettingsError  # noqa: E402
from .files import atomic_file  # noqa: E402

SOURCES = ("per_sample", "micro_batch")
SOURCE_LABELS = {"per_sample": "per-sample source", "micro_batch": "micro-batch source"}
POINTS = 32  # measurement points over the run, evenly spaced in steps
WINDOWS = 4  # windows per source and point
PER_WINDOW = 4  # micro-batches of the smallest batch per window
REGIME_FACTOR = 8  # the regime: B_simple at or above this many smallest batches
CSV_COLUMNS = ("step", "sequences", "val_loss",
               *(f"{s}_{t}" for s in SOURCES for t in ("b_simple", "trace", "squared_norm")))


def measure_regime(lr: float, seed: int, cfg: ExperimentConfig) -> dict[str, Any]:
    """The stated run (module docstring) at ``lr`` and ``seed`` with the LM section's settings
    ``cfg`` (its ``budget`` in sequences, ``increment`` the smallest batch); returns what
    ``lm_regime.json`` holds. Module-level: a worker process runs it."""
    import torch

    from .critical_batch_section import make_task
    from .critical_batch_torch import accumulator_noise_scale, sample_batches

    started = time.perf_counter()
    task = make_task("lm", cfg)
    batch = cfg.increment
    steps = max(1, cfg.budget // batch)
    at = sorted({max(1, round(steps * (k + 1) / POINTS)) for k in range(POINTS)})
    torch.manual_seed(seed)
    model, optimizer = task.make(lr)
    stream = task.problem.batches(batch, seed)
    points = []
    for step in range(1, steps + 1):
        task.problem.step((model, optimizer), next(stream), lr)
        if step in at:
            point: dict[str, Any] = {"step": step, "sequences": step * batch,
                                     "val_loss": task.problem.loss((model, optimizer))}
            for source in SOURCES:  # the same micro-batches for both sources
                point[source] = accumulator_noise_scale(
                    model, task.problem.loss_of, sample_batches(task.problem.train, batch, seed + 1), PER_WINDOW,
                    WINDOWS, source, task.count_of)
            points.append(point)
    return {"arm": "baseline", "lr": lr, "seed": seed, "batch": batch, "budget": cfg.budget, "steps": steps,
            "windows": WINDOWS, "per_window": PER_WINDOW, "points": points,
            "seconds": time.perf_counter() - started}


def quarters(points: Sequence[dict[str, Any]], budget: int, source: str) -> list[float]:
    """``source``'s ``B_simple`` per quarter of the budget: the quarter's summed ``tr(Sigma)``
    over its summed ``|G|^2`` (every point has the same number of windows, so this is the ratio
    of the averaged terms). A point at ``s`` sequences is in quarter ``k`` when
    ``k budget / 4 < s <= (k + 1) budget / 4``. A quarter without points raises ValueError."""
    sums = [[0.0, 0.0, 0] for _ in range(4)]
    for point in points:
        k = min(3, max(0, math.ceil(4 * point["sequences"] / budget) - 1))
        sums[k][0] += point[source]["trace"]
        sums[k][1] += point[source]["squared_norm"]
        sums[k][2] += 1
    empty = [k + 1 for k, (_, _, n) in enumerate(sums) if n == 0]
    if empty:
        raise ValueError(f"points: quarter(s) {empty} of the budget ({budget}) hold no measurement point; "
                         "measure at least one point per quarter")
    return [trace / squared if squared > 0 else math.inf for trace, squared, _ in sums]


def steps_saved(ratio: float, extra: float) -> tuple[float, float]:
    """Under McCandlish et al.'s model with ``B_noise = ratio`` smallest batches: the window
    ``c`` (in smallest batches) that spends ``extra`` more samples (``E(c B) = (1 + extra) E(B)``)
    and the share of the steps it saves, ``1 - rho``; they satisfy
    ``ratio = (1 + extra)(1 - rho) / (rho extra)``."""
    c = 1.0 + extra + ratio * extra
    rho = (1.0 + extra) / c
    return c, 1.0 - rho


def regime_lines(regime: dict[str, Any]) -> list[str]:
    """The report's lines: the run, per quarter ``B_simple`` over the smallest batch by each
    source, how many quarters pass ``REGIME_FACTOR``x, and the tolerance on extra samples."""
    batch, budget = regime["batch"], regime["budget"]
    lines = ["", "## The noise-scale regime and the two statistics sources", ""]
    try:
        ratios = {s: [q / batch for q in quarters(regime["points"], budget, s)] for s in SOURCES}
    except ValueError as error:  # said, never left out silently
        return lines + [f"No per-quarter noise scale: the stated run of {regime['steps']} steps is too short "
                        f"({error}).", ""]
    passes = sum(r >= REGIME_FACTOR for r in ratios["per_sample"])
    lines += [f"One stated run: the baseline (batch {batch}, AdamW) at its tuned lr {regime['lr']:.3g}, "
             f"{budget:,} sequences, batches drawn with replacement (seed {regime['seed']}). At "
             f"{len(regime['points'])} points the gradient noise scale B_simple is measured at the run's parameters "
             f"by both statistics sources on the same micro-batches ({regime['windows']} windows of "
             f"{regime['per_window']} micro-batches of {batch}); per quarter of the run, the ratio of the averaged "
             "tr(Sigma) to the averaged |G|^2, over the smallest batch:", "",
              "| source | " + " | ".join(f"quarter {k + 1}" for k in range(4)) + " |", "|---" * 5 + "|"]
    for source in SOURCES:
        lines.append(f"| {SOURCE_LABELS[source]} | " + " | ".join(f"{r:.1f}x" for r in ratios[source]) + " |")
    mean = sum(ratios["per_sample"]) / 4
    examples = "; ".join(f"{x:.0%} extra samples: a window of {c:.1f} batches saves {saved:.0%} of the steps"
                         for x in (0.25, 1.0) for c, saved in [steps_saved(mean, x)])
    lines += ["", f"B_simple (per-sample source) passes {REGIME_FACTOR}x the smallest batch in {passes} of 4 quarters.",
              "", "Tolerance on extra samples: every arm has the same budget and none is imposed per level, so a "
              "comparison counts a saving of steps whatever extra samples it costs (the samples ratio beside it "
              "says how many). Under McCandlish et al.'s model a window of c times the smallest batch B_min saves "
              "1 - rho of the steps for x extra samples when B_noise / B_min = (1 + x)(1 - rho) / (rho x); at this "
              f"run's mean {mean:.1f}x: {examples}.", "",
              "![B_simple by both statistics sources over the run](lm_sources.png)", "",
              "Per point, both sources: `lm_sources.csv`.", ""]
    return lines


def regime_section(out: Path, task: str) -> list[str]:
    """``regime_lines`` of ``<out>/<task>_regime.json``; none when the file is absent (a task
    without a stated run). An unreadable or damaged file raises SettingsError naming it."""
    path = out / f"{task}_regime.json"
    if not path.exists():
        return []
    try:
        return regime_lines(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SettingsError(f"out: cannot read {path} ({error!r}); rerun the {task} section with --force") from None


def sources_csv(regime: dict[str, Any]) -> str:
    """One row per measurement point: step, sequences, validation loss, and per source its
    ``B_simple`` and averaged ``tr(Sigma)`` and ``|G|^2``."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for p in regime["points"]:
        writer.writerow([p["step"], p["sequences"], f"{p['val_loss']:.6g}",
                         *(f"{p[s][t]:.6g}" for s in SOURCES for t in ("b_simple", "trace", "squared_norm"))])
    return text.getvalue()


def plot_sources(regime: dict[str, Any], path: Path) -> None:
    """Both sources' ``B_simple`` over the run, one colour each (distinct markers and line
    styles keep both visible where they overlap), and ``REGIME_FACTOR`` smallest batches."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [p["sequences"] for p in regime["points"]]
    for source, colour, marker, line in (("per_sample", "C0", "o", "-"), ("micro_batch", "C1", "s", "--")):
        ax.plot(xs, [p[source]["b_simple"] for p in regime["points"]], line, marker=marker, ms=4, color=colour,
                lw=1.5, label=f"B_simple, {SOURCE_LABELS[source]}")
    ax.axhline(REGIME_FACTOR * regime["batch"], color="0.4", ls=":", lw=1,
               label=f"{REGIME_FACTOR}x the smallest batch ({REGIME_FACTOR * regime['batch']})")
    for k in range(1, 4):
        ax.axvline(k * regime["budget"] / 4, color="0.85", lw=1)
    ax.set(yscale="log", xlabel="training sequences", ylabel="B_simple (sequences)",
           title=f"LM: the noise scale over one run (baseline, batch {regime['batch']}, lr {regime['lr']:.3g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
