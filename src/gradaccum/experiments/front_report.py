"""The steps-quality front's report section: quality levels, steps to each, paired ratios, plots.

Every choice reads the validation split of the final runs (retrained on seeds no tuning trial
used, the same seeds for every arm); the test split is read once per run, after training, for
the final-quality column only:

- A run's final quality is the mean of its last ``FINAL_EVALUATIONS`` validation evaluations.
  The best fixed arm has the best mean final quality over seeds; the targets sit below
  (accuracy) or above (loss) that mean by margins, the k-th raised to at least 2.5 + 1.5 k of
  its standard errors. Lower quality levels, fractions of the way from the untrained model to
  the best fixed arm, show the rest of the front.
- A run reaches a level at the first evaluation from which the mean of ``WINDOW`` consecutive
  validation evaluations reaches it (one lucky evaluation cannot); its steps, samples and
  training seconds are read at that evaluation.
- One rule for every arm, fixed or adaptive: a point that misses a level in any seed does not
  reach it. The fixed front at a level is the fixed arm with the fewest mean steps among those
  that reach it; an adaptive arm's value is its point with the fewest mean steps among those
  that reach it (both chosen on the same runs, so both sides get the same benefit of a choice).
- Comparisons are paired: per seed, the adaptive arm's steps over the fixed front's; the
  geometric mean of the ratios with the 95 % t-interval of the mean log-ratio over seeds.
  "fewer steps" where the interval lies below 1, "more steps" above, "no difference" where it
  contains 1.
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

from .arms import label, style  # noqa: E402
from .errors import SettingsError  # noqa: E402
from .files import atomic_file  # noqa: E402
from .front import FINAL_EVALUATIONS  # noqa: E402
from .lm_regime import regime_section  # noqa: E402

MARGINS = {"accuracy": (0.005, 0.01, 0.02), "loss": (0.01, 0.02, 0.05)}  # below / above the best fixed arm
MIN_STANDARD_ERRORS = 2.5
WINDOW = 3  # validation evaluations whose mean must reach a level
LEVEL_FRACTIONS = (0.5, 0.75, 0.9)  # lower levels: of the way from the untrained metric to the best fixed arm's


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


def final_val(run: dict[str, Any]) -> float:
    """A run's final quality: the mean of its last FINAL_EVALUATIONS validation evaluations."""
    values = [e["val"] for e in run["evaluations"][-FINAL_EVALUATIONS:]]
    return statistics.fmean(values) if values else run["final_val_accuracy"]


def first_reaching(evaluations: Sequence[dict[str, Any]], target: float, higher: bool, window: int = WINDOW
                   ) -> int | None:
    """The index of the first evaluation, after at least one optimizer step, from which the mean
    of ``window`` consecutive validation evaluations reaches ``target``; None if no full window does."""
    values = [float(e["val"]) for e in evaluations]
    for k in range(len(values) - window + 1):
        if evaluations[k]["steps"] >= 1 and reached(statistics.fmean(values[k:k + window]), target, higher):
            return k
    return None


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float, float]:
    """The geometric mean of the per-seed ratios and the exponentiated 95 % t-interval of the
    mean log-ratio (NaN bounds for one seed)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("paired_ratio needs as many denominators as numerators, at least one")
    mean, lo, hi = interval([math.log(a / b) for a, b in zip(numerators, denominators)])
    return math.exp(mean), math.exp(lo), math.exp(hi)


def verdict(ratio: tuple[float, float, float] | None) -> str:
    """'fewer steps', 'more steps' or 'no difference' from a paired ratio's interval."""
    if ratio is None:
        return "not reached"
    _, lo, hi = ratio
    if math.isnan(lo):
        return "no interval (one seed)"
    if hi < 1:
        return "fewer steps"
    if lo > 1:
        return "more steps"
    return "no difference"


