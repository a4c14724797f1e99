"""What a Monitor's hooks gather during one backward, for the measurement at its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardCall:
    """One forward of the model: its input's leading size (None: no tensor input with a batch dim)."""

    samples: int | None


class BackwardPass:
    """One backward as the Monitor's hooks see it: where its end callback is queued, each
    parameter's ``.grad`` before the backward added to it, and which parameters it reached.
    With the micro-batch source also, per parameter, the added gradient's squared norm and its
    product with ``.grad`` so far (0-dim tensors on the device, read with the window's at the step), and the
    forwards whose outputs reached the loss."""

    def __init__(self) -> None:
        self.task: int | None = None  # the autograd graph task the end callback runs at the end of
        self.priors: dict[int, torch.Tensor | None] = {}  # parameter index -> its .grad's size before (None: none)
        self.accumulated: set[int] = set()
        self.forwards: dict[int, ForwardCall] = {}
        self.squares: dict[int, torch.Tensor] = {}
        self.dots: dict[int, torch.Tensor] = {}
        self.state: dict[int, str] = {}  # .grad before: "none", "same" (the window's, untouched) or "changed"
        self.after: dict[int, tuple[Any, int]] = {}  # .grad after the add: (weak reference, version)
        self.sizes: dict[int, torch.Tensor] = {}  # a changed .grad's largest magnitude
        self.twice: set[int] = set()

    def before(self, i: int, grad: torch.Tensor | None) -> None:
        """The per-sample source's note of parameter ``i``'s ``.grad`` before the add (its largest
        magnitude: whether the backward accumulates)."""
        if i not in self.priors:  # a parameter reached twice (reentrant checkpoints): its first add counts
            self.priors[i] = None if grad is None else largest_magnitude(grad)

    def take(self, i: int, added: torch.Tensor, grad: torch.Tensor | None, expected: tuple[Any, int] | None) -> None:
        """The micro-batch source's reductions of the gradient ``added`` to ``grad`` (``.grad``
        now; ``expected``: what the open window left in it)."""
        if i in self.squares:
            self.twice.add(i)
            return
        if added.requires_grad:  # a backward with create_graph=True
            added = added.detach()
        flat = added.reshape(-1)
        # float32 and float64: one dot each (both sum the squares in the tensor's dtype, as a float32
        # vector_norm does: the same range); half precision sums in float32
        wide = added.dtype in (torch.float32, torch.float64) and added.layout == torch.strided
        self.squares[i] = (torch.dot(flat, flat) if wide
                           else torch.linalg.vector_norm(added, dtype=torch.float32).to(torch.float64).square())
        if grad is None:
            self.state[i] = "none"
        elif expected is not None and expected[0]() is grad and grad._version == expected[1]:
            self.state[i] = "same"
            other = (grad.detach() if grad.requires_grad else grad).reshape(-1)
            if not wide:
                self.dots[i] = torch.dot(flat.float(), other.float())
            else:
                self.dots[i] = torch.dot(flat, other if other.dtype == added.dtype else other.to(added.dtype))
        else:
            self.state[i] = "changed"
            self.sizes[i] = largest_magnitude(grad)

    def queue(self, task: int, callback: Callable[[], None]) -> None:
        """Queue ``callback`` for the end of the autograd graph task ``task`` (once a backward)."""
        if self.task is None:
            self.task = task
            torch.autograd.Variable._execution_engine.queue_callback(callback)


def as_floats(values: list[torch.Tensor]) -> list[float]:
    """0-dim tensors as Python floats in float64, with one synchronisation (one stack and one
    conversion where they share a device and dtype, the usual case)."""
    device, dtype = values[0].device, values[0].dtype
    if all(v.device == device and v.dtype == dtype for v in values):
        return torch.stack(values).to(torch.float64).tolist()
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in values]).tolist()


def stacked(values: list[torch.Tensor]) -> torch.Tensor | None:
    """0-dim tensors as one float64 vector on the first one's device, without a synchronisation
    (None for none)."""
    if not values:
        return None
    device, dtype = values[0].device, values[0].dtype
    if all(v.device == device and v.dtype == dtype for v in values):
        return torch.stack(values).to(torch.float64)
    return torch.stack([v.to(device=device, dtype=torch.float64) for v in values])


def largest_magnitude(grad: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in ``grad``, without a synchronisation (0 for an empty tensor)."""
    if grad.numel() == 0:
        return torch.zeros((), device=grad.device)
    return torch.linalg.vector_norm(grad.detach(), float("inf"))
