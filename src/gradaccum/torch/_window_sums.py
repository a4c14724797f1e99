"""Where a window's gradient sum lives: apart from ``.grad``, or in it (autograd's own add).

Apart (policies ``"raise"`` and ``"skip_micro_batch"``, and any statistics rule): each
backward lands in ``.grad``, is checked, and is then added to a buffer of its own, so a bad
micro-batch (or a backward that raised half-way) can be dropped and the window is exactly as
before. In place (``"skip_window"`` without statistics): autograd accumulates into ``.grad``,
the hand-written loop's way and the fastest; a bad micro-batch can only doom the window.

Counts are applied as loss seeds scaled by a power of two, ``count * 2**-shift`` with
``2**shift <= count`` of the window's first micro-batch: ``loss * count`` for 70,000 tokens
overflows a float16 loss (and the seed of the backward with it), while multiplying by a
power of two is exact, so every sum and the final ``sum / items`` are bitwise those of the
unscaled arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class WindowSums:
    """The window's gradient sums (per tracked parameter) and the power-of-two count shift."""

    def __init__(self, params: list[torch.nn.Parameter], in_place: bool) -> None:
        self.params = params
        self.in_place = in_place
        self.reset()

    def reset(self) -> None:
        self.sums: list[torch.Tensor | None] = [None] * len(self.params)
        self.shift = 0

    @property
    def empty(self) -> bool:
        """No gradient has reached the window yet."""
        return all(s is None for s in self.sums)

    def seed(self, count: int, reduction: str) -> float:
        """The factor the micro-batch's loss is multiplied by before its backward; the
        window's first gradient fixes the shift."""
        if self.empty:
            self.shift = max(count.bit_length() - 1, 0)  # 2**shift <= count < 2**(shift + 1)
        factor = 2.0 ** -self.shift
        return count * factor if reduction == "mean" else factor

    @property
    def factor(self) -> float:
        """The power of two the sums are scaled by (divide it out to get true sums)."""
        return 2.0 ** -self.shift

    def take(self, grads: list[torch.Tensor | None]) -> None:
        """Add this micro-batch's gradients (``.grad``) to the window and clear ``.grad``."""
        if self.in_place:
            self.sums = grads  # autograd accumulated into the window sums, which .grad holds
            return
        adds_to: list[torch.Tensor] = []
        added: list[torch.Tensor] = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.sums[i] is None:
                self.sums[i] = g  # the first gradient of a window becomes its sum: no copy
            else:
                adds_to.append(self.sums[i])  # type: ignore[arg-type]
                added.append(g)
        if adds_to:
            torch._foreach_add_(adds_to, added)
        for p in self.params:
            p.grad = None

    def owns(self, i: int, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is the window's own sum (in place), not a stray gradient."""
        return self.in_place and grad is self.sums[i]

    def true_sums(self) -> list[torch.Tensor]:
        """The sums without the count shift, zeros for parameters without one (for a reduce)."""
        out = [torch.zeros_like(p) if s is None else s for p, s in zip(self.params, self.sums)]
        if self.shift:
            torch._foreach_mul_(out, 2.0 ** self.shift)
        self.shift = 0
        self.sums = list(out)
        return out

    def to_grads(self, items: int) -> None:
        """``.grad = sum / items``: the window's mean gradient, in place."""
        denominator = items * self.factor  # exact: a power of two times an int
        present = [s for s in self.sums if s is not None]
        if present:
            torch._foreach_div_(present, denominator)  # one dispatch for every parameter
        for p, s in zip(self.params, self.sums):
            p.grad = s


class UnshiftedWindowSums(WindowSums):
    """Window sums whose seeds are the counts themselves (no power-of-two shift): under FSDP2
    each backward's gradient is summed over ranks by the reduce-scatter, so every rank's seed
    must be on one scale, which a shift taken from each rank's own first count is not."""

    def seed(self, count: int, reduction: str) -> float:
        return float(count) if reduction == "mean" else 1.0


class MomentWindowSums(WindowSums):
    """The window's sum kept by per-element statistics instead of a buffer of its own.

    Their running mean times the samples is the window's gradient sum (Chan's merge keeps it,
    exact to rounding), so with a per-element rule the Accumulator holds the mean and ``M2`` and
    no third parameter-sized buffer; at the close the mean's buffers become the gradient in
    place. Under DDP the moments are already the ranks' (every increment is reduced), so the
    close reduces only which parameters any rank reached (``true_sums``), not the sums. ``seen``
    marks the parameters a gradient reached: the others get no ``.grad``, as in one big batch.
    ``sums`` gives (and takes) the sums in ``WindowSums``'s form, scaled by the count shift, so
    state dicts are the same. Not with a GradScaler: an
    overflowing micro-batch is never merged, and the scaler must see it in the window.
    """

    def __init__(self, params: list[torch.nn.Parameter], moments: Callable[[], Any]) -> None:
        self._moments = moments
        super().__init__(params, in_place=False)

    @property
    def sums(self) -> list[torch.Tensor | None]:
        moments = self._moments()
        if moments is None:
            return [None] * len(self.params)
        scale = moments[0].n * self.factor
        return [m.mean * scale if seen else None for m, seen in zip(moments, self.seen)]

    @sums.setter
    def sums(self, value: list[torch.Tensor | None]) -> None:
        self.seen = [s is not None for s in value]

    def reset(self) -> None:
        super().reset()
        self._reached: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return not any(self.seen)

    def take(self, grads: list[torch.Tensor | None]) -> None:
        """Mark the parameters this micro-batch reached (the statistics merged its gradient)."""
        for i, g in enumerate(grads):
            if g is not None:
                self.seen[i] = True
        for p in self.params:
            p.grad = None

    def true_sums(self) -> list[torch.Tensor]:
        """For the close's all-reduce under DDP: not the sums (the moments are every rank's
        already) but 1 for each parameter this rank reached, which the reduce turns into the
        number of ranks that did; ``to_grads`` then gives a gradient to each one any rank reached."""
        self._reached = torch.tensor(self.seen, dtype=torch.int64, device=self.params[0].device)
        return [self._reached]

    def to_grads(self, items: int) -> None:
        """``.grad = mean * n / items``, in the statistics' own buffers: they are dropped when the
        window resets."""
        moments = self._moments()
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        seen = self.seen if self._reached is None else [bool(r) for r in self._reached.tolist()]
        if moments is not None:
            present = [i for i, reached in enumerate(seen) if reached]
            means = [moments[i].mean for i in present]
            if means:
                torch._foreach_mul_(means, moments[0].n / items)
            for i, mean in zip(present, means):
                grads[i] = mean
        for p, g in zip(self.params, grads):
            p.grad = g
