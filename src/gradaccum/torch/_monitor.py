"""Monitor: measure the gradient noise scale (and GSNR) of an unchanged training loop.

It changes nothing about training. Hooks record each layer's input and output gradient during
the ordinary backward, and **at the end of every backward** (an autograd callback queued from
the hooks, so after every gradient has reached ``.grad``) the backward's per-sample statistics
are committed, exactly as the Accumulator's are (the same registry, checks and fallbacks: exact
or refused). What is measured is the gradient as it came out of the backward: the true gradient
of the loss, before ``clip_grad_norm_``, a GradScaler's ``unscale_`` or anything else the loop
does to ``.grad`` before ``optimizer.step()``. The row is **recorded at the step** (an optimizer
step post-hook), so a backward whose step never comes (a GradScaler's skipped step) records
nothing, and an optimizer that runs the backward inside ``step(closure)`` (Lightning) is
measured too. Each row holds:

- ``step``: the index of the optimizer step (from the Monitor's construction);
- ``samples``, ``trace`` and ``squared_norm``: the unbiased ``tr(Sigma)`` and ``|G|^2`` of this
  step's batch (McCandlish et al. 2018), ``noise_scale`` their ratio ``B_simple``, and
  ``noise_scale_ema`` the ratio of their exponential moving averages (one batch's estimate is
  noisy and its ``|G|^2`` can be <= 0: the averages are what to read);
- on the norm path, ``noise_scale/<layer>``: each layer's own ``B_simple`` (the terms add up
  over layers to the whole model's);
- with ``statistics="elements"`` also ``gsnr_sample`` and ``gsnr_mean``, the mean GSNR on
  both scales (docs/design.md, "GSNR"), at the cost of the per-element path, and with an
  Adam-like optimizer (``exp_avg_sq`` in its state) ``noise_scale_adam``: the preconditioned
  noise scale ``tr(P Sigma) / G^T P G`` with Adam's ``P = 1 / (sqrt(v_hat) + eps)``
  (AdaptDL/Pollux), from the state before this step's update (NaN before the first step). It
  needs the per-element moments (``P`` weights each element, so the per-sample norms no
  longer factor): it costs what the per-element path costs.

Units: ``trace`` and ``squared_norm`` are in units of **one sample's loss as the loss reduces
it** (per-sample-mean units): with ``reduction="mean"`` the per-sample gradients are those of
``n`` times each sample's share of the mean loss, so for a loss averaged over tokens each
sample's per-token mean. The Accumulator's records are in units of each sample's *summed*
loss (a factor ``T^2`` for ``T`` tokens a sample); ``noise_scale`` is the same in both.

Two lines: ``monitor = Monitor(model, optimizer, csv="noise.csv")`` before the loop, and
``monitor.close()`` after it. With the per-sample source (``source="per_sample"``) a step must be
one backward of one batch through ``model``: a backward that adds to gradients already in
``.grad`` (accumulation in a plain loop) or a loss from several forward passes of the model raises
``ValueError`` from that backward, and the Monitor stays usable.

**Accumulation loops** (``source="micro_batch"``): ``loss.backward()`` on several micro-batches,
then ``optimizer.step()``. Each micro-batch's own gradient is an estimate of the gradient, and
their spread gives the terms (docs/design.md, "Micro-batch statistics"): no layer hooks, any
model, compiled or with dropout (its noise is part of the gradient noise). A hook on each
parameter sees the gradient a backward adds to ``.grad`` before it is added, and takes its
squared norm and its product with ``.grad`` so far (two reductions per parameter and backward,
no buffer); they are read from the device once per window, at the step, which makes the
window's terms. A step after a single backward has no between-micro-batch variance: the first
one is refused (use ``source="per_sample"`` or accumulate two or more micro-batches), a later
window of one micro-batch (a short last window) records NaN terms. ``accumulation`` says how
the loop scaled each backward's loss. Each micro-batch's samples are the leading size of the
model's first tensor input. Under DistributedDataParallel
each rank measures its own micro-batches (its local gradients, before the all-reduce), so all
but a window's last backward run under ``model.no_sync()``; a backward into a ``.grad`` that DDP
replaced with the ranks' mean is refused.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .._core.monitor_log import MonitorLog
from .._core.noise_scale import layer_noise_scales, noise_scale, noise_terms, pooled_terms
from .._core.rules import SOURCES
from .._core.statistics import mean_gsnr
from .._core.validation import check_choice, check_positive_int
from ._accumulator import stepping_accumulator
from ._distributed import is_ddp, is_fsdp
from ._monitor_pass import BackwardPass, ForwardCall, as_floats, largest_magnitude, stacked
from ._monitor_window import MicroBatchWindow
from ._nonfinite import all_finite
from ._stats import PerSampleGradStats

ACCUMULATED = (
    "Monitor: this backward added to gradients already in .grad (an earlier backward's, not cleared by "
    "optimizer.zero_grad()), so the step's gradient would come from several backward passes (gradient "
    "accumulation), which a Monitor does not measure. Clear the gradients before each backward (one backward "
    "of one batch per optimizer.step()); to measure a loop that accumulates, build the Monitor with "
    "source='micro_batch' (or accumulate with gradaccum.torch.Accumulator, whose step records hold the same "
    "statistics)")
ACCUMULATED_OUTSIDE = (
    "Monitor(source='micro_batch'): this backward added to a .grad that did not come from the backwards of the "
    "open window alone (not cleared since the last optimizer.step(), changed between backwards, or partly "
    "cleared): the micro-batches' gradients cannot be told apart. Clear the gradients after each step "
    "(optimizer.zero_grad()) and leave .grad alone between a window's backwards; under DistributedDataParallel run "
    "every backward of a window but its last inside model.no_sync() (DDP replaces .grad with the ranks' mean at "
    "each backward it synchronises; with gradient_as_bucket_view=True clear the gradients with "
    "zero_grad(set_to_none=True), the default). The window is as before")
ONE_MICRO_BATCH = (
    "Monitor(source='micro_batch'): this optimizer step follows a single backward, and one micro-batch has no "
    "between-micro-batch variance to measure. Use source='per_sample' for a loop with one backward per step, or "
    "accumulate >= 2 micro-batches (loss.backward() on each) before every optimizer.step()")
BUCKET_VIEWS = (
    "Monitor(source='per_sample'): model is DistributedDataParallel with gradient_as_bucket_view=True, which divides "
    "and all-reduces .grad in place during the backward, before the Monitor checks its per-sample statistics against "
    "it. Build DDP with gradient_as_bucket_view=False (the default), or use source='micro_batch' with two or more "
    "micro-batches per step (every backward but a window's last under model.no_sync())")
UNDER_ACCUMULATOR = (
    "Monitor: optimizer is stepped by a gradaccum Accumulator, whose windows a Monitor cannot measure (several "
    "micro-batches, scaled losses). The Accumulator's own step records hold the same statistics "
    "(acc.history[i].info with a statistics rule or planner); build the Monitor on an optimizer that no "
    "Accumulator steps")


class Monitor:
    """Per optimizer step: the step's gradient noise scale (and GSNR), measured only.

    Args:
      model: the module being trained.
      optimizer: its optimizer; every ``step()`` after a backward records one row. A wrapped
        optimizer is unwrapped to the ``torch.optim.Optimizer`` it holds: Accelerate's
        ``AcceleratedOptimizer`` (also the Transformers Trainer's) and Lightning's
        ``LightningOptimizer``.
      statistics: ``"norms"`` (default; the noise scale from per-sample gradient norms, about
        free for ``nn.Linear``) or ``"elements"`` (also the GSNR on both scales; per-element cost).
      reduction: how the loss the backward ran on was reduced over the batch: ``"mean"``
        (``.grad`` is the batch's mean gradient) or ``"sum"``.
      scaler: the GradScaler the loss is scaled by (``scaler.scale(loss).backward()``, or
        Accelerate's ``accelerator.scaler``): its scale at each backward is divided out, so the
        terms are in the units above. Without it, a scaled loss gives terms ``scale**2`` too large
        (each row's ``noise_scale`` is right, the moving average only while the scale is
        constant). A backward whose gradient is not finite under an enabled scaler records
        nothing (the scaler skips its step); without one, its row's terms are NaN and stay out
        of the moving averages.
      csv: optional path of a CSV file written row by row (flushed after each step).
      tensorboard: optional log directory: every row's finite values as TensorBoard scalars
        ``gradaccum/<column>`` at the step (needs ``torch.utils.tensorboard``, the
        ``tensorboard`` extra).
      decay: the weight of the past in the noise terms' moving averages.
      source: where the statistics come from: ``"per_sample"`` (default; per-sample gradients from
        layer hooks, one backward per step) or ``"micro_batch"`` (each backward's own gradient, in
        a loop that accumulates two or more micro-batches per step; norms only).
      accumulation: with ``source="micro_batch"``, how the loop scaled each backward's loss (its
        micro-batch's loss, reduced as ``reduction`` says): ``"mean"`` (default: divided by the
        window's number of backwards, so ``.grad`` at the step is the mean of the micro-batches'),
        ``"sum"`` (not divided), or an int N (divided by N always, as nanoGPT, Accelerate's
        ``accelerator.backward`` and Lightning do with their fixed accumulation steps, also in a
        shorter last window).

    ``rows`` holds every recorded row (dicts of floats); ``close()`` removes the hooks and
    closes the file. An optimizer stepped by a ``gradaccum.torch.Accumulator`` is refused.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, *, statistics: str = "norms",
                 reduction: str = "mean", scaler: Any | None = None, csv: str | Path | None = None,
                 tensorboard: str | Path | None = None, decay: float = 0.9, source: str = "per_sample",
                 accumulation: str | int = "mean") -> None:
        check_choice("statistics", statistics, ("norms", "elements"))
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self.source = check_choice("source", source, SOURCES)
        if self.source == "micro_batch" and statistics != "norms":
            raise ValueError("statistics='elements' with source='micro_batch': the GSNR and the preconditioned noise "
                             "scale need per-element moments, which the micro-batch source does not take; use "
                             "statistics='norms' or source='per_sample'")
        self.accumulation = _check_accumulation(accumulation)
        self._optimizer = torch_optimizer(optimizer)
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (with get_scale()), got {type(scaler).__name__}")
        self._scaler = scaler
        if _stepped_by_accumulator(self._optimizer):
            raise ValueError(UNDER_ACCUMULATOR)
        params = [p for group in self._optimizer.param_groups for p in group["params"] if p.requires_grad]
        _refuse_sharded(model, params)
        if self.source == "per_sample" and is_ddp(model) and getattr(model, "gradient_as_bucket_view", False):
            raise ValueError(BUCKET_VIEWS)
        self.params = params
        self._board: Any = None
        self.log = MonitorLog(csv, decay, sink=self._to_board)  # checks the path; the file opens at the first row
        self.stats: PerSampleGradStats | None = None  # the per-sample source's hooks on the layers
        self._window: MicroBatchWindow | None = None  # the micro-batch source's open window
        if self.source == "per_sample":
            self.stats = PerSampleGradStats(model, params=params, statistics=statistics)
        else:
            names = {id(p): name for name, p in model.named_parameters()}
            _refuse_unmeasurable(model, params, names)
            self._window = MicroBatchWindow([names.get(id(p), f"parameter #{i}") for i, p in enumerate(params)])
        if tensorboard is not None:
            try:
                self._board = _summary_writer(tensorboard)
            except BaseException:
                if self.stats is not None:
                    self.stats.remove()  # no hook left behind
                raise
        self._pass: BackwardPass | None = None  # the backward running now, from its first hook to its end
        self._pending: _Row | None = None  # the last backward's row, recorded at the step that applies it
        self._refusal: str | None = None  # the optimizer turned out to be an Accumulator's
        self._scanned = False  # looked for an Accumulator at the first backward
        self._busy = False  # measuring: the statistics' own replays must not be seen as the loop's
        self._steps = 0
        # a compiled model's forward runs its hooks eagerly (they queue autograd callbacks)
        self._handles = [model.register_forward_pre_hook(torch.compiler.disable(self._before_forward)),
                         model.register_forward_hook(torch.compiler.disable(self._on_forward), with_kwargs=True),
                         self._optimizer.register_step_pre_hook(self._before_step),
                         self._optimizer.register_step_post_hook(self._after_step)]
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(self._before_accumulation(i)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._after_accumulation(i)))

    @property
    def rows(self) -> list[dict[str, float]]:
        """Every recorded row (dicts of floats), one per optimizer step taken after a backward."""
        return self.log.rows

    # ------------------------------------------------------------------ the backward
    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        """A backward still open when the model runs again raised before its end: what it
        gathered (and the statistics of the forward it came from) is forgotten."""
        if self._busy or torch._C._current_graph_task_id() != -1:
            return  # a replay of the statistics, or a recomputation inside a backward
        stale, self._pass = self._pass, None
        if stale is not None and (stale.task is not None or stale.accumulated) and self.stats is not None:
            self.stats.discard()

    def _on_forward(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        """Hook the model's outputs: their gradient is the first of the backward through the
        model, and a callback queued there runs when that backward (reentrant checkpoints
        inside it included) has ended. (``register_multi_grad_hook`` over the parameters would
        fire at the end of whichever backward saw them last: inside a reentrant checkpoint's
        own backward, before the rest of the model's gradient reached ``.grad``; and it cannot
        see what ``.grad`` held before, which is how accumulation is told apart.)"""
        if self._busy or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return  # a replay of the statistics, no_grad, or a recomputation inside a backward
        forward = ForwardCall(_leading_size(args, kwargs))
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._on_output_grad(forward))

    def _on_output_grad(self, forward: ForwardCall):
        def hook(grad: torch.Tensor) -> None:
            if self._busy:
                return
            task = torch._C._current_graph_task_id()
            if self._pass is not None and self._pass.task not in (None, task):
                self._pass = None  # queued in a backward that never ended
            current = self._open()
            current.forwards[id(forward)] = forward
            current.queue(task, self._end_of_backward)

        return hook

    def _before_accumulation(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            if self._busy:
                return
            if self._window is None:
                self._open().before(i, self.params[i].grad)
            else:
                self._open().take(i, grad, self.params[i].grad, self._window.expected[i])

        return hook

    def _after_accumulation(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if not self._busy:
                current = self._open()
                current.accumulated.add(i)
                if param.grad is not None:
                    current.after[i] = (weakref.ref(param.grad), param.grad._version)
                current.queue(torch._C._current_graph_task_id(), self._end_of_backward)  # no-op when queued

        return hook

    def _open(self) -> BackwardPass:
        if self._pass is None:
            self._pass = BackwardPass()
        return self._pass

    def _end_of_backward(self) -> None:
        """Measure the backward that just ended. It runs before the callbacks a wrapper queued
        during the backward (DistributedDataParallel's, which finishes its all-reduce), and what
        it measures was taken before each gradient's add (with ``gradient_as_bucket_view=True``
        DDP divides and reduces ``.grad`` itself during the backward). A refusal is raised from a
        callback queued behind the wrapper's, so the wrapper's backward is complete when the loop
        sees the error and the model trains on."""
        try:
            self._measure_ended()
        except Exception as error:
            if self._window is not None:
                self._window.refused += 1
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_raise, error))

    def _measure_ended(self) -> None:
        ended, self._pass = self._pass, None
        if ended is None or not ended.accumulated:
            return  # no gradient reached .grad (torch.autograd.grad)
        self._busy = True
        try:
            if self._window is not None:
                self._measure_micro_batch(ended)
                return
            self._pending = None
            self._pending = self._measure_backward(ended)
        finally:
            if self.stats is not None:
                self.stats.reset()
            self._busy = False

    def _measure_backward(self, ended: BackwardPass) -> _Row | None:
        """The row of the backward that just ended (None: its step will be skipped), or raise."""
        self._refuse_accumulator()
        if self._accumulated(ended):
            raise ValueError(ACCUMULATED)
        assert self.stats is not None
        passes = self.stats.forward_passes
        if passes > 1:
            raise ValueError(
                f"Monitor: this backward's loss comes from {passes} forward passes of the model; a monitored step "
                "must be one backward of one batch. With gradient accumulation use gradaccum.torch.Accumulator, "
                "whose step records hold the same statistics")
        grads = [p.grad if i in ended.accumulated else None for i, p in enumerate(self.params)]
        if not all_finite(grads):
            if self._scaler is not None and _enabled(self._scaler):
                return None  # the scaler skips this step
            return _Row(math.nan, math.nan, math.nan, {}, ended.accumulated)
        scale = 1.0 if self._scaler is None else float(self._scaler.get_scale())
        n = self.stats.commit(grads, scale=scale)
        return self._row(n, grads, scale, ended.accumulated)

    def _measure_micro_batch(self, ended: BackwardPass) -> None:
        """Add the backward that just ended to the open window, or raise with the window as it
        was. Its squares and products stay on the device until the step reads the window's at
        once (no synchronisation per backward; only a ``.grad`` changed since the window's last
        backward is read here). A backward into gradients cleared since the window's last one
        starts a new window (the last one's step never came: a GradScaler skipped it)."""
        self._refuse_accumulator()
        window = self._window
        assert window is not None
        reached = sorted(i for i in ended.accumulated if i in ended.squares)
        if ended.twice:
            names = ", ".join(window.names[i] for i in sorted(ended.twice)[:3])
            raise ValueError(f"Monitor(source='micro_batch'): {names} received gradients in two parts of one backward "
                             "(a reentrant checkpoint sharing it): the micro-batch's gradient cannot be taken apart "
                             "from .grad there. Use torch.utils.checkpoint with use_reentrant=False, or "
                             "source='per_sample'")
        samples = self._micro_batch_samples(ended)
        changed = [i for i in reached if ended.state.get(i) == "changed"]
        if changed and any(size != 0 for size in as_floats([ended.sizes[i] for i in changed])):
            raise ValueError(ACCUMULATED_OUTSIDE)
        dotted = [i for i in reached if i in ended.dots]
        cleared = [i for i in reached if ended.state.get(i) in ("none", "changed") and window.expected[i] is not None]
        if cleared and dotted:
            raise ValueError(ACCUMULATED_OUTSIDE)
        if cleared or (window.refused and not dotted):
            # gradients cleared without a step (a skipped step, or after refused backwards): that window is gone
            window.reset()
        scale = 1.0 if self._scaler is None else float(self._scaler.get_scale())
        values = stacked([ended.squares[i] for i in reached] + [ended.dots[i] for i in dotted])
        window.add(samples, reached, dotted, values, scale, {i: ended.after[i] for i in reached if i in ended.after})

    def _micro_batch_samples(self, ended: BackwardPass) -> int:
        """The samples of the backward's micro-batch: the leading size of the input of the one
        forward of the model whose output reached the loss."""
        forwards = list(ended.forwards.values())
        if len(forwards) > 1:
            raise ValueError(
                f"Monitor: this backward's loss comes from {len(forwards)} forward passes of the model; with "
                "source='micro_batch' each backward must be one micro-batch's loss through one forward of the model")
        samples = forwards[0].samples if forwards else None
        if samples is None or samples < 1:
            raise ValueError("Monitor(source='micro_batch'): the backward's micro-batch has no sample count: the "
                             "model's forward whose output reached the loss was not seen with a tensor input carrying "
                             "the batch on dim 0 (build the Monitor on the module whose forward takes the batch)")
        return samples

    def _accumulated(self, ended: BackwardPass) -> bool:
        """Whether ``.grad`` held a nonzero gradient before this backward (one synchronisation)."""
        sizes = [s for i, s in ended.priors.items() if i in ended.accumulated and s is not None]
        sizes += [largest_magnitude(p.grad) for i, p in enumerate(self.params) if i not in ended.accumulated
                  and p.grad is not None]
        if not sizes:
            return False
        device = sizes[0].device
        return bool(torch.stack([s.ne(0).to(device) for s in sizes]).any())

    def _refuse_accumulator(self) -> None:
        if not self._scanned:
            self._scanned = True
            if _stepped_by_accumulator(self._optimizer):
                self._refusal = UNDER_ACCUMULATOR
        if self._refusal is not None:
            raise ValueError(self._refusal)

    # ------------------------------------------------------------------ the step
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """An Accumulator's step is only noted, and refused at the next backward (an exception
        here would leave its window in ``.grad``). With the micro-batch source the first step
        of a loop after a single backward is refused here, before the optimizer runs."""
        if _stepped_by_accumulator(optimizer):
            self._refusal, self._pending = UNDER_ACCUMULATOR, None
            return
        window = self._window
        if (window is not None and self._refusal is None and len(window.samples) == 1 and not window.measured
                and not window.refused):
            raise ValueError(ONE_MICRO_BATCH)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step, self._steps = self._steps, self._steps + 1
        if self._refusal is not None:
            return
        if self._window is not None:
            self._record_window(step)
            return
        pending, self._pending = self._pending, None
        if pending is None or any(self.params[i].grad is None for i in pending.params):
            warnings.warn("gradaccum Monitor: an optimizer step without a backward of its own since the previous "
                          "step (or whose gradient was cleared before it) records no row", RuntimeWarning,
                          stacklevel=2)
            return
        self.log.record(pending.samples, pending.trace, pending.squared_norm, step=step, **pending.extra)

    def _record_window(self, step: int) -> None:
        """The micro-batch source's row of the window this step applied; the next window opens.
        A window some of whose backwards were refused records no row (a warning says so). A step
        after one backward (the loop's first was refused before it ran: a step whose backward ran
        in its closure) raises once the step is taken."""
        window = self._window
        assert window is not None
        k = len(window.samples)
        try:
            if window.refused:
                warnings.warn(f"gradaccum Monitor: {window.refused} of this window's backwards were refused (see the "
                              "errors they raised), so this step applied micro-batches the Monitor did not measure: "
                              "it records no row", RuntimeWarning, stacklevel=3)
                return
            if k == 0 or any(self.params[i].grad is None for i in window.params):
                warnings.warn("gradaccum Monitor: an optimizer step without a backward of its own since the previous "
                              "step (or whose gradient was cleared before it) records no row", RuntimeWarning,
                              stacklevel=3)
                return
            if k == 1 and not window.measured:
                raise ValueError(f"{ONE_MICRO_BATCH} (the optimizer has stepped)")
            window.read(overflow_skips=self._scaler is not None and _enabled(self._scaler))
            if window.overflow:
                return
            row = window.row(self.accumulation, self.reduction)
            self.log.record(*row[:3], step=step, **row[3])
            window.measured = window.measured or k >= 2
        finally:
            window.reset()

    # ------------------------------------------------------------------ the row
    def _row(self, n: int, grads: list[torch.Tensor | None], scale: float, params: set[int]) -> _Row:
        assert self.stats is not None
        # the statistics are in .grad's units: per-sample gradients of the loss as reduced, so
        # with a mean over n samples both terms are n^2 too small (their ratio is not)
        units = float(n * n) if self.reduction == "mean" else 1.0
        extra: dict[str, float] = {}
        if self.stats.statistics == "norms":
            pooled = pooled_terms(self.stats.norm_sums(grads, scale))
            trace, squared = pooled.trace * units, pooled.squared_norm * units
            layers = self.stats.layer_norm_sums(grads, scale)
            extra.update({f"noise_scale/{name}": math.nan for name in layers})  # every column from the first row
            extra.update(layer_noise_scales(layers))  # ratios: the units cancel
        else:
            moments = self.stats.moments()
            if n > 1:
                t, g = noise_terms(n, [m.mean for m in moments], [m.m2 for m in moments])
                trace, squared = float(t) * units, float(g) * units
            else:
                trace = squared = math.nan
            extra["gsnr_sample"] = mean_gsnr(moments, "sample").value if n > 1 else math.nan
            extra["gsnr_mean"] = mean_gsnr(moments, "mean").value if n > 1 else math.nan
            extra["noise_scale_adam"] = self._preconditioned(moments, n)
        return _Row(float(n), trace, squared, extra, params)

    def _preconditioned(self, moments: list[Any], n: int) -> float:
        """``tr(P Sigma) / G^T P G`` with Adam's current preconditioner (NaN without one)."""
        weights = []
        for p in self.params:
            state = self._optimizer.state.get(p, {})
            group = next(g for g in self._optimizer.param_groups if any(q is p for q in g["params"]))
            if "exp_avg_sq" not in state or "step" not in state or "betas" not in group or n < 2:
                return math.nan
            step = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
            weights.append(1.0 / (v_hat.sqrt() + group["eps"]))
        trace = sum(float((w * m.m2).sum()) for w, m in zip(weights, moments)) / (n - 1)
        signal = sum(float((w * m.mean * m.mean).sum()) for w, m in zip(weights, moments)) - trace / n
        return noise_scale(trace, signal)

    def _to_board(self, row: dict[str, float]) -> None:
        if self._board is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                self._board.add_scalar(f"gradaccum/{key}", value, step)

    def close(self) -> None:
        """Remove the hooks and close the CSV file and the TensorBoard writer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.stats is not None:
            self.stats.remove()
        if self._board is not None:
            self._board.close()
            self._board = None
        self.log.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class _Row:
    """A backward's measured row, waiting for the step; ``params``: the parameters it reached."""

    samples: float
    trace: float
    squared_norm: float
    extra: dict[str, float]
    params: set[int]


