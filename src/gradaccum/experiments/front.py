"""The steps-quality front: the same quality in fewer optimizer steps? (docs/design.md, "The steps-quality front")

Every arm gets the same sample budget and the same tuning budget: ``cfg.front_trials`` trials
over the same lr range, scrambled Sobol points (a fixed arm's are a stratified log grid of the
lr; an adaptive arm searches its own parameter within the same count). A fixed-batch arm's
objective is its final validation quality (the mean of its last ``FINAL_EVALUATIONS``
evaluations, which one lucky evaluation cannot set); an adaptive or planned arm has two (that
quality up, optimizer steps down), which gives a Pareto front of settings, whose points at the
fixed arms' step counts (the one with the most steps at or below each; at most
``cfg.front_points``, spread from the fewest steps to the most) are retrained over ``cfg.seeds``
seeds, the same seeds for every arm. Runs evaluate on the validation split during
training and on the test split once, at the end; every choice (settings, points, reference arm,
targets) reads the validation split only (``front_report``).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from .arms import ARM_TABLE, ARMS
from .config import ExperimentConfig
from .errors import SettingsError
from .files import write_atomic
from .run_record import RunResult
from .tuning import storage, storage_errors, too_many_diverged
from .workers import Tuning, complete, run_reusing, tune_in_rounds

FRONT_SEED_OFFSET = 20_000  # the front's final runs use seeds no tuning trial used


@dataclass(frozen=True)
class FrontTask:
    """What the front trains: ``run(arm, params, seed, data, cfg) -> RunResult`` (a module-level
    function, so worker processes can run it), its data, and its quality metric (the runs'
    ``final_val_accuracy`` / ``test_accuracy`` and evaluations hold it)."""

    name: str
    title: str
    run: Callable[..., RunResult]
    data: Any
    metric: str  # "accuracy" (higher is better) or "loss" (lower is better)
    start: float  # the metric before training (chance accuracy, the loss of a uniform guess)
    arms: tuple[str, ...]
    about: dict[str, Any] = field(default_factory=dict)  # what the report says of the data and model
    model: str = ""  # what the runs depend on beyond the settings (the LM's shape): in study names and run keys

    @property
    def key(self) -> str:
        """The task's name in its studies and its runs' cache keys: trials and runs of another
        model are never reused."""
        return f"{self.name}-{self.model}" if self.model else self.name

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def open_front_study(task: FrontTask, arm: str, cfg: ExperimentConfig) -> optuna.Study:
    """The arm's study: one objective (the validation metric) for a fixed arm, two (the metric and
    optimizer steps, minimised) for an adaptive one."""
    optuna.logging.set_verbosity(logging.WARNING)
    quality: Literal["maximize", "minimize"] = "maximize" if task.higher_is_better else "minimize"
    directions: list[Literal["maximize", "minimize"]] = [quality] if not ARM_TABLE[arm].adaptive \
        else [quality, "minimize"]
    try:
        return optuna.create_study(study_name=f"gradaccum-{task.key}-{arm}-last{FINAL_EVALUATIONS}",
                                   storage=storage(cfg.storage_url), load_if_exists=True, directions=directions)
    except SettingsError:
        raise
    except Exception as error:
        raise SettingsError(f"storage: cannot open Optuna storage {cfg.storage_url!r}: {error}") from None


FINAL_EVALUATIONS = 3
"""Validation evaluations whose mean is a run's final quality (the tuning objective)."""


def trials_of(arm: str, cfg: ExperimentConfig) -> int:
    """Trials of an arm: ``front_trials`` for every arm, fixed or adaptive (equal tuning budgets)."""
    return cfg.front_trials


def final_quality(result: RunResult) -> float:
    """The mean validation metric of the run's last ``FINAL_EVALUATIONS`` evaluations (its final
    validation metric if it has none)."""
    values = [e.val for e in result.evaluations[-FINAL_EVALUATIONS:]]
    return sum(values) / len(values) if values else result.final_val_accuracy


