"""Planners: the length of the next window, fixed before it starts (docs/design.md, "Planned windows").

A stopping rule decides after each increment whether the window is complete; frameworks
(the Transformers Trainer, Lightning, DeepSpeed, FSDP2, DDP's ``no_sync``) fix a window's end
*before* its backward. A planner answers first: ``plan(history) -> micro-batches`` for the
window about to start, a pure function of the step records so far. The backends accept a
planner wherever they accept a rule.

Built in:
- ``BatchRamp``: the window grows from ``start`` to ``end`` samples, linearly or in equal
  stages, over a number of samples or steps (Megatron's ``--rampup-batch-size``, OLMo's
  batch-size warmup).
- ``NoiseScalePlanner``: ``c * B_simple`` from the exponential averages of the noise terms the
  earlier windows measured, clamped to ``[min_batch, max_batch]``, changed at most every
  ``every`` steps (Gray et al. 2024).
- ``NormTestPlanner``: the plan-ahead norm test: the window at which the norm test is
  expected to pass, ``B_simple (1 - theta^2) / theta^2`` (Byrd et al.'s biased form) or
  ``B_simple / theta^2`` (``unbiased=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from .noise_scale import NoiseScaleEMA
from .records import StepRecord
from .validation import check_choice, check_positive_float, check_positive_int


@runtime_checkable
class Planner(Protocol):
    """The protocol every planner follows.

    Attributes:
      needs_statistics: whether the windows must record the noise terms (``trace``,
        ``squared_norm`` in the step records' info) that ``plan`` reads.
    """

    needs_statistics: bool

    def plan(self, history: Sequence[StepRecord]) -> int:
        """Micro-batches of the window about to start, from the records of the windows so far."""
        ...


def is_planner(obj: object) -> bool:
    return isinstance(obj, Planner) and not isinstance(obj, type)


def _micro_batches(batch: float, micro_batch: int, low: int, high: int) -> int:
    """``batch`` samples as whole micro-batches, within ``[low, high]`` micro-batches."""
    return int(min(max(round(batch / micro_batch), low, 1), high))


@dataclass(frozen=True)
class BatchRamp:
    """Ramp the window from ``start`` to ``end`` samples over ``over`` samples (or steps).

    ``stages=None`` ramps linearly (rounded to whole micro-batches); ``stages=s`` in ``s``
    equal steps. ``budget`` (optional, in the ramp's unit) refuses a ramp longer than the run.
    """

    start: int
    end: int
    over: int
    micro_batch: int
    unit: str = "samples"
    stages: int | None = None
    budget: int | None = None
    needs_statistics: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        for name in ("start", "end", "over", "micro_batch"):
            check_positive_int(name, getattr(self, name))
        check_choice("unit", self.unit, ("samples", "steps"))
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must be <= end ({self.end}): a ramp grows the window")
        if self.micro_batch > self.start:
            raise ValueError(f"micro_batch ({self.micro_batch}) must be <= start ({self.start})")
        if self.stages is not None:
            check_positive_int("stages", self.stages)
        if self.budget is not None and check_positive_int("budget", self.budget) < self.over:
            raise ValueError(f"over ({self.over} {self.unit}) is longer than the budget ({self.budget}): "
                             "the ramp would never reach its end")

    def batch_at(self, progress: int) -> float:
        """The window's target size in samples after ``progress`` samples (or steps)."""
        fraction = min(1.0, progress / self.over)
        if self.stages is not None:
            fraction = math.floor(fraction * self.stages) / self.stages
        return self.start + (self.end - self.start) * fraction

    def plan(self, history: Sequence[StepRecord]) -> int:
        progress = sum(r.items for r in history) if self.unit == "samples" else len(history)
        low = -(-self.start // self.micro_batch)
        return _micro_batches(self.batch_at(progress), self.micro_batch, low, self.end // self.micro_batch)


@dataclass(frozen=True, kw_only=True)
class _NoisePlanner:
    """Shared by the planners that read the noise scale the earlier windows measured."""

    min_batch: int
    max_batch: int
    micro_batch: int
    every: int = 1
    decay: float = 0.9
    needs_statistics: bool = field(default=True, init=False)
    statistics: str = field(default="norms", init=False)  # the noise terms need only the norm path

    def _check(self) -> None:
        for name in ("min_batch", "max_batch", "micro_batch", "every"):
            check_positive_int(name, getattr(self, name))
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch ({self.min_batch}) must be <= max_batch ({self.max_batch})")
        if self.micro_batch > self.min_batch:
            raise ValueError(f"micro_batch ({self.micro_batch}) must be <= min_batch ({self.min_batch})")
        NoiseScaleEMA(self.decay)

    def noise_scale(self, history: Sequence[StepRecord]) -> float:
        """``B_simple`` from the windows up to the last multiple of ``every`` steps (NaN if none)."""
        seen = history[: len(history) - len(history) % self.every]
        terms = [(r.info["trace"], r.info["squared_norm"]) for r in seen
                 if "trace" in r.info and not r.skipped and math.isfinite(r.info["trace"])]
        return NoiseScaleEMA(self.decay).estimate(terms)

    def _plan_batch(self, batch: float) -> int:
        if math.isnan(batch):
            batch = self.min_batch  # nothing measured yet: start small
        low = -(-self.min_batch // self.micro_batch)
        return _micro_batches(min(batch, self.max_batch), self.micro_batch, low, self.max_batch // self.micro_batch)


@dataclass(frozen=True)
class NoiseScalePlanner(_NoisePlanner):
    """The next window is ``c * B_simple`` samples, clamped to ``[min_batch, max_batch]``.

    ``B_simple`` is the ratio of the exponential averages (``decay``) of the unbiased
    ``tr(Sigma)`` and ``|G|^2`` the earlier windows measured; with no signal yet
    (``|G|^2 <= 0``) the window goes to ``max_batch``; before any measurement, ``min_batch``.
    """

    c: float

    def __post_init__(self) -> None:
        check_positive_float("c", self.c)
        self._check()

    def plan(self, history: Sequence[StepRecord]) -> int:
        return self._plan_batch(self.c * self.noise_scale(history))


@dataclass(frozen=True)
class NormTestPlanner(_NoisePlanner):
    """The window at which the norm test is expected to pass, planned ahead.

    Byrd et al.'s practical test (``GSNR``'s sibling ``NormTest``) compares with the biased
    ``|mu|^2`` and passes once ``n >= B_simple (1 - theta^2) / theta^2`` (always for
    theta >= 1); ``unbiased=True`` plans ``n = B_simple / theta^2``, the test with the
    unbiased ``|G|^2``.
    """

    theta: float
    unbiased: bool = False

    def __post_init__(self) -> None:
        check_positive_float("theta", self.theta)
        if not self.unbiased and self.theta >= 1:
            raise ValueError(f"theta ({self.theta}) must be < 1 for the biased norm test: it always passes at >= 1")
        self._check()

    def plan(self, history: Sequence[StepRecord]) -> int:
        b = self.noise_scale(history)
        factor = 1 / self.theta**2 if self.unbiased else (1 - self.theta**2) / self.theta**2
        return self._plan_batch(b * factor)
