"""Find the largest micro-batch that runs, by probing: double, then binary search."""

from __future__ import annotations

import gc
from typing import Callable

import torch
import torch.distributed as dist

from .._core.validation import check_positive_int


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError that says "out of memory" (other devices)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_micro_batch_size(step: Callable[[int], object], start: int = 1, max_size: int | None = None, *,
                          process_group: object | None = None) -> int:
    """The largest micro-batch ``m`` for which ``step(m)`` runs without running out of memory.

    ``step(m)`` should run one forward and backward at micro-batch ``m``. Sizes are probed
    from ``start`` by doubling until one fails (or ``max_size``), then by binary search
    between the last size that ran and the first that failed; memory is freed between
    tries. Errors other than out-of-memory propagate. Under torch.distributed every rank
    probes and all agree on the smallest result. Raises RuntimeError when even ``start``
    does not fit.
    """
    start = check_positive_int("start", start)
    if max_size is not None:
        max_size = check_positive_int("max_size", max_size)
        if max_size < start:
            raise ValueError(f"max_size ({max_size}) must be >= start ({start})")

    def fits(m: int) -> bool:
        try:
            step(m)
            return True
        except BaseException as error:  # noqa: B902 - only out-of-memory is swallowed
            if not is_out_of_memory(error):
                raise
        _free_memory()  # the failed try's tensors, held by the traceback until now
        return False

    if not fits(start):
        raise RuntimeError(f"micro-batch start={start} does not fit in memory; try a smaller start")
    good, bad = start, None
    while bad is None and (max_size is None or good < max_size):
        trial = good * 2 if max_size is None else min(good * 2, max_size)
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    if dist.is_available() and dist.is_initialized():
        agreed = torch.tensor([good], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=process_group)
        good = int(agreed)
    return good
