"""`gradaccum reproduce`: tune every arm, train the best settings over seeds, write the report."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .arms import ARM_TABLE, FRONT_ARMS, LM_FRONT_ARMS
from .config import ExperimentConfig
from .errors import SettingsError
from .files import write_atomic
from .front import FrontTask, run_front
from .lm_regime import measure_regime, plot_sources, sources_csv
from .lm_task import EVAL_SEQUENCES, load_corpus, shape, train_lm_run
from .mnist1d_data import MNIST1D, load_mnist1d
from .report import write_full_report
from .run_record import RunResult
from .runs import train_run
from .tuning import best_params, best_value, open_study, sampler, storage_errors, too_many_diverged, trial_table
from .workers import Tuning, complete, executor, run_reusing, tune_in_rounds

FINAL_SEED_OFFSET = 10_000  # final runs use seeds no tuning trial used


def prepare_output(cfg: ExperimentConfig) -> tuple[Path, MNIST1D]:
    """Create the output directory (checking it is writable) and load the data."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a probe no other worker can collide with
            pass
    except OSError as error:
        raise SettingsError(f"out: cannot write to output directory {out}: {error}") from None
    write_atomic(out / "config.yaml", cfg.to_yaml())
    return out, load_mnist1d(Path(cfg.data_dir) / "mnist1d.npz")


def tuning_of(arm: str, cfg: ExperimentConfig, data: MNIST1D) -> Tuning:
    """The reference section's study of an arm: final validation accuracy, maximised."""
    spec = ARM_TABLE[arm]
    return Tuning(open_study(arm, cfg), cfg.trials, lambda trial: spec.suggest(trial, cfg),
                  lambda params, number: (arm, params, cfg.seed + number, data, cfg),
                  value=lambda r: r.final_val_accuracy, pruned=lambda r: "diverged" if r.diverged else None,
                  attributes=trial_attributes, sampler=lambda number: sampler(cfg, arm, number),
                  too_many_diverged=lambda count: too_many_diverged(arm, count, cfg))


def trial_attributes(result: RunResult) -> dict[str, Any]:
    """What a trial records beside its value: mean window, steps, test accuracy (never optimised)."""
    batches = result.batch_sizes or [result.flushed_items]
    return {"mean_batch": sum(batches) / len(batches), "steps": result.steps, "test_accuracy": result.test_accuracy}


def tune_all(cfg: ExperimentConfig, data: MNIST1D, pool: Executor) -> dict[str, Any]:
    """Every arm's study, resumed where it stopped; returns best params and trial tables."""
    tunings = [tuning_of(arm, cfg, data) for arm in cfg.arms]
    done = sum(min(complete(t.study), cfg.trials) for t in tunings)
    with tqdm(total=len(cfg.arms) * cfg.trials, initial=done, desc="tuning trials", disable=cfg.quiet) as bar, \
            storage_errors(cfg.storage_url):
        tune_in_rounds(pool, train_run, tunings, cfg.processes, on_trial=bar.update)
    return {arm: {"best_params": best_params(t.study, cfg.trials), "best_value": best_value(t.study, cfg.trials),
                  "trials": trial_table(t.study, cfg.trials)} for arm, t in zip(cfg.arms, tunings)}


