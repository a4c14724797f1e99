"""The PyTorch Accumulator: exact gradient accumulation with pluggable stopping rules."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
import torch.distributed as dist

from .._core import (
    Decision,
    DecisionMonitor,
    StepRecord,
    StoppingRule,
    WindowView,
)
from .._core.config import AccumulationConfig, as_rule
from .._core.lr_scaling import LR_SCALINGS, lr_factor
from .._core.validation import check_choice, check_positive_float, check_positive_int
from ._checks import check_count, check_loss, tracked_parameters
from ._distributed import all_reduce_count, all_reduce_sums, disable_ddp_sync, is_ddp
from ._stats import PerSampleGradStats

NonFinitePolicy = Literal["raise", "skip_micro_batch", "skip_window"]
_POLICIES: tuple[str, ...] = ("raise", "skip_micro_batch", "skip_window")
_STATE_VERSION = 1
_FOREACH_BELOW = 1 << 20  # gradient elements below which the finiteness check uses one foreach call


class NonFiniteError(FloatingPointError):
    """A micro-batch produced a NaN or Inf loss or gradient (policy ``"raise"``)."""


class Accumulator:
    """Accumulate micro-batch gradients into windows whose step sees the exact mean gradient.

    Each ``backward(loss, count)`` adds the gradient of ``loss * count`` (the *sum* of
    the micro-batch's per-item losses) to a window sum. When the stopping rule closes
    the window, the sum is divided by the window's total item count, so the optimizer
    sees the gradient of the mean loss over every item of the window, whatever the
    micro-batch sizes or token counts (docs/design.md, "Window mean").

    Args:
      model: the module being trained (plain or DistributedDataParallel).
      optimizer: an optimizer that owns every trainable parameter of ``model``.
      rule: a stopping rule, for example ``gradaccum.FixedSteps(4)``, or an ``AccumulationConfig``.
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

    A rule that needs per-sample statistics (``GSNR``, ``NormTest``) gets them from a
    ``PerSampleGradStats`` on the model, merged after every micro-batch (one micro-batch
    is one increment); ``FixedSteps`` pays nothing for them. The rule's info of each
    window (samples, the statistic) goes into the step record, and a warning says when
    the rule closes every window after one increment or at the cap.

    Under DistributedDataParallel the Accumulator owns gradient synchronisation: DDP's
    per-backward all-reduce is switched off and the window's gradient sums and item
    counts are all-reduced once, when the window closes, so the step equals a single
    process run over the union of all ranks' micro-batches. Every rank must call
    ``backward`` the same number of times per window, and ``flush`` together. With a
    statistics rule, every micro-batch is one collective increment: a rank whose
    micro-batch was skipped as non-finite contributes zeros, so no rank waits; the
    ``"raise"`` policy raises on the rank that saw the bad micro-batch only, so use a
    skip policy under DDP.

    Memory: the window sum is kept apart from ``param.grad`` (one extra gradient-sized
    buffer), so that a bad micro-batch can be dropped without touching the sum.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        rule: StoppingRule | AccumulationConfig,
        *,
        scheduler: Any | None = None,
        scaler: Any | None = None,
        clip_grad_norm: float | None = None,
        nonfinite: NonFinitePolicy = "raise",
        keep_history: bool = True,
        lr_scaling: str | None = None,
        reference_batch: int | None = None,
    ) -> None:
        self._params = tracked_parameters(model, optimizer)
        stale = [name for name, p in model.named_parameters() if p.grad is not None and p.requires_grad]
        if stale:
            raise ValueError(
                f"model parameters already hold gradients ({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}) "
                "from a backward before the Accumulator was built (a memory probe such as find_micro_batch_size?): "
                "they belong to no window. Clear them with optimizer.zero_grad(set_to_none=True) first")
        self.model = model
        self.optimizer = optimizer
        self.rule = as_rule(rule)
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError(f"scheduler must have a step() method, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        if scaler is not None and not all(
            callable(getattr(scaler, m, None)) for m in ("scale", "unscale_", "step", "update")
        ):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self.clip_grad_norm = None if clip_grad_norm is None else check_positive_float("clip_grad_norm", clip_grad_norm)
        self.nonfinite = check_choice("nonfinite", nonfinite, _POLICIES)
        self.keep_history = bool(keep_history)
        # Only "skip_window" may let autograd accumulate straight into .grad (the hand-written
        # loop's way, the fastest): the other policies must be able to drop one micro-batch,
        # so they keep the window sum in a buffer of its own.
        self._in_place = self.nonfinite == "skip_window"
        self._ddp = is_ddp(model)
        if self._ddp:
            disable_ddp_sync(model)  # type: ignore[arg-type]
        self.lr_scaling = None if lr_scaling is None else check_choice("lr_scaling", lr_scaling, LR_SCALINGS)
        if self.lr_scaling is not None and reference_batch is None:
            raise ValueError("reference_batch must be given with lr_scaling (the batch size the lr was set for)")
        self.reference_batch = None if reference_batch is None else check_positive_int("reference_batch", reference_batch)
        self.stats: PerSampleGradStats | None = None
        if self.rule.needs_statistics:
            # matched to the optimizer's parameters by identity: its groups may list them in any order
            self.stats = PerSampleGradStats(model.module if self._ddp else model, params=self._params)  # type: ignore[arg-type]
            self._in_place = False  # the rule needs each micro-batch's own gradient sum
        self.monitor = DecisionMonitor()
        self.history: list[StepRecord] = []
        self.last_record: StepRecord | None = None
        self._steps = 0
        self._reset_window()

    # ------------------------------------------------------------------ window state
    def _reset_window(self) -> None:
        if self.stats is not None:
            self.stats.reset()
        self._sums: list[torch.Tensor | None] = [None] * len(self._params)
        self._micro_batches = 0
        self._items = 0
        self._poisoned = False
        self._failed = False  # a backward raised half-way into in-place sums

    @property
    def window_items(self) -> int:
        """Items accumulated in the open window (on this process)."""
        return self._items

    @property
    def window_micro_batches(self) -> int:
        """Micro-batches received in the open window, skipped ones included."""
        return self._micro_batches

    @property
    def steps(self) -> int:
        """Windows closed so far, skipped ones included."""
        return self._steps

    # ------------------------------------------------------------------ public API
    def backward(self, loss: torch.Tensor, count: Any, *, reduction: Literal["mean", "sum"] = "mean",
                 samples: int | None = None) -> bool:
        """Add one micro-batch and step when the rule closes the window.

        Args:
          loss: the micro-batch loss, a scalar: the *mean* over its ``count`` items
            (``reduction="mean"``, as ``nn.CrossEntropyLoss()`` returns) or their sum.
          count: the number of items the loss is over: samples, or tokens that count
            (for example ``(labels != ignore_index).sum()``). The window's gradient is
            the mean over its items.
          reduction: how ``loss`` was reduced over the items.
          samples: for a statistics rule, the number of samples (sequences, images) in
            the micro-batch: the units per-sample gradients are taken over. By default
            the leading size of the model's input. Items and samples differ for a
            language model: ``count`` tokens in ``samples`` sequences.

        Returns:
          True when this call completed a window and the optimizer stepped.

        If the call raises (a refused statistic, an error inside the backward), the
        micro-batch is not counted and its gradient is cleared; the window is as before.
        """
        count = check_count(count)
        loss = check_loss(loss)
        check_choice("reduction", reduction, ("mean", "sum"))
        if samples is not None:
            check_positive_int("samples", samples)
        self._check_grads_untouched()
        self._micro_batches += 1
        try:
            committed, overflow = self._take_micro_batch(loss, count, reduction, samples)
        except NonFiniteError:
            raise  # already handled: the micro-batch is not counted and the window is unchanged
        except BaseException:
            self._micro_batches -= 1
            self._discard_statistics()
            if self._in_place:
                # autograd may have added part of this micro-batch to the window sum (.grad):
                # that cannot be undone bitwise, so the window is dropped when it closes
                self._poisoned = self._failed = True
            else:
                self._clear_grads()  # the window sum is kept apart: it is exactly as before
            raise
        if self.stats is not None and self._ddp and not committed:
            self.stats.commit_empty(self._reduce_increment)  # every rank joins every increment
        if overflow:
            decision = Decision(True, {"overflow": True})
        elif self.stats is not None and self.stats.count == 0:
            decision = Decision(False, {})  # no statistics yet (every micro-batch so far was skipped)
        else:
            stats = None if self.stats is None else self.stats.moments()
            decision = self.rule.decide(WindowView(self._micro_batches, self._items, stats))
        if decision.stop:
            return self._close_window("rule", decision)
        return False

    def _take_micro_batch(self, loss: torch.Tensor, count: int, reduction: str, samples: int | None
                          ) -> tuple[bool, bool]:
        """Backward, non-finite policy, statistics and the window sum for one micro-batch.

        Returns (statistics committed, the scaler's loss scale overflowed). Until the
        window sum is added to, nothing of the window has changed.
        """
        if self._poisoned:
            self._discard_statistics()  # the window will be skipped: no backward needed
            return False, False
        if (self.scaler is not None or self._in_place) and not bool(torch.isfinite(loss.detach()).all()):
            self._on_nonfinite("loss", count)
            return False, False
        total = loss * count if reduction == "mean" else loss
        if self.scaler is not None:
            total = self.scaler.scale(total)
        total.backward()
        grads = [p.grad for p in self._params]
        if self._in_place:
            self._sums = grads
        # With a scaler, non-finite gradients are overflow: the scaler skips the window. In
        # place, the window sum is checked once when it closes (a bad micro-batch dooms it).
        if self.scaler is None and not self._in_place and not _all_finite([loss.detach(), *grads]):
            self._on_nonfinite("loss or gradient", count)
            return False, False
        committed = overflow = False
        if self.stats is not None:
            scale = None if self.scaler is None else float(self.scaler.get_scale())
            if scale is not None and not _all_finite(grads):
                overflow = True  # the scaler will skip this window: close it now, statistics untouched
                self._discard_statistics()
            else:
                self.stats.commit(grads, reduce=self._reduce_increment if self._ddp else None,
                                  samples=samples, scale=scale)
                committed = True
        self._add_to_window(grads)
        self._items += count
        return committed, overflow

    def flush(self, *, drop: bool = False) -> bool:
        """Close a partial window at the end of the data.

        With ``drop=False`` (default) the partial window is applied, averaged over the
        items it really holds. With ``drop=True`` it is discarded, as a dataloader's
        ``drop_last`` would. Returns True when the optimizer stepped.
        """
        if self._micro_batches == 0:
            return False
        if drop:
            self._clear_grads()
            self._reset_window()
            return False
        return self._close_window("flush", Decision(True, {}))

    def state_dict(self) -> dict[str, Any]:
        """The open window (gradient sums, counts) and counters, for a mid-window checkpoint.

        Save it with the model, optimizer, scheduler and scaler state dicts; after
        ``load_state_dict`` in a fresh process the run continues bitwise identically.
        """
        return {
            "version": _STATE_VERSION,
            "sums": [None if s is None else s.detach().clone() for s in self._sums],
            "shapes": [tuple(p.shape) for p in self._params],
            "micro_batches": self._micro_batches,
            "items": self._items,
            "poisoned": self._poisoned,
            "steps": self._steps,
            "history": [r.as_dict() for r in self.history],
            "statistics": None if self.stats is None else self.stats.state_dict(),
            "monitor": vars(self.monitor).copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; checks it fits the tracked parameters first."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state must be a dict saved by Accumulator.state_dict() (version {_STATE_VERSION})")
        sums = state["sums"]
        if len(sums) != len(self._params):
            raise ValueError(f"state holds {len(sums)} gradient sums but the optimizer tracks {len(self._params)} parameters")
        restored: list[torch.Tensor | None] = []
        for i, (s, p) in enumerate(zip(sums, self._params)):
            if s is not None and tuple(s.shape) != tuple(p.shape):
                raise ValueError(f"state gradient sum {i} has shape {tuple(s.shape)}, parameter has {tuple(p.shape)}")
            restored.append(None if s is None else s.detach().to(device=p.device, dtype=p.dtype).clone())
        self._sums = restored
        self._micro_batches = int(state["micro_batches"])
        self._items = int(state["items"])
        self._poisoned = bool(state["poisoned"])
        self._steps = int(state["steps"])
        self.history = [StepRecord(**r) for r in state["history"]]
        self.last_record = self.history[-1] if self.history else None
        if self.stats is not None:
            self.stats.load_state_dict(state["statistics"])
        self.monitor = DecisionMonitor(**state["monitor"])
        if self._in_place:
            for p, window_sum in zip(self._params, self._sums):
                p.grad = window_sum

    # ------------------------------------------------------------------ internals
    def _check_grads_untouched(self) -> None:
        for p, window_sum in zip(self._params, self._sums):
            if p.grad is not None and not (self._in_place and p.grad is window_sum):
                raise RuntimeError(
                    "a parameter has a .grad that the Accumulator did not put there: run backward only "
                    "through the Accumulator (a stray loss.backward() would leak into the window)"
                )

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _add_to_window(self, grads: list[torch.Tensor | None]) -> None:
        if self._in_place:
            return  # autograd accumulated into the window sums, which .grad holds
        adds_to: list[torch.Tensor] = []
        added: list[torch.Tensor] = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self._sums[i] is None:
                self._sums[i] = g  # the first gradient of a window becomes its sum: no copy
            else:
                adds_to.append(self._sums[i])  # type: ignore[arg-type]
                added.append(g)
        if adds_to:
            torch._foreach_add_(adds_to, added)
        self._clear_grads()

    def _discard_statistics(self) -> None:
        if self.stats is not None:
            self.stats.discard()

    def _on_nonfinite(self, what: str, count: int) -> None:
        self._discard_statistics()
        if not self._in_place:
            self._clear_grads()  # the window sum is apart from .grad: the bad gradient goes
        if self.nonfinite == "skip_window":
            self._poisoned = True  # the whole window is dropped, so in-place sums may be poisoned
            return
        if self.nonfinite == "raise":
            self._micro_batches -= 1
            raise NonFiniteError(
                f"non-finite {what} in micro-batch of {count} items (window {self._steps}, "
                f"micro-batch {self._micro_batches + 1}); the accumulated window is unchanged. "
                "Pass nonfinite='skip_micro_batch' or 'skip_window' to go on instead."
            )
        # skip_micro_batch: the micro-batch counts toward the window's length, its items don't

    def _close_window(self, reason: str, decision: Decision) -> bool:
        items, poisoned = self._items, self._poisoned
        if self._ddp:
            items, poisoned = self._all_reduce_window()
        if self._in_place and self.scaler is None and not poisoned:
            poisoned = not _all_finite(self._sums)
        skipped = poisoned or items == 0
        grad_norm: float | None = None
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.lr_scaling is not None and items > 0:
            factor = lr_factor(self.lr_scaling, items, self.reference_batch)  # type: ignore[arg-type]
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * factor
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if not skipped:
            for p, s in zip(self._params, self._sums):
                p.grad = None if s is None else s.div_(items)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.clip_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm))
            if self.scaler is not None:
                skipped = not _all_finite([p.grad for p in self._params])
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, base_lrs):
            g["lr"] = lr  # the scaling holds for this step only; the scheduler owns the base lr
        if not skipped and self.scheduler is not None:
            self.scheduler.step()
        self._clear_grads()
        record = StepRecord(
            step=self._steps,
            items=items,
            micro_batches=self._micro_batches,
            skipped=skipped,
            reason=("failed" if self._failed else "nonfinite") if poisoned else reason,
            grad_norm=grad_norm,
            lr=lrs,
            info=dict(decision.info),
        )
        if self.stats is not None and reason == "rule":
            message = self.monitor.observe(self._micro_batches, bool(decision.info.get("capped", False)))
            if message:
                warnings.warn(f"gradaccum: {message}", RuntimeWarning, stacklevel=3)
        self.last_record = record
        if self.keep_history:
            self.history.append(record)
        self._steps += 1
        self._reset_window()
        return not skipped

    def _reduce_increment(self, tensors: list[torch.Tensor], n: int) -> int:
        group = getattr(self.model, "process_group", None)
        all_reduce_sums(tensors, group)
        return all_reduce_count(n, group, tensors[0].device)

    def _all_reduce_window(self) -> tuple[int, bool]:
        group = getattr(self.model, "process_group", None)
        sums = [torch.zeros_like(p) if s is None else s for p, s in zip(self._params, self._sums)]
        counts = torch.tensor([self._items, int(self._poisoned)], dtype=torch.int64, device=sums[0].device)
        all_reduce_sums(sums, group)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        self._sums = list(sums)
        return int(counts[0]), bool(counts[1] > 0)


def _all_finite(grads: list[torch.Tensor | None]) -> bool:
    """Whether every element of every gradient is finite, in one synchronisation.

    A tensor's sum (or norm) is NaN or Inf whenever one of its elements is, and is a
    fast, vectorised read; only when one is not finite (which huge finite values can
    also cause) do the exact, slower per-element checks run.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return True
    if sum(g.numel() for g in present) <= _FOREACH_BELOW:
        reduced = torch.stack(torch._foreach_norm(present, 1))  # one dispatch for many small tensors
    else:
        reduced = torch.stack([g.sum() for g in present])  # large tensors: the fastest kernel
    if bool(torch.isfinite(reduced).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in present)
