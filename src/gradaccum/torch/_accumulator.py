"""The PyTorch Accumulator: exact gradient accumulation with pluggable stopping rules.

The class reads top-down: construction (the distribution mode, the statistics source, the window
buffer), the window's state, and the public calls. A micro-batch's way into the window is
``_intake.MicroBatchIntake``, the window's close ``_close.WindowClose``, and what differs between
one process, DDP and FSDP2 the distribution mode (``_modes``)."""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch

from .._core import Decision, DecisionMonitor, StepRecord, StoppingRule, WindowView
from .._core.config import AccumulationConfig, as_rule
from .._core.lr_scaling import LR_SCALINGS
from .._core.planners import PlanFold, Planner, is_planner
from .._core.rules import statistics_kind, statistics_source
from .._core.validation import check_choice, check_positive_float, check_positive_int
from ._checks import check_count, check_loss, check_model, tracked_parameters
from ._close import Pending, WindowClose, stray_step_hook
from ._intake import MicroBatchIntake
from ._modes import DistributionMode, distribution_mode
from ._nonfinite import POLICIES, NonFiniteError, NonFinitePolicy, Screen
from ._sources import MicroBatchSource, PerSampleSource
from ._state import VERSION, checked_state
from ._stats import PerSampleGradStats
from ._window_sums import MomentWindowSums, WindowSums

__all__ = ["Accumulator", "NonFiniteError", "NonFinitePolicy"]


class Accumulator(MicroBatchIntake, WindowClose):
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
    is one increment); ``FixedSteps`` pays nothing for them. With ``source="micro_batch"``
    they come from the micro-batches' own gradients instead (no hooks: any model, compiled
    or with dropout; a window needs two micro-batches to have a variance); per-element rules
    (``GSNR``, ``GSNRPlanner``) take them so on one process only. The rule's info of each
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
        self.reference_batch = None if reference_batch is None else \
            check_positive_int("reference_batch", reference_batch)
        if lr_schedule is not None and not callable(lr_schedule):
            raise TypeError(f"lr_schedule must be a callable items_seen -> factor, got {type(lr_schedule).__name__}")
        self.lr_schedule = lr_schedule
        timeout = check_positive_float("collective_timeout", collective_timeout)
        self._mode: DistributionMode = distribution_mode(model, self.rule, scaler)
        self.stats: PerSampleGradStats | None = None  # the per-sample source's collector (its hooks, paths)
        self.source = self._statistics_source(model)
        # Only "skip_window" without statistics may let autograd accumulate straight into
        # .grad (the hand-written loop's way, the fastest): the others must be able to drop
        # one micro-batch, and a statistics rule needs each micro-batch's own gradient.
        # Per-element statistics hold the window's sum themselves (their mean); not with a
        # GradScaler, whose overflowing micro-batch must reach the window unmerged.
        elements = self.stats is not None and self.stats.statistics == "elements"
        if elements and scaler is None and self._mode.holds_moments:
            self._window: WindowSums = MomentWindowSums(self._params, self._merged_moments)
        else:
            self._window = self._mode.window_sums(self._params,
                                                  in_place=self.nonfinite == "skip_window" and self.source is None)
        self._screen = Screen(self.nonfinite, self._window.in_place, scaler is not None)
        self._mode.connect(model, timeout)
        self.monitor = DecisionMonitor()
        self.history: list[StepRecord] = []
        # a built-in planner's running summary of the history (each close folds one record), with
        # the planner it was made for
        self._fold: tuple[Planner, PlanFold | None] | None = None
        self.last_record: StepRecord | None = None
        self._steps = 0
        self._items_seen = 0  # items of every closed window (the schedule's progress)
        self._reset_window()
        handle = optimizer.register_step_pre_hook(stray_step_hook(weakref.ref(self)))
        weakref.finalize(self, handle.remove)
        optimizer._gradaccum_accumulator = weakref.ref(self)  # type: ignore[attr-defined]  # what a Monitor refuses

    def _statistics_source(self, model: torch.nn.Module) -> PerSampleSource | MicroBatchSource | None:
        """The rule's statistics source (None when it needs no statistics): the micro-batches'
        own gradients, or per-sample statistics from hooks on the model (``self.stats``)."""
        if not self.rule.needs_statistics:
            return None
        kind = statistics_kind(self.rule)
        source = statistics_source(self.rule, elements=True, backend="the torch Accumulator")
        if source == "micro_batch" and kind == "elements" and self._mode.reduces_increments:
            raise ValueError(
                f"source='micro_batch': {type(self.rule).__name__} reads per-element statistics, which the torch "
                "Accumulator takes from the micro-batches on one process only (under DistributedDataParallel "
                "each rank's decision would read only its own micro-batches); use source='per_sample', or a "
                "norm rule or planner with source='micro_batch' (NormTest, NoiseScalePlanner, NormTestPlanner)")
        inner = self._mode.statistics_model(model)  # under DDP the wrapped model: its layers named as on one process
        names = {id(p): n for n, p in inner.named_parameters()}
        if source == "micro_batch":
            micro = MicroBatchSource([names.get(id(p), f"parameter #{i}") for i, p in enumerate(self._params)],
                                     group=self._mode.shard_group(self._params,
                                                                  [names.get(id(p), "?") for p in self._params]),
                                     statistics=kind)
            if kind == "elements":  # M2 by Chan's update against the window's sums before each add
                micro.bind_window(lambda: self._window.sums, self._params)
            return micro
        # matched to the optimizer's parameters by identity: its groups may list them in any order
        self.stats = PerSampleGradStats(inner, params=self._params, statistics=kind)
        return PerSampleSource(self.stats)

    def _merged_moments(self) -> Any:
        """The statistics' moments of the window so far (None before the first increment)."""
        return self.stats.moments() if self.stats is not None and self.stats.count else None  # elements only

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
        self._pending: Pending | None = None  # a close whose step did not complete (flush() retries it)
        self._grads_seen = self._grad_state(self._window.sums)  # in place: .grad as the window last left it
        self._planned = planned if planned is not None or self.planner is None else check_positive_int(
            "the planner's window", self.planner.plan(self.history))

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
        agreed = self._mode.before_backward(loss, count, self._steps, self._micro_batches)
        self._micro_batches += 1
        try:
            committed, overflow = self._take_micro_batch(loss, count, reduction, samples, agreed)
        except NonFiniteError:
            raise  # already handled: the micro-batch is not counted and the window is unchanged
        except BaseException:
            self._undo()
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


def stepping_accumulator(optimizer: Any) -> Accumulator | None:
    """The live Accumulator that steps ``optimizer``, if any (it marks the optimizer it owns)."""
    ref = getattr(optimizer, "_gradaccum_accumulator", None)
    return ref() if callable(ref) else None
