"""results.json -> runs.csv, report.md and PNG plots. `gradaccum report` reruns just this."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats as scipy_stats  # noqa: E402

from .arms import ARM_TABLE, label, style  # noqa: E402
from .errors import SettingsError  # noqa: E402
from .files import atomic_file, write_atomic  # noqa: E402
from .front_report import section as front_section  # noqa: E402

BACKEND_NAMES = {"torch": "PyTorch", "jax": "JAX/Flax"}
REFERENCE = {  # docs/design.md, "Reference experiment"
    "baseline": {"lr": 0.00589, "test_accuracy": 0.6630},
    "gaga": {"lr": 0.00307, "tau": 0.0984, "test_accuracy": 0.6620},
}
STABILITY_LAST = 10


def effective_batches(run: dict[str, Any]) -> list[int]:
    """The windows the rule closed, or the one flushed window of a run too short to close any
    (0 for a run that diverged before its first step)."""
    return run["batch_sizes"] or [run["flushed_items"]]


def summarize(results: dict[str, Any], timings: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per arm: test accuracy mean, std and 95 % t-interval; stability; effective batch."""
    out = {}
    for arm, entry in results["arms"].items():
        runs = entry["runs"]
        tests = [r["test_accuracy"] for r in runs]
        mean = statistics.fmean(tests)
        std = statistics.stdev(tests) if len(tests) > 1 else 0.0
        half = scipy_stats.t.ppf(0.975, len(tests) - 1) * std / math.sqrt(len(tests)) if len(tests) > 1 else math.nan
        stability = [statistics.pstdev([a for _, a in r["val_curve"][-STABILITY_LAST:]]) for r in runs
                     if len(r["val_curve"]) >= 2]
        batches = [b for r in runs for b in effective_batches(r)]
        out[arm] = {
            "test_mean": mean, "test_std": std, "ci95": (mean - half, mean + half),
            "stability": statistics.fmean(stability) if stability else math.nan,
            "mean_batch": statistics.fmean(batches), "median_batch": statistics.median(batches),
            "min_batch": min(batches), "max_batch": max(batches),
            "steps": statistics.fmean([r["steps"] for r in runs]),
            "wall": statistics.fmean(timings[arm]) if timings.get(arm) else math.nan,
            "params": entry["best_params"], "warnings": sorted({w for r in runs for w in r["warnings"]}),
            "diverged": sum(bool(r.get("diverged")) for r in runs), "runs": len(runs),
        }
    return out


