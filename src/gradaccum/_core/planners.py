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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from array_api_compat import array_namespace

from .arrays import host_array, is_python, namespace, python, ratio_or_inf
from .noise_scale import NoiseScaleEMA, averaged, averaged_noise_scale
from .records import StepRecord
from .rules import SOURCES
from .validation import check_choice, check_positive_float, check_positive_int, real_number


@runtime_checkable
class Planner(Protocol):
    """The protocol every planner follows.

    Attributes:
      needs_statistics: whether the windows must record the noise terms (``trace``,
        ``squared_norm`` in the step records' info) that ``plan`` reads.
    """

    # read-only: a planner may hold it as a plain attribute, a frozen dataclass field or a property
    @property
    def needs_statistics(self) -> bool: ...

    def plan(self, history: Sequence[StepRecord]) -> int:
        """Micro-batches of the window about to start, from the records of the windows so far."""
        ...


def is_planner(obj: object) -> bool:
    return isinstance(obj, Planner) and not isinstance(obj, type)


class PlanSummary(NamedTuple):
    """All a built-in planner reads of the windows so far: Python numbers summarised from the
    step records (``summarize``), or arrays a traced train state carries and updates at every
    close (``after_window``), so the JAX backend plans inside ``jit`` with the same formulas.

    Attributes:
      items: items of every closed window (skipped ones included).
      steps: windows closed.
      trace, squared, weight: the exponential moving averages (``NoiseScaleEMA``, not yet
        divided by ``weight``) of the windows' ``tr(Sigma)`` and ``|G|^2`` that count:
        applied, with a finite trace, up to the planner's last plan boundary.
      signal: the same average of the windows' per-sample GSNR less its ``1/n`` bias (windows
        with per-element statistics; 0 otherwise), which ``GSNRPlanner`` reads.
    """

    items: Any
    steps: Any
    trace: Any
    squared: Any
    weight: Any
    signal: Any = 0.0


def summarize(history: Sequence[StepRecord], decay: float = 0.9, every: int = 1) -> PlanSummary:
    """``PlanSummary`` of the step records; the noise terms of windows up to the last
    multiple of ``every`` windows (``NoiseScaleEMA.update``, as ``after_window``)."""
    average = NoiseScaleEMA(decay)
    state = (0.0, 0.0, 0.0, 0.0)  # trace, squared, weight, signal
    for r in history[: len(history) - len(history) % every]:
        state = _fold(average, state, r)
    return PlanSummary(sum(r.items for r in history), len(history), *state)


def _fold(average: NoiseScaleEMA, state: tuple[Any, ...], r: StepRecord) -> tuple[Any, ...]:
    """The averages after record ``r``: its noise terms join them where they count (applied,
    finite trace)."""
    if "trace" in r.info and not r.skipped and math.isfinite(r.info["trace"]):
        measured = r.info["gsnr"] - 1 / r.info["samples"] if "gsnr" in r.info else 0.0
        return average.update(state, (r.info["trace"], r.info["squared_norm"], 1.0, measured))
    return state


class PlanFold:
    """``summarize(history, decay, every)`` kept as a history grows: each call folds only the
    records it has not folded yet, so a plan at window 100,000 costs what one at window 10 does
    (``summarize`` refolds every record at every close).

    Bitwise ``summarize``'s result: the same records, folded in the same order. A history that
    does not extend the one last seen (the record at the last folded place is another object: a
    restored history, or a close whose step failed and whose record never joined it) is folded
    anew from its start.
    """

    def __init__(self, decay: float = 0.9, every: int = 1) -> None:
        self._average = NoiseScaleEMA(decay)
        self._every = check_positive_int("every", every)
        self._start()

    def _start(self) -> None:
        self._counted = 0  # records whose items are in _items
        self._items = 0
        self._folded = 0  # records folded into the averages (a multiple of every)
        self._state: tuple[Any, ...] = (0.0, 0.0, 0.0, 0.0)
        self._last: StepRecord | None = None  # the record at index _counted - 1

    def __call__(self, history: Sequence[StepRecord], pending: StepRecord | None = None) -> PlanSummary:
        """The summary of ``history`` followed by ``pending`` (a record not yet in it), if given."""
        n = len(history) + (pending is not None)

        def record(i: int) -> StepRecord:
            return pending if pending is not None and i == len(history) else history[i]

        counted, items, folded, state = self._counted, self._items, self._folded, self._state
        if counted and (counted > n or record(counted - 1) is not self._last):
            counted, items, folded, state = 0, 0, 0, (0.0, 0.0, 0.0, 0.0)  # folded anew
        for i in range(counted, n):
            items += record(i).items
        boundary = n - n % self._every
        for i in range(folded, boundary):
            state = _fold(self._average, state, record(i))
        # kept only once every record is folded: an interrupted call (Ctrl-C, a failed close
        # retried by flush()) leaves the fold as it was
        self._counted, self._items, self._folded, self._state = n, items, max(folded, boundary), state
        self._last = record(n - 1) if n else None
        return PlanSummary(items, n, *state)


