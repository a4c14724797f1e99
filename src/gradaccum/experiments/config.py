"""The experiment's settings: one typed, documented dataclass shared by the CLI and YAML.

Each field's ``help`` is the text of its command-line flag; ``--config file.yaml`` takes
the same names. The resolved settings are saved next to the results (``config.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .._yaml import safe_load
from .arms import ARMS, DEFAULT_ARMS
from .errors import SettingsError

BACKENDS = ("torch", "jax")
SECTIONS = ("reference", "front", "lm", "critical")
_KINDS: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool,
                                              "list": list}
"""The Python types a field's value may have, by its annotation (a float field takes an int too)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ExperimentConfig:
    """Settings of `gradaccum reproduce` / `tune` / `train` (docs/design.md, "Reference experiment")."""

    out: str = _f("gradaccum-out/reproduce", "output directory (results, report, plots, Optuna storage)")
    data_dir: str = _f("gradaccum-out/data", "where the generated mnist1d splits are cached")
    sections: list = _f(list(SECTIONS), "sections of `reproduce`: reference (the GAGA reproduction), front (fewer "
                        "steps at equal quality? on mnist1d), lm (the same on a byte-level language model), "
                        "critical (the critical batch size measured by branching, beside the online noise scale, "
                        "on both tasks)",
                        choices=SECTIONS)
    arms: list = _f(list(DEFAULT_ARMS), f"arms of the reference section, from {', '.join(ARMS)}", choices=ARMS)
    trials: int = _f(8, "Optuna trials per arm")
    seeds: int = _f(4, "seeds the best settings of each arm are trained over")
    budget: int = _f(96_000, "training samples per run")
    eval_every: int = _f(3_200, "validate every this many training samples")
    increment: int = _f(32, "samples per micro-batch (the baseline's batch, GAGA's increment)")
    max_samples: int = _f(512, "cap of an adaptive window, in samples")
    lr_low: float = _f(1e-4, "lower end of the log-uniform lr search range")
    lr_high: float = _f(3e-2, "upper end of the log-uniform lr search range")
    tau_low: float = _f(1e-3, "lower end of the log-uniform tau range, per-sample GSNR scale")
    tau_high: float = _f(3.0, "upper end of the log-uniform tau range, per-sample GSNR scale")
    tau_mean_low: float = _f(0.5, "lower end of the log-uniform tau range, mean-gradient GSNR scale")
    tau_mean_high: float = _f(20.0, "upper end of the log-uniform tau range, mean-gradient GSNR scale")
    theta_low: float = _f(0.1, "lower end of the log-uniform theta range of the norm test")
    theta_high: float = _f(3.0, "upper end of the log-uniform theta range of the norm test")
    ramp_low: float = _f(0.05, "lower end of the log-uniform range of the batch ramp's length, as a fraction of "
                         "the budget")
    ramp_high: float = _f(1.0, "upper end of the batch ramp's length range, as a fraction of the budget")
    c_low: float = _f(0.01, "lower end of the log-uniform range of the noise-scale planner's c (window = c B_simple)")
    c_high: float = _f(1.0, "upper end of the noise-scale planner's c range")
    front_trials: int = _f(6, "Optuna trials per arm of the steps-quality front, fixed and adaptive alike")
    front_points: int = _f(2, "most Pareto points per adaptive arm retrained over seeds (spread over its front)")
    lm_seeds: int = _f(3, "seeds the LM section's chosen settings are trained over")
    workers: int = _f(0, "worker processes for trials and final runs, one thread each (0: one per core)")
    lm_budget: int = _f(3_200, "training sequences per run of the LM section (validated every 1/30 of it)")
    lm_scale: int = _f(1, "size of the LM section's model: width 64k, depth 2k, context 12k bytes (k > 1 for a GPU)")
    storage: str = _f("", "Optuna storage: an RDB URL (default: sqlite:///<out>/optuna.db; postgresql://... "
                          "for several machines) or journal:PATH (a file several local processes can share)")
    n_jobs: int = _f(1, "parallel Optuna trials in this process")
    seed: int = _f(0, "base seed (tuning sampler, data order, initialisation)")
    quiet: bool = _f(False, "no progress bars")
    backend: str = _f("torch", "training backend (jax needs the jax extra)", choices=BACKENDS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SettingsError naming the first bad field (types first: YAML can say anything)."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _KINDS[str(f.type)]
            if (kind is not bool and isinstance(value, bool)) or not isinstance(value, kind):
                what = str(f.type).replace('list', f'a list of {f.name[:-1]} names')
                raise SettingsError(f"{f.name} must be {what}, got {value!r} ({type(value).__name__})")
            if isinstance(value, list):  # a list field: its value passed the type check above
                choices = f.metadata["choices"]
                if not value or len(set(value)) != len(value) or any(v not in choices for v in value):
                    raise SettingsError(f"{f.name} must be a non-empty list of distinct names from "
                                        f"{', '.join(choices)}, got {value!r}")
        if self.backend not in BACKENDS:
            raise SettingsError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in ("trials", "seeds", "budget", "eval_every", "increment", "max_samples", "n_jobs", "front_trials",
                     "front_points", "lm_seeds", "lm_budget", "lm_scale"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise SettingsError(f"workers must be 0 (one per core) or a positive integer, got {self.workers!r}")
        if self.seed < 0:
            raise SettingsError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.increment > self.max_samples:
            raise SettingsError(f"increment ({self.increment}) must be <= max_samples ({self.max_samples})")
        if self.budget < self.increment:
            raise SettingsError(f"budget ({self.budget}) must be at least one increment ({self.increment})")
        for low, high in (("lr_low", "lr_high"), ("tau_low", "tau_high"), ("tau_mean_low", "tau_mean_high"),
                          ("theta_low", "theta_high"), ("ramp_low", "ramp_high"), ("c_low", "c_high")):
            lo, hi = getattr(self, low), getattr(self, high)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
                raise SettingsError(f"{low} and {high} must satisfy 0 < {low} < {high}, got {lo!r} and {hi!r}")
        if self.ramp_high > 1:
            raise SettingsError("ramp_high must be <= 1 (a ramp longer than the budget never ends), got "
                                f"{self.ramp_high!r}")
        if not self.out:
            raise SettingsError("out must name a directory")

    @property
    def processes(self) -> int:
        """Worker processes to use: ``workers``, or one per core the process may run on."""
        import os

        return self.workers or len(os.sched_getaffinity(0))

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'optuna.db'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Path) -> None:
        path.write_text(self.to_yaml())

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> ExperimentConfig:
        """Settings from a YAML file, then ``overrides`` (flags given on the command line)."""
        try:
            loaded = safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SettingsError(f"config: cannot read {path}: {error}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config: {path} must hold a mapping of settings, got {type(loaded).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(loaded) - names)
        if unknown:
            raise SettingsError(f"config: unknown settings in {path}: {', '.join(unknown)}")
        return cls(**{**loaded, **overrides})

    @classmethod
    def quick(cls, **overrides: Any) -> ExperimentConfig:
        """A small version for smoke tests: few trials, seeds and samples."""
        return cls(**{"trials": 2, "seeds": 2, "lm_seeds": 2, "budget": 6_400, "eval_every": 640, "front_trials": 2,
                      "lm_budget": 400, **overrides})
