"""A batch sampler whose position is part of the checkpoint, for windows of micro-batches.

With changing (planned or adaptive) windows, a resumed run must continue on the very
micro-batch where it stopped, mid-epoch and mid-window: ``RandomSampler`` draws a new
permutation on every ``iter``, and a DataLoader restarted after a crash starts the epoch
over. ``MicroBatchSampler`` draws each epoch's permutation from ``(seed, epoch)`` and keeps
its position (epoch, micro-batches served), which ``state_dict`` saves with the model,
optimizer and Accumulator state dicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from .._core.validation import check_positive_int


class MicroBatchSampler(Sampler[list[int]]):
    """Micro-batches of dataset indices, reproducible from ``seed`` and resumable.

    Use it as a DataLoader's ``batch_sampler``; every micro-batch is one ``Accumulator.backward``.

    Args:
      size: the number of examples in the dataset.
      micro_batch: examples per micro-batch (on each process).
      seed: the permutation of epoch e is drawn from ``(seed, e)`` (any int: the generator's
        seed is ``(seed * 1_000_003 + e) mod 2**64``).
      shuffle: False serves the examples in order.
      drop_last: drop an epoch's last micro-batch when it is short (default True: every
        micro-batch then has ``micro_batch`` examples).
      num_replicas: under data parallelism, the number of processes: every process serves its
        own slice of each global micro-batch of ``micro_batch * num_replicas`` examples (as
        ``DistributedSampler`` splits an epoch), so the processes' micro-batches together
        are one global micro-batch and windows stay aligned. A short last one (``drop_last=False``)
        is split as evenly as it goes, so it must hold at least ``num_replicas`` examples.
      rank: this process's index among them.

    The position advances as micro-batches are served. With ``num_workers > 0`` a DataLoader
    fetches ahead of the training loop: save ``state_dict()`` from a loop that has consumed
    every micro-batch served (or use ``num_workers=0``), else a resumed run skips the
    prefetched ones. One iterator serves at a time: an iterator started earlier, or live
    when ``load_state_dict`` moved the position, raises instead of serving another epoch's
    examples.
    """

    def __init__(self, size: int, micro_batch: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0) -> None:
        self.size = check_positive_int("size", size)
        self.micro_batch = check_positive_int("micro_batch", micro_batch)
        self.num_replicas = check_positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, num_replicas), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.rank, self.seed, self.shuffle, self.drop_last = rank, seed, bool(shuffle), bool(drop_last)
        if len(self) == 0:
            raise ValueError(f"size ({size}) holds no {'full ' if drop_last else ''}micro-batch of "
                             f"{micro_batch} x {num_replicas} examples")
        short = size % (micro_batch * num_replicas)
        if not self.drop_last and 0 < short < num_replicas:
            raise ValueError(f"drop_last=False: the epoch's last micro-batch holds {short} example(s) for "
                             f"num_replicas={num_replicas} processes, so some process would get none; pass "
                             "drop_last=True, or a size or micro_batch that leaves at least one example per process")
        self.epoch = 0
        self.served = 0  # micro-batches of the current epoch already served
        self._iterator = 0  # which iterator may serve: the latest, unless a state was loaded since

    def __len__(self) -> int:
        """Micro-batches per epoch (on this process)."""
        step = self.micro_batch * self.num_replicas
        return self.size // step if self.drop_last else -(-self.size // step)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        seed = (self.seed * 1_000_003 + epoch) % 2**64  # the generator takes 64 bits
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch, from where the position says; then the epoch ends."""
        self._iterator += 1
        return self._serve(self._iterator)

    def _serve(self, iterator: int) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        step = self.micro_batch * self.num_replicas
        while True:
            self._check_live(iterator)
            if self.served == len(self):
                break
            start = self.served * step
            global_batch = order[start:start + step]
            self.served += 1
            share = len(global_batch)  # step, or a short last one split as evenly as it goes
            yield global_batch[self.rank * share // self.num_replicas:(self.rank + 1) * share // self.num_replicas
                               ].tolist()
        self.epoch += 1
        self.served = 0

    def _check_live(self, iterator: int) -> None:
        if iterator != self._iterator:
            raise RuntimeError("MicroBatchSampler: this iterator was overtaken by a newer one or by "
                               "load_state_dict(), which moved the position; it would serve another epoch's "
                               "examples. Iterate anew (a new DataLoader iterator) after load_state_dict()")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "served": self.served, "seed": self.seed, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "size": self.size, "micro_batch": self.micro_batch,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; the sampler must have been built with the same settings (every
        key is checked: a state without one cannot say it was)."""
        if not isinstance(state, dict):
            raise ValueError("sampler state must be a dict from MicroBatchSampler.state_dict()")
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"sampler state is missing {', '.join(missing)}: pass a dict from "
                             "MicroBatchSampler.state_dict()")
        for key in ("seed", "shuffle", "drop_last", "size", "micro_batch", "num_replicas"):
            if state[key] != getattr(self, key) or type(state[key]) is not type(getattr(self, key)):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, this sampler has "
                                 f"{key}={getattr(self, key)!r}: build it with the same settings")
        epoch, served = state["epoch"], state["served"]
        for name, value, high in (("epoch", epoch, None), ("served", served, len(self))):
            if (isinstance(value, bool) or not isinstance(value, int) or value < 0
                    or (high is not None and value > high)):
                raise ValueError(f"sampler state: {name} must be an int in [0, {high if high is not None else 'inf'}], "
                                 f"got {value!r}")
        self.epoch, self.served = epoch, served
        self._iterator += 1  # a live iterator stops serving: it holds the old epoch's order
