"""`gradaccum reproduce`: tune every arm, train the best settings over seeds, write the report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .config import ExperimentConfig
from .errors import SettingsError
from .files import write_atomic
from .mnist1d_data import MNIST1D, load_mnist1d
from .report import write_report
from .runs import train_run
from .tuning import best_params, best_value, completed, open_study, trial_table, tune_arm

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


def tune_all(cfg: ExperimentConfig, data: MNIST1D) -> dict[str, Any]:
    """Every arm's study, resumed where it stopped; returns best params and trial tables."""
    studies = {arm: open_study(arm, cfg) for arm in cfg.arms}
    done = sum(min(completed(s), cfg.trials) for s in studies.values())
    with tqdm(total=len(cfg.arms) * cfg.trials, initial=done, desc="tuning trials", disable=cfg.quiet) as bar:
        for arm in cfg.arms:
            studies[arm] = tune_arm(arm, cfg, data, on_trial=bar.update)
    return {arm: {"best_params": best_params(s, cfg.trials), "best_value": best_value(s, cfg.trials),
                  "trials": trial_table(s, cfg.trials)} for arm, s in studies.items()}


def final_runs(cfg: ExperimentConfig, data: MNIST1D, tuned: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best settings of each arm over ``cfg.seeds`` seeds; timings kept apart (they vary)."""
    arms: dict[str, Any] = {}
    timings: dict[str, list[float]] = {}
    with tqdm(total=len(cfg.arms) * cfg.seeds, desc="final runs", disable=cfg.quiet) as bar:
        for arm in cfg.arms:
            runs = []
            for k in range(cfg.seeds):
                result = train_run(arm, tuned[arm]["best_params"], cfg.seed + FINAL_SEED_OFFSET + k, data, cfg)
                timings.setdefault(arm, []).append(result.wall_seconds)
                record = result.as_dict()
                record.pop("wall_seconds")
                runs.append(record)
                bar.update()
            arms[arm] = {**tuned[arm], "runs": runs}
    return arms, timings


def reproduce(cfg: ExperimentConfig) -> Path:
    """Run the whole experiment; returns the output directory."""
    out, data = prepare_output(cfg)
    tuned = tune_all(cfg, data)
    arms, timings = final_runs(cfg, data, tuned)
    results = {"config": cfg.to_dict(), "arms": arms}
    write_atomic(out / "timings.json", json.dumps({"wall_seconds": timings}, indent=1) + "\n")
    write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_report(results, out)
    return out
