"""The PyTorch Accumulator: exact gradient accumulation with pluggable stopping rules."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .._core import (
    Decision,
    DecisionMonitor,
    StepRecord,
    StoppingRule,
    WindowView,
)
from .._core.config import AccumulationConfig, as_rule
from .._core.lr_scaling import LR_SCALINGS, lr_factor
from .._core.noise_scale import NormStatistics, NormSums, layer_noise_scales, noise_scale, noise_terms, pooled_terms
from .._core.planners import Planner, check_history, is_planner
from .._core.rules import statistics_kind, statistics_source
from .._core.statistics import mean_gsnr
from .._core.validation import check_choice, check_positive_float, check_positive_int, real_number
from ._checks import check_count, check_loss, check_model, tracked_parameters
from ._distributed import (
    CHECK,
    CLOSE,
    FLUSH,
    GATE,
    INCREMENT,
    LAYERS,
    NORMS,
    RankContract,
    disable_ddp_sync,
    is_ddp,
    is_fsdp,
    local,
    sum_fsdp_gradients,
)
from ._nonfinite import (
    POLICIES,
    NonFiniteError,
    NonFinitePolicy,
    Screen,
    all_finite,
    finite_loss,
    squared_norms_if_finite,
)
from ._sources import MicroBatchSource, PerSampleSource
from ._state import VERSION, checked_state
from ._stats import PerSampleGradStats
from ._stats._sharded import is_sharded, shard_group
from ._window_sums import MomentWindowSums, UnshiftedWindowSums, WindowSums

__all__ = ["Accumulator", "NonFiniteError", "NonFinitePolicy"]

_OWN_STEPS = [0]  # optimizer steps an Accumulator is taking now: the stray-step hook lets them through


@contextmanager
def _own_step() -> Iterator[None]:
    _OWN_STEPS[0] += 1
    try:
        yield
    finally:
        _OWN_STEPS[0] -= 1


def _stray_step_hook(accumulator: weakref.ref[Accumulator]) -> Callable[..., None]:
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


def _note(error: BaseException, text: str) -> None:
    """Add ``text`` to the error's message (a note under it in the traceback), keeping its type."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    elif error.args and isinstance(error.args[0], str):  # Python 3.10: no notes
        error.args = (f"{error.args[0]}\n{text}", *error.args[1:])


@dataclass
class _Pending:
    """A window whose step was prepared (totals reduced, gradient divided, unscaled and clipped,
    record made) but did not complete: ``flush()`` retries from here, without a second reduce
    or division."""

    record: StepRecord
    factor: float  # the lr factor of the step (schedule and scaling)
    steps: bool  # whether the optimizer is called (an empty or poisoned window is not stepped)


