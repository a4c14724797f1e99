"""Find the largest micro-batch that runs, by probing: double, then binary search."""

from __future__ import annotations

import gc
import multiprocessing
import resource
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

from .._core.planning import plan_micro_batches
from .._core.validation import check_positive_int


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")
PROBE_LIMIT = 1 << 24  # micro-batch size past which an unbounded probe stops


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or a RuntimeError whose message says
    memory ran out (CUDA, MPS, and the CPU allocator's "can't allocate memory")."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if (oom is not None and isinstance(error, oom)) or isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MESSAGES)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_micro_batch_size(step: Callable[[int], object], start: int = 1, max_size: int | None = None, *,
                          max_memory: int | None = None, process_group: object | None = None,
                          model: torch.nn.Module | None = None) -> int:
    """The largest micro-batch ``m`` for which ``step(m)`` runs without running out of memory.

    ``step(m)`` should run one forward and backward at micro-batch ``m``. Sizes are probed
    from ``start`` by doubling until one fails (or ``max_size``), then by binary search
    between the last size that ran and the first that failed; memory is freed between
    tries. Errors other than out-of-memory propagate. Under torch.distributed every rank
    probes and all agree on the smallest result. Raises RuntimeError when even ``start``
    does not fit.

    With ``max_memory`` (bytes), a size fits only if its measured peak memory stays within
    the budget: each try runs in a forked child process (``measure_peak_memory``), which
    is how a CPU limit must be handled, since the operating system kills a process that
    exceeds memory instead of raising.

    With ``model``, the gradients each try leaves on it are cleared after the try (set to
    None), so the probe neither carries one try's gradients into the next nor leaves any
    behind for an Accumulator built afterwards (which refuses stale gradients).
    """
    start = check_positive_int("start", start)
    if max_size is not None:
        max_size = check_positive_int("max_size", max_size)
        if max_size < start:
            raise ValueError(f"max_size ({max_size}) must be >= start ({start})")

    if max_memory is not None:
        max_memory = check_positive_int("max_memory", max_memory)

    def fits(m: int) -> bool:
        if max_memory is not None:
            peak = measure_peak_memory(step, m)
            return peak is not None and peak <= max_memory
        try:
            step(m)
            return True
        except BaseException as error:  # noqa: B902 - only out-of-memory is swallowed
            if not is_out_of_memory(error):
                raise
        finally:
            if model is not None:
                model.zero_grad(set_to_none=True)
        _free_memory()  # the failed try's tensors, held by the traceback until now
        return False

    if not fits(start):
        raise RuntimeError(f"micro-batch start={start} does not fit in memory; try a smaller start")
    good, bad = start, None
    while bad is None and (max_size is None or good < max_size):
        if max_size is None and good >= PROBE_LIMIT:
            raise ValueError(f"step(m) ran at every micro-batch size up to {good} without running out of memory: "
                             "it may not allocate with m at all; pass max_size (the largest size worth using)")
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


def measure_peak_memory(step: Callable[[int], object], m: int) -> int | None:
    """Peak resident memory (bytes) that ``step(m)`` adds, measured in a forked child.

    The child resets its peak resident size (Linux ``/proc/self/clear_refs``), runs the
    step and reports how far the peak rose above what it held at the fork. Returns None
    when the child dies (the operating system's out-of-memory killer) or the step runs
    out of memory. The parent never runs the step, so a size that does not fit cannot
    kill it. Linux only.
    """
    check_positive_int("m", m)
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_measure_child, args=(step, m, writer), daemon=True)
    with warnings.catch_warnings():
        # JAX, when imported, warns at every fork that a child using JAX may deadlock; this
        # child runs a torch step on one thread and never enters JAX.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        child.start()
    writer.close()
    result = None
    try:
        if reader.poll(timeout=None):
            result = reader.recv()
    except EOFError:
        result = None  # killed before it could answer
    child.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _measure_child(step: Callable[[int], object], m: int, writer: Any) -> None:
    # A forked child inherits the parent's OpenMP state but not its threads: entering a
    # parallel region would hang, so the child computes on one thread (same memory).
    torch.set_num_threads(1)
    try:
        baseline = _rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        try:
            step(m)
        except BaseException as error:  # noqa: B902
            writer.send(None if is_out_of_memory(error) else error)
            return
        writer.send(_peak_bytes() - baseline)
    finally:
        writer.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def plan_accumulation(step: Callable[[int], object], effective_batch: int, *, start: int = 1,
                      max_memory: int | None = None, model: torch.nn.Module | None = None) -> list[int]:
    """One call from "my model runs out of memory at this batch" to a window plan.

    Finds the largest micro-batch ``step`` runs at (up to ``effective_batch``; within
    ``max_memory`` bytes when given, as ``find_micro_batch_size``), then returns this
    rank's micro-batch sizes adding up (over all ranks, under torch.distributed) to exactly
    ``effective_batch``. Train with ``Accumulator(model, opt, FixedSteps(len(sizes)))``;
    pass ``model`` so the probe's gradients are cleared (see ``find_micro_batch_size``).
    """
    effective_batch = check_positive_int("effective_batch", effective_batch)
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    cap = max(start, -(-effective_batch // world))
    micro = find_micro_batch_size(step, start, cap, max_memory=max_memory, model=model)
    return plan_micro_batches(effective_batch, micro, world)[rank]
