"""The per-step record that every backend emits, ready to log as a dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepRecord:
    """What happened in one completed window.

    Attributes:
      step: index of this window (0-based), counting skipped windows too.
      items: items (samples, or tokens that count) the applied gradient averages over.
      micro_batches: micro-batches in the window (on this process).
      skipped: True when the optimizer step was skipped (GradScaler found inf/nan,
        or the non-finite policy dropped the window).
      reason: why the window closed: "rule", "flush", "nonfinite" (dropped for a non-finite
        micro-batch) or "failed" (dropped: a backward raised half-way into in-place sums).
      grad_norm: total norm of the mean gradient before clipping, when clipping is on.
      lr: learning rate of each parameter group used for this step.
      info: the stopping rule's info (for example the statistic it tested). With statistics,
        ``trace`` and ``squared_norm`` are the unbiased ``tr(Sigma)`` and ``|G|^2`` in units of
        one sample's *summed* loss (a sequence's summed token losses for a language model, as
        ``samples`` counts them; a sample's loss for a classifier): per-token means are ``T^2``
        smaller. ``noise_scale`` (``B_simple``, in samples) is their ratio and has no such factor.
        The Monitor's rows are in per-sample-mean units (the loss as the batch reduces it).
      samples: samples (sequences, images) in the window, summed over processes: the
        units per-sample statistics count; None when nothing said (a rule without
        statistics and no ``samples=`` given).
    """

    step: int
    items: int
    micro_batches: int
    skipped: bool
    reason: str
    grad_norm: float | None = None
    lr: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    samples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-serialisable) of this record."""
        return asdict(self)