REASONS = ("rule", "flush", "nonfinite", "failed")  # why a window closed (``StepRecord.reason``)


def check_history(history: Sequence[StepRecord], name: str = "history", start: int = 0) -> None:
    """Refuse, naming the record and its key, a value no window could have recorded.

    A planner trusts its history: a resumed run plans from the records it loads, so a tampered
    or corrupted one (``items`` of -1000, a negative ``trace``, a NaN ``squared_norm``, an
    infinite ``gsnr``) would plan every later window from it, silently. Checked here: each
    record's place (``step`` is its index), counts, flags and reason, and the noise terms the
    planners read where they count (``summarize``: an applied window with a finite trace).
    ``start``: the step of the first record (0 for a whole history).
    """
    for k, r in enumerate(history, start):
        where = f"{name}[{k}]" if start == 0 else name
        _check_int(f"{where}['step']", r.step, k, k)
        _check_int(f"{where}['items']", r.items, 0)
        _check_int(f"{where}['micro_batches']", r.micro_batches, 1)
        if r.samples is not None:
            _check_int(f"{where}['samples']", r.samples, 1)
        if not isinstance(r.skipped, bool):
            raise ValueError(f"{where}['skipped'] must be a bool, got {r.skipped!r}")
        if r.reason not in REASONS:
            raise ValueError(f"{where}['reason'] must be one of {', '.join(REASONS)}, got {r.reason!r}")
        norm = None if r.grad_norm is None else real_number(r.grad_norm)
        if r.grad_norm is not None and (norm is None or norm < 0):
            raise ValueError(f"{where}['grad_norm'] must be None or a norm >= 0, got {r.grad_norm!r}")
        if not isinstance(r.lr, (list, tuple)) or any(real_number(lr) is None for lr in r.lr):
            raise ValueError(f"{where}['lr'] must be a list of learning rates, got {r.lr!r}")
        if not isinstance(r.info, dict):
            raise ValueError(f"{where}['info'] must be a dict, got {type(r.info).__name__}")
        _check_noise_terms(f"{where}['info']", r.info, counts=not r.skipped)


