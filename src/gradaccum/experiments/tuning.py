"""Optuna studies, one per arm, in resumable storage (SQLite in the output directory by default).

Only COMPLETE trials count toward ``cfg.trials``. A rerun after a crash or Ctrl-C goes on
where the study stopped; several ``gradaccum tune`` processes may share one study through
the same ``--storage`` (PostgreSQL for several machines, ``journal:PATH`` on one).

Each trial's sampler is seeded from the base seed, the arm and the trial's own number, which
the storage hands out once: a sequential run is deterministic (same seed, same trials), a
resumed run continues the sequence instead of replaying it, and parallel workers draw
different settings. A worker stops once the study holds ``cfg.trials`` complete trials;
a trial that finishes after the target was reached elsewhere is recorded as PRUNED
("surplus"), so parallel workers overshoot only if two trials finish at the same instant,
and the results use the first ``cfg.trials`` complete trials by number. A run that diverges
is recorded as PRUNED ("diverged") and the study goes on.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from .arms import ARM_TABLE, ARMS
from .config import ExperimentConfig
from .errors import SettingsError
from .mnist1d_data import MNIST1D
from .runs import train_run

_OPEN_RETRIES = 5  # two workers creating one fresh SQLite file race on Optuna's schema tables


def storage(url: str) -> Any:
    """An Optuna storage: an RDB URL (``sqlite:///...``, ``postgresql://...``) as Optuna takes
    it, or ``journal:PATH``, a journal file that several processes on one machine can share
    without a database server (Optuna's JournalFileBackend)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    _check_sqlite(url)
    return url


def _check_sqlite(url: str) -> None:
    """Refuse an SQLite file that is empty or damaged instead of using it silently (a 0-byte
    file used to start a new study; a malformed one failed later, half-way)."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///"):])
    if not path.exists():
        return
    if path.stat().st_size == 0:
        raise SettingsError(f"storage: {path} is an empty file, not an Optuna database; delete it to start a "
                            "new study, or restore the database")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as error:
        verdict = str(error)
    if verdict != "ok":
        raise SettingsError(f"storage: {path} is not a usable SQLite database ({verdict}); restore it or "
                            "delete it to start a new study")


def open_study(arm: str, cfg: ExperimentConfig) -> optuna.Study:
    """Create or load the arm's study; a storage that cannot be opened raises SettingsError."""
    optuna.logging.set_verbosity(logging.WARNING)
    for attempt in range(_OPEN_RETRIES):
        try:
            return optuna.create_study(study_name=f"gradaccum-{arm}", storage=storage(cfg.storage_url),
                                       load_if_exists=True, direction="maximize", sampler=sampler(cfg, arm, 0))
        except SettingsError:
            raise
        except Exception as error:  # SQLAlchemy / driver errors carry the useful message
            racing = any(m in str(error) for m in ("UNIQUE constraint failed", "database is locked", "already exists"))
            if racing and attempt + 1 < _OPEN_RETRIES:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise SettingsError(f"storage: cannot open Optuna storage {cfg.storage_url!r}: {error}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def sampler(cfg: ExperimentConfig, arm: str, number: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=(cfg.seed * len(ARMS) + ARMS.index(arm)) * 1_000_003 + number)


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def tune_arm(arm: str, cfg: ExperimentConfig, data: MNIST1D,
             on_trial: Callable[[], None] | None = None) -> optuna.Study:
    """Run the arm's study up to ``cfg.trials`` complete trials; objective: final validation accuracy."""
    study = open_study(arm, cfg)
    spec = ARM_TABLE[arm]
    try:
        while completed(study) < cfg.trials:
            trial = study.ask()
            study.sampler = sampler(cfg, arm, trial.number)  # suggestions below draw from this seed
            params = spec.suggest(trial, cfg)
            try:
                result = train_run(arm, params, cfg.seed + trial.number, data, cfg)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)
                raise
            batches = result.batch_sizes or [result.flushed_items]
            trial.set_user_attr("mean_batch", sum(batches) / len(batches))
            trial.set_user_attr("test_accuracy", result.test_accuracy)  # recorded, never optimised
            if result.diverged:
                trial.set_user_attr("pruned", "diverged")
                study.tell(trial, state=TrialState.PRUNED)
            elif completed(study) >= cfg.trials:
                trial.set_user_attr("pruned", "surplus")
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, result.final_val_accuracy)
            if on_trial is not None:
                on_trial()
    except SettingsError:
        raise
    except (OSError, optuna.exceptions.StorageInternalError) as error:
        raise SettingsError(f"storage: writing to {cfg.storage_url!r} failed: {error}") from error
    except Exception as error:
        if type(error).__module__.startswith("sqlalchemy"):
            raise SettingsError(f"storage: writing to {cfg.storage_url!r} failed: {error}") from error
        raise
    return study


def counted_trials(study: optuna.Study, target: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``target`` complete trials by number: the ones results are built from."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return done[:target]


def best_params(study: optuna.Study, target: int) -> dict[str, float]:
    return dict(max(counted_trials(study, target), key=lambda t: t.value).params)


def best_value(study: optuna.Study, target: int) -> float:
    return max(t.value for t in counted_trials(study, target))


def trial_table(study: optuna.Study, target: int) -> list[dict[str, Any]]:
    return [{"number": t.number, "value": t.value, "params": dict(t.params), **t.user_attrs}
            for t in counted_trials(study, target)]
