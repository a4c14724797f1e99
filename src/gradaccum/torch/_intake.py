"""One micro-batch into the Accumulator's window, in straight-line order: screen the loss,
backward, screen the gradient (its squared norms in the same pass, for the micro-batch source),
measure the statistics, add to the window sum. Until the sum is added to, nothing of the window
has changed; a backward that raises is undone here (``_undo``)."""

from __future__ import annotations

import torch

from ._nonfinite import all_finite, finite_loss, squared_norms_if_finite
from ._parts import AccumulatorState


class MicroBatchIntake(AccumulatorState):
    """A micro-batch's way into the window (mixed into ``Accumulator``, whose state it reads)."""

    _untracked: list[tuple[str, torch.nn.Parameter]]
    _grads_seen: list[tuple[int, int] | None]

    @property
    def _in_place(self) -> bool:
        return self._window.in_place

    def _take_micro_batch(self, loss: torch.Tensor, count: int, reduction: str, samples: int | None,
                          agreed: bool | None = None) -> tuple[bool, bool]:
        """Screen the loss, backward, screen the gradient, statistics, add to the window sum.

        ``agreed``: whether every rank's loss is finite, where the mode makes the ranks agree
        on it before the backward (FSDP2), else None. Returns (statistics committed, the
        scaler's loss scale overflowed).
        """
        if count == 0:  # no items (every label ignored): nothing to add but its place in the window
            self._discard_statistics()
            return False, False
        if self._poisoned and self.source is None:
            return False, False  # the window will be dropped: no backward needed
        # (a statistics rule still needs the window's statistics to decide its length, so a
        # poisoned window goes on gathering them from its good micro-batches; it is dropped
        # when it closes, on every rank)
        if agreed is False or (agreed is None and self._screen.loss_before_backward and not finite_loss(loss)):
            self._reject("loss", count)
            return False, False
        grads = self._backward(loss, count, reduction)
        squared: list[float] | None = None
        if self._screen.each_gradient:
            finite, squared = self._finite(loss, grads)
            if not finite:
                self._reject("loss or gradient", count)
                return False, False
        measured, overflow = self._statistics(grads, squared, samples, count)
        self._window.take(grads)
        if self._in_place:
            self._grads_seen = self._grad_state(self._window.sums)
        self._items += count
        self._samples += (measured if measured is not None else samples) or 0
        return measured is not None, overflow

    def _backward(self, loss: torch.Tensor, count: int, reduction: str) -> list[torch.Tensor | None]:
        """The backward of the micro-batch's summed loss (times the window's power-of-two
        seed, and the scaler's scale); its gradient, in ``.grad``."""
        total = loss * self._window.seed(count, reduction)
        if self.scaler is not None:
            total = self.scaler.scale(total)
        total.backward()
        self._check_untracked()
        grads = [p.grad for p in self._params]
        if self._in_place and self._grad_state(grads) == self._grads_seen or not any(g is not None for g in grads):
            raise ValueError(
                "loss: its backward reached none of the model's parameters (it was computed by another model, or "
                "from tensors detached from this one): pass the loss of the model the Accumulator was built with "
                "(the window is unchanged; any other model's parameters now hold this loss's gradient)")
        return grads

    def _finite(self, loss: torch.Tensor, grads: list[torch.Tensor | None]) -> tuple[bool, list[float] | None]:
        """Whether the micro-batch's loss and gradient are finite, on every rank where the mode
        agrees on it (FSDP2: each rank's shard). With the micro-batch source the same pass takes
        each gradient's squared norm (returned, of this rank's shard under FSDP2), else None."""
        shards = self._mode.shards(grads)
        squared = None
        if self.source is not None and self.source.takes_norms:
            squared = squared_norms_if_finite(shards) if finite_loss(loss) else None
            mine = squared is not None
        else:
            mine = finite_loss(loss) and all_finite(shards)
        return self._mode.agree_finite(mine, self._steps, self._micro_batches), squared

    def _statistics(self, grads: list[torch.Tensor | None], squared: list[float] | None, samples: int | None,
                    count: int) -> tuple[int | None, bool]:
        """Measure the micro-batch (its statistics source); (the samples measured, or None when
        nothing was, and whether the scaler overflowed). An overflowing micro-batch under a scaler
        is not measured: the scaler skips its window, which closes now. ``squared``: its
        gradient's squared norms, where the finiteness check took them."""
        if self.source is None:
            return None, False
        if self.scaler is not None:
            squared = squared_norms_if_finite(grads) if self.source.takes_norms else squared
            if (squared is None) if self.source.takes_norms else not all_finite(grads):
                self._discard_statistics()
                return None, True
        scale = self._window.factor * (1.0 if self.scaler is None else float(self.scaler.get_scale()))
        return self.source.measure(grads, squared, samples, count, scale,
                                   self._reduce_increment if self._reduces_moments else None), False

    @property
    def _reduces_moments(self) -> bool:
        """Per-element statistics whose increments the mode reduces over ranks (DDP)."""
        return self._mode.reduces_increments and self.stats is not None and self.stats.statistics == "elements"

    def _reduce_increment(self, tensors: list[torch.Tensor], n: int) -> int:
        return self._mode.reduce_increment(tensors, n, self._steps, self._micro_batches)

    def _reject(self, what: str, count: int) -> None:
        """A non-finite micro-batch: its statistics and (apart) its gradient go; the policy
        says whether it raises, dooms the window, or only loses its items."""
        self._discard_statistics()
        if not self._in_place:
            self._clear_grads()  # the window sum is apart from .grad: the bad gradient goes
        if self._screen.dooms_window:
            self._poisoned = True  # the whole window is dropped, so in-place sums may be poisoned
            return
        error = self._screen.error(what, count, self._steps, self._micro_batches)
        if error is not None:
            self._micro_batches -= 1
            raise error
        # skip_micro_batch: the micro-batch counts toward the window's length, its items don't

    def _undo(self) -> None:
        """A micro-batch whose backward (or statistics) raised: it is not counted, and the window
        is as before, or, where part of it cannot be taken back, marked failed (dropped at its
        close)."""
        self._micro_batches -= 1
        self._discard_statistics()
        for _, p in self._untracked:
            p.grad = None
        if self.source is not None and self.source.lost:
            # the statistics merged part of this micro-batch into their moments (which may hold
            # the window sum): the window is dropped when it closes, and goes on gathering
            # statistics from its next micro-batches to decide its length
            self.source.reset()
            self._poisoned = self._failed = True
            self._clear_grads()
        elif self._in_place:
            if self._grad_state([p.grad for p in self._params]) != self._grads_seen:
                # autograd added part of this micro-batch to the window sum (.grad): that
                # cannot be undone bitwise, so the window is dropped when it closes
                self._poisoned = self._failed = True
                self._window.take([p.grad for p in self._params])
                self._grads_seen = self._grad_state(self._window.sums)
        else:
            self._clear_grads()  # the window sum is kept apart: it is exactly as before

    # ------------------------------------------------------------------ the gradients' owner
    def _check_grads_untouched(self) -> None:
        """Refuse a ``.grad`` the Accumulator did not put there; in place (the window's sum is
        ``.grad``), also one changed since its last backward (``optimizer.zero_grad()``, with or
        without ``set_to_none``, or any in-place change): the window's sum is lost then."""
        if self._in_place and self._micro_batches and self._grad_state([p.grad for p in self._params]) != \
                self._grads_seen:
            raise RuntimeError(
                "the window's gradient sum, which .grad holds under nonfinite='skip_window', was changed outside "
                "the Accumulator since its last backward (optimizer.zero_grad(), a stray loss.backward(), clipping "
                "or another in-place change of .grad): remove it from the training loop, the Accumulator clears "
                "the gradients when it steps. The window's sum is lost: call flush(drop=True) to drop the window")
        for i, p in enumerate(self._params):
            if p.grad is not None and not self._window.owns(i, p.grad):
                raise RuntimeError(
                    "a parameter has a .grad that the Accumulator did not put there: run backward only "
                    "through the Accumulator (a stray loss.backward() would leak into the window)"
                )

    def _grad_state(self, grads: list[torch.Tensor | None]) -> list[tuple[int, int] | None]:
        """Each gradient's identity and version counter (of its local shard under FSDP2): what
        autograd's add into ``.grad``, ``zero_grad`` or any in-place change moves. Read only
        with the sums in ``.grad``; elsewhere an empty list."""
        if not self._in_place:
            return []
        shards = self._mode.shards(grads)
        return [None if g is None else (id(g), s._version) for g, s in zip(grads, shards)]  # type: ignore[union-attr]

    def _check_untracked(self) -> None:
        stray = [n for n, p in self._untracked if p.grad is not None]
        if stray:
            raise ValueError(
                f"parameters the optimizer does not hold got gradients ({', '.join(stray[:3])}): they were "
                "trainable (or unfrozen) after the optimizer was built, so no step would use them. Add them to "
                "the optimizer (optimizer.add_param_group) and build a new Accumulator, or freeze them")

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _discard_statistics(self) -> None:
        if self.source is not None:
            self.source.discard()