def targets(front: dict[str, Any]) -> tuple[str, list[float]]:
    """The best fixed arm (best mean final validation quality over seeds) and the targets below
    (accuracy) or above (loss) that mean."""
    higher = front["metric"] == "accuracy"
    fixed = {arm: [final_val(r) for r in e["points"][0]["runs"]]
             for arm, e in front["arms"].items() if not e["adaptive"] and e["points"] and e["points"][0]["runs"]}
    if not fixed:
        raise SettingsError(f"{front.get('task', 'front')}_results.json: no fixed-batch arm has a retrained point "
                            "with runs, so there is no target to measure the arms against; rerun `gradaccum reproduce "
                            f"--sections {'lm' if front.get('task') == 'lm' else 'front'} --force` to rebuild it")
    best = (max if higher else min)(fixed, key=lambda a: (statistics.fmean(fixed[a]), a))
    mean, se = statistics.fmean(fixed[best]), standard_error(fixed[best])
    sign = -1.0 if higher else 1.0
    margins = [max(m, (MIN_STANDARD_ERRORS + 1.5 * k) * se) for k, m in enumerate(MARGINS[front["metric"]])]
    return best, [mean + sign * m for m in margins]


def levels(front: dict[str, Any]) -> tuple[str, list[float], int]:
    """The best fixed arm, every quality level (lower levels first, then the targets), and how
    many of them are targets."""
    best, tops = targets(front)
    top = statistics.fmean(final_val(r) for r in front["arms"][best]["points"][0]["runs"])
    lower = [front["start"] + f * (top - front["start"]) for f in LEVEL_FRACTIONS]
    higher = front["metric"] == "accuracy"
    below_targets = [v for v in lower if (v < tops[-1] if higher else v > tops[-1])]
    return best, below_targets + tops[::-1], len(tops)


def point_at(point: dict[str, Any], seconds: list[dict[str, Any]] | None, target: float, higher: bool
             ) -> dict[str, Any]:
    """Per seed, the steps, samples and training seconds at which one point reaches ``target``."""
    seeds: dict[int, tuple[float, float, float] | None] = {}
    for k, run in enumerate(point["runs"]):
        hit = first_reaching(run["evaluations"], target, higher)
        if hit is None:
            seeds[run["seed"]] = None
            continue
        e = run["evaluations"][hit]
        s = float(seconds[k]["evaluation_seconds"][hit]) if seconds else math.nan
        seeds[run["seed"]] = (float(e["steps"]), float(e["samples"]), s)
    return {"seeds": seeds, "reached": sum(v is not None for v in seeds.values()), "runs": len(seeds),
            "all": all(v is not None for v in seeds.values())}


def best_point(front: dict[str, Any], timings: dict[str, Any], arm: str, target: float) -> dict[str, Any] | None:
    """The arm's point with the fewest mean steps among those reaching ``target`` in every seed
    (None if none does); with its index and per-seed values."""
    higher, entry = front["metric"] == "accuracy", front["arms"][arm]
    times = timings.get(arm) or [None] * len(entry["points"])
    rows = [dict(point_at(p, times[k], target, higher), point=k) for k, p in enumerate(entry["points"])]
    full = [r for r in rows if r["all"] and r["runs"]]
    if not full:
        return None
    return min(full, key=lambda r: (statistics.fmean(v[0] for v in r["seeds"].values()), r["point"]))


def most_reached(front: dict[str, Any], timings: dict[str, Any], arm: str, target: float) -> tuple[int, int]:
    """The most seeds any point of the arm reached ``target`` in, and its seeds."""
    higher = front["metric"] == "accuracy"
    rows = [point_at(p, None, target, higher) for p in front["arms"][arm]["points"]]
    return max(((r["reached"], r["runs"]) for r in rows), default=(0, 0))


