"""The Accumulator's state that its parts (``MicroBatchIntake``, ``WindowClose``) read and write,
declared once: the ``Accumulator`` sets every attribute."""

from __future__ import annotations

from typing import Any

import torch

from ._modes import DistributionMode
from ._nonfinite import Screen
from ._sources import MicroBatchSource, PerSampleSource
from ._window_sums import WindowSums


class AccumulatorState:
    """The attributes the Accumulator's parts share (annotations only)."""

    _params: list[torch.nn.Parameter]  # the parameters the optimizer holds, in its order
    _mode: DistributionMode
    _window: WindowSums
    _screen: Screen
    _steps: int  # windows closed
    _micro_batches: int  # of the open window, skipped ones included
    _items: int
    _samples: int
    _poisoned: bool  # the open window is dropped when it closes
    _failed: bool  # ... because a backward raised half-way into it
    source: PerSampleSource | MicroBatchSource | None
    stats: Any  # the per-sample source's PerSampleGradStats, or None
    scaler: Any
