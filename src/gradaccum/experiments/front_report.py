"""The steps-quality front's report section: targets, steps and time to target, verdicts, a plot.

Targets come from the best fixed arm's final test metric (mean over seeds) less margins, the
k-th raised to at least 2.5 + 1.5 k of that mean's standard errors, so that reaching a target is
more than noise and the targets stay apart. A run's steps (and training seconds) to a target are read from its evaluations,
linearly interpolated between the two evaluations around the first crossing (from the
untrained model's metric at step 0 before the first). An arm's value at a target is the mean
over seeds of its best point (the fewest mean steps among its points whose every seed reaches
the target), with a 95 % t-interval. Verdicts compare with the best fixed arm at that target:
fewer steps (the arm's interval entirely below the fixed one's), more steps (entirely above,
or the target not reached), or equal within intervals.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from .arms import label  # noqa: E402
from .errors import SettingsError  # noqa: E402
from .files import atomic_file  # noqa: E402

MARGINS = {"accuracy": (0.005, 0.01, 0.02), "loss": (0.01, 0.02, 0.05)}  # below / above the best fixed arm
MIN_STANDARD_ERRORS = 2.5


def interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval (NaN bounds for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def standard_error(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def reached(metric: float, target: float, higher: bool) -> bool:
    return metric >= target if higher else metric <= target


def to_target(evaluations: Sequence[dict[str, Any]], seconds: Sequence[float] | None, target: float, higher: bool,
              start: float) -> tuple[float, float, float] | None:
    """(steps, training seconds, samples) at which the test metric first reaches ``target``,
    interpolated linearly between evaluations (from ``start`` at step 0); None if it never does.
    Seconds are NaN without ``seconds``."""
    previous = (0.0, 0.0, 0.0, start)
    for k, e in enumerate(evaluations):
        now = (float(e["steps"]), float(seconds[k]) if seconds is not None else math.nan, float(e["samples"]),
               float(e["test"]))
        if reached(now[3], target, higher):
            if reached(previous[3], target, higher) or now[3] == previous[3]:
                return now[:3]
            w = (target - previous[3]) / (now[3] - previous[3])
            return tuple(a + w * (b - a) for a, b in zip(previous[:3], now[:3]))  # type: ignore[return-value]
        previous = now
    return None


def targets(front: dict[str, Any]) -> tuple[str, list[float]]:
    """The best fixed arm and the targets below (accuracy) or above (loss) its final test metric."""
    higher = front["metric"] == "accuracy"
    fixed = {arm: [r["test_accuracy"] for r in e["points"][0]["runs"]]
             for arm, e in front["arms"].items() if not e["adaptive"] and e["points"] and e["points"][0]["runs"]}
    if not fixed:
        raise SettingsError(f"{front.get('task', 'front')}_results.json: no fixed-batch arm has a retrained point "
                            "with runs, so there is no target to measure the arms against; rerun `gradaccum "
                            f"reproduce --sections {'lm' if front.get('task') == 'lm' else 'front'}` to rebuild it")
    best = (max if higher else min)(fixed, key=lambda a: statistics.fmean(fixed[a]))
    mean, se = statistics.fmean(fixed[best]), standard_error(fixed[best])
    sign = -1.0 if higher else 1.0
    margins = [max(m, (MIN_STANDARD_ERRORS + 1.5 * k) * se) for k, m in enumerate(MARGINS[front["metric"]])]
    return best, [mean + sign * m for m in margins]


def point_at_target(point: dict[str, Any], seconds: list[dict[str, Any]] | None, target: float, higher: bool,
                    start: float) -> dict[str, Any]:
    """Steps and seconds to ``target`` of one point over its seeds."""
    hits = []
    for k, run in enumerate(point["runs"]):
        evaluation_seconds = seconds[k]["evaluation_seconds"] if seconds else None
        hits.append(to_target(run["evaluations"], evaluation_seconds, target, higher, start))
    ok = [h for h in hits if h is not None]
    out: dict[str, Any] = {"reached": len(ok), "seeds": len(hits)}
    if len(ok) == len(hits):
        out["steps"] = interval([h[0] for h in ok])
        out["seconds"] = interval([h[1] for h in ok])
        out["samples"] = interval([h[2] for h in ok])
    return out


def arm_at_target(front: dict[str, Any], timings: dict[str, Any], arm: str, target: float) -> dict[str, Any]:
    """The arm's best point at ``target`` (fewest mean steps among points every seed of which reaches it)."""
    higher, entry = front["metric"] == "accuracy", front["arms"][arm]
    rows = [point_at_target(p, (timings.get(arm) or [None] * len(entry["points"]))[k], target, higher, front["start"])
            for k, p in enumerate(entry["points"])]
    full = [r for r in rows if "steps" in r]
    if not full:
        return {"reached": max((r["reached"] for r in rows), default=0), "seeds": rows[0]["seeds"] if rows else 0}
    return min(full, key=lambda r: r["steps"][0])


