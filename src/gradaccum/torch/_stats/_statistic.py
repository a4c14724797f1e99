"""What a statistic keeps over a window of increments, behind one interface.

``PerSampleGradStats`` records the calls, takes each layer's path and checks the increment
the same way for every statistic; what it keeps of an increment is the statistic's:

- ``_norms.NormSquares`` (``statistics="norms"``): the window's samples and each parameter's
  ``sum_i |g_i|^2``, float64 scalars (NormTest, the noise-scale planners);
- ``_elements.ElementMoments`` (``statistics="elements"``): per-element running moments (GSNR).

Each refuses, by name, what it does not keep (``moments`` of the norms, ``norm_sums`` of the
moments).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

from ..._core.moments import Moments
from ..._core.noise_scale import NormSums
from ._increment import Increment

Reduce = Callable[[list[torch.Tensor], int], int]  # sums tensors (in place) and a count over processes


class Statistic(abc.ABC):
    """One statistic's running state over a window (see the module docstring)."""

    statistics: str  # the ``statistics`` of ``PerSampleGradStats`` it serves
    norm_formulas: bool  # whether the layers' norm formulas serve it (only ``sum_i |g_i|^2`` needed)

    @property
    @abc.abstractmethod
    def count(self) -> int:
        """Samples merged so far."""

    @property
    def lost(self) -> bool:
        """Whether a merge failed half-way and the state is refused until ``reset``."""
        return False

    def refuse_lost(self) -> None:  # noqa: B027 (an optional hook: a statistic that cannot be lost has none)
        """Raise if the state was lost (``lost``)."""

    @classmethod  # noqa: B027 (an optional hook: a statistic taken on any model has none)
    def check_sharded(cls) -> None:
        """Raise if the statistic cannot be taken on a fully_shard-ed model."""

    @abc.abstractmethod
    def merge(self, inc: Increment, sums: list[torch.Tensor | None], n: int, unscale: float,
              reduce: Reduce | None) -> int:
        """Merge a checked increment of ``n`` samples (``sums``: its gradient sums, both divided by
        ``unscale``); returns the samples merged (all processes' where ``reduce`` sums over them)."""

    @abc.abstractmethod
    def merge_empty(self, reduce: Reduce) -> int:
        """Join a data-parallel increment this process has no samples of; returns its samples."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the window."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The window's state, for a checkpoint."""

    @abc.abstractmethod
    def check_state(self, state: Any) -> Any:
        """What ``state`` holds, validated; nothing is assigned."""

    @abc.abstractmethod
    def load(self, checked: Any) -> None:
        """Take a state ``check_state`` returned."""

    @abc.abstractmethod
    def moments(self) -> list[Moments]:
        """Per-element running moments per parameter."""

    @abc.abstractmethod
    def norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> NormSums:
        """The norm path's window terms (``PerSampleGradStats.norm_sums``)."""

    @abc.abstractmethod
    def layer_norm_sums(self, window_sums: list[torch.Tensor | None], scale: float) -> dict[str, NormSums]:
        """``norm_sums`` per layer (``PerSampleGradStats.layer_norm_sums``)."""