def choices(front: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    """Every choice the section makes, from the validation split only: the best fixed arm, the
    levels, and per level the fixed front's arm and each arm's point (None: not reached), with
    the per-seed values and the paired ratios of steps and of samples."""
    best, values, tops = levels(front)
    rows: list[dict[str, Any]] = []
    for target in values:
        arms = {arm: best_point(front, timings, arm, target) for arm in front["arms"]}
        reached = {a: point for a, point in arms.items() if point is not None}
        fixed = [a for a, e in front["arms"].items() if not e["adaptive"] and a in reached]
        reference = min(fixed, key=lambda a: (mean_of(reached[a], 0), a)) if fixed else None
        ratios: dict[str, Any] = {}
        for a, e in front["arms"].items():
            point = reached.get(a)
            if not e["adaptive"] or point is None or reference is None:
                ratios[a] = None
                continue
            ref = reached[reference]["seeds"]
            seeds = sorted(set(point["seeds"]) & set(ref))
            if not seeds:
                raise SettingsError(f"{front.get('task', 'front')}_results.json: the arms {a} and {reference} share "
                                    "no seed, so there is no paired comparison; rerun with --force")
            ratios[a] = {what: paired_ratio([point["seeds"][s][i] for s in seeds], [ref[s][i] for s in seeds])
                         for i, what in enumerate(("steps", "samples"))}
        rows.append({"level": target, "target": len(rows) >= len(values) - tops, "arms": arms,
                     "reference": reference, "ratios": ratios})
    return {"best_fixed": best, "rows": rows}


def mean_of(row: dict[str, Any], i: int) -> float:
    return statistics.fmean(v[i] for v in row["seeds"].values())


def interval_of(row: dict[str, Any], i: int) -> tuple[float, float, float]:
    return interval([v[i] for v in row["seeds"].values()])


def overall(rows: list[dict[str, Any]], arm: str) -> str:
    said = [verdict(r["ratios"][arm]["steps"] if r["ratios"][arm] else None) for r in rows if r["reference"]]
    if not said:
        return "has no fixed front to compare with"
    if all(v == "fewer steps" for v in said):
        return "needs fewer steps than the fixed front at every level"
    if all(v in ("more steps", "not reached") for v in said):
        return "needs more steps than the fixed front (or misses) at every level"
    if all(v == "no difference" for v in said):
        return "no difference from the fixed front at any level"
    counts = {v: said.count(v) for v in ("fewer steps", "no difference", "more steps", "not reached") if v in said}
    return "is mixed across the levels (" + ", ".join(f"{n} {v}" for v, n in counts.items()) + ")"


def _fmt(value: tuple[float, float, float] | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    mean, lo, hi = value
    return f"{mean:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]" if math.isfinite(lo) else f"{mean:.{digits}f}"


def _ratio(value: tuple[float, float, float]) -> str:
    mean, lo, hi = value
    return f"{mean:.2f}x [{lo:.2f}-{hi:.2f}]" if math.isfinite(lo) else f"{mean:.2f}x"


def edge_lrs(front: dict[str, Any]) -> list[str]:
    """The fixed arms whose best tuning lr is the smallest or largest lr their trials tried."""
    higher = front["metric"] == "accuracy"
    edges = []
    for arm, entry in front["arms"].items():
        trials = entry.get("trials") or []
        if entry["adaptive"] or len(trials) < 3:
            continue
        best = (max if higher else min)(trials, key=lambda t: t["values"][0])["params"]["lr"]
        tried = [t["params"]["lr"] for t in trials]
        if best in (min(tried), max(tried)):
            edges.append(arm)
    return edges


def cost_line(cfg: dict[str, Any]) -> str:
    """What the equal budgets and the seeds cost the intervals, in the report's words."""
    seeds = cfg["seeds"]
    t = scipy_stats.t.ppf(0.975, seeds - 1) if seeds > 1 else math.nan
    return ("What the intervals cost: an adaptive arm searches its own parameter within the same "
            f"{cfg['front_trials']} trials a fixed arm spends on its lr alone, so its settings are tuned more "
            f"coarsely; with {seeds} seeds a paired interval reaches {t:.2f} standard errors of the mean log-ratio "
            "on each side, so a ratio near 1 reads 'no difference' unless the seeds agree closely.")


def section(front: dict[str, Any], timings: dict[str, Any], out: Path) -> str:
    """The Markdown section (and its plot) for one task's front."""
    higher = front["metric"] == "accuracy"
    scale, unit = (100.0, " %") if higher else (1.0, "")
    digits = 2 if higher else 3
    result = choices(front, timings)
    plot = plot_front(front, result, out / f"{front['task']}_front.png")
    cfg = front["config"]
    context = (front.get("about") or {}).get("model", {}).get("context")
    per = "sequences (tokens: x " + str(context) + ")" if context else "samples"
    lines = [f"# {front['title']}", "",
             f"Every arm trains on {cfg['budget']:,} {'sequences' if context else 'samples'} (micro-batches of "
             f"{cfg['increment']}), validated every {cfg['eval_every']:,}. Tuning gives every arm, fixed or adaptive, "
             f"the same {cfg['front_trials']} trials over the same lr range [{cfg['lr_low']:g}, {cfg['lr_high']:g}] "
             "(Optuna, scrambled Sobol points: a stratified log grid of the lr for a fixed arm; an adaptive arm "
             "searches its own parameter within the same count). Objectives: the mean of the last "
             f"{FINAL_EVALUATIONS} validation evaluations, and for an adaptive arm also the optimizer steps (its "
             "Pareto points at the fixed arms' step counts, nearest lower, at most "
             f"{cfg.get('front_points', 'all')} spread over its front, are retrained). The chosen settings are "
             f"retrained over {cfg['seeds']} seeds, the same seeds for every arm; every choice below (targets, the "
             "fixed front's arm at each level, each adaptive arm's point) reads only those runs' validation "
             "evaluations. The test split is read once per run, after training, for the test column.", ""]
    edges = edge_lrs(front)
    lines += [("Every fixed arm's best lr lies inside the lrs its trials tried." if not edges else
               "The best lr of " + ", ".join(label(a, cfg) for a in edges) + " is at the edge of the lrs tried: "
               "a wider lr range could change its steps."), ""]
    lines += [f"| arm | point | optimizer steps | final validation {front['metric']} | test {front['metric']} "
              "(once, at the end) | tuned |", "|---|---|---|---|---|---|"]
    for arm, entry in front["arms"].items():
        for k, point in enumerate(entry["points"]):
            steps = interval([r["steps"] for r in point["runs"]])
            val = interval([scale * final_val(r) for r in point["runs"]])
            test = interval([scale * r["test_accuracy"] for r in point["runs"]])
            tuned = ", ".join(f"{n} {v:.3g}" for n, v in point["params"].items())
            lines.append(f"| {label(arm, cfg)} | {k + 1} | {_fmt(steps)} | {_fmt(val, digits)}{unit} | "
                         f"{_fmt(test, digits)}{unit} | {tuned} |")
    lines += about_lines(front) + regime_section(out, front["task"])
    best = label(result["best_fixed"], cfg)
    lines += ["", "## The whole front", "",
              f"Levels: the three highest are the targets, the best fixed arm ({best}) {'less' if higher else 'plus'} "
              f"margins of at least {MIN_STANDARD_ERRORS}, 4 and 5.5 of its standard errors; the lower ones are "
              f"{', '.join(f'{f:g}' for f in LEVEL_FRACTIONS)} of the way from the untrained model to it. A run "
              f"reaches a level at the first validation evaluation from which the mean of {WINDOW} consecutive "
              "evaluations reaches it. One rule for fixed and adaptive arms alike: a point that misses a level in "
              "any seed does not reach it; the fixed front is the fixed arm with the fewest mean steps among those "
              "that reach it, an adaptive arm is its point with the fewest mean steps among those that reach it. "
              "Ratios are paired per seed (the arm's steps over the fixed front's on the same seed): geometric "
              "mean and 95 % t-interval of the mean log-ratio; 'no difference' where it contains 1. No tolerance "
              f"on extra samples is imposed (every arm has the same budget); the {per} each needed is shown beside "
              "its steps, with the paired ratio of samples.", "", cost_line(cfg), ""]
    adaptive = [a for a, e in front["arms"].items() if e["adaptive"]]
    lines += ["| level | fixed front: steps, " + ("sequences" if context else "samples") + " | "
              + " | ".join(label(a, cfg) for a in adaptive) + " |", "|---" * (len(adaptive) + 2) + "|"]
    for row in result["rows"]:
        ref = row["reference"]
        cells = [f"{label(ref, cfg)}: {_fmt(interval_of(row['arms'][ref], 0))} steps, "
                 f"{_fmt(interval_of(row['arms'][ref], 1))}" if ref else "no fixed arm reaches it"]
        for a in adaptive:
            here = row["arms"][a]
            if here is None:
                got, of = most_reached(front, timings, a, row["level"])
                cells.append(f"not reached ({got}/{of} seeds)")
                continue
            text = f"point {here['point'] + 1}: {_fmt(interval_of(here, 0))} steps, {_fmt(interval_of(here, 1))}"
            ratio = row["ratios"][a]
            if ratio:
                text += (f"; steps {_ratio(ratio['steps'])}, samples {_ratio(ratio['samples'])}: "
                         f"**{verdict(ratio['steps'])}**")
            cells.append(text)
        name = f"{scale * row['level']:.{digits}f}{unit}" + (" (target)" if row["target"] else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""]
    for a in adaptive:
        lines.append(f"- **{label(a, cfg)}** {overall(result['rows'], a)}.")
    lines += ["", f"![steps to each level and the points]({plot.name})", ""]
    return "\n".join(lines)


def noise_scale_quarters(front: dict[str, Any], arm: str = "noise") -> list[float] | None:
    """The gradient noise scale ``B_simple`` (samples) in each quarter of the budget, over the
    arm's final runs: the ratio of the quarter's mean ``tr(Sigma)`` to its mean ``|G|^2``
    (a median of per-window ratios is biased low); None without measured windows."""
    entry = front["arms"].get(arm)
    if not entry or not entry["points"]:
        return None
    budget = front["config"]["budget"]
    sums = [[0.0, 0.0, 0] for _ in range(4)]
    for point in entry["points"]:
        for run in point["runs"]:
            seen = 0
            for terms in run.get("noise_terms") or []:
                if terms is None:
                    continue
                samples, trace, squared = terms
                quarter = sums[min(3, 4 * seen // budget)]
                quarter[0] += trace
                quarter[1] += squared
                quarter[2] += 1
                seen += samples
    if not all(q[2] for q in sums):
        return None
    return [q[0] / q[1] if q[1] > 0 else math.inf for q in sums]


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
        cfg = front["config"]
        eight = 8 * cfg["increment"]
        above = sum(m >= eight for m in measured)
        lines += ["", "Measured gradient noise scale B_simple (the noise-scale planner's final runs, in samples; per "
                  "quarter of the budget, the ratio of the mean tr(Sigma) to the mean |G|^2 over its windows): "
                  + ", ".join(f"{m:.0f}" for m in measured)
                  + f". It is at or above 8x the smallest batch (8 x {cfg['increment']} = {eight}) in {above} of the "
                  f"4 quarters; the arms' batches span {cfg['increment']}-{cfg['max_samples']}."]
    return lines


def plot_front(front: dict[str, Any], result: dict[str, Any], path: Path) -> Path:
    """Left: optimizer steps to each level, the fixed front and every arm (95 % intervals over
    seeds); right: every retrained point's steps against its test metric. One colour per arm."""
    higher = front["metric"] == "accuracy"
    scale = 100.0 if higher else 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    xs = [scale * row["level"] for row in result["rows"]]
    front_steps = [mean_of(row["arms"][row["reference"]], 0) if row["reference"] else math.nan
                   for row in result["rows"]]
    left.plot(xs, front_steps, "-", color="#888888", lw=8, alpha=0.3, label="fixed front (fewest steps)", zorder=1)
    for k, arm in enumerate(front["arms"]):
        ys, lo, hi = [], [], []
        for row in result["rows"]:
            here = row["arms"][arm]
            mean, a, b = interval_of(here, 0) if here else (math.nan, math.nan, math.nan)
            ys.append(mean)
            lo.append(0.0 if math.isnan(a) else mean - a)
            hi.append(0.0 if math.isnan(b) else b - mean)
        colour, marker, line = style(arm)
        shift = 1 + 0.004 * (k - len(front["arms"]) / 2)  # a nudge so that equal values stay visible
        left.errorbar([x * shift for x in xs], ys, yerr=[lo, hi], color=colour, marker=marker, ls=line, ms=5,
                      capsize=2, lw=1.2, alpha=0.85, label=label(arm, front["config"]), zorder=2)
    left.set(yscale="log", xlabel=f"validation {front['metric']} level" + (" (%)" if higher else ""),
             ylabel="optimizer steps to reach it", title=f"{front['task']}: steps to each level")
    if not higher:
        left.invert_xaxis()
    for arm, entry in front["arms"].items():
        colour, marker, line = style(arm)
        pts = [(interval([r["steps"] for r in p["runs"]]), interval([scale * r["test_accuracy"] for r in p["runs"]]))
               for p in entry["points"]]
        if not pts:
            continue
        right.errorbar([s[0] for s, _ in pts], [q[0] for _, q in pts],
                       xerr=[[0.0 if math.isnan(s[1]) else s[0] - s[1] for s, _ in pts],
                             [0.0 if math.isnan(s[2]) else s[2] - s[0] for s, _ in pts]],
                       yerr=[[0.0 if math.isnan(q[1]) else q[0] - q[1] for _, q in pts],
                             [0.0 if math.isnan(q[2]) else q[2] - q[0] for _, q in pts]],
                       color=colour, marker=marker, ls=line if entry["adaptive"] else "none", ms=6, capsize=2,
                       alpha=0.85, label=label(arm, front["config"]))
    right.set(xscale="log", xlabel="optimizer steps", ylabel=f"test {front['metric']}" + (" (%)" if higher else ""),
              title="retrained points (test, once at the end)")
    left.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path
