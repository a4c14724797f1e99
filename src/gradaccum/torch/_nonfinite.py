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
_FLAGGED_UP_TO = 1 << 20  # gradient elements up to which the finiteness check is the flagging kernel
_DOT_FROM = 1 << 17  # elements from which a CPU gradient's squared norm is its dot with itself (squared_norms)


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
    """Whether the (one-element) loss is finite: one read of its value, no kernel launch."""
    return math.isfinite(loss.item())


def all_finite(grads: list[torch.Tensor | None]) -> bool:
    """Whether every element of every gradient is finite, in one synchronisation, exactly.

    Up to ``_FLAGGED_UP_TO`` elements in all: the GradScaler's own kernel, one dispatch per
    device that flags any NaN or Inf (it multiplies by 1, which leaves every value bitwise as
    it was). Beyond that a read-only reduction is faster than that kernel's write: a tensor's
    sum is NaN or Inf whenever one of its elements is, and so is the sum of those; only when
    it is not finite (which huge finite values, or sums of opposite infinities, can also
    cause) do the exact per-element checks run.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return True
    if sum(g.numel() for g in present) <= _FLAGGED_UP_TO:
        return _none_flagged(present)
    if math.isfinite(torch.stack([g.sum() for g in present]).sum().item()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in present)


def _none_flagged(tensors: list[torch.Tensor]) -> bool:
    """The flagging kernel over ``tensors``, per device (complex ones as real views)."""
    device = tensors[0].device
    if any(t.device != device or t.is_complex() for t in tensors):  # the kernel takes one device's real tensors
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(torch.view_as_real(t) if t.is_complex() else t)
        return all(_none_flagged(group) for group in by_device.values())
    # the kernel takes float32 operands whatever the default dtype (torch.set_default_dtype(torch.float64),
    # Lightning's "64-true"), so their dtype is explicit; two one-element tensors per check
    found = torch.zeros(1, dtype=torch.float32, device=device)
    one = torch.ones(1, dtype=torch.float32, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    return found.item() == 0.0


def squared_norms_if_finite(grads: list[torch.Tensor | None]) -> list[float] | None:
    """Each gradient's squared norm (0.0 for None) in float64, or None when any element of any
    gradient is NaN or Inf: the finiteness check and the micro-batch statistics in one pass.

    A squared norm is NaN or Inf whenever one of its elements is; a finite tensor's can still
    overflow its dtype (elements beyond about 1e19 in float32), and only then do the exact
    per-element check and a float64 norm run."""
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    out = [0.0] * len(grads)
    if not present:
        return out
    for (i, g), value in zip(present, squared_norms([g for _, g in present])):
        if not math.isfinite(value):
            if not bool(torch.isfinite(g).all()):
                return None
            value = float(torch.linalg.vector_norm(g.to(torch.float64)).square())
        out[i] = value
    return out


@torch.no_grad()  # a gradient made with create_graph=True carries a graph; no norm of it is recorded
def squared_norms(tensors: list[torch.Tensor]) -> list[float]:
    """Each tensor's squared norm as a Python float, in one read: NaN or Inf where an element is
    (or where the square overflows the tensor's dtype).

    Large CPU float32 and float64 tensors (``_DOT_FROM`` elements or more) take ``torch.dot`` of
    the flattened tensor with itself: one BLAS pass, two to three times as fast there as
    ``torch._foreach_norm`` (which loops over ``vector_norm``). The others go together through
    ``_foreach_norm`` (one dispatch: many small tensors would pay a dot's dispatch each; CUDA's
    fused multi-tensor kernel; half precision, whose dot would sum in its own dtype; complex),
    squared in float64."""
    flags = [_dots(t) for t in tensors]
    if not any(flags):
        return _norms_squared(tensors).tolist()
    dots = [i for i, dot in enumerate(flags) if dot]
    rest = [i for i, dot in enumerate(flags) if not dot]
    squares = torch.stack([torch.dot(f, f).to(torch.float64) for f in (tensors[i].detach().reshape(-1) for i in dots)])
    if rest:
        others = _norms_squared([tensors[i] for i in rest])
        if others.device == squares.device:
            values = torch.cat([squares, others]).tolist()  # one read back
        else:
            values = squares.tolist() + others.tolist()
    else:
        values = squares.tolist()
    out = [0.0] * len(tensors)
    for i, v in zip(dots + rest, values):
        out[i] = v
    return out


_HALF = (torch.float16, torch.bfloat16)


def _norms_squared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' squared norms in float64, one tensor on the first norm's device
    (``_foreach_norm``: one dispatch; gradients and window sums, which no graph records).
    Half-precision norms are returned in float32 (``_foreach_norm`` sums them in float32 but
    would round the result to the tensor's dtype: a bfloat16 norm keeps 3 digits)."""
    half = [i for i, t in enumerate(tensors) if t.dtype in _HALF]
    if half:
        rest = [i for i, t in enumerate(tensors) if t.dtype not in _HALF]
        norms: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for i, n in zip(half, torch._foreach_norm([tensors[i] for i in half], 2, dtype=torch.float32)):
            norms[i] = n
        for i, n in zip(rest, torch._foreach_norm([tensors[i] for i in rest]) if rest else []):
            norms[i] = n
    else:
        norms = list(torch._foreach_norm(tensors))
    device, dtype = norms[0].device, norms[0].dtype
    if all(n.device == device and n.dtype == dtype for n in norms):  # one stack, one conversion
        return torch.stack(norms).to(torch.float64).square()
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in norms]).square()


def _dots(t: torch.Tensor) -> bool:
    """Whether ``squared_norms`` takes ``t``'s squared norm as its dot with itself."""
    return (t.numel() >= _DOT_FROM and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and t.layout == torch.strided)  # the size first: most tensors of a model are small
