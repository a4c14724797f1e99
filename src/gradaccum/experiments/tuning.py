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
is recorded as PRUNED ("diverged") and the study goes on, up to ``diverged_limit`` diverged
trials in a row: then the lr range is wrong and tuning stops with an error saying so.

A trial is failed by another process only when its owner is gone (``study_storage``: heartbeats
with a grace period): a run killed mid-trial leaves it RUNNING, and the next start fails it once
its heartbeats are ``GRACE_SECONDS`` old.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .arms import ARM_TABLE, ARMS
from .config import ExperimentConfig
from .errors import SettingsError
from .mnist1d_data import MNIST1D
from .runs import train_run
from .study_storage import GRACE_SECONDS, Heartbeats, ask, fail_stale, open_storage, root_cause

_OPEN_RETRIES = 5  # two workers creating one fresh SQLite file race on Optuna's schema tables


def storage(url: str) -> Any:
    """An Optuna storage with heartbeats (``study_storage.open_storage``): an RDB URL
    (``sqlite:///...``, ``postgresql://...``) or ``journal:PATH``, a journal file that several
    processes on one machine can share without a database server; a damaged SQLite file is refused."""
    if not url.startswith("journal:"):
        _check_sqlite(url)
    return open_storage(url)


def diverged_limit(batch: int) -> int:
    """Diverged trials in a row after which tuning stops: the lr range is wrong (every trial
    diverging used to prune forever)."""
    return max(10, 2 * batch)


def too_many_diverged(arm: str, count: int, cfg: ExperimentConfig) -> SettingsError:
    return SettingsError(f"{arm}: the last {count} trials all diverged (a non-finite loss or gradient): the lr range "
                         f"[{cfg.lr_low:g}, {cfg.lr_high:g}] is wrong for this arm; lower --lr-high (and --lr-low) "
                         "and rerun (finished trials are kept)")


def storage_failed(url: str, error: BaseException) -> SettingsError:
    """A write to the storage failed: the message names the storage and the real cause."""
    return SettingsError(f"storage: writing to {url!r} failed: {root_cause(error)}")


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
             on_trial: Callable[[int], None] | None = None) -> optuna.Study:
    """Run the arm's study up to ``cfg.trials`` complete trials; objective: final validation accuracy.

    Trials left RUNNING by a process that is gone are failed first; this process's own trial
    carries a heartbeat while it trains. ``on_trial(complete)`` is called after each trial with
    the study's count of complete trials."""
    study = open_study(arm, cfg)
    spec = ARM_TABLE[arm]
    diverged = 0
    with storage_errors(cfg.storage_url):
        fail_stale(study)
        with Heartbeats() as heartbeats:
            while completed(study) < cfg.trials:
                trial = ask(study)
                heartbeats.add(study, trial)
                study.sampler = sampler(cfg, arm, trial.number)  # suggestions below draw from this seed
                params = spec.suggest(trial, cfg)
                try:
                    result = train_run(arm, params, cfg.seed + trial.number, data, cfg)
                except BaseException:
                    tell_failed(study, trial)
                    raise
                batches = result.batch_sizes or [result.flushed_items]
                attributes = {"mean_batch": sum(batches) / len(batches),
                              "test_accuracy": result.test_accuracy}  # recorded, never optimised
                if result.diverged:
                    finish(study, trial, {**attributes, "pruned": "diverged"}, state=TrialState.PRUNED)
                elif completed(study) >= cfg.trials:
                    finish(study, trial, {**attributes, "pruned": "surplus"}, state=TrialState.PRUNED)
                else:
                    finish(study, trial, attributes, value=result.final_val_accuracy)
                heartbeats.remove(trial)
                diverged = diverged + 1 if result.diverged else 0
                if on_trial is not None:
                    on_trial(completed(study))
                if diverged >= diverged_limit(1):
                    raise too_many_diverged(arm, diverged, cfg)
    return study


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A failed write to the storage (OSError, Optuna's or SQLAlchemy's error) becomes a
    SettingsError naming the storage and the real cause; anything else passes unchanged."""
    try:
        yield
    except SettingsError:
        raise
    except (OSError, optuna.exceptions.StorageInternalError) as error:
        raise storage_failed(url, error) from error
    except Exception as error:
        if type(error).__module__.startswith("sqlalchemy"):
            raise storage_failed(url, error) from error
        raise


def finish(study: optuna.Study, trial: optuna.Trial, attributes: dict[str, Any], value: Any = None,
           state: TrialState | None = None) -> bool:
    """Record a trial's attributes and tell its value or state; False (with a warning) when
    another process already failed it (its heartbeats stopped past the grace period)."""
    try:
        for key, item in attributes.items():
            trial.set_user_attr(key, item)
        told = study.tell(trial, value, state=state, skip_if_finished=True).state
    except optuna.exceptions.UpdateFinishedTrialError:
        told = None
    if told != (state or TrialState.COMPLETE):
        warnings.warn(f"trial {trial.number} was failed by another process (no heartbeat for {GRACE_SECONDS} s): "
                      "its result is dropped", RuntimeWarning, stacklevel=2)
        return False
    return True


def tell_failed(study: optuna.Study, trial: optuna.Trial) -> None:
    """Fail this process's own trial after its run raised; if even that write fails (a full
    disk), the trial stays RUNNING and its stopped heartbeat lets the next start fail it."""
    try:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:  # noqa: BLE001 - the run's own error is the one to report
        pass


def counted_trials(study: optuna.Study, target: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``target`` complete trials by number: the ones results are built from."""
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return done[:target]


def best_params(study: optuna.Study, target: int) -> dict[str, float]:
    return dict(max(counted_trials(study, target), key=trial_value).params)


def best_value(study: optuna.Study, target: int) -> float:
    return max(trial_value(t) for t in counted_trials(study, target))


def trial_value(trial: optuna.trial.FrozenTrial) -> float:
    """A complete single-objective trial's value (a trial without one cannot be ranked)."""
    value = trial.value
    if value is None:
        raise SettingsError(f"trial {trial.number} has no objective value (state {trial.state.name}): "
                            "only complete trials are ranked")
    return value


def trial_table(study: optuna.Study, target: int) -> list[dict[str, Any]]:
    return [{"number": t.number, "value": t.value, "params": dict(t.params), **t.user_attrs}
            for t in counted_trials(study, target)]