def _raise(error: Exception) -> None:
    """Raise ``error`` from an autograd callback without keeping it in this frame (its traceback
    holds the frame: the error, the Monitor and the backward's tensors would wait for the
    garbage collector)."""
    try:
        raise error
    finally:
        del error


def _check_accumulation(accumulation: Any) -> str | int:
    if isinstance(accumulation, str):
        return check_choice("accumulation", accumulation, ("mean", "sum"))
    if isinstance(accumulation, bool) or not isinstance(accumulation, int):
        raise TypeError(f"accumulation must be 'mean', 'sum' or an int >= 1 (the loss's divisor), got {accumulation!r}")
    return check_positive_int("accumulation", accumulation)


def _refuse_sharded(model: torch.nn.Module, params: list[torch.Tensor]) -> None:
    """A fully_shard-ed model (or one whose optimizer's parameters are DTensor shards: a Monitor on
    a submodule of one) is refused by name: the shards' gradients come from FSDP's
    reduce-scatter, not from the backward's hooks a Monitor reads."""
    sharded = next((f"fully_shard on {name}" if name else "fully_shard on the model"
                    for name, module in model.named_modules() if is_fsdp(module)), None)
    if sharded is None:
        names = {id(p): name for name, p in model.named_parameters()}
        sharded = next((f"parameter {names.get(id(p), f'#{i}')} is a DTensor shard"
                        for i, p in enumerate(params) if _is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(f"Monitor: the model is sharded by FSDP2 ({sharded}): its parameters are shards whose "
                         "gradients come from FSDP's reduce-scatter, which a Monitor's hooks do not see. Measure it "
                         "with gradaccum.torch.Accumulator and NoiseScalePlanner or NormTest (source='micro_batch'): "
                         "its step records hold each window's noise terms, exact on FSDP2")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _refuse_unmeasurable(model: torch.nn.Module, params: list[torch.Tensor], names: dict[int, str]) -> None:
    """The micro-batch source takes real dense gradients: a complex parameter (its products would
    need conjugating) or a layer with sparse gradients is refused by name, before any hook."""
    for i, p in enumerate(params):
        if p.is_complex():
            raise ValueError(f"Monitor(source='micro_batch'): parameter {names.get(id(p), f'#{i}')} is complex; "
                             "the micro-batch source measures real parameters only (use source='per_sample' or "
                             "view the parameter as real pairs)")
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is True:
            raise ValueError(f"Monitor(source='micro_batch'): {name or type(module).__name__} makes sparse gradients "
                             "(sparse=True); the micro-batch source measures dense gradients only (build the layer "
                             "with sparse=False)")


def _leading_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The leading size of the first tensor among a forward's arguments (None: no such tensor)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() > 0 else None
    return None


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` behind a framework's wrapper (Accelerate's and the
    Transformers Trainer's ``AcceleratedOptimizer.optimizer``, Lightning's
    ``LightningOptimizer.optimizer``), whose step hooks every step runs."""
    current = optimizer
    for _ in range(8):
        inner = getattr(current, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is current:
            break
        current = inner
    if not isinstance(current, torch.optim.Optimizer) or not hasattr(current, "_optimizer_step_pre_hooks"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or a framework's wrapper of one (Accelerate's "
                        f"AcceleratedOptimizer, Lightning's LightningOptimizer), got {type(optimizer).__name__}")
    return current


def _stepped_by_accumulator(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a live Accumulator steps ``optimizer`` (an Accumulator marks the optimizer it owns)."""
    return stepping_accumulator(optimizer) is not None


def _enabled(scaler: Any) -> bool:
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def _summary_writer(directory: str | Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("Monitor(tensorboard=...) needs TensorBoard: pip install 'gradaccum[tensorboard]' "
                          f"({error})") from error
    return SummaryWriter(str(directory))
