"""Layer type -> how to get that layer's per-sample gradient statistics.

One small entry per layer type (BackPACK's layout, Opacus' ``register_grad_sampler``
contract): a new layer is one function and one ``register_layer_stats`` call. A module
type that is not registered but owns parameters goes to the exact per-sample fallback
in ``_fallback.py``, and ``PerSampleGradStats.paths`` says so (docs/design.md,
"Per-sample statistics").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

Grads = dict[str, torch.Tensor]


class Projector(Protocol):
    """Projects a gradient onto fixed random vectors along its last dimension (see ``_explained``)."""

    def vector(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...

    def norm(self, size: int) -> float: ...

    def __call__(self, t: torch.Tensor) -> torch.Tensor: ...


class NormParts(NamedTuple):
    """A layer call's share of the norm path (docs/design.md, "Norm path").

    Attributes:
      squared_norms: per parameter, ``sum_i |g_i|^2`` over the call's samples (0-d tensors).
      sums: per parameter, the projected sum of the per-sample gradients, as in ``sum_squares``.
      magnitudes: per parameter, the projected (with ``|v|``) sum of the absolute values of
        the terms autograd adds up into the gradient: the rounding scale of the check.
      terms: how many terms autograd adds up into each gradient element (samples x positions).
    """

    squared_norms: Grads
    sums: Grads
    magnitudes: Grads
    terms: int


class RowSquares(NamedTuple):
    """A weight's per-element sum of squares over samples, made on demand a block of rows
    (dim 0) at a time: ``write(start, stop, out)`` fills ``out``, of shape
    ``(stop - start, *shape[1:])``, with rows ``start:stop``. The per-element path merges each
    block as it is made, through one small buffer, so the increment's sum of squares is never
    held whole (docs/design.md, "Moments in blocks"). ``full()`` makes all of it."""

    shape: torch.Size
    write: Callable[[int, int, torch.Tensor], None]
    dtype: torch.dtype
    device: torch.device

    def full(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.write(0, self.shape[0], out)
        return out


Squares = dict[str, torch.Tensor | RowSquares]
"""``sum_squares``' squares: per parameter a tensor, or a ``RowSquares`` that makes it in blocks."""

# A layer's functions take the module type they are registered for (nn.Linear's take an nn.Linear):
# the table dispatches by type (``lookup``), which a Callable's parameter type cannot say, so the
# module parameter is Any here, as in the JAX table (gradaccum.jax._layer_stats).
PerSample = Callable[[Any, tuple, torch.Tensor], Grads]
SumSquares = Callable[[Any, tuple, torch.Tensor, Projector],
                      "tuple[Squares, Grads] | tuple[Squares, Grads, Grads] | None"]
Norms = Callable[[Any, tuple, torch.Tensor, Projector], "NormParts | None"]
Values = Callable[[Any, tuple, torch.Tensor, str, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerStats:
    """How one layer type yields statistics from its input and output gradient.

    Attributes:
      name: the path's name as ``PerSampleGradStats.paths`` reports it.
      per_sample: per-sample gradients of the layer's own parameters, ``{name: (B, *shape)}``,
        from the layer's positional inputs and the gradient of the summed loss with
        respect to its output, all with the batch on dim 0 and in the parameters' dtype.
        Called on batch chunks.
      sum_squares: optional fast path without per-sample gradients in memory:
        ``(squares, sums)`` with ``squares[name] = sum_i g_i**2`` (a tensor, or a
        ``RowSquares`` that makes it a block of rows at a time) and ``sums[name]`` the
        sum over samples of the gradients *projected* by the given projector
        (``project(sum_i g_i)``, which the fast path can often form far more cheaply
        than the sum itself); None when it does not apply to these inputs. The sums
        let the collector check that the call explains the parameter's gradient. It may
        return a third dict, ``magnitudes`` as in ``NormParts``: the check's rounding scale
        from them instead of from a pass over ``squares`` (``nn.Linear``: from norms of its
        input and output gradient).
      norms: optional fast path for the norm rules (NormTest, the noise scale): the summed
        per-sample squared gradient norms without per-element squares (``NormParts``); None
        when it does not apply to these inputs. Without it the norm path sums the squares
        of ``sum_squares`` or of the per-sample gradients.
      values: optional, the per-sample gradients of one parameter (by its local name) at flat
        element indices, ``(B, len(index))``, without forming the others: what the precision
        guard recomputes flagged elements from (docs/design.md, "Moments"). Without it they
        are gathered from ``per_sample`` (chunked over samples).
      positions: optional, how many positions of a sample the layer's gradient sums over,
        from the output gradient ``d``: autograd adds ``samples x positions`` terms into each
        gradient element, which sets the rounding tolerance of the check. Default
        ``channels_last_positions`` (all dims but the batch and the last); convolutions
        and GroupNorm count their spatial dims.
      applies: optional test of a module's configuration; where it says False the
        module takes the exact fallback instead.
      subtree: the entry covers the parameters of the module's children too (a module
        that uses its children's weights itself, as MultiheadAttention uses out_proj);
        its functions then take the call's keyword arguments as a fourth argument.
    """

    name: str
    per_sample: PerSample
    sum_squares: SumSquares | None = None
    norms: Norms | None = None
    values: Values | None = None
    positions: Callable[[torch.Tensor], int] | None = None
    subtree: bool = False
    applies: Callable[[nn.Module], bool] | None = None


REGISTRY: dict[type[nn.Module], LayerStats] = {}


def channels_last_positions(d: torch.Tensor) -> int:
    """Positions per sample of an output gradient with features last: (B, ..., C) -> prod(...)."""
    return d[0].numel() // d.shape[-1] if d.dim() >= 2 and d.shape[-1] else 1


def channels_first_positions(d: torch.Tensor) -> int:
    """Positions per sample of an output gradient with channels first: (B, C, ...) -> prod(...)."""
    return d[0, 0].numel() if d.dim() >= 3 else 1


def register_layer_stats(*types: type[nn.Module]) -> Callable[[LayerStats], LayerStats]:
    """Register ``LayerStats`` for module types (the type and its subclasses).

    A subclass whose ``forward`` differs from the registered type's is not trusted
    blindly: the collector checks every call against the parameter's gradient and
    moves parameters it cannot explain to the whole-model fallback. Everything is checked
    before anything is registered: a refused call registers nothing.
    """
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_layer_stats: {t!r} is not an nn.Module subclass")

    def add(stats: LayerStats) -> LayerStats:
        if not isinstance(stats, LayerStats):
            raise TypeError(f"register_layer_stats takes a LayerStats, got {type(stats).__name__}")
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
