"""Monitor: measure the gradient noise scale (and GSNR) of an unchanged training loop.

It changes nothing about training: hooks record each layer's input and output gradient
during the ordinary backward, and just before every ``optimizer.step()`` (an optimizer step
pre-hook) the step's per-sample statistics are committed, exactly as the Accumulator's are
(the same registry, checks and fallbacks: exact or refused), and one row is recorded:

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

Two lines: ``monitor = Monitor(model, optimizer, csv="noise.csv")`` before the loop, and
``monitor.close()`` after it. A step must be one backward of one batch through ``model``
(with gradient accumulation, use the Accumulator, whose records hold the same numbers).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .._core.monitor_log import MonitorLog
from .._core.noise_scale import layer_noise_scales, noise_scale, noise_terms, pooled_terms
from .._core.statistics import mean_gsnr
from .._core.validation import check_choice
from ._stats import PerSampleGradStats


class Monitor:
    """Per optimizer step: the step's gradient noise scale (and GSNR), measured only.

    Args:
      model: the module being trained.
      optimizer: its optimizer; every ``step()`` records one row.
      statistics: ``"norms"`` (default; the noise scale from per-sample gradient norms, about
        free for ``nn.Linear``) or ``"elements"`` (also the GSNR on both scales; per-element cost).
      reduction: how the loss the backward ran on was reduced over the batch: ``"mean"``
        (``.grad`` is the batch's mean gradient) or ``"sum"``.
      csv: optional path of a CSV file written row by row (flushed after each step).
      tensorboard: optional log directory: every row's finite values as TensorBoard scalars
        ``gradaccum/<column>`` at the step (needs ``torch.utils.tensorboard``, the
        ``tensorboard`` extra).
      decay: the weight of the past in the noise terms' moving averages.

    ``rows`` holds every recorded row (dicts of floats); ``close()`` removes the hooks and
    closes the file.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, statistics: str = "norms",
                 reduction: str = "mean", csv: str | Path | None = None, tensorboard: str | Path | None = None,
                 decay: float = 0.9) -> None:
        check_choice("statistics", statistics, ("norms", "elements"))
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self._board: Any = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("Monitor(tensorboard=...) needs TensorBoard: pip install 'gradaccum[tensorboard]' "
                                  f"({error})") from error
            self._board = SummaryWriter(str(tensorboard))
        self.log = MonitorLog(csv, decay, sink=None if self._board is None else self._to_board)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self.stats = PerSampleGradStats(model, params=params, kind=statistics)
        self._optimizer = optimizer
        self._handle = optimizer.register_step_pre_hook(self._before_step)

    @property
    def rows(self) -> list[dict[str, float]]:
        """Every recorded row (dicts of floats), one per optimizer step."""
        return self.log.rows

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        passes = self.stats.forward_passes
        if passes > 1:
            self.stats.discard()
            raise ValueError(
                f"Monitor: this optimizer step's gradient comes from {passes} forward passes of the model; a "
                "monitored step must be one backward of one batch. With gradient accumulation use "
                "gradaccum.torch.Accumulator, whose step records hold the same statistics")
        grads = [p.grad for p in self.stats.params]
        try:
            n = self.stats.commit(grads)
            self._record(n, grads)
        finally:
            self.stats.reset()

    def _record(self, n: int, grads: list[torch.Tensor | None]) -> None:
        # the statistics are in .grad's units: per-sample gradients of the loss as reduced, so
        # with a mean over n samples both terms are n^2 too small (their ratio is not)
        units = float(n * n) if self.reduction == "mean" else 1.0
        extra: dict[str, float] = {}
        if self.stats.kind == "norms":
            pooled = pooled_terms(self.stats.norm_sums(grads))
            trace, squared = pooled.trace * units, pooled.squared_norm * units
            extra.update(layer_noise_scales(self.stats.layer_norm_sums(grads)))  # ratios: the units cancel
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
        self.log.record(n, trace, squared, **extra)

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
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                self._board.add_scalar(f"gradaccum/{key}", value, step)

    def close(self) -> None:
        """Remove the hooks and close the CSV file and the TensorBoard writer."""
        self._handle.remove()
        self.stats.remove()
        if self._board is not None:
            self._board.close()
            self._board = None
        self.log.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
