"""The experiment's arms, one table: an arm's label, its rule and its search space.

Adding an arm is one entry here; the config, the CLI's choices, tuning, the trainers and
the report all read this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import GSNR, BatchRamp, FixedSteps, NoiseScalePlanner, NormTest, Planner, StoppingRule

if TYPE_CHECKING:  # pragma: no cover
    from .config import ExperimentConfig

Params = dict[str, float]


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment.

    Attributes:
      name: the key used on the command line and in results.
      label: how the report names it.
      rule: its stopping rule from tuned parameters and the settings.
      space: the tuned parameters besides ``lr``: name -> (the settings' low and high
        field names); each is searched log-uniformly.
    """

    name: str
    label: str
    rule: Callable[[Params, ExperimentConfig], StoppingRule | Planner]
    space: dict[str, tuple[str, str]]

    @property
    def adaptive(self) -> bool:
        return bool(self.space)

    def suggest(self, trial: Any, cfg: ExperimentConfig) -> Params:
        """lr log-uniform, and this arm's own parameters over their configured ranges."""
        params = {"lr": trial.suggest_float("lr", cfg.lr_low, cfg.lr_high, log=True)}
        for name, (low, high) in self.space.items():
            params[name] = trial.suggest_float(name, getattr(cfg, low), getattr(cfg, high), log=True)
        return params


def _gsnr(scale: str) -> Callable[[Params, Any], StoppingRule]:
    return lambda p, cfg: GSNR(p["tau"], increment=cfg.increment, max_samples=cfg.max_samples, scale=scale)


def _fixed(batch: int) -> Arm:
    return Arm(f"fixed{batch}", f"fixed batch {batch}", lambda p, cfg: FixedSteps(max(1, batch // cfg.increment)), {})


def _ramp(p: Params, cfg: Any) -> int:
    """The ramp's length in samples: the tuned fraction of the budget."""
    return max(1, round(p["ramp"] * cfg.budget))


ARM_TABLE: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("baseline", "baseline (batch {increment})", lambda p, cfg: FixedSteps(1), {}),
    Arm("gaga", "GAGA (per-sample GSNR)", _gsnr("sample"), {"tau": ("tau_low", "tau_high")}),
    Arm("gaga_mean", "GSNR, mean-gradient scale", _gsnr("mean"), {"tau": ("tau_mean_low", "tau_mean_high")}),
    Arm("baseline512", "fixed batch {max_samples}",
        lambda p, cfg: FixedSteps(max(1, cfg.max_samples // cfg.increment)), {}),
    # the experiment's norm test and planner read per-sample statistics: a decision after every
    # micro-batch of the window (the micro-batch source needs two micro-batches to have a variance)
    Arm("normtest", "norm test",
        lambda p, cfg: NormTest(p["theta"], increment=cfg.increment, max_samples=cfg.max_samples,
                                source="per_sample"),
        {"theta": ("theta_low", "theta_high")}),
    *(_fixed(batch) for batch in (64, 128, 256, 16, 32, 8)),
    Arm("ramp", "batch ramp", lambda p, cfg: BatchRamp(cfg.increment, cfg.max_samples, over=_ramp(p, cfg),
                                                       micro_batch=cfg.increment), {"ramp": ("ramp_low", "ramp_high")}),
    Arm("noise", "noise-scale planner",
        lambda p, cfg: NoiseScalePlanner(p["c"], min_batch=cfg.increment, max_batch=cfg.max_samples,
                                         micro_batch=cfg.increment, source="per_sample"),
        {"c": ("c_low", "c_high")}),
)}
ARMS = tuple(ARM_TABLE)
PARAMETERS: dict[str, tuple[str, float]] = {
    "tau": ("GSNR threshold (per-sample scale for gaga, mean-gradient scale for gaga_mean)", math.inf),
    "theta": ("the norm test's theta", math.inf),
    "ramp": ("the batch ramp's length, as a fraction of the budget", 1.0),
    "c": ("the noise-scale planner's factor: window = c x the measured B_simple", math.inf),
}
"""Every arm's own parameter besides ``lr``: what it is, and its largest value (it must be > 0)."""


def check_params(arm: str, params: dict[str, Any], flags: bool = False) -> Params:
    """``params`` for ``arm``: exactly ``lr`` and the arm's own parameters, each a positive finite
    number within its range; anything else raises ValueError naming the parameter (as a
    command-line flag with ``flags``) and the fix."""
    spec = ARM_TABLE[arm]
    takes = ["lr", *spec.space]
    shown = (lambda name: "--" + name) if flags else (lambda name: name)
    for name in params:
        if name not in takes:
            raise ValueError(f"{name}: the {arm} arm takes no {shown(name)} (its parameters: "
                             f"{', '.join(map(shown, takes))}); drop it")
    for name in takes:
        value = params.get(name)
        high = PARAMETERS[name][1] if name in PARAMETERS else math.inf
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not (0 < value <= high and math.isfinite(value)):
            bound = f"a number in (0, {high:g}]" if math.isfinite(high) else "a positive finite number"
            raise ValueError(f"{name}: the {arm} arm needs {shown(name)}, {bound}, got {value!r}")
    return {name: float(params[name]) for name in takes}
DEFAULT_ARMS = ("baseline", "gaga", "gaga_mean")
FRONT_ARMS = ("baseline", "fixed64", "fixed128", "fixed256", "baseline512", "ramp", "noise", "gaga_mean", "normtest")
"""The arms of the steps-quality front on mnist1d (docs/design.md, "The steps-quality front")."""
LM_FRONT_ARMS = ("baseline", "fixed8", "fixed16", "fixed32", "fixed64", "baseline512", "ramp", "noise", "gaga_mean",
                 "normtest")
"""The same on the LM: micro-batches of 4 sequences and windows up to 128 (fixed 4 to 128), the
range its measured noise scale spans."""

_COLOURS = {"baseline": "#1f77b4", "gaga": "#ff7f0e", "gaga_mean": "#2ca02c", "baseline512": "#d62728",
            "normtest": "#9467bd", "fixed64": "#8c564b", "fixed128": "#e377c2", "fixed256": "#7f7f7f",
            "fixed16": "#bcbd22", "fixed32": "#17becf", "fixed8": "#aec7e8", "ramp": "#e6ab02", "noise": "#000000"}
_MARKERS = "osD^v<>pP*Xhd"


def style(name: str) -> tuple[str, str, str]:
    """The arm's colour, marker and line style, the same in every plot: one colour per arm,
    fixed batches dashed, adaptive and planned arms solid."""
    k = ARMS.index(name) if name in ARM_TABLE else len(ARMS)
    line = "-" if name in ARM_TABLE and ARM_TABLE[name].adaptive else "--"
    return _COLOURS.get(name, "#555555"), _MARKERS[k % len(_MARKERS)], line


def label(name: str, cfg: dict[str, Any] | None = None) -> str:
    """The arm's name in reports, with the sizes of ``cfg`` (a config dict; default: the defaults)."""
    if name not in ARM_TABLE:
        return name
    sizes = {"increment": 32, "max_samples": 512, **{k: v for k, v in (cfg or {}).items()
                                                     if k in ("increment", "max_samples")}}
    return ARM_TABLE[name].label.format(**sizes)