def write_runs_csv(results: dict[str, Any], timings: dict[str, list[float]], path: Path) -> None:
    rows = []
    for arm, entry in results["arms"].items():
        for k, r in enumerate(entry["runs"]):
            b = sorted(effective_batches(r))
            rows.append({"arm": arm, "seed": r["seed"], "test_accuracy": r["test_accuracy"],
                         "final_val_accuracy": r["final_val_accuracy"], "optimizer_steps": r["steps"],
                         "mean_batch": statistics.fmean(b), "p10_batch": b[len(b) // 10],
                         "median_batch": b[len(b) // 2], "p90_batch": b[(9 * len(b)) // 10],
                         "wall_seconds": timings.get(arm, [math.nan] * (k + 1))[k]})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def verdict(summary: dict[str, dict[str, Any]], cfg: dict[str, Any]) -> str:
    if "baseline" not in summary:
        return "No baseline arm was run, so there is nothing to compare against."
    base = summary["baseline"]
    lines = []
    for arm, s in summary.items():
        if arm == "baseline":
            continue
        overlap = s["ci95"][0] <= base["ci95"][1] and base["ci95"][0] <= s["ci95"][1]
        accuracy = ("matches the baseline's test accuracy (95 % intervals overlap)" if overlap else
                    "is " + ("better" if s["test_mean"] > base["test_mean"] else "worse") +
                    " than the baseline (95 % intervals do not overlap)")
        steadier = s["stability"] < base["stability"]
        adapting = s["min_batch"] != s["max_batch"]
        lines.append(f"- **{label(arm, cfg)}** {accuracy}; its late validation curve is "
                     f"{'steadier' if steadier else 'not steadier'} (std of the last {STABILITY_LAST} evaluations "
                     f"{s['stability']:.4f} vs {base['stability']:.4f}); its effective batch "
                     + (f"adapted between {s['min_batch']} and {s['max_batch']} (mean {s['mean_batch']:.0f})."
                        if adapting else f"was always {s['min_batch']}: it did not adapt."))
    return "\n".join(lines)


FRONT_TASKS = ("mnist1d", "lm")  # the front sections, in the report's order
CRITICAL_TASKS = ("mnist1d", "lm")  # critical_batch_<task>.json, in the report's order


def critical_section(out: Path) -> str | None:
    """The critical-batch section from ``critical_batch_<task>.json`` (None if there is none):
    the module's own Markdown when it offers one, else a table of its checkpoints."""
    found = [t for t in CRITICAL_TASKS if (out / f"critical_batch_{t}.json").exists()]
    if not found:
        return None
    module: ModuleType | None = None
    try:
        from . import critical_batch_section

        module = critical_batch_section
    except ImportError:
        pass
    lines = ["# The critical batch size, measured by branching, beside the online noise scale", ""]
    for task in found:
        path = out / f"critical_batch_{task}.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SettingsError(f"out: cannot read {path}: {error}") from None
        own = getattr(module, "markdown", None)
        if callable(own):
            lines += [own(results), ""]
            continue
        lines += _critical_table(task, results)
    return "\n".join(lines)


def _critical_table(task: str, results: dict[str, Any]) -> list[str]:
    """Per checkpoint: the fitted B_noise and critical batch beside the online B_simple."""
    def number(value: Any) -> str:
        return f"{value:.0f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"

    lines = [f"## {task}", "", "| checkpoint step | training samples | B_noise (fit) [interval] | Zhang et al. "
             "critical batch | online B_simple (per-sample, micro-batch) | Adam's noise scale |",
             "|---|---|---|---|---|---|"]
    for c in results.get("checkpoints", []):
        online = c.get("online") or {}
        sources = ", ".join(number((online.get(k) or {}).get("b_simple")) for k in ("per_sample", "micro_batch"))
        adam = number((online.get("adam") or {}).get("b_simple"))
        if "refused" in c:
            lines.append(f"| {c.get('step')} | {number(c.get('run_samples'))} | refused: {c['refused']} | - | "
                         f"{sources} | {adam} |")
            continue
        band = c.get("b_noise_interval")
        fit = number(c.get("b_noise")) + (f" [{number(band[0])}-{number(band[1])}]" if band else "")
        lines.append(f"| {c.get('step')} | {number(c.get('run_samples'))} | {fit} | {number(c.get('b_zhang'))} | "
                     f"{sources} | {adam} |")
    lines += ["", f"![critical batch, {task}](critical_batch_{task}.png)", ""]
    return lines


def sections_table(out: Path) -> list[str]:
    """Each section's stated budget and measured seconds (``sections.json``), and whether it was reused."""
    try:
        status = json.loads((out / "sections.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(status, dict) or not status:
        return []
    lines = ["# Sections: budgets and times", "",
             "| section | budget (s) | measured (s) | workers | this call |", "|---|---|---|---|---|"]
    for name, entry in status.items():
        if not isinstance(entry, dict):
            continue
        seconds = entry.get("seconds")
        lines.append(f"| {name} | {entry.get('budget_seconds', '-')} | "
                     f"{seconds:.0f} | {entry.get('workers', '-')} | "
                     f"{'reused (finished earlier)' if entry.get('reused') else 'computed'} |"
                     if isinstance(seconds, (int, float)) else f"| {name} | - | - | - | - |")
    entries = [e for e in status.values() if isinstance(e, dict)]
    numbers = [(e["budget_seconds"], e["seconds"]) for e in entries if not e.get("reused")
               and isinstance(e.get("budget_seconds"), (int, float)) and isinstance(e.get("seconds"), (int, float))]
    if len(numbers) == len(status) > 1:
        lines.append(f"| all | {sum(b for b, _ in numbers):.0f} | {sum(t for _, t in numbers):.0f} | | computed |")
    return lines + [""]


def write_full_report(out: Path) -> list[str]:
    """report.md from what ``out`` holds: the reference section (results.json) first, then each
    front section (``<task>_results.json``); returns the sections written."""
    parts, written = [], []
    if (out / "results.json").exists():
        parts.append(reference_section(load_results(out), out))
        written.append("reference")
    for task in FRONT_TASKS:
        path = out / f"{task}_results.json"
        if path.exists():
            try:
                front = json.loads(path.read_text())
                timings = json.loads((out / f"{task}_timings.json").read_text())
            except (OSError, ValueError) as error:
                raise SettingsError(f"out: cannot read {path} or its timings: {error}") from None
            parts.append(front_section(front, timings, out))
            written.append(task)
    critical = critical_section(out)
    if critical is not None:
        parts.append(critical)
        written.append("critical")
    if not parts:
        fronts = ", ".join(t + "_results.json" for t in FRONT_TASKS)
        raise SettingsError(f"out: no readable results.json (nor {fronts}) "
                            f"in {out}: run `gradaccum reproduce` first")
    write_atomic(out / "report.md", "\n".join(parts + sections_table(out)))
    return written


def write_report(results: dict[str, Any], out: Path) -> None:
    """Write runs.csv, report.md (the reference section alone) and the plots from ``results``."""
    write_atomic(out / "report.md", reference_section(results, out))


def reference_section(results: dict[str, Any], out: Path) -> str:
    """Write runs.csv and the plots from ``results`` (and timings.json, if there); the section's text."""
    try:
        timings = json.loads((out / "timings.json").read_text())["wall_seconds"]
    except (OSError, ValueError, KeyError):
        timings = {}
    summary = summarize(results, timings)
    write_runs_csv(results, timings, out / "runs.csv")
    plots = write_plots(results, out)
    cfg = results["config"]
    lines = [
        "# gradaccum reproduce: GAGA vs fixed-batch Adam on mnist1d", "",
        f"MLP 40-256-256-10 ({BACKEND_NAMES[cfg.get('backend', 'torch')]}), Adam, {cfg['budget']:,} training "
        f"samples per run, validation every "
        f"{cfg['eval_every']:,} samples; Optuna TPE, {cfg['trials']} trials per arm (objective: final validation "
        f"accuracy); the best settings trained over {cfg['seeds']} seeds and evaluated on the 1000 test samples.", "",
        "| arm | test accuracy (mean ± std) | 95 % CI | tuned | stability (std of last "
        f"{STABILITY_LAST} val. acc.) | effective batch mean (min-max) | optimizer steps | wall s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        tuned = ", ".join(f"{k} {v:.4g}" for k, v in s["params"].items())
        lines.append(f"| {label(arm, results['config'])} | {100 * s['test_mean']:.2f} ± {100 * s['test_std']:.2f} % | "
                     f"{100 * s['ci95'][0]:.2f} – {100 * s['ci95'][1]:.2f} % | {tuned} | {s['stability']:.4f} | "
                     f"{s['mean_batch']:.0f} ({s['min_batch']}-{s['max_batch']}) | {s['steps']:.0f} | "
                     f"{s['wall']:.1f} |")
    lines += ["", "Reference values (docs/design.md, 'Reference experiment'; one run each):", "",
              "| arm | lr | tau | test accuracy |", "|---|---|---|---|"]
    for arm, ref in REFERENCE.items():
        lines.append(f"| {label(arm, results['config'])} | {ref['lr']} | {ref.get('tau', '-')} | "
                     f"{100 * ref['test_accuracy']:.2f} % |")
    lines += ["", "## Verdict", "", verdict(summary, cfg), ""]
    diverged = {arm: s for arm, s in summary.items() if s["diverged"]}
    if diverged:
        lines += ["## Diverged runs", ""]
        lines += [f"- {label(arm, results['config'])}: {s['diverged']} of {s['runs']} final runs diverged "
                  "(a non-finite loss or gradient); their accuracies, counted above, are those of the weights "
                  "when it happened"
                  for arm, s in diverged.items()]
        lines.append("")
    warned = {arm: s["warnings"] for arm, s in summary.items() if s["warnings"]}
    if warned:
        lines += ["## Warnings during the final runs", ""]
        lines += [f"- {label(arm, results['config'])}: {w}" for arm, ws in warned.items() for w in ws]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, entry in results["arms"].items():
        curves = [r["val_curve"] for r in entry["runs"]]
        length = min(len(c) for c in curves)
        xs = [c[0] for c in curves[0][:length]]
        ys = [[c[i][1] for c in curves] for i in range(length)]
        mean = [statistics.fmean(v) for v in ys]
        std = [statistics.pstdev(v) for v in ys]
        colour, marker, line = style(arm)
        ax.plot(xs, mean, color=colour, marker=marker, ls=line, ms=3, alpha=0.85, label=label(arm, results['config']))
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour,
                        alpha=0.15)
    ax.set(xlabel="training samples seen", ylabel="validation accuracy",
           title="Validation accuracy (mean ± std over seeds)")
    ax.legend()
    paths.append(_save(fig, out / "val_accuracy.png"))

    adaptive = [a for a in results["arms"] if a in ARM_TABLE and ARM_TABLE[a].adaptive]
    if adaptive:
        fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for arm in adaptive:
            run = results["arms"][arm]["runs"][0]
            colour, marker, line = style(arm)
            axes[0].plot(run["batch_sizes"], color=colour, ls=line, marker=marker, markevery=max(1, len(
                run["batch_sizes"]) // 12), ms=4, label=label(arm, results['config']), lw=0.9, alpha=0.7)
            stat = [math.nan if v is None else v for v in run["statistic"]]
            axes[1].plot(stat, color=colour, ls=line, marker=marker, markevery=max(1, len(stat) // 12), ms=4,
                         label=label(arm, results['config']), lw=0.9, alpha=0.7)
        axes[0].set(ylabel="effective batch (samples)", title="Adaptive arms, first seed")
        axes[1].set(xlabel="optimizer step", ylabel="rule statistic at the stop", yscale="log")
        axes[0].legend()
        paths.append(_save(fig, out / "effective_batch_and_statistic.png"))

    arms = list(results["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        values = [t["value"] for t in results["arms"][arm]["trials"]]
        best = [max(values[:i + 1]) for i in range(len(values))]
        colour, marker, _ = style(arm)
        ax.plot(values, marker, color=colour, ms=3, alpha=0.6, ls="none", label="trial")
        ax.plot(best, "-", color=colour, label="best so far")
        ax.set(title=label(arm, results['config']), xlabel="trial", ylabel="final val. accuracy")
    axes[0][0].legend()
    paths.append(_save(fig, out / "optuna_history.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def load_results(out: Path) -> dict[str, Any]:
    """``results.json`` of ``out``, checked: a structurally bad file raises SettingsError
    naming what is wrong (it used to give raw KeyError / TypeError)."""
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SettingsError(f"out: no readable results.json in {out}: {error}") from None
    check_results(results, path)
    return results


_RUN_FIELDS = {"seed": int, "test_accuracy": float, "final_val_accuracy": float, "val_curve": list, "steps": int,
               "batch_sizes": list, "flushed_items": int, "statistic": list, "warnings": list}


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_results(results: Any, path: Path) -> None:
    """Refuse a results file whose structure or values cannot be right (an accuracy of 7.5, a
    negative step count), naming the file and the key."""
    def bad(what: str) -> SettingsError:
        return SettingsError(f"{path}: {what}; rerun `gradaccum reproduce` to rebuild it")

    if not isinstance(results, dict) or not isinstance(results.get("config"), dict) \
            or not isinstance(results.get("arms"), dict) or not results["arms"]:
        raise bad("expected an object with 'config' and a non-empty 'arms'")
    for key in ("budget", "eval_every", "trials", "seeds"):
        if not isinstance(results["config"].get(key), int):
            raise bad(f"config.{key} must be an integer")
    for arm, entry in results["arms"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("best_params"), dict) \
                or not isinstance(entry.get("trials"), list) or not isinstance(entry.get("runs"), list) \
                or not entry["runs"]:
            raise bad(f"arm {arm!r} must hold best_params, trials and a non-empty runs list")
        for k, run in enumerate(entry["runs"]):
            for name, kind in _RUN_FIELDS.items():
                value = run.get(name) if isinstance(run, dict) else None
                ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
                non_finite = isinstance(value, (int, float)) and not math.isfinite(value)
                if not ok or (kind is float and non_finite):
                    raise bad(f"arms.{arm}.runs[{k}].{name} must be a finite {kind.__name__}, got {value!r}")
            where = f"arms.{arm}.runs[{k}]"
            for name in ("test_accuracy", "final_val_accuracy"):
                if not 0 <= run[name] <= 1:
                    raise bad(f"{where}.{name} must be an accuracy between 0 and 1, got {run[name]!r}")
            for name in ("steps", "flushed_items"):
                if run[name] < 0:
                    raise bad(f"{where}.{name} must be >= 0, got {run[name]!r}")
            if not all(_count(b) and b > 0 for b in run["batch_sizes"]):
                raise bad(f"{where}.batch_sizes must hold positive integers")
            if not all(isinstance(p, list) and len(p) == 2 and _count(p[0]) and _number(p[1]) and 0 <= p[1] <= 1
                       for p in run["val_curve"]):
                raise bad(f"{where}.val_curve must hold [samples, accuracy] pairs, accuracies between 0 and 1")
            if not run["batch_sizes"] and not run["flushed_items"] and not run.get("diverged"):
                raise bad(f"arms.{arm}.runs[{k}] has no window (batch_sizes and flushed_items are empty)")