def _sampler(cfg: ExperimentConfig, task: FrontTask, arm: str) -> optuna.samplers.BaseSampler:
    """Scrambled Sobol points: a dozen trials cover a two-parameter space evenly (TPE would still
    be sampling at random), and the k-th point depends only on the seed and on k."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since Optuna 3.0
        return optuna.samplers.QMCSampler(seed=(cfg.seed * len(ARMS) + ARMS.index(arm)) * 7919 + len(task.name),
                                          scramble=True, warn_independent_sampling=False)


def tuning(task: FrontTask, arm: str, cfg: ExperimentConfig) -> Tuning:
    spec = ARM_TABLE[arm]

    def value(result: RunResult) -> Any:
        return final_quality(result) if not spec.adaptive else [final_quality(result), result.steps]

    return Tuning(open_front_study(task, arm, cfg), trials_of(arm, cfg), lambda trial: spec.suggest(trial, cfg),
                  lambda params, number: (arm, params, cfg.seed + number, task.data, cfg), value=value,
                  pruned=lambda r: "diverged" if r.diverged else None,
                  attributes=lambda r: {"steps": r.steps},  # the test split is never read here
                  sampler=lambda number: _sampler(cfg, task, arm),
                  too_many_diverged=lambda count: too_many_diverged(f"{task.name} front, {arm}", count, cfg))


def counted(study: optuna.Study, target: int) -> list[FrozenTrial]:
    """The first ``target`` complete trials by number (what the results are built from)."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return done[:target]


def pareto(trials: list[FrozenTrial], higher_is_better: bool) -> list[FrozenTrial]:
    """The trials no other trial beats on both quality and steps, by increasing steps."""
    sign = 1.0 if higher_is_better else -1.0

    def beaten(t: FrozenTrial) -> bool:
        q, s = sign * t.values[0], t.values[1]
        return any(sign * o.values[0] >= q and o.values[1] <= s and (sign * o.values[0] > q or o.values[1] < s)
                   for o in trials)

    return sorted((t for t in trials if not beaten(t)), key=lambda t: (t.values[1], t.number))


def points_at(front: list[FrozenTrial], steps: list[float]) -> list[FrozenTrial]:
    """For each fixed arm's step count, the front point with the most steps at or below it
    (nearest lower); each point once, by increasing steps."""
    chosen: dict[int, FrozenTrial] = {}
    for budget in steps:
        below = [t for t in front if t.values[1] <= budget]
        if below:
            best = max(below, key=lambda t: (t.values[1], -t.number))
            chosen[best.number] = best
    return sorted(chosen.values(), key=lambda t: (t.values[1], t.number))


def spread(points: list[FrozenTrial], most: int) -> list[FrozenTrial]:
    """At most ``most`` of ``points`` (sorted by steps), evenly spread from the first to the last."""
    if len(points) <= most:
        return points
    if most == 1:
        return [points[-1]]
    return [points[round(i * (len(points) - 1) / (most - 1))] for i in range(most)]


def costly_first(jobs: list[tuple[Any, ...]]) -> list[int]:
    """The order the final runs are submitted in: the adaptive arms' first (they read statistics
    and take longest), so the pool's last runs are short ones; otherwise the jobs' own order."""
    return sorted(range(len(jobs)), key=lambda i: not ARM_TABLE[jobs[i][0]].adaptive)


