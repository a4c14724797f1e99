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
``monitor.close()`` after it. A step must be one backward of one batch through ``model``: a
backward that adds to gradients already in ``.grad`` (accumulation in a plain loop) or a loss
from several forward passes of the model raises ``ValueError`` from that backward, and the
Monitor stays usable (with gradient accumulation, use the Accumulator, whose records hold the
same numbers).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .._core.monitor_log import MonitorLog
from .._core.noise_scale import layer_noise_scales, noise_scale, noise_terms, pooled_terms
from .._core.statistics import mean_gsnr
from .._core.validation import check_choice
from ._accumulator import stepping_accumulator
from ._nonfinite import all_finite
from ._stats import PerSampleGradStats

ACCUMULATED = (
    "Monitor: this backward added to gradients already in .grad (an earlier backward's, not cleared by "
    "optimizer.zero_grad()), so the step's gradient would come from several backward passes (gradient "
    "accumulation), which a Monitor does not measure. Clear the gradients before each backward (one backward "
    "of one batch per optimizer.step()), or accumulate with gradaccum.torch.Accumulator, whose step records "
    "hold the same statistics")
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

    ``rows`` holds every recorded row (dicts of floats); ``close()`` removes the hooks and
    closes the file. An optimizer stepped by a ``gradaccum.torch.Accumulator`` is refused.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, *, statistics: str = "norms",
                 reduction: str = "mean", scaler: Any | None = None, csv: str | Path | None = None,
                 tensorboard: str | Path | None = None, decay: float = 0.9) -> None:
        check_choice("statistics", statistics, ("norms", "elements"))
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self._optimizer = torch_optimizer(optimizer)
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (with get_scale()), got {type(scaler).__name__}")
        self._scaler = scaler
        if _stepped_by_accumulator(self._optimizer):
            raise ValueError(UNDER_ACCUMULATOR)
        params = [p for group in self._optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._board: Any = None
        self.log = MonitorLog(csv, decay, sink=self._to_board)  # checks the path; the file opens at the first row
        self.stats = PerSampleGradStats(model, params=params, kind=statistics)
        if tensorboard is not None:
            try:
                self._board = _summary_writer(tensorboard)
            except BaseException:
                self.stats.remove()  # no hook left behind
                raise
        self._pass: _Pass | None = None  # the backward running now, from its first hook to its end
        self._pending: _Row | None = None  # the last backward's row, recorded at the step that applies it
        self._refusal: str | None = None  # the optimizer turned out to be an Accumulator's
        self._scanned = False  # looked for an Accumulator at the first backward
        self._busy = False  # measuring: the statistics' own replays must not be seen as the loop's
        self._steps = 0
        self._handles = [model.register_forward_pre_hook(self._before_forward),
                         model.register_forward_hook(self._on_forward),
                         self._optimizer.register_step_pre_hook(self._before_step),
                         self._optimizer.register_step_post_hook(self._after_step)]
        for i, p in enumerate(self.stats.params):
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
        if stale is not None and (stale.task is not None or stale.accumulated):
            self.stats.discard()

    def _on_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Hook the model's outputs: their gradient is the first of the backward through the
        model, and a callback queued there runs when that backward (reentrant checkpoints
        inside it included) has ended. (``register_multi_grad_hook`` over the parameters would
        fire at the end of whichever backward saw them last: inside a reentrant checkpoint's
        own backward, before the rest of the model's gradient reached ``.grad``; and it cannot
        see what ``.grad`` held before, which is how accumulation is told apart.)"""
        if self._busy or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return  # a replay of the statistics, no_grad, or a recomputation inside a backward
        for t in tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if self._busy:
            return
        task = torch._C._current_graph_task_id()
        if self._pass is not None and self._pass.task not in (None, task):
            self._pass = None  # queued in a backward that never ended
        self._open().queue(task, self._end_of_backward)

    def _before_accumulation(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            if not self._busy:
                self._open().before(i, self.stats.params[i].grad)

        return hook

    def _after_accumulation(self, i: int):
        def hook(param: torch.Tensor) -> None:
            if not self._busy:
                current = self._open()
                current.accumulated.add(i)
                current.queue(torch._C._current_graph_task_id(), self._end_of_backward)  # no-op when queued

        return hook

    def _open(self) -> _Pass:
        if self._pass is None:
            self._pass = _Pass()
        return self._pass

    def _end_of_backward(self) -> None:
        ended, self._pass = self._pass, None
        if ended is None or not ended.accumulated:
            return  # no gradient reached .grad (torch.autograd.grad)
        self._busy = True
        try:
            self._pending = None
            self._pending = self._measure_backward(ended)
        finally:
            self.stats.reset()
            self._busy = False

    def _measure_backward(self, ended: _Pass) -> _Row | None:
        """The row of the backward that just ended (None: its step will be skipped), or raise."""
        self._refuse_accumulator()
        if self._accumulated(ended):
            raise ValueError(ACCUMULATED)
        passes = self.stats.forward_passes
        if passes > 1:
            raise ValueError(
                f"Monitor: this backward's loss comes from {passes} forward passes of the model; a monitored step "
                "must be one backward of one batch. With gradient accumulation use gradaccum.torch.Accumulator, "
                "whose step records hold the same statistics")
        grads = [p.grad if i in ended.accumulated else None for i, p in enumerate(self.stats.params)]
        if not all_finite(grads):
            if self._scaler is not None and _enabled(self._scaler):
                return None  # the scaler skips this step
            return _Row(math.nan, math.nan, math.nan, {}, ended.accumulated)
        scale = 1.0 if self._scaler is None else float(self._scaler.get_scale())
        n = self.stats.commit(grads, scale=scale)
        return self._row(n, grads, scale, ended.accumulated)

    def _accumulated(self, ended: _Pass) -> bool:
        """Whether ``.grad`` held a nonzero gradient before this backward (one synchronisation)."""
        sizes = [s for i, s in ended.priors.items() if i in ended.accumulated and s is not None]
        sizes += [_size(p.grad) for i, p in enumerate(self.stats.params) if i not in ended.accumulated
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
        """Never raises (an exception here would leave a caller's window in ``.grad``): an
        Accumulator's step is only noted, and refused at the next backward."""
        if _stepped_by_accumulator(optimizer):
            self._refusal, self._pending = UNDER_ACCUMULATOR, None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        step, self._steps = self._steps, self._steps + 1
        pending, self._pending = self._pending, None
        if self._refusal is not None:
            return
        if pending is None or any(self.stats.params[i].grad is None for i in pending.params):
            warnings.warn("gradaccum Monitor: an optimizer step without a backward of its own since the previous "
                          "step (or whose gradient was cleared before it) records no row", RuntimeWarning,
                          stacklevel=2)
            return
        self.log.record(pending.samples, pending.trace, pending.squared_norm, step=step, **pending.extra)

    # ------------------------------------------------------------------ the row
    def _row(self, n: int, grads: list[torch.Tensor | None], scale: float, params: set[int]) -> _Row:
        # the statistics are in .grad's units: per-sample gradients of the loss as reduced, so
        # with a mean over n samples both terms are n^2 too small (their ratio is not)
        units = float(n * n) if self.reduction == "mean" else 1.0
        extra: dict[str, float] = {}
        if self.stats.kind == "norms":
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
        for p in self.stats.params:
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


class _Pass:
    """One backward as the Monitor's hooks see it: where its end callback is queued, each
    parameter's ``.grad`` before the backward added to it, and which parameters it reached."""

    def __init__(self) -> None:
        self.task: int | None = None  # the autograd graph task the end callback runs at the end of
        self.priors: dict[int, torch.Tensor | None] = {}  # parameter index -> its .grad's size before (None: none)
        self.accumulated: set[int] = set()

    def before(self, i: int, grad: torch.Tensor | None) -> None:
        if i not in self.priors:  # a parameter reached twice (reentrant checkpoints): its first add counts
            self.priors[i] = None if grad is None else _size(grad)

    def queue(self, task: int, callback: Any) -> None:
        if self.task is None:
            self.task = task
            torch.autograd.Variable._execution_engine.queue_callback(callback)


def _size(grad: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in ``grad``, without a synchronisation (0 for an empty tensor)."""
    if grad.numel() == 0:
        return torch.zeros((), device=grad.device)
    return torch.linalg.vector_norm(grad.detach(), float("inf"))


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
