"""Optuna studies, one per arm, in resumable storage (SQLite in the output directory by default).

A rerun after a crash or Ctrl-C continues the study: only COMPLETE trials count toward
``cfg.trials`` and finished ones are never repeated. Several ``gradaccum tune`` processes
may share one study through the same ``--storage`` URL (PostgreSQL for several machines);
``MaxTrialsCallback`` stops all of them at the target count.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from .config import ARMS, ExperimentConfig
from .mnist1d_data import MNIST1D
from .runs import RunResult, train_run

SEARCH_SPACE: dict[str, tuple[str, ...]] = {
    "baseline": ("lr",), "baseline512": ("lr",), "gaga": ("lr", "tau"), "gaga_mean": ("lr", "tau"),
    "normtest": ("lr", "theta"),
}


def suggest(trial: optuna.Trial, arm: str, cfg: ExperimentConfig) -> dict[str, float]:
    """lr log-uniform for every arm; tau (or theta) log-uniform over a range that spans
    "stops at the first increment" to "always hits the cap"."""
    params = {"lr": trial.suggest_float("lr", cfg.lr_low, cfg.lr_high, log=True)}
    if arm == "gaga":
        params["tau"] = trial.suggest_float("tau", cfg.tau_low, cfg.tau_high, log=True)
    elif arm == "gaga_mean":
        params["tau"] = trial.suggest_float("tau", cfg.tau_mean_low, cfg.tau_mean_high, log=True)
    elif arm == "normtest":
        params["theta"] = trial.suggest_float("theta", cfg.theta_low, cfg.theta_high, log=True)
    return params


def storage(url: str) -> Any:
    """An Optuna storage: an RDB URL (``sqlite:///...``, ``postgresql://...``) as Optuna takes
    it, or ``journal:PATH``, a journal file that several processes on one machine can share
    without a database server (Optuna's JournalFileBackend)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    return url


def open_study(arm: str, cfg: ExperimentConfig) -> optuna.Study:
    """Create or load the arm's study; a storage that cannot be opened raises ValueError."""
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        return optuna.create_study(study_name=f"gradaccum-{arm}", storage=storage(cfg.storage_url), load_if_exists=True,
                                   direction="maximize",
                                   sampler=optuna.samplers.TPESampler(seed=cfg.seed + ARMS.index(arm)))
    except Exception as error:  # SQLAlchemy / driver errors carry the useful message
        raise ValueError(f"storage: cannot open Optuna storage {cfg.storage_url!r}: {error}") from None


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def tune_arm(arm: str, cfg: ExperimentConfig, data: MNIST1D,
             on_trial: Callable[[], None] | None = None) -> optuna.Study:
    """Run the arm's study up to ``cfg.trials`` complete trials; objective: final validation accuracy."""
    study = open_study(arm, cfg)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, arm, cfg)
        result: RunResult = train_run(arm, params, cfg.seed + trial.number, data, cfg)
        batches = result.batch_sizes or [result.flushed_items]
        trial.set_user_attr("mean_batch", sum(batches) / len(batches))
        trial.set_user_attr("test_accuracy", result.test_accuracy)  # recorded, never optimised
        return result.final_val_accuracy

    remaining = cfg.trials - completed(study)
    if remaining > 0:
        callbacks: list[Any] = [optuna.study.MaxTrialsCallback(cfg.trials, states=(TrialState.COMPLETE,))]
        if on_trial is not None:
            callbacks.append(lambda study, trial: on_trial())
        study.optimize(objective, n_trials=remaining, n_jobs=cfg.n_jobs, callbacks=callbacks,
                       catch=())
    return study


def best_params(study: optuna.Study) -> dict[str, float]:
    return dict(study.best_trial.params)


def trial_table(study: optuna.Study) -> list[dict[str, Any]]:
    return [{"number": t.number, "value": t.value, "params": dict(t.params), **t.user_attrs}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