class Accumulator:
    """Accumulate micro-batch gradients into windows whose step sees the exact mean gradient.

    Each ``backward(loss, count)`` adds the gradient of ``loss * count`` (the *sum* of
    the micro-batch's per-item losses) to a window sum. When the stopping rule closes
    the window, the sum is divided by the window's total item count, so the optimizer
    sees the gradient of the mean loss over every item of the window, whatever the
    micro-batch sizes or token counts (docs/design.md, "Window mean").

    Args:
      model: the module being trained (plain, DistributedDataParallel, or sharded with FSDP2's
        ``fully_shard``).
      optimizer: an optimizer that owns every trainable parameter of ``model``.
      rule: a stopping rule, for example ``gradaccum.FixedSteps(4)``, an ``AccumulationConfig``,
        or a planner (``gradaccum.BatchRamp``, ``NoiseScalePlanner``, ``NormTestPlanner``),
        which fixes each window's length before it starts (``planned_micro_batches``).
      scheduler: optional LR scheduler, stepped once per optimizer step that happened.
      scaler: optional ``torch.amp.GradScaler``; the window is unscaled once, and a window
        whose gradient has inf/nan is skipped with the scheduler step, as in one big batch.
      clip_grad_norm: optional max total norm, applied to the window's mean gradient.
      nonfinite: what a NaN/Inf loss or gradient of a micro-batch does: ``"raise"``
        (default, NonFiniteError), ``"skip_micro_batch"`` (drop its items and gradient),
        or ``"skip_window"`` (no optimizer step for the window it fell in). The
        accumulated window is never touched by the bad micro-batch. With a scaler,
        non-finite *gradients* are the scaler's business (the window is skipped and the
        scale reduced); non-finite losses still follow this policy.
      keep_history: keep a ``StepRecord`` for every window in ``history``.
      lr_scaling: opt-in coupling of the learning rate to the window's realized size:
        ``"linear"`` (lr * items / reference_batch) or ``"sqrt"``; applied to every
        parameter group for the step only, on top of any scheduler.
      reference_batch: the batch size at which the optimizer's learning rate applies
        unchanged (required with ``lr_scaling``).
      lr_schedule: an LR schedule over training progress in items, not steps (with a planner
        or an adaptive rule the number of steps is not known in advance):
        ``lr_schedule(items_seen) -> factor``, ``items_seen`` counting the items of every
        earlier window; each group's lr is multiplied by it for the step only, on top of
        any scheduler and ``lr_scaling``.
      collective_timeout: seconds the Accumulator's own collectives wait for every rank
        under DistributedDataParallel before raising (default 300).

    A rule that needs per-sample statistics (``GSNR``, ``NormTest``) gets them from a
    ``PerSampleGradStats`` on the model, merged after every micro-batch (one micro-batch
    is one increment); ``FixedSteps`` pays nothing for them. The rule's info of each
    window (samples, the statistic) goes into the step record, and a warning says when
    the rule closes every window after one increment or at the cap.

    Under DistributedDataParallel the Accumulator owns gradient synchronisation: DDP's
    per-backward all-reduce is switched off and the window's gradient sums and item
    counts are all-reduced once, when the window closes, so the step equals a single
    process run over the union of all ranks' micro-batches. Every rank must call
    ``backward`` the same number of times per window, and ``flush`` together: a small
    header all-gathered before each of the Accumulator's collectives checks it, so a rank
    that breaks it raises ``ContractError`` on every rank, and one that never arrives
    times out after ``collective_timeout`` seconds. The close's header also carries what
    each rank's step applies (the ``lr_schedule`` factor, ``lr_scaling``, ``reference_batch``,
    ``clip_grad_norm``, the optimizer's learning rates): ranks that differ raise
    ``ContractError`` before the window changes instead of stepping apart. With a statistics rule, every
    micro-batch is one collective increment (with a per-element rule its moments are reduced
    then, and they hold the window's sum: the close reduces only the counts); a rank whose
    micro-batch was skipped as non-finite contributes zeros, so no rank waits; the
    ``"raise"`` policy raises on the rank that saw the bad micro-batch only, so use a
    skip policy under DDP.

    Under FSDP2 (``fully_shard``) every micro-batch's gradient is reduce-scattered as a plain
    sum over ranks into the window's sharded sum, and the ranks agree on the window's items
    when it closes (one small collective); before each backward they agree that every rank
    has items and whether every loss is finite, so a micro-batch is kept or dropped on every
    rank (docs/design.md, "Window mean"). Norm rules and planners read statistics summed over
    the ranks (docs/design.md, "Norm path"); per-element rules and a GradScaler are refused.

    Memory: the window sum is kept apart from ``param.grad`` (one extra gradient-sized
    buffer), so that a bad micro-batch can be dropped without touching the sum, except
    with ``nonfinite="skip_window"`` and no statistics rule, where autograd adds into
    ``.grad`` itself (see the README's table of guarantees).

    The parameters managed are those the optimizer holds, frozen ones included, so a
    parameter unfrozen later is averaged like the others; a model parameter the optimizer
    does not hold that gets a gradient raises ValueError naming it.

    The Accumulator takes the optimizer step: an ``optimizer.step()`` it did not take is
    refused while a window is open, and with the sum in ``.grad`` a ``.grad`` changed between
    backwards (``optimizer.zero_grad()``) is refused at the next backward or flush. Everything
    a close computes (the schedule's factor, the totals, the mean gradient, the record and the
    next plan) is made and validated before the optimizer runs. If the plan or the optimizer
    fails, the learning rates are restored and the window keeps its mean gradient: ``flush()``
    retries the step (no second reduce or division), ``flush(drop=True)`` drops the window,
    and ``backward`` and ``state_dict`` refuse until one of them is called. A scheduler (or
    the scaler's update) failing after the step raises once the window is recorded.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        rule: StoppingRule | Planner | AccumulationConfig,
        *,
        scheduler: Any | None = None,
        scaler: Any | None = None,
        clip_grad_norm: float | None = None,
        nonfinite: NonFinitePolicy = "raise",
        keep_history: bool = True,
        lr_scaling: str | None = None,
        reference_batch: int | None = None,
        lr_schedule: Any | None = None,
        collective_timeout: float = 300.0,
    ) -> None:
        self._params = tracked_parameters(model, optimizer)
        check_model(model, self._params)
        tracked = {id(p) for p in self._params}
        self._untracked = [(n, p) for n, p in model.named_parameters() if id(p) not in tracked]
        self.model = model
        self.optimizer = optimizer
        self.rule = as_rule(rule)
        self.planner: Planner | None = self.rule if is_planner(self.rule) else None
        if self.planner is not None and not keep_history:
            raise ValueError("keep_history must be True with a planner: it plans each window from the history")
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        if scaler is not None and not all(
            callable(getattr(scaler, m, None)) for m in ("scale", "unscale_", "step", "update")
        ):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.clip_grad_norm = None if clip_grad_norm is None else check_positive_float("clip_grad_norm", clip_grad_norm)
        self.nonfinite = check_choice("nonfinite", nonfinite, POLICIES)
        self.keep_history = bool(keep_history)
        self.lr_scaling = None if lr_scaling is None else check_choice("lr_scaling", lr_scaling, LR_SCALINGS)
        if self.lr_scaling is not None and reference_batch is None:
            raise ValueError("reference_batch must be given with lr_scaling (the batch size the lr was set for)")
        self.reference_batch = None if reference_batch is None else check_positive_int("reference_batch", reference_batch)
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be a callable items_seen -> factor, got {type(lr_schedule).__name__}")
        self.lr_schedule = lr_schedule
        timeout = check_positive_float("collective_timeout", collective_timeout)
        self._ddp = is_ddp(model)
        self._fsdp = is_fsdp(model)
        if self._fsdp:
            if self.rule.needs_statistics and statistics_kind(self.rule) != "norms":
                raise ValueError(f"rule: {type(self.rule).__name__} needs per-element statistics, which are not taken on "
                                 "a model sharded with fully_shard (each rank would need its shard's moments over every "
                                 "rank's samples); use a norm rule (NormTest, the noise-scale planners), FixedSteps "
                                 "or BatchRamp, or DDP")
            if scaler is not None:
                raise ValueError("scaler: a GradScaler is not supported with fully_shard; use bf16 or 32-bit")
            sum_fsdp_gradients(model)
        self.stats: PerSampleGradStats | None = None  # the per-sample source's collector (its hooks, paths)
        self.source: PerSampleSource | MicroBatchSource | None = None
        if self.rule.needs_statistics and statistics_source(self.rule) == "micro_batch":
            names = {id(p): n for n, p in model.named_parameters()}
            self.source = MicroBatchSource(
                [names.get(id(p), f"parameter #{i}") for i, p in enumerate(self._params)],
                group=shard_group(self._params, [names.get(id(p), "?") for p in self._params])
                if self._fsdp and is_sharded(self._params) else None)
        elif self.rule.needs_statistics:
            # matched to the optimizer's parameters by identity: its groups may list them in any order
            self.stats = PerSampleGradStats(model.module if self._ddp else model, params=self._params,  # type: ignore[arg-type]
                                            kind=statistics_kind(self.rule))
            self.source = PerSampleSource(self.stats)
        # Only "skip_window" without statistics may let autograd accumulate straight into
        # .grad (the hand-written loop's way, the fastest): the others must be able to drop
        # one micro-batch, and a statistics rule needs each micro-batch's own gradient.
        # Under FSDP2 the reduce-scatter sums every rank's backward: one scale for all seeds.
        # Per-element statistics hold the window's sum themselves (their mean); not with a
        # GradScaler, whose overflowing micro-batch must reach the window unmerged.
        if self.stats is not None and self.stats.kind == "elements" and scaler is None and not self._fsdp:
            self._window: WindowSums = MomentWindowSums(self._params, self._merged_moments)
        else:
            sums = UnshiftedWindowSums if self._fsdp else WindowSums
            self._window = sums(self._params, in_place=self.nonfinite == "skip_window" and self.source is None)
        self._screen = Screen(self.nonfinite, self._window.in_place, scaler is not None)
        self._contract: RankContract | None = None
        if self._ddp:
            disable_ddp_sync(model)  # type: ignore[arg-type]
        if self._ddp or self._fsdp:
            self._contract = RankContract(model, timeout)  # type: ignore[arg-type]
        self.monitor = DecisionMonitor()
        self.history: list[StepRecord] = []
        self.last_record: StepRecord | None = None
        self._steps = 0
        self._items_seen = 0  # items of every closed window (the schedule's progress)
        self._reset_window()
        handle = optimizer.register_step_pre_hook(_stray_step_hook(weakref.ref(self)))
        weakref.finalize(self, handle.remove)
        optimizer._gradaccum_accumulator = weakref.ref(self)  # type: ignore[attr-defined]  # what a Monitor refuses


    # ------------------------------------------------------------------ window state
    def _reset_window(self, planned: int | None = None) -> None:
        """An empty window; ``planned``: its plan, when the close has computed it already."""
        if self.source is not None:
            self.source.reset()
        self._window.reset()
        self._micro_batches = 0
        self._items = 0
        self._samples = 0
        self._poisoned = False
        self._failed = False  # a backward raised half-way into in-place sums
        self._schedule: float | None = None  # lr_schedule's factor for this window, from the items seen before it
        self._pending: _Pending | None = None  # a close whose step did not complete (flush() retries it)
        self._grads_seen = self._grad_state(self._window.sums)  # in place: .grad as the window last left it
        self._planned = planned if planned is not None or self.planner is None else check_positive_int(
            "the planner's window", self.planner.plan(self.history))

    @property
    def _in_place(self) -> bool:
        return self._window.in_place

    @property
    def window_items(self) -> int:
        """Items (the ``count`` of each micro-batch) accumulated in the open window on this process."""
        return self._items

    @property
    def window_samples(self) -> int:
        """Samples accumulated in the open window on this process (``samples`` of each micro-batch,
        or what the statistics counted; 0 when neither says)."""
        return self._samples

    @property
    def window_micro_batches(self) -> int:
        """Micro-batches received in the open window, skipped ones included."""
        return self._micro_batches

    @property
    def steps(self) -> int:
        """Windows closed so far, skipped ones included."""
        return self._steps

    @property
    def planned_micro_batches(self) -> int | None:
        """With a planner, the micro-batches of the current window (fixed before it starts): what
        a data loader or a framework hook needs to know in advance. None with a stopping rule."""
        return self._planned

    # ------------------------------------------------------------------ public API
    def backward(self, loss: torch.Tensor, count: Any, *, reduction: Literal["mean", "sum"] = "mean",
                 samples: int | None = None) -> bool:
        """Add one micro-batch and step when the rule closes the window.

        Args:
          loss: the micro-batch loss, a scalar: the *mean* over its ``count`` items
            (``reduction="mean"``, as ``nn.CrossEntropyLoss()`` returns) or their sum.
          count: the number of items the loss is over: samples, or tokens that count
            (for example ``(labels != ignore_index).sum()``). The window's gradient is
            the mean over its items. 0 (every label ignored; the loss is then NaN or 0)
            adds nothing but the micro-batch's place in the window, with no backward.
          reduction: how ``loss`` was reduced over the items.
          samples: the number of samples (sequences, images) in the micro-batch: the
            units per-sample statistics are taken over and the records' ``samples``. By
            default the leading size of the model's input (statistics rules), else unset.
            Items and samples differ for a language model: ``count`` tokens in
            ``samples`` sequences.

        Returns:
          True when this call completed a window and the optimizer stepped.

        If the call raises (a refused statistic, an error inside the backward, a bad
        argument), the micro-batch is not counted and its gradient is cleared: the window
        is exactly as before and the next call can retry (with a smaller micro-batch after
        an out-of-memory error, say). With ``nonfinite="skip_window"`` and no statistics
        rule, autograd adds into the window sum itself; a backward that raises half-way
        cannot be undone there, so the window is marked failed and dropped (``reason
        "failed"`` in its record), never applied.
        """
        count = check_count(count)
        loss = check_loss(loss)
        check_choice("reduction", reduction, ("mean", "sum"))
        if samples is not None:
            check_positive_int("samples", samples)
        if self._pending is not None:
            raise RuntimeError(f"{self._pending_message()} before the next backward; the window is unchanged")
        if self._schedule is None:  # a new window's, or a resumed one's: refused before the window changes
            self._schedule = self._scheduled_factor()
        self._check_grads_untouched()
        agreed = self._agree_micro_batch(loss, count) if self._fsdp else None
        self._micro_batches += 1
        try:
            committed, overflow = self._take_micro_batch(loss, count, reduction, samples, agreed)
        except NonFiniteError:
            raise  # already handled: the micro-batch is not counted and the window is unchanged
        except BaseException:
            self._micro_batches -= 1
            self._discard_statistics()
            for _, p in self._untracked:
                p.grad = None
            if self.source is not None and self.source.lost:
                # the statistics merged part of this micro-batch into their moments (which may hold
                # the window sum): the window is dropped when it closes, and goes on gathering
                # statistics from its next micro-batches to decide its length
                self.source.reset()
                self._poisoned = self._failed = True
                self._clear_grads()
            elif self._in_place:
                if self._grad_state([p.grad for p in self._params]) != self._grads_seen:
                    # autograd added part of this micro-batch to the window sum (.grad): that
                    # cannot be undone bitwise, so the window is dropped when it closes
                    self._poisoned = self._failed = True
                    self._window.take([p.grad for p in self._params])
                    self._grads_seen = self._grad_state(self._window.sums)
            else:
                self._clear_grads()  # the window sum is kept apart: it is exactly as before
            raise
        if self._reduces_moments and not committed:
            self.stats.commit_empty(self._reduce_increment)  # type: ignore[union-attr]  # every rank joins every increment
        if overflow:
            decision = Decision(True, {"overflow": True})
        elif self._planned is not None:
            decision = Decision(self._micro_batches >= self._planned, {"planned": self._planned})
        elif self.source is None:
            decision = self.rule.decide(WindowView(self._micro_batches, self._items, None))
        else:
            stats = self._window_statistics()
            decision = Decision(False, {}) if stats is None else \
                self.rule.decide(WindowView(self._micro_batches, self._items, stats))  # None: every micro-batch skipped
        if decision.stop:
            return self._close_window("rule", decision)
        return False

    def flush(self, *, drop: bool = False) -> bool:
        """Close a partial window at the end of the data.

        With ``drop=False`` (default) the partial window is applied, averaged over the
        items it really holds. With ``drop=True`` it is discarded, as a dataloader's
        ``drop_last`` would. Returns True when the optimizer stepped. Under DDP every rank
        calls it together.
        """
        if self._micro_batches == 0:
            return False
        if drop:
            self._clear_grads()
            self._reset_window()
            return False
        if self._pending is None:
            self._check_grads_untouched()
        return self._close_window("flush", Decision(True, {}))

    def state_dict(self) -> dict[str, Any]:
        """The open window (gradient sums, counts) and counters, for a mid-window checkpoint.

        Save it with the model, optimizer, scheduler and scaler state dicts; after
        ``load_state_dict`` in a fresh process the run continues bitwise identically.
        A window whose step did not complete is refused: flush it first.
        """
        if self._pending is not None:
            raise RuntimeError(f"{self._pending_message()} before saving the state")
        return {
            "version": VERSION,
            "sums": [None if s is None else s.detach().clone() for s in self._window.sums],
            "shift": self._window.shift,
            "micro_batches": self._micro_batches,
            "items": self._items,
            "samples": self._samples,
            "poisoned": self._poisoned,
            "steps": self._steps,
            "items_seen": self._items_seen,
            "history": [r.as_dict() for r in self.history],
            "statistics": None if self.source is None else self.source.state_dict(),
            "monitor": vars(self.monitor).copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved. Everything is validated first (keys, types,
        shapes, counts, finite sums, the statistics against the rule); on any error the
        Accumulator is unchanged."""
        values = checked_state(state, self._params, self.source, self.planner)
        self._clear_grads()
        self._pending = None
        self._window.sums = values["sums"]
        self._window.shift = values["shift"]
        self._micro_batches = values["micro_batches"]
        self._items = values["items"]
        self._samples = values["samples"]
        self._poisoned = values["poisoned"]
        self._failed = False
        self._steps = values["steps"]
        self._items_seen = values["items_seen"]
        self._schedule = None  # recomputed from the restored progress
        self.history = values["history"]
        self.last_record = self.history[-1] if self.history else None
        if self.source is not None:
            self.source.load_state_dict(values["statistics"])
        self.monitor = values["monitor"]
        self._planned = values["planned"]  # the open window's plan, from the history it was planned from
        if self._in_place:
            for p, window_sum in zip(self._params, self._window.sums):
                p.grad = window_sum
        self._grads_seen = self._grad_state(self._window.sums)

    # ------------------------------------------------------------------ one micro-batch
    def _take_micro_batch(self, loss: torch.Tensor, count: int, reduction: str, samples: int | None,
                          agreed: bool | None = None) -> tuple[bool, bool]:
        """One micro-batch in straight-line order: screen the loss, backward, screen the
        gradient, statistics, add to the window sum.

        ``agreed``: under FSDP2, whether every rank's loss is finite (``_agree_micro_batch``).
        Returns (statistics committed, the scaler's loss scale overflowed). Until the
        window sum is added to, nothing of the window has changed.
        """
        if count == 0:  # no items (every label ignored): nothing to add but its place in the window
            self._discard_statistics()
            return False, False
        if self._poisoned and self.source is None:
            return False, False  # the window will be dropped: no backward needed
        # (a statistics rule still needs the window's statistics to decide its length, so a
        # poisoned window goes on gathering them from its good micro-batches; it is dropped
        # when it closes, on every rank)
        if agreed is False or (agreed is None and self._screen.loss_before_backward and not finite_loss(loss)):
            self._reject("loss", count)
            return False, False
        grads = self._backward(loss, count, reduction)
        squared: list[float] | None = None
        if self._screen.each_gradient:
            finite, squared = self._finite(loss, grads)
            if not finite:
                self._reject("loss or gradient", count)
                return False, False
        measured, overflow = self._statistics(grads, squared, samples, count)
        self._window.take(grads)
        if self._in_place:
            self._grads_seen = self._grad_state(self._window.sums)
        self._items += count
        self._samples += (measured if measured is not None else samples) or 0
        return measured is not None, overflow

    def _backward(self, loss: torch.Tensor, count: int, reduction: str) -> list[torch.Tensor | None]:
        """The backward of the micro-batch's summed loss (times the window's power-of-two
        seed, and the scaler's scale); its gradient, in ``.grad``."""
        total = loss * self._window.seed(count, reduction)
        if self.scaler is not None:
            total = self.scaler.scale(total)
        total.backward()
        self._check_untracked()
        grads = [p.grad for p in self._params]
        if self._in_place and self._grad_state(grads) == self._grads_seen or not any(g is not None for g in grads):
            raise ValueError(
                "loss: its backward reached none of the model's parameters (it was computed by another model, or "
                "from tensors detached from this one): pass the loss of the model the Accumulator was built with "
                "(the window is unchanged; any other model's parameters now hold this loss's gradient)")
        return grads

    def _statistics(self, grads: list[torch.Tensor | None], squared: list[float] | None, samples: int | None,
                    count: int) -> tuple[int | None, bool]:
        """Measure the micro-batch (its statistics source); (the samples measured, or None when
        nothing was, and whether the scaler overflowed). An overflowing micro-batch under a scaler
        is not measured: the scaler skips its window, which closes now. ``squared``: its
        gradient's squared norms, where the finiteness check took them."""
        if self.source is None:
            return None, False
        if self.scaler is not None:
            squared = squared_norms_if_finite(grads) if self.source.takes_norms else squared
            if (squared is None) if self.source.takes_norms else not all_finite(grads):
                self._discard_statistics()
                return None, True
        scale = self._window.factor * (1.0 if self.scaler is None else float(self.scaler.get_scale()))
        return self.source.measure(grads, squared, samples, count, scale,
                                   self._reduce_increment if self._reduces_moments else None), False

    # ------------------------------------------------------------------ the close
    def _close_window(self, reason: str, decision: Decision) -> bool:
        """Everything the close computes (totals, reduced under DDP; the gradient; the record;
        the next plan) before the optimizer runs, then the step, then the bookkeeping. From the
        gradient's division on, a failure leaves the window's step pending: ``flush()`` retries
        it (no second reduce or division), ``flush(drop=True)`` drops it."""
        if self._pending is None:
            self._pending = self._prepare_close(reason, decision)
        pending = self._pending
        try:
            planned = self._next_plan(pending.record)
        except BaseException as error:
            _note(error, f"{self._pending_message()}: no optimizer step was taken")
            raise
        self._step(pending)
        self._pending = None
        try:
            self._after_step(pending)
        except BaseException as error:  # the step is taken: the bookkeeping completes before this raises
            self._finish_close(pending.record, planned)
            _note(error, "the optimizer stepped and the window is closed and recorded; the scaler's update or the "
                         "scheduler's step after it raised")
            raise
        self._finish_close(pending.record, planned)
        if self.source is not None and self.planner is None and reason == "rule":
            message = self.monitor.observe(pending.record.micro_batches, bool(decision.info.get("capped", False)))
            if message:
                warnings.warn(f"gradaccum: {message}", RuntimeWarning, stacklevel=3)
        return not pending.record.skipped

    def _prepare_close(self, reason: str, decision: Decision) -> _Pending:
        """The schedule's factor, the rule's info and the totals (agreed and reduced under DDP),
        each refused before the window changes; then the window's gradient for the step and its
        record. A failure while the gradient is made drops the window (it is no longer the sum)."""
        scheduled = self._schedule if self._schedule is not None else self._scheduled_factor()
        if self.planner is not None and self.source is not None:
            decision = Decision(decision.stop, {**decision.info, **self._noise_info()})
        if self.source is not None and self.source.kind == "norms":
            decision = Decision(decision.stop, {**decision.info, **self._layer_noise_info()})
        items, samples, poisoned = self._window_totals(reason, scheduled)
        try:
            return self._prepare_step(reason, decision, scheduled, items, samples, poisoned)
        except BaseException as error:
            self._clear_grads()
            self._reset_window(self._planned)
            _note(error, "the window's mean gradient could not be made for its step: the window is dropped and no "
                         "optimizer step was taken")
            raise

    def _window_totals(self, reason: str, scheduled: float) -> tuple[int, int, bool]:
        """The window's items, samples and whether it is poisoned: all-reduced with its
        gradient sums under DDP (the ranks first agree on what the step applies); a sum in
        ``.grad`` is screened here, once."""
        kind = FLUSH if reason == "flush" else CLOSE
        if self._ddp:
            items, samples, poisoned = self._all_reduce_window(kind, self._step_settings(scheduled))
        elif self._fsdp:
            return self._agree_window(kind, self._step_settings(scheduled))
        else:
            items, samples, poisoned = self._items, self._samples, self._poisoned
        if self._screen.window_at_close and not poisoned:
            poisoned = not all_finite(self._window.sums)
        return items, samples, poisoned

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
                      poisoned: bool) -> _Pending:
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
        return _Pending(record, factor, steps=not skip)

    def _next_plan(self, record: StepRecord) -> int | None:
        """With a planner, the next window's plan from the history with this window's record;
        both validated before the optimizer runs (the record as a resumed run would check it)."""
        if self.planner is None:
            return None
        check_history([record], f"the window's record (window {self._steps})", start=self._steps)
        return check_positive_int(f"{type(self.planner).__name__}.plan(history), the next window's micro-batches,",
                                  self.planner.plan([*self.history, record]))

    def _step(self, pending: _Pending) -> None:
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
            _note(error, f"optimizer.step() raised: the learning rates are restored and the window keeps its mean "
                         f"gradient (it is not divided again), but parameters and optimizer state may be partly "
                         f"updated. {self._pending_message()} (retry only if the optimizer changed nothing, for "
                         "example it ran out of memory allocating its state)")
            raise
        finally:
            for g, lr in zip(groups, base_lrs):
                g["lr"] = lr  # the scaling holds for this step only; the scheduler owns the base lr

    def _after_step(self, pending: _Pending) -> None:
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

    @property
    def _reduces_moments(self) -> bool:
        """Per-element statistics under DDP: every increment's moments are all-reduced."""
        return self._ddp and self.stats is not None and self.stats.kind == "elements"

    def _window_statistics(self) -> Any:
        """What a statistics rule reads: the per-element moments, or the norm path's pooled
        estimates (under DDP each rank's norm sums travel in the contract's header: one small
        collective). None when the window has no samples yet (every micro-batch skipped)."""
        source = self.source
        assert source is not None
        if source.kind == "elements":
            return self.stats.moments() if source.count else None  # type: ignore[union-attr]
        scale = self._window.factor * (1.0 if self.scaler is None else float(self.scaler.get_scale()))
        sums = source.norm_sums(self._window.sums, scale)
        if self._ddp:
            gathered = self._contract.agree(NORMS, self._steps, self._micro_batches, 0, tuple(sums))  # type: ignore[union-attr]
            sums = NormSums(*(math.fsum(column) for column in zip(*gathered)))
        pooled = pooled_terms(sums)
        return pooled if pooled.samples else None

    def _layer_noise_info(self) -> dict[str, float]:
        """Each layer's noise scale, ``noise_scale/<layer>`` (the norm path); under DDP the
        ranks' per-layer norm sums are pooled by one small all-reduce at the close."""
        scale = self._window.factor * (1.0 if self.scaler is None else float(self.scaler.get_scale()))
        layers = self.source.layer_norm_sums(self._window.sums, scale)  # type: ignore[union-attr]
        if self._ddp:
            names = list(layers)  # the same model on every rank: the same layers, in the same order
            flat = torch.tensor([v for name in names for v in layers[name]], dtype=torch.float64)
            contract = self._contract
            assert contract is not None
            contract.agree(LAYERS, self._steps, self._micro_batches, flat.numel())
            contract.all_reduce([flat], LAYERS, self._steps, self._micro_batches)
            width = len(NormSums._fields)
            layers = {name: NormSums(*flat[k * width:(k + 1) * width].tolist()) for k, name in enumerate(names)}
        return layer_noise_scales(layers)

    def _noise_info(self) -> dict[str, float]:
        """The window's noise terms (unbiased ``tr(Sigma)``, ``|G|^2``), its noise scale and,
        with per-element statistics, its per-sample GSNR: what the noise-scale planners read
        from the records. Nothing with fewer than 2 samples."""
        stats = self._window_statistics()
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

    # ------------------------------------------------------------------ internals
    def _check_grads_untouched(self) -> None:
        """Refuse a ``.grad`` the Accumulator did not put there; in place (the window's sum is
        ``.grad``), also one changed since its last backward (``optimizer.zero_grad()``, with or
        without ``set_to_none``, or any in-place change): the window's sum is lost then."""
        if self._in_place and self._micro_batches and self._grad_state([p.grad for p in self._params]) != \
                self._grads_seen:
            raise RuntimeError(
                "the window's gradient sum, which .grad holds under nonfinite='skip_window', was changed outside "
                "the Accumulator since its last backward (optimizer.zero_grad(), a stray loss.backward(), clipping "
                "or another in-place change of .grad): remove it from the training loop, the Accumulator clears "
                "the gradients when it steps. The window's sum is lost: call flush(drop=True) to drop the window")
        for i, p in enumerate(self._params):
            if p.grad is not None and not self._window.owns(i, p.grad):
                raise RuntimeError(
                    "a parameter has a .grad that the Accumulator did not put there: run backward only "
                    "through the Accumulator (a stray loss.backward() would leak into the window)"
                )

    def _grad_state(self, grads: list[torch.Tensor | None]) -> list[tuple[int, int] | None]:
        """Each gradient's identity and version counter (of its local shard under FSDP2): what
        autograd's add into ``.grad``, ``zero_grad`` or any in-place change moves. Read only
        with the sums in ``.grad``; elsewhere an empty list."""
        if not self._in_place:
            return []
        shards = local(grads) if self._fsdp else grads
        return [None if g is None else (id(g), s._version) for g, s in zip(grads, shards)]  # type: ignore[union-attr]

    def _check_untracked(self) -> None:
        stray = [n for n, p in self._untracked if p.grad is not None]
        if stray:
            raise ValueError(
                f"parameters the optimizer does not hold got gradients ({', '.join(stray[:3])}): they were "
                "trainable (or unfrozen) after the optimizer was built, so no step would use them. Add them to "
                "the optimizer (optimizer.add_param_group) and build a new Accumulator, or freeze them")

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _discard_statistics(self) -> None:
        if self.source is not None:
            self.source.discard()

    def _reject(self, what: str, count: int) -> None:
        """A non-finite micro-batch: its statistics and (apart) its gradient go; the policy
        says whether it raises, dooms the window, or only loses its items."""
        self._discard_statistics()
        if not self._in_place:
            self._clear_grads()  # the window sum is apart from .grad: the bad gradient goes
        if self._screen.dooms_window:
            self._poisoned = True  # the whole window is dropped, so in-place sums may be poisoned
            return
        error = self._screen.error(what, count, self._steps, self._micro_batches)
        if error is not None:
            self._micro_batches -= 1
            raise error
        # skip_micro_batch: the micro-batch counts toward the window's length, its items don't

    def _reduce_increment(self, tensors: list[torch.Tensor], n: int) -> int:
        contract = self._contract
        assert contract is not None
        count = torch.tensor([n], dtype=torch.int64, device=tensors[0].device)
        contract.agree(INCREMENT, self._steps, self._micro_batches, sum(t.numel() for t in tensors))
        contract.all_reduce([*tensors, count], INCREMENT, self._steps, self._micro_batches)
        return int(count[0])

    def _merged_moments(self) -> Any:
        """The statistics' moments of the window so far (None before the first increment)."""
        return self.stats.moments() if self.stats is not None and self.stats.count else None  # elements only

    # ------------------------------------------------------------------ FSDP2: the ranks agree on scalars
    def _agree_micro_batch(self, loss: torch.Tensor, count: int) -> bool:
        """Every rank's backward joins the reduce-scatter of the gradient, so before it the
        ranks agree (one small collective) that each has items, and whether every loss is
        finite: a micro-batch is the global increment, kept or dropped on every rank."""
        said = self._contract.agree(GATE, self._steps, self._micro_batches, 0,  # type: ignore[union-attr]
                                    (float(count), float(finite_loss(loss))))
        empty = [rank for rank, (items, _) in enumerate(said) if items == 0]
        if empty:
            raise ValueError(
                f"count: rank(s) {empty} have no items in this micro-batch. Under fully_shard every rank's backward "
                "joins the gradient's reduce-scatter, so a micro-batch without items cannot sit out on one rank; "
                "leave such micro-batches out on every rank alike (the window is unchanged)")
        return all(finite == 1.0 for _, finite in said)

    def _finite(self, loss: torch.Tensor, grads: list[torch.Tensor | None]) -> tuple[bool, list[float] | None]:
        """Whether the micro-batch's loss and gradient are finite: under FSDP2 every rank's
        shard checked and the answer agreed (one small collective), else this process's. With
        the micro-batch source the same pass takes each gradient's squared norm (returned, of
        this rank's shard under FSDP2), else None."""
        shards = local(grads) if self._fsdp else grads
        squared = None
        if self.source is not None and self.source.takes_norms:
            squared = squared_norms_if_finite(shards) if finite_loss(loss) else None
            mine = squared is not None
        else:
            mine = finite_loss(loss) and all_finite(shards)
        if not self._fsdp:
            return mine, squared
        said = self._contract.agree(CHECK, self._steps, self._micro_batches, 0, (float(mine),))  # type: ignore[union-attr]
        return all(finite == 1.0 for (finite,) in said), squared

    def _agree_window(self, kind: int, settings: dict[str, float]) -> tuple[int, int, bool]:
        """Under FSDP2 the window's sums are already summed over ranks (shards of them); only
        the items, samples and whether any rank's shard is poisoned are agreed, with what the
        step applies: one small collective per window."""
        poisoned = self._poisoned or (self._screen.window_at_close and not all_finite(local(self._window.sums)))
        said = self._contract.agree(kind, self._steps, self._micro_batches, 0,  # type: ignore[union-attr]
                                    (float(self._items), float(self._samples), float(poisoned)), settings)
        return (int(sum(s[0] for s in said)), int(sum(s[1] for s in said)), any(s[2] > 0 for s in said))

    def _all_reduce_window(self, kind: int, settings: dict[str, float]) -> tuple[int, int, bool]:
        """The window's sums and counts summed over ranks, after the header (with what the step
        applies) is agreed: a disagreement raises before the window changes."""
        contract = self._contract
        assert contract is not None
        moments = isinstance(self._window, MomentWindowSums)  # it reduces one flag per parameter
        numel = len(self._params) if moments else sum(p.numel() for p in self._params)
        contract.agree(kind, self._steps, self._micro_batches, numel, settings=settings)
        sums = self._window.true_sums()  # ranks may have shifted their counts differently
        counts = torch.tensor([self._items, self._samples, int(self._poisoned)], dtype=torch.int64,
                              device=sums[0].device)
        contract.all_reduce([*sums, counts], kind, self._steps, self._micro_batches)
        return int(counts[0]), int(counts[1]), bool(counts[2] > 0)


def stepping_accumulator(optimizer: Any) -> Accumulator | None:
    """The live Accumulator that steps ``optimizer``, if any (it marks the optimizer it owns)."""
    ref = getattr(optimizer, "_gradaccum_accumulator", None)
    return ref() if callable(ref) else None
