"""Layer type -> how to get that layer's per-sample gradient statistics.

One small entry per layer type (BackPACK's layout): a new layer is one function and
one ``register`` call. A module type that is not registered but owns parameters goes
to the exact per-sample loop in ``_fallback.py``, and ``PerSampleGradStats.paths``
says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

Grads = dict[str, torch.Tensor]
PerSample = Callable[[nn.Module, tuple, torch.Tensor], Grads]
SumSquares = Callable[[nn.Module, tuple, torch.Tensor], "Grads | None"]


@dataclass(frozen=True)
class LayerStats:
    """How one layer type yields statistics from its input and output gradient.

    Attributes:
      name: the path's name as ``PerSampleGradStats.paths`` reports it.
      per_sample: per-sample gradients of the layer's own parameters, ``{name: (B, *shape)}``,
        from the layer's positional inputs and the gradient of the summed loss with
        respect to its output, all with the batch on dim 0. Called on batch chunks.
      sum_squares: optional fast path: ``{name: sum_i g_i**2}`` without per-sample
        gradients in memory, or None when it does not apply to these inputs.
      applies: optional test of a module's configuration; where it says False the
        module takes the exact fallback instead.
      subtree: the entry covers the parameters of the module's children too (a module
        that uses its children's weights itself, as MultiheadAttention uses out_proj);
        its functions then take the call's keyword arguments as a fourth argument.
    """

    name: str
    per_sample: PerSample
    sum_squares: SumSquares | None = None
    subtree: bool = False
    applies: Callable[[nn.Module], bool] | None = None


REGISTRY: dict[type[nn.Module], LayerStats] = {}


def register(*types: type[nn.Module]) -> Callable[[LayerStats], LayerStats]:
    """Register ``LayerStats`` for module types (exact type match, subclasses too)."""

    def add(stats: LayerStats) -> LayerStats:
        for t in types:
            REGISTRY[t] = stats
        return stats

    return add


def lookup(module: nn.Module) -> LayerStats | None:
    """The entry for ``module``'s type, or the nearest registered base class."""
    for t in type(module).__mro__:
        if t in REGISTRY:
            entry = REGISTRY[t]
            return entry if entry.applies is None or entry.applies(module) else None
    return None
