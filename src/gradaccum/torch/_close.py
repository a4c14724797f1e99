"""The Accumulator's close: a window's totals, mean gradient, record and plan, then its step.

Everything the close computes (the schedule's factor, the totals, reduced over ranks by the
distribution mode; the mean gradient; the record and the next plan) is made and validated
before the optimizer runs. From the gradient's division on, a failure leaves the window's step
pending: ``flush()`` retries it (no second reduce or division), ``flush(drop=True)`` drops it.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .._core import Decision, DecisionMonitor, StepRecord
from .._core.lr_scaling import LR_SCALINGS, lr_factor
from .._core.noise_scale import NormStatistics, NormSums, layer_noise_scales, noise_scale, noise_terms, pooled_terms
from .._core.planners import PlanFold, Planner, check_history
from .._core.statistics import mean_gsnr
from .._core.validation import check_positive_int, real_number
from ._distributed import CLOSE, FLUSH
from ._nonfinite import all_finite
from ._parts import AccumulatorState

_OWN_STEPS = [0]  # optimizer steps an Accumulator is taking now: the stray-step hook lets them through


@contextmanager
def _own_step() -> Iterator[None]:
    _OWN_STEPS[0] += 1
    try:
        yield
    finally:
        _OWN_STEPS[0] -= 1


def stray_step_hook(accumulator: weakref.ref[Any]) -> Callable[..., None]:
    """An optimizer step pre-hook that refuses a step the Accumulator did not take while its
    window is open: a leftover ``optimizer.step()`` in the loop would step with the window's
    partial sum (in ``.grad`` under ``"skip_window"``), or with nothing, before the window closes."""
    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        acc = accumulator()
        if acc is not None and acc._micro_batches and not _OWN_STEPS[0]:
            raise RuntimeError(
                f"optimizer.step() was called while the Accumulator's window is open (window {acc.steps}, "
                f"{acc.window_micro_batches} micro-batch(es) so far): the Accumulator steps the optimizer itself "
                "when a window closes (backward returns True). Remove optimizer.step() and optimizer.zero_grad() "
                "from the training loop; the parameters and the window are unchanged")
    return hook


def note(error: BaseException, text: str) -> None:
    """Add ``text`` to the error's message (a note under it in the traceback), keeping its type."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    elif error.args and isinstance(error.args[0], str):  # Python 3.10: no notes
        error.args = (f"{error.args[0]}\n{text}", *error.args[1:])


@dataclass
class Pending:
    """A window whose step was prepared (totals reduced, gradient divided, unscaled and clipped,
    record made) but did not complete: ``flush()`` retries from here, without a second reduce
    or division."""

    record: StepRecord
    factor: float  # the lr factor of the step (schedule and scaling)
    steps: bool  # whether the optimizer is called (an empty or poisoned window is not stepped)