def compare(arm: dict[str, Any], fixed: dict[str, Any]) -> str:
    """An adaptive arm's steps to a target against the best fixed arm's."""
    if "steps" not in fixed:
        return "no fixed arm reaches it"
    if "steps" not in arm:
        return "more steps (not reached)"
    (_, a_lo, a_hi), (_, f_lo, f_hi) = arm["steps"], fixed["steps"]
    if a_hi < f_lo:
        return "fewer steps"
    if a_lo > f_hi:
        return "more steps"
    return "equal within intervals"


def verdicts(front: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    """Per target: every arm's steps and seconds to it, the best fixed arm, each adaptive arm's verdict."""
    best, levels = targets(front)
    rows = []
    for target in levels:
        arms = {arm: arm_at_target(front, timings, arm, target) for arm in front["arms"]}
        fixed = [a for a, e in front["arms"].items() if not e["adaptive"] and "steps" in arms[a]]
        fastest = min(fixed, key=lambda a: arms[a]["steps"][0]) if fixed else None
        reference = arms[fastest] if fastest else {}
        rows.append({"target": target, "arms": arms, "fastest_fixed": fastest,
                     "verdicts": {a: compare(arms[a], reference) for a, e in front["arms"].items() if e["adaptive"]}})
    return {"best_fixed": best, "rows": rows}


def overall(rows: list[dict[str, Any]], arm: str) -> str:
    said = [r["verdicts"][arm] for r in rows if r["fastest_fixed"] is not None]
    if said and all(v == "fewer steps" for v in said):
        return "dominates the fixed front (fewer steps at every target)"
    if said and all(v.startswith("more steps") for v in said):
        return "loses to the fixed front (more steps at every target)"
    if said and all(v == "equal within intervals" for v in said):
        return "no difference: equal to the best fixed batch within the intervals at every target"
    return "is mixed across the targets"


def ratio(row: dict[str, Any], arm: str, what: str) -> float:
    """An arm's mean steps (or seconds) to the row's target over the fastest fixed arm's."""
    return row["arms"][arm][what][0] / row["arms"][row["fastest_fixed"]][what][0]


def _fmt(value: tuple[float, float, float] | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    mean, lo, hi = value
    return f"{mean:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]" if math.isfinite(lo) else f"{mean:.{digits}f}"


def section(front: dict[str, Any], timings: dict[str, Any], out: Path) -> str:
    """The Markdown section (and its plot) for one task's front."""
    higher = front["metric"] == "accuracy"
    scale, unit = (100.0, " %") if higher else (1.0, "")
    result = verdicts(front, timings)
    plot = plot_front(front, out / f"{front['task']}_front.png")
    cfg = front["config"]
    lines = [f"# {front['title']}", "",
             f"Every arm trains on {cfg['budget']:,} samples (micro-batches of {cfg['increment']}), evaluated every "
             f"{cfg['eval_every']:,}; tuning (Optuna, scrambled Sobol points; {cfg['front_trials']} trials per adaptive "
             f"arm with two objectives, validation {front['metric']} and optimizer steps; half as many, lr only, per "
             f"fixed arm) reads only the validation split. The fixed arms' best settings and the adaptive arms' Pareto "
             f"points at the fixed arms' step counts (nearest lower) are retrained over {cfg['seeds']} seeds and "
             f"measured on the test split. Intervals are 95 % t-intervals over seeds.", "",
             f"| arm | point | optimizer steps | test {front['metric']} | tuned |", "|---|---|---|---|---|"]
    for arm, entry in front["arms"].items():
        for k, point in enumerate(entry["points"]):
            steps = interval([r["steps"] for r in point["runs"]])
            quality = interval([scale * r["test_accuracy"] for r in point["runs"]])
            tuned = ", ".join(f"{n} {v:.3g}" for n, v in point["params"].items())
            lines.append(f"| {label(arm, front['config'])} | {k + 1} | {_fmt(steps)} | {_fmt(quality, 2)}{unit} | {tuned} |")
    lines += about_lines(front)
    lines += ["", f"Targets: the best fixed arm ({label(result['best_fixed'], front['config'])}) {'less' if higher else 'plus'} "
              f"margins of at least {MIN_STANDARD_ERRORS}, 4 and 5.5 of its standard errors. Steps and training seconds to each "
              "target, and the training samples it took (for the LM, times its context: tokens) (the arm's best point; '-' "
              "where not every seed reached it):", ""]
    arms = list(front["arms"])
    lines += ["| target | " + " | ".join(label(a, front['config']) for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for row in result["rows"]:
        cells = []
        for a in arms:
            r = row["arms"][a]
            cells.append(f"{_fmt(r['steps'])} steps, {_fmt(r['seconds'], 1)} s, {_fmt(r['samples'])} samples"
                         if "steps" in r else
                         f"- ({r['reached']}/{r['seeds']} seeds)")
        lines.append(f"| {scale * row['target']:.{2 if higher else 3}f}{unit} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""]
    adaptive = [a for a, e in front["arms"].items() if e["adaptive"]]
    for a in adaptive:
        per_target = "; ".join(f"{scale * row['target']:.{2 if higher else 3}f}{unit}: {row['verdicts'][a]}"
                               + (f" ({ratio(row, a, 'steps'):.2f}x the steps and {ratio(row, a, 'seconds'):.2f}x the "
                                  f"training seconds of {label(row['fastest_fixed'], front['config'])})"
                                  if "steps" in row["arms"][a] and row["fastest_fixed"] else "")
                               for row in result["rows"])
        lines.append(f"- **{label(a, front['config'])}** {overall(result['rows'], a)}. {per_target}.")
    if not any(all(row["verdicts"][a] == "fewer steps" for row in result["rows"] if row["fastest_fixed"])
               for a in adaptive):
        lines += ["", "No adaptive or planned arm beats the best fixed batch at every target on this task."]
    lines += ["", f"![steps vs {front['metric']}]({plot.name})", ""]
    return "\n".join(lines)


def noise_scale_quarters(front: dict[str, Any]) -> tuple[list[float], float] | None:
    """The noise-scale planner's measured ``B_simple`` (samples): the median of each quarter of
    training over its final runs, and the share of windows inside the arms' batch range."""
    entry = front["arms"].get("noise")
    if not entry or not entry["points"]:
        return None
    cfg = front["config"]
    quarters: list[list[float]] = [[], [], [], []]
    inside = total = 0
    for point in entry["points"]:
        for run in point["runs"]:
            values = [v for v in run["statistic"] if v is not None and math.isfinite(v)]
            for k, v in enumerate(values):
                quarters[min(3, 4 * k // max(1, len(values)))].append(v)
                inside += cfg["increment"] <= v <= cfg["max_samples"]
                total += 1
    if not total or not all(quarters):
        return None
    return [statistics.median(q) for q in quarters], inside / total


def about_lines(front: dict[str, Any]) -> list[str]:
    """The data, the model and the measured noise scale, as the report states them."""
    lines = []
    corpus = front.get("about", {}).get("corpus")
    if corpus:
        lines += ["", f"Corpus: Python {corpus['python']}'s standard library ({corpus['root']}), read as bytes, split "
                  "by file: " + "; ".join(f"{name} {corpus[name]['bytes']:,} bytes from {len(corpus[name]['files'])} "
                                         f"files ({', '.join(corpus[name]['files'][:4])}"
                                         f"{', ...' if len(corpus[name]['files']) > 4 else ''}), SHA-256 "
                                         f"{corpus[name]['sha256'][:12]}" for name in ("train", "val", "test"))
                  + f". The metric is the next-byte cross-entropy (nats) on {front['about']['eval_sequences']} fixed "
                  "sequences of each held-out split; a sample is one sequence."]
    measured = noise_scale_quarters(front)
    if measured is not None:
        medians, share = measured
        cfg = front["config"]
        lines += ["", "Measured gradient noise scale B_simple (the noise-scale planner's final runs, in samples): "
                  "median per quarter of training " + ", ".join(f"{m:.0f}" for m in medians)
                  + f"; {100 * share:.0f} % of windows within the arms' batch range {cfg['increment']}-"
                  f"{cfg['max_samples']}."]
    return lines


def plot_front(front: dict[str, Any], path: Path) -> Path:
    """Optimizer steps against the test metric: every point of every arm with its seed intervals."""
    scale = 100.0 if front["metric"] == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fixed_x, fixed_y = [], []
    for arm, entry in front["arms"].items():
        xs, ys, xerr, yerr = [], [], [], []
        for point in entry["points"]:
            steps = interval([r["steps"] for r in point["runs"]])
            quality = interval([scale * r["test_accuracy"] for r in point["runs"]])
            xs.append(steps[0])
            ys.append(quality[0])
            xerr.append(0.0 if math.isnan(steps[1]) else steps[0] - steps[1])
            yerr.append(0.0 if math.isnan(quality[1]) else quality[0] - quality[1])
        marker = "s" if not entry["adaptive"] else "o"
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=marker + ("-" if entry["adaptive"] else ""), capsize=3,
                    label=label(arm, front['config']), ms=5)
        if not entry["adaptive"]:
            fixed_x += xs
            fixed_y += ys
    order = sorted(range(len(fixed_x)), key=lambda i: fixed_x[i])
    ax.plot([fixed_x[i] for i in order], [fixed_y[i] for i in order], "k--", lw=0.8, label="fixed front")
    ax.set(xscale="log", xlabel="optimizer steps", ylabel=f"test {front['metric']}" + (" (%)" if scale == 100 else ""),
           title=f"{front['task']}: steps vs quality (95 % intervals over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