def run_front(task: FrontTask, cfg: ExperimentConfig, pool: Executor, out: Path, reuse: bool = True,
              before_final_runs: Callable[[dict[str, list[dict[str, float]]]], Any] | None = None
              ) -> dict[str, Any]:
    """Tune every arm, choose the points, retrain them over seeds; write ``<task>_results.json``
    and ``<task>_timings.json`` (times vary from run to run and are kept apart). Final runs an
    earlier call finished (kept under ``<out>/runs/<task>``) are reused unless ``reuse`` is False;
    each run's record says whether it was (``"reused"``). ``before_final_runs(chosen)``, with
    each arm's chosen settings, runs before the final runs are submitted (to put a run of its own
    on ``pool`` beside them)."""
    tunings = [tuning(task, arm, cfg) for arm in task.arms]
    total = sum(t.target for t in tunings)
    finished = sum(min(complete(t.study), t.target) for t in tunings)
    with tqdm(total=total, initial=finished, desc=f"{task.name}: tuning trials", disable=cfg.quiet) as bar, \
            storage_errors(cfg.storage_url):
        tune_in_rounds(pool, task.run, tunings, cfg.processes, on_trial=bar.update)
    best = max if task.higher_is_better else min
    chosen: dict[str, list[FrozenTrial]] = {}
    fixed_steps = []
    for arm, t in zip(task.arms, tunings):
        trials = counted(t.study, t.target)
        if not ARM_TABLE[arm].adaptive:
            chosen[arm] = [best(trials, key=lambda tr: (tr.values[0], -tr.number))]
            fixed_steps.append(float(chosen[arm][0].user_attrs["steps"]))
    for arm, t in zip(task.arms, tunings):
        if ARM_TABLE[arm].adaptive:
            chosen[arm] = spread(points_at(pareto(counted(t.study, t.target), task.higher_is_better), fixed_steps),
                                 cfg.front_points)
    jobs = [(arm, k, dict(trial.params), cfg.seed + FRONT_SEED_OFFSET + seed)
            for arm in task.arms for k, trial in enumerate(chosen[arm]) for seed in range(cfg.seeds)]
    if before_final_runs is not None:
        before_final_runs({arm: [dict(trial.params) for trial in chosen[arm]] for arm in task.arms})
    order = costly_first(jobs)
    with tqdm(total=len(jobs), desc=f"{task.name}: final runs", disable=cfg.quiet) as bar:
        done, again = run_reusing(pool, task.run, [(jobs[i][0], jobs[i][2], jobs[i][3], task.data, cfg)
                                                   for i in order], task.key,
                                  out / "runs" / task.name if reuse else None, on_done=bar.update)
    records: list[dict[str, Any]] = [{}] * len(jobs)
    reused = [False] * len(jobs)
    for position, i in enumerate(order):  # back in the jobs' order
        records[i], reused[i] = done[position], again[position]
    arms: dict[str, Any] = {arm: {"adaptive": ARM_TABLE[arm].adaptive, "trials": trial_table(tunings[i].study,
                                                                                             tunings[i].target),
                                  "points": [{"trial": tr.number, "params": dict(tr.params),
                                              "tuned_values": list(tr.values), "runs": []} for tr in chosen[arm]]}
                            for i, arm in enumerate(task.arms)}
    timings: dict[str, Any] = {arm: [[] for _ in chosen[arm]] for arm in task.arms}
    for (arm, k, _, _), record, was_reused in zip(jobs, records, reused):
        record = {**record, "evaluations": [dict(e) for e in record["evaluations"]], "reused": was_reused}
        timings[arm][k].append({"wall_seconds": record.pop("wall_seconds"),
                                "evaluation_seconds": [e.pop("seconds") for e in record["evaluations"]]})
        arms[arm]["points"][k]["runs"].append(record)
    front = {"task": task.name, "title": task.title, "metric": task.metric, "start": task.start,
             "about": task.about, "config": cfg.to_dict(), "arms": arms}
    write_atomic(out / f"{task.name}_results.json", json.dumps(front, indent=1) + "\n")
    write_atomic(out / f"{task.name}_timings.json", json.dumps(timings, indent=1) + "\n")
    return front


def trial_table(study: optuna.Study, target: int) -> list[dict[str, Any]]:
    return [{"number": t.number, "values": list(t.values), "params": dict(t.params), **t.user_attrs}
            for t in counted(study, target)]