class WindowClose(AccumulatorState):
    """The close of the Accumulator's window (mixed into ``Accumulator``, whose state it reads)."""

    _items_seen: int
    _schedule: float | None
    _pending: Pending | None
    _planned: int | None
    optimizer: torch.optim.Optimizer
    planner: Planner | None
    _fold: tuple[Planner, PlanFold | None] | None  # (planner, its running summary or None), made at the first close
    scheduler: Any
    clip_grad_norm: float | None
    lr_scaling: str | None
    reference_batch: int | None
    lr_schedule: Any
    keep_history: bool
    history: list[StepRecord]
    last_record: StepRecord | None
    monitor: DecisionMonitor
    _reset_window: Callable[[int | None], None]  # the Accumulator's
    _clear_grads: Callable[[], None]  # MicroBatchIntake's

    def _close_window(self, reason: str, decision: Decision) -> bool:
        """Everything the close computes, then the step, then the bookkeeping."""
        if self._pending is None:
            self._pending = self._prepare_close(reason, decision)
        pending = self._pending
        try:
            planned = self._next_plan(pending.record)
        except BaseException as error:
            note(error, f"{self._pending_message()}: no optimizer step was taken")
            raise
        self._step(pending)
        self._pending = None
        try:
            self._after_step(pending)
        except BaseException as error:  # the step is taken: the bookkeeping completes before this raises
            self._finish_close(pending.record, planned)
            note(error, "the optimizer stepped and the window is closed and recorded; the scaler's update or the "
                        "scheduler's step after it raised")
            raise
        self._finish_close(pending.record, planned)
        if self.source is not None and self.planner is None and reason == "rule":
            message = self.monitor.observe(pending.record.micro_batches, bool(decision.info.get("capped", False)))
            if message:
                warnings.warn(f"gradaccum: {message}", RuntimeWarning, stacklevel=3)
        return not pending.record.skipped

    def _prepare_close(self, reason: str, decision: Decision) -> Pending:
        """The schedule's factor, the rule's info and the totals (agreed and reduced over ranks),
        each refused before the window changes; then the window's gradient for the step and its
        record. A failure while the gradient is made drops the window (it is no longer the sum)."""
        scheduled = self._schedule if self._schedule is not None else self._scheduled_factor()
        reduced_first = self._mode.measures_reduced_sums(self.source)
        if not reduced_first:
            decision = self._with_statistics(decision, None)
        items, samples, poisoned = self._mode.window_totals(
            self._window, (self._items, self._samples, self._poisoned), self._screen.window_at_close,
            FLUSH if reason == "flush" else CLOSE, lambda: self._step_settings(scheduled),
            self._steps, self._micro_batches)
        try:
            if reduced_first:  # from the window sum the close has just reduced over every rank
                decision = self._with_statistics(decision, self._mode.global_norm_sums(
                    self.source, self._window.sums, self._statistics_scale(), self._steps, self._micro_batches))
            return self._prepare_step(reason, decision, scheduled, items, samples, poisoned)
        except BaseException as error:
            self._clear_grads()
            self._reset_window(self._planned)
            note(error, "the window's mean gradient could not be made for its step: the window is dropped and no "
                        "optimizer step was taken")
            raise

    def _with_statistics(self, decision: Decision, reduced: tuple[NormSums, dict[str, NormSums]] | None) -> Decision:
        """The decision's info with the window's noise terms (for a planner) and each layer's noise
        scale (the norm path): over ranks as the mode pools them, or from ``reduced``, the model's
        and the layers' norm sums over every rank's micro-batches (``global_norm_sums``)."""
        if self.source is None:
            return decision
        info = dict(decision.info)
        if self.planner is not None:
            info.update(self._noise_info(self._window_statistics() if reduced is None else self._pooled(reduced[0])))
        if self.source.statistics == "norms":
            info.update(self._layer_noise_info(None if reduced is None else reduced[1]))
        return Decision(decision.stop, info)

    def _step_settings(self, scheduled: float) -> dict[str, float]:
        """What every rank's step must apply alike, agreed in the close's header under DDP and
        FSDP2: ranks that differ would step apart, their weights diverging with no error."""
        return {"lr_schedule's factor": scheduled,
                "lr_scaling (0 none, 1 linear, 2 sqrt)": float(LR_SCALINGS.index(self.lr_scaling) + 1
                                                              if self.lr_scaling is not None else 0),
                "reference_batch": float(self.reference_batch or 0),
                "clip_grad_norm": float(self.clip_grad_norm or 0.0),
                "the optimizer's learning rates (summed)": math.fsum(float(g["lr"])
                                                                    for g in self.optimizer.param_groups)}

    def _prepare_step(self, reason: str, decision: Decision, scheduled: float, items: int, samples: int,
                      poisoned: bool) -> Pending:
        """In straight-line order: the lr factor, divide, unscale, clip, whether the scaler
        skips; the window's record. Nothing is stepped yet."""
        skip = poisoned or items == 0
        factor = scheduled
        if self.lr_scaling is not None and items > 0:
            factor *= lr_factor(self.lr_scaling, items, self.reference_batch)  # type: ignore[arg-type]
        lrs = [float(g["lr"] * factor) for g in self.optimizer.param_groups]
        grad_norm: float | None = None
        overflow = False
        if not skip:
            self._window.to_grads(items)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.clip_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm))
            if self.scaler is not None:
                overflow = not all_finite([p.grad for p in self._params])
        record = StepRecord(
            step=self._steps,
            items=items,
            micro_batches=self._micro_batches,
            skipped=skip or overflow,
            reason=("failed" if self._failed else "nonfinite") if poisoned else reason,
            grad_norm=grad_norm,
            lr=lrs,
            info=dict(decision.info),
            samples=samples or None,
        )
        return Pending(record, factor, steps=not skip)

    def _next_plan(self, record: StepRecord) -> int | None:
        """With a planner, the next window's plan from the history with this window's record;
        both validated before the optimizer runs (the record as a resumed run would check it)."""
        if self.planner is None:
            return None
        check_history([record], f"the window's record (window {self._steps})", start=self._steps)
        # a built-in planner folds this record into its running summary (constant cost a close);
        # a user's planner, or a subclass with its own plan(), reads the whole history
        if self._fold is None or self._fold[0] is not self.planner:  # made for this planner
            make = getattr(self.planner, "fold", None)
            self._fold = (self.planner, make() if callable(make) else None)
        fold = self._fold[1]
        planned = self.planner.plan([*self.history, record]) if fold is None \
            else int(self.planner.plan_from(fold(self.history, record)))  # type: ignore[attr-defined]  # fold(): built-in
        return check_positive_int(f"{type(self.planner).__name__}.plan(history), the next window's micro-batches,",
                                  planned)

    def _step(self, pending: Pending) -> None:
        """The optimizer's step (through the scaler) with the lr scaled by the window's factor;
        the learning rates are restored whatever happens."""
        if not pending.steps:
            return
        groups = self.optimizer.param_groups
        base_lrs = [g["lr"] for g in groups]
        if pending.factor != 1.0:
            for g in groups:
                g["lr"] = g["lr"] * pending.factor
        try:
            with _own_step():
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                else:
                    self.optimizer.step()
        except BaseException as error:
            note(error, f"optimizer.step() raised: the learning rates are restored and the window keeps its mean "
                        f"gradient (it is not divided again), but parameters and optimizer state may be partly "
                        f"updated. {self._pending_message()} (retry only if the optimizer changed nothing, for "
                        "example it ran out of memory allocating its state)")
            raise
        finally:
            for g, lr in zip(groups, base_lrs):
                g["lr"] = lr  # the scaling holds for this step only; the scheduler owns the base lr

    def _after_step(self, pending: Pending) -> None:
        """The scaler's update after its step; the scheduler's step after an optimizer step."""
        if pending.steps and self.scaler is not None:
            self.scaler.update()
        if not pending.record.skipped and self.scheduler is not None:
            self.scheduler.step()

    def _finish_close(self, record: StepRecord, planned: int | None) -> None:
        """The bookkeeping of a closed window: gradients cleared, record kept, counters, the next window."""
        self._clear_grads()
        self.last_record = record
        if self.keep_history:
            self.history.append(record)
        self._items_seen += record.items
        self._steps += 1
        self._reset_window(planned)

    def _pending_message(self) -> str:
        return ("the window's step did not complete: call flush() to retry it (its gradient is ready: no second "
                "reduce or division) or flush(drop=True) to drop the window")

    def _scheduled_factor(self) -> float:
        if self.lr_schedule is None:
            return 1.0
        seen = self._items_seen
        value = self.lr_schedule(seen)
        factor = real_number(value)
        if factor is None or not 0 <= factor < math.inf:
            raise ValueError(f"lr_schedule({seen}) must return a finite factor >= 0 (a real number: a float, a NumPy "
                             f"scalar or a 0-dim tensor), got {value!r}")
        return factor

    # ------------------------------------------------------------------ what the statistics say
    def _statistics_scale(self) -> float:
        """What the window's sums are scaled by: the power-of-two count shift and a GradScaler's scale."""
        return self._window.factor * (1.0 if self.scaler is None else float(self.scaler.get_scale()))

    def _window_statistics(self) -> Any:
        """What a statistics rule reads: the per-element moments, or the norm path's pooled
        estimates (over ranks, as the mode pools them). None when the window has no samples yet
        (every micro-batch skipped)."""
        source = self.source
        assert source is not None
        if source.statistics == "elements":
            return source.moments() if source.count else None
        sums = source.norm_sums(self._window.sums, self._statistics_scale())
        return self._pooled(self._mode.pool_norm_sums(sums, self._steps, self._micro_batches))

    @staticmethod
    def _pooled(sums: NormSums) -> NormStatistics | None:
        pooled = pooled_terms(sums)
        return pooled if pooled.samples else None

    def _layer_noise_info(self, layers: dict[str, NormSums] | None = None) -> dict[str, float]:
        """Each layer's noise scale, ``noise_scale/<layer>`` (the norm path), over ranks; from
        ``layers``, the layers' norm sums over every rank, where the close measured them."""
        if layers is None:
            assert self.source is not None
            layers = self._mode.pool_layer_sums(self.source.layer_norm_sums(self._window.sums,
                                                                           self._statistics_scale()),
                                                self._steps, self._micro_batches)
        return layer_noise_scales(layers)

    def _noise_info(self, stats: Any) -> dict[str, float]:
        """The window's noise terms (unbiased ``tr(Sigma)``, ``|G|^2``), its noise scale and,
        with per-element statistics, its per-sample GSNR: what the noise-scale planners read
        from the records, given the window's statistics (``_window_statistics``). Nothing with
        fewer than 2 samples."""
        if stats is None:
            return {}
        if isinstance(stats, NormStatistics):
            n, trace, squared, extra = stats.samples, stats.trace, stats.squared_norm, {}
            if n < 2:
                return {}
        else:
            n = stats[0].n
            if n < 2:
                return {}
            trace, squared = (float(t) for t in noise_terms(n, [m.mean for m in stats], [m.m2 for m in stats]))
            extra = {"gsnr": mean_gsnr(stats, "sample").value}
        return {"samples": n, "trace": trace, "squared_norm": squared, "noise_scale": noise_scale(trace, squared),
                **extra}