def _check_int(name: str, value: Any, low: int, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        wanted = f"{low}" if high == low else f"an int >= {low}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def _check_noise_terms(where: str, info: dict[str, Any], counts: bool) -> None:
    """The info keys the planners read: ``planned``; ``trace`` (>= 0, or NaN: nothing measured);
    where it counts (finite, the window applied) ``squared_norm`` finite, ``samples`` >= 2 and
    ``gsnr`` finite and >= 0."""
    if "planned" in info:
        _check_int(f"{where}['planned']", info["planned"], 1)
    if "trace" not in info:
        return
    trace = real_number(info["trace"])
    if trace is None or trace < 0:
        raise ValueError(f"{where}['trace'] must be a real number >= 0 (or NaN), got {info['trace']!r}")
    if not (counts and math.isfinite(trace)):
        return
    squared = real_number(info.get("squared_norm"))
    if squared is None or not math.isfinite(squared):
        raise ValueError(f"{where}['squared_norm'] must be a finite real number where the trace is finite, got "
                         f"{info.get('squared_norm')!r}")
    gsnr = real_number(info["gsnr"]) if "gsnr" in info else 0.0
    if gsnr is None or not 0 <= gsnr < math.inf:
        raise ValueError(f"{where}['gsnr'] must be a finite real number >= 0, got {info['gsnr']!r}")
    _check_int(f"{where}['samples']", info.get("samples"), 2)


def after_window(summary: PlanSummary, decay: float, items: Any, counts: Any, trace: Any, squared: Any,
                 signal: Any = 0.0) -> PlanSummary:
    """The summary after one more window (array code, traced by the JAX backend): its
    ``items``; its noise terms (and GSNR signal) join the averages where ``counts``
    (applied, finite trace)."""
    xp = array_namespace(summary.trace)
    old = (summary.trace, summary.squared, summary.weight, summary.signal)
    new = NoiseScaleEMA(decay).update(old, (trace, squared, 1.0, signal))
    keep = [xp.where(counts, a, b) for a, b in zip(new, old)]
    return PlanSummary(summary.items + items, summary.steps + 1, *keep)


def _micro_batches(batch: Any, micro_batch: int, low: int, high: int) -> Any:
    """``batch`` samples as whole micro-batches (rounded half to even), within ``[low, high]``:
    an int32 array, or a Python int for a Python number."""
    xp = namespace(batch)
    count = xp.clip(xp.round(host_array(batch) / micro_batch), max(low, 1), high)
    return int(count) if is_python(batch) else xp.astype(count, xp.int32)


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

    def batch_at(self, progress: Any) -> Any:
        """The window's target size in samples after ``progress`` samples (or steps): an array,
        or a Python float for a Python number."""
        xp = namespace(progress)
        fraction = xp.minimum(host_array(progress) / self.over, 1.0)  # true division: the default float dtype
        if self.stages is not None:
            fraction = xp.floor(fraction * self.stages) / self.stages
        batch = self.start + (self.end - self.start) * fraction
        return python(batch) if is_python(progress) else batch

    def plan(self, history: Sequence[StepRecord]) -> int:
        return int(self.plan_from(summarize(history)))

    def fold(self) -> PlanFold | None:
        """A ``PlanFold`` whose summaries give ``plan``'s answer through ``plan_from``, a close
        at a time (the Accumulator keeps one); None for a subclass with its own ``plan``."""
        return PlanFold() if type(self).plan is BatchRamp.plan else None

    def plan_from(self, summary: PlanSummary) -> Any:
        """The plan from a ``PlanSummary`` (Python numbers or arrays alike)."""
        progress = summary.items if self.unit == "samples" else summary.steps
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
    source: str = "per_sample"
    needs_statistics: bool = field(default=True, init=False)
    statistics: str = field(default="norms", init=False)  # the noise terms need only the norm path

    def _check(self) -> None:
        for name in ("min_batch", "max_batch", "micro_batch", "every"):
            check_positive_int(name, getattr(self, name))
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch ({self.min_batch}) must be <= max_batch ({self.max_batch})")
        if self.micro_batch > self.min_batch:
            raise ValueError(f"micro_batch ({self.micro_batch}) must be <= min_batch ({self.min_batch})")
        check_choice("source", self.source, SOURCES)
        if self.source == "micro_batch":  # per-element statistics: the backend decides (statistics_source)
            if self.max_batch < 2 * self.micro_batch:
                raise ValueError(f"max_batch ({self.max_batch}) must be >= 2 * micro_batch ({self.micro_batch}) with "
                                 "source='micro_batch': a window needs two micro-batches to measure their variance "
                                 "(or use source='per_sample')")
        NoiseScaleEMA(self.decay)

    @property
    def _fewest(self) -> int:
        """The fewest micro-batches a window may have: two where the variance is measured
        between micro-batches (a window of one has none)."""
        return 2 if self.source == "micro_batch" else 1

    def noise_scale(self, history: Sequence[StepRecord]) -> float:
        """``B_simple`` from the windows up to the last multiple of ``every`` steps (NaN if none)."""
        return float(self.noise_scale_from(summarize(history, self.decay, self.every)))

    def noise_scale_from(self, summary: PlanSummary) -> Any:
        """``B_simple`` of the summary's averages: NaN before any window counted, infinite
        when the averaged ``|G|^2`` is not positive (no division by it)."""
        return averaged_noise_scale(summary.trace, summary.squared, summary.weight)

    def plan(self, history: Sequence[StepRecord]) -> int:
        return int(self.plan_from(summarize(history, self.decay, self.every)))

    def fold(self) -> PlanFold | None:
        """A ``PlanFold`` whose summaries give ``plan``'s answer through ``plan_from``, a close
        at a time (the Accumulator keeps one); None for a subclass with its own ``plan``."""
        return PlanFold(self.decay, self.every) if type(self).plan is _NoisePlanner.plan else None

    def plan_from(self, summary: PlanSummary) -> Any:
        """The plan from a ``PlanSummary`` (Python numbers or arrays alike)."""
        return self._plan_batch(self._target_from(summary))

    def _target_from(self, summary: PlanSummary) -> Any:
        return self._target(self.noise_scale_from(summary))

    def _target(self, noise_scale: Any) -> Any:
        raise NotImplementedError

    def _plan_batch(self, batch: Any) -> Any:
        low = max(-(-self.min_batch // self.micro_batch), self._fewest)
        xp = namespace(batch)
        # nothing measured yet (NaN): start small; no signal (inf): the largest window
        clamped = xp.minimum(xp.where(xp.isnan(host_array(batch)), float(self.min_batch), batch), float(self.max_batch))
        return _micro_batches(python(clamped) if is_python(batch) else clamped, self.micro_batch, low,
                              self.max_batch // self.micro_batch)


@dataclass(frozen=True)
class NoiseScalePlanner(_NoisePlanner):
    """The next window is ``c * B_simple`` samples, clamped to ``[min_batch, max_batch]``.

    ``B_simple`` is the ratio of the exponential averages (``decay``) of the unbiased
    ``tr(Sigma)`` and ``|G|^2`` the earlier windows measured; with no signal yet
    (``|G|^2 <= 0``) the window goes to ``max_batch``; before any measurement, ``min_batch``.
    """

    c: float
    source: str = field(default="micro_batch", kw_only=True)  # the micro-batches' own gradients (docs/noise-scale.md)

    def __post_init__(self) -> None:
        check_positive_float("c", self.c)
        self._check()

    def _target(self, noise_scale: Any) -> Any:
        return self.c * noise_scale


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
    source: str = field(default="micro_batch", kw_only=True)  # the micro-batches' own gradients (docs/noise-scale.md)

    def __post_init__(self) -> None:
        check_positive_float("theta", self.theta)
        if not self.unbiased and self.theta >= 1:
            raise ValueError(f"theta ({self.theta}) must be < 1 for the biased norm test: it always passes at >= 1")
        self._check()

    def _target(self, noise_scale: Any) -> Any:
        factor = 1 / self.theta**2 if self.unbiased else (1 - self.theta**2) / self.theta**2
        return noise_scale * factor


@dataclass(frozen=True)
class GSNRPlanner(_NoisePlanner):
    """The plan-ahead ``GSNR(tau, scale="mean")``: the window at which the mean-scale GSNR is
    expected to pass tau.

    Per window the per-sample GSNR estimate is about ``r + 1/n`` (r the mean per-sample GSNR,
    n the window's samples); its average less that bias estimates r, and the mean-scale
    statistic of a window of n samples is about ``n r + 1``, so the plan is
    ``n = (tau - 1) / r``, clamped to ``[min_batch, max_batch]`` (``max_batch`` while r <= 0,
    ``min_batch`` before anything is measured). It needs per-element statistics
    (``statistics = "elements"``): the windows record their ``gsnr``.
    """

    tau: float
    statistics: str = field(default="elements", init=False)

    def __post_init__(self) -> None:
        check_positive_float("tau", self.tau)
        if self.tau <= 1:
            raise ValueError(f"tau ({self.tau}) must be > 1: the mean-scale GSNR is about 1 with no signal")
        self._check()

    def _target_from(self, summary: PlanSummary) -> Any:
        """``(tau - 1) / r`` of the averaged signal r: NaN before anything was measured, infinite
        while r <= 0."""
        xp = namespace(summary.signal, summary.weight)
        signal, seen = averaged(summary.signal, summary.weight)
        target = ratio_or_inf(self.tau - 1, signal)
        target = xp.where(seen, target, xp.asarray(math.nan, dtype=target.dtype))
        return python(target) if is_python(summary.signal, summary.weight) else target
