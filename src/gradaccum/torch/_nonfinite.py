"""The non-finite policy: where a micro-batch is checked for NaN/Inf, and what a bad one does.

One piece of the Accumulator's hot path (docs/design.md, "Window mean"): the window buffer
(``_window_sums``) says where the sum lives, this says when it is checked.

- Sums kept apart from ``.grad`` (``"raise"``, ``"skip_micro_batch"``, any statistics rule):
  every micro-batch's loss and gradient are checked after its backward, before they join the
  window, so a bad one is dropped and the window is exactly as before.
- Sums in ``.grad`` (``"skip_window"`` without statistics): the loss is checked before the
  backward, the window's sum once when it closes; a bad micro-batch dooms its window.
- With a ``GradScaler``, non-finite gradients are the scaler's overflow (it skips the window
  and lowers the scale); the loss is checked before the backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

NonFinitePolicy = Literal["raise", "skip_micro_batch", "skip_window"]
POLICIES: tuple[str, ...] = ("raise", "skip_micro_batch", "skip_window")
_FOREACH_BELOW = 1 << 20  # gradient elements below which the finiteness check uses one foreach call


class NonFiniteError(FloatingPointError):
    """A micro-batch produced a NaN or Inf loss or gradient (policy ``"raise"``)."""


@dataclass(frozen=True)
class Screen:
    """When the Accumulator looks for NaN/Inf, given where the window sum lives.

    Attributes:
      policy: what a bad micro-batch does (``NonFinitePolicy``).
      in_place: the window sum is ``.grad`` itself (autograd adds into it).
      scaled: a GradScaler owns non-finite gradients (overflow).
    """

    policy: str
    in_place: bool
    scaled: bool

    @property
    def loss_before_backward(self) -> bool:
        """Check the loss before the backward (the gradient is not checked per micro-batch)."""
        return self.in_place or self.scaled

    @property
    def each_gradient(self) -> bool:
        """Check every micro-batch's loss and gradient after its backward."""
        return not (self.in_place or self.scaled)

    @property
    def window_at_close(self) -> bool:
        """Check the window's sum once, when it closes (sums in ``.grad``, no scaler)."""
        return self.in_place and not self.scaled

    @property
    def dooms_window(self) -> bool:
        return self.policy == "skip_window"

    def error(self, what: str, count: int, window: int, micro_batch: int) -> NonFiniteError | None:
        """The error to raise for a bad micro-batch, or None when the policy goes on."""
        if self.policy != "raise":
            return None
        return NonFiniteError(
            f"non-finite {what} in micro-batch of {count} items (window {window}, micro-batch {micro_batch}); "
            "the accumulated window is unchanged. Pass nonfinite='skip_micro_batch' or 'skip_window' to go on "
            "instead.")


def finite_loss(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss.detach()).all())


def all_finite(grads: list[torch.Tensor | None]) -> bool:
    """Whether every element of every gradient is finite, in one synchronisation.

    A tensor's sum (or norm) is NaN or Inf whenever one of its elements is, and is a
    fast, vectorised read, and so is the sum of those; only when it is not finite (which
    huge finite values, or sums of opposite infinities, can also cause) do the exact,
    slower per-element checks run.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return True
    if sum(g.numel() for g in present) <= _FOREACH_BELOW:
        reduced = torch.stack(torch._foreach_norm(present))  # one dispatch for many small tensors (L2: 2x faster than L1)
    else:
        reduced = torch.stack([g.sum() for g in present])  # large tensors: the fastest kernel
    if math.isfinite(reduced.sum().item()):  # (one dispatch fewer than isfinite().all())
        return True
    return all(bool(torch.isfinite(g).all()) for g in present)