def final_runs(cfg: ExperimentConfig, data: MNIST1D, tuned: dict[str, Any], pool: Executor,
               cache: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best settings of each arm over ``cfg.seeds`` seeds; timings kept apart (they vary).
    Runs ``cache`` holds from an earlier call are reused (``workers.run_reusing``)."""
    jobs = [(arm, tuned[arm]["best_params"], cfg.seed + FINAL_SEED_OFFSET + k, data, cfg)
            for arm in cfg.arms for k in range(cfg.seeds)]
    with tqdm(total=len(jobs), desc="final runs", disable=cfg.quiet) as bar:
        records, reused = run_reusing(pool, train_run, jobs, "reference", cache, on_done=bar.update)
    arms: dict[str, Any] = {}
    timings: dict[str, list[float]] = {}
    for (arm, *_), record, again in zip(jobs, records, reused):
        timings.setdefault(arm, []).append(record["wall_seconds"])
        arms.setdefault(arm, {**tuned[arm], "runs": []})["runs"].append({**timeless(record), "reused": again})
    return arms, timings


def timeless(result: RunResult | dict[str, Any]) -> dict[str, Any]:
    """A run's record without its times (they vary from run to run: timings.json keeps them)."""
    record = result.as_dict() if isinstance(result, RunResult) else json.loads(json.dumps(result))
    record.pop("wall_seconds")
    for evaluation in record["evaluations"]:
        evaluation.pop("seconds")
    return record


def mnist1d_front(data: MNIST1D) -> FrontTask:
    return FrontTask("mnist1d", "Fewer optimizer steps at equal quality? mnist1d", train_run, data, "accuracy",
                     0.1, FRONT_ARMS)


LM_INCREMENT, LM_MAX = 4, 128  # sequences of LM_CONTEXT bytes: the measured noise scale passes 8 x LM_INCREMENT


def lm_front(cfg: ExperimentConfig) -> tuple[FrontTask, ExperimentConfig]:
    """The LM section's task and settings: its own budget, evaluations every 1/30 of it,
    micro-batches of LM_INCREMENT sequences and windows up to LM_MAX."""
    corpus = load_corpus()
    lm_cfg = dataclasses.replace(cfg, budget=cfg.lm_budget, seeds=cfg.lm_seeds, eval_every=max(1, cfg.lm_budget // 30),
                                 increment=LM_INCREMENT * cfg.lm_scale, max_samples=LM_MAX * cfg.lm_scale)
    size = shape(lm_cfg)
    title = (f"Fewer optimizer steps at equal quality? A byte-level language model (context {size['context']}, "
             f"width {size['dim']}, {size['layers']} blocks) on Python {corpus.about['python']}'s standard library")
    about = {"corpus": corpus.about, "model": size, "eval_sequences": EVAL_SEQUENCES}
    model = "context{context}-dim{dim}-layers{layers}".format(**size)
    return FrontTask("lm", title, train_lm_run, corpus, "loss", math.log(256), LM_FRONT_ARMS, about, model), lm_cfg


def write_regime(regime: dict[str, Any], out: Path) -> None:
    """The LM section's stated run (``lm_regime``: the baseline at the lr its tuning chose, both
    statistics sources measured over it, run on the pool beside the final runs): writes
    ``lm_sources.csv``, ``lm_sources.png`` and, last, ``lm_regime.json``."""
    write_atomic(out / "lm_sources.csv", sources_csv(regime))
    plot_sources(regime, out / "lm_sources.png")
    write_atomic(out / "lm_regime.json", json.dumps(regime, indent=1) + "\n")


SECTION_BUDGETS = {"reference": 180, "front": 330, "lm": 360, "critical": 330}
"""Seconds each section of the default `gradaccum reproduce` is sized to take on two cores, 20
minutes in all (the report states them beside the measured times, and their sums)."""
SECTION_FILES = {"reference": ("results.json",), "front": ("mnist1d_results.json",),
                 "lm": ("lm_results.json", "lm_regime.json"), "critical": ("critical_batch_lm.json",)}
STATUS = "sections.json"
"""Per section: its settings, budget, measured seconds and whether the last call reused it."""


def _settings(cfg: ExperimentConfig, section: str) -> dict[str, Any]:
    """What a section's results depend on (not where they are written, progress bars or sections);
    the LM's model shape for the sections that train it."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "quiet", "sections")}
    if section in ("lm", "critical"):
        settings["lm_model"] = shape(cfg)
    return settings


def _status(out: Path) -> dict[str, Any]:
    try:
        status = json.loads((out / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def finished(cfg: ExperimentConfig, out: Path, section: str) -> bool:
    """Whether ``out`` holds the section's results from a finished call with the same settings."""
    entry = _status(out).get(section)
    return (isinstance(entry, dict) and entry.get("settings") == _settings(cfg, section)
            and all((out / name).exists() for name in SECTION_FILES[section]))


def up_to_date(cfg: ExperimentConfig) -> bool:
    """Whether every chosen section is finished in ``cfg.out`` with these settings and the report is there."""
    out = Path(cfg.out)
    return (out / "report.md").exists() and all(finished(cfg, out, s) for s in cfg.sections)


def _run_section(section: str, cfg: ExperimentConfig, data: MNIST1D, pool: Executor, out: Path, force: bool,
                 quick: bool) -> None:
    if section == "reference":
        tuned = tune_all(cfg, data, pool)
        arms, timings = final_runs(cfg, data, tuned, pool, None if force else out / "runs" / "reference")
        results = {"config": cfg.to_dict(), "arms": arms}
        write_atomic(out / "timings.json", json.dumps({"wall_seconds": timings}, indent=1) + "\n")
        write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    elif section == "front":
        run_front(mnist1d_front(data), cfg, pool, out, reuse=not force)
    elif section == "lm":
        task, lm_cfg = lm_front(cfg)
        side: list[Future[dict[str, Any]]] = []
        run_front(task, lm_cfg, pool, out, reuse=not force, before_final_runs=lambda chosen: side.append(
            pool.submit(measure_regime, chosen["baseline"][0]["lr"], lm_cfg.seed, lm_cfg)))
        write_regime(side[0].result(), out)
    else:
        from .critical_batch_section import TASKS, run_critical_batch_section

        for name in TASKS:
            run_critical_batch_section(name, cfg, pool, out, quick=quick)


def reproduce(cfg: ExperimentConfig, force: bool = False, quick: bool = False) -> Path:
    """Run the chosen sections of the experiment; returns the output directory.

    A section finished earlier with the same settings is reused (``sections.json`` says which,
    with each section's budget and measured seconds), and so are the final runs an interrupted
    call finished; ``force`` recomputes every chosen section and its final runs (tuning trials
    already complete in the Optuna storage are kept: delete it to tune again). ``quick``: the
    critical section's small plan (``--quick``)."""
    out, data = prepare_output(cfg)
    if {"front", "lm", "critical"} & set(cfg.sections) and cfg.backend != "torch":
        raise SettingsError("backend: the front, lm and critical sections run on torch (their trainers record the "
                            "evaluations they read); use --sections reference with --backend jax")
    status = _status(out)
    todo = [s for s in cfg.sections if force or not finished(cfg, out, s)]
    for section, entry in status.items():  # every section this call does not compute, chosen or not
        if section not in todo and isinstance(entry, dict):
            status[section] = {**entry, "reused": True}
    if todo:
        with executor(cfg.processes) as pool:
            for section in todo:
                started = time.perf_counter()
                _run_section(section, cfg, data, pool, out, force, quick)
                status[section] = {"settings": _settings(cfg, section), "budget_seconds": SECTION_BUDGETS[section],
                                   "seconds": time.perf_counter() - started, "reused": False,
                                   "workers": cfg.processes}
                write_atomic(out / STATUS, json.dumps(status, indent=1) + "\n")
    write_atomic(out / STATUS, json.dumps(status, indent=1) + "\n")
    write_full_report(out)
    return out
