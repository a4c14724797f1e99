"""Find the largest micro-batch that runs, by probing: double, then binary search."""

from __future__ import annotations

import gc
import multiprocessing
import re
import resource
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .._core.planning import plan_micro_batches
from .._core.validation import check_positive_int

_OOM_MESSAGES = re.compile(
    r"\b(?:CUDA|HIP|XPU|MTIA|MPS backend) out of memory"  # torch's device allocators
    r"|CUDA error: out of memory"  # the CUDA runtime itself
    r"|DefaultCPUAllocator: can't allocate memory"  # torch's CPU allocator
    r"|\b(?:CUBLAS|CUDNN|CUSOLVER|CUSPARSE)_STATUS_ALLOC_FAILED"  # a library's workspace
    r"|RESOURCE_EXHAUSTED: Out of memory")  # XLA devices
"""The messages of real out-of-memory errors raised as a plain RuntimeError (torch's own
``OutOfMemoryError`` and Python's ``MemoryError`` are recognised by type)."""
PROBE_LIMIT = 1 << 24  # micro-batch size past which an unbounded probe stops


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: torch's ``OutOfMemoryError`` (CUDA and others),
    Python's ``MemoryError``, or a RuntimeError with an allocator's own message (CUDA, HIP,
    XPU, MPS, the CPU allocator's "can't allocate memory", cuBLAS/cuDNN ALLOC_FAILED, XLA's
    RESOURCE_EXHAUSTED). Nothing else counts: an error that merely mentions allocating is the
    step's own failure, and a crash or ``sys.exit`` is never taken for memory running out."""
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(t, type))
    if isinstance(error, (MemoryError, *types)):
        return True
    return type(error) is RuntimeError and _OOM_MESSAGES.search(str(error)) is not None


class ProbeError(RuntimeError):
    """The probed step did something a probe cannot read as "fits" or "out of memory": it
    crashed its process, exited, or did not return in time. The message says which."""


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_micro_batch_size(step: Callable[[int], object], start: int = 1, max_size: int | None = None, *,
                          max_memory: int | None = None, process_group: object | None = None,
                          model: torch.nn.Module | None = None, timeout: float | None = None) -> int:
    """The largest micro-batch ``m`` for which ``step(m)`` runs without running out of memory.

    ``step(m)`` should run one forward and backward at micro-batch ``m``. Sizes are probed
    from ``start`` by doubling until one fails (or ``max_size``), then by binary search
    between the last size that ran and the first that failed; memory is freed between
    tries. Only out of memory (``is_out_of_memory``) counts as "does not fit": any other
    error propagates, and a step that calls ``sys.exit`` raises ``ProbeError`` (it used to
    exit the caller without a word). Under torch.distributed every rank probes and all agree
    on the smallest result. Raises RuntimeError when even ``start`` does not fit (saying so
    plainly when ``start`` is 1: the model itself does not fit).

    With ``max_memory`` (bytes), a size fits only if its measured peak memory stays within
    the budget: each try runs in a forked child process (``measure_peak_memory``), which
    is how a CPU limit must be handled, since the operating system kills a process that
    exceeds memory instead of raising. A child killed by SIGKILL (the out-of-memory killer)
    means "does not fit"; one that crashes otherwise (a segfault) raises ``ProbeError``.

    ``timeout`` (seconds per try; default: none) turns a step that never returns into a
    ``ProbeError``. In a child (``max_memory``) the child is killed and nothing is left
    behind. In this process, the step then runs in a helper thread (the current CUDA device
    is carried over; enter autocast or no_grad inside ``step``), and a step that hangs cannot
    be stopped: the error says that the thread may still be running and the model's state is
    unknown, and the process should be restarted.

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
    timeout = _check_timeout(timeout)

    def fits(m: int) -> bool:
        if max_memory is not None:
            peak = measure_peak_memory(step, m, timeout=timeout)
            return peak is not None and peak <= max_memory
        try:
            _run_here(step, m, timeout)
            return True
        except SystemExit as error:
            raise ProbeError(f"step({m}) called sys.exit({error.code!r}) during the memory probe; a probed step "
                             "must return, or raise (out of memory or its own error)") from error
        except BaseException as error:  # noqa: B902 - only out-of-memory is swallowed
            if not is_out_of_memory(error):
                raise
        finally:
            if model is not None:
                model.zero_grad(set_to_none=True)
        _free_memory()  # the failed try's tensors, held by the traceback until now
        return False

    if not fits(start):
        within = f" within max_memory={max_memory} bytes" if max_memory is not None else ""
        if start == 1:
            raise RuntimeError(f"even a micro-batch of 1 does not fit in memory{within}: the model and one "
                               "sample's activations need more; raise the memory budget or shrink the model")
        raise RuntimeError(f"micro-batch start={start} does not fit in memory{within}; try a smaller start "
                           "(1 is the smallest)")
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


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive finite number of seconds or None, got {timeout!r}")
    return float(timeout)


def _run_here(step: Callable[[int], object], m: int, timeout: float | None) -> None:
    """``step(m)`` in this process; with ``timeout``, in a helper thread waited on that long."""
    if timeout is None:
        step(m)
        return
    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            step(m)
        except BaseException as error:  # noqa: B902 - handed to the probing thread
            outcome.append(error)

    thread = threading.Thread(target=run, name=f"gradaccum-probe-{m}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ProbeError(f"step({m}) did not return within timeout={timeout:g} s; it may still be running in a "
                         "background thread, so the model's state is unknown: restart the process (or probe with "
                         "max_memory, in a child process that is killed on a timeout)")
    if outcome:
        raise outcome[0]


def measure_peak_memory(step: Callable[[int], object], m: int, *, timeout: float | None = None) -> int | None:
    """Peak resident memory (bytes) that ``step(m)`` adds, measured in a forked child.

    The child resets its peak resident size (Linux ``/proc/self/clear_refs``), runs the
    step and reports how far the peak rose above what it held at the fork. Returns None
    when the step runs out of memory (``is_out_of_memory``) or the child is killed by
    SIGKILL (the operating system's out-of-memory killer). The parent never runs the step,
    so a size that does not fit cannot kill it. Raises the step's own error; ``ProbeError``
    when the child crashes otherwise (a segfault), exits (``sys.exit``, ``os._exit``) or does
    not answer within ``timeout`` seconds (then it is killed). The peak depends on the state
    the child inherits (memory the parent's allocator holds free is reused without raising
    the peak), so two measurements can differ. Linux only.
    """
    check_positive_int("m", m)
    timeout = _check_timeout(timeout)
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_measure_child, args=(step, m, writer), daemon=True)
    with warnings.catch_warnings():
        # JAX, when imported, warns at every fork that a child using JAX may deadlock; this
        # child runs a torch step on one thread and never enters JAX.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        child.start()
    writer.close()
    answer = None
    try:
        if reader.poll(timeout=timeout):
            answer = reader.recv()
        else:
            child.kill()
            child.join()
            raise ProbeError(f"step({m}) did not return within timeout={timeout:g} s; its child process was killed")
    except EOFError:
        answer = None  # the child died before it could answer
    finally:
        reader.close()
    child.join()
    if answer is None:
        _died(child.exitcode, m)  # raises unless the out-of-memory killer ended it
        return None
    kind, value = answer
    if kind == "peak":
        return value
    if kind == "oom":
        return None
    if isinstance(value, SystemExit):
        raise ProbeError(f"step({m}) called sys.exit({value.code!r}) during the memory probe; a probed step must "
                         "return, or raise (out of memory or its own error)") from value
    raise value


def _died(exitcode: int | None, m: int) -> None:
    """A child that ended without an answer: SIGKILL is the out-of-memory killer (None, "does
    not fit"); anything else is the step's crash, not memory."""
    if exitcode == -signal.SIGKILL:
        return None
    if exitcode is not None and exitcode < 0:
        raise ProbeError(f"step({m}) crashed the probe's child process with signal {signal.Signals(-exitcode).name}: "
                         "a crash, not out of memory; run step({m}) alone to debug it")
    raise ProbeError(f"the probe's child process exited with code {exitcode} at micro-batch {m} without an answer "
                     "(os._exit in step?); a probed step must return, or raise")


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
            _send_error(writer, error)
            return
        writer.send(("peak", _peak_bytes() - baseline))
    finally:
        writer.close()


def _send_error(writer: Any, error: BaseException) -> None:
    """Out of memory, or the step's error (as text when it cannot be pickled: it must never
    reach the parent as silence, which would read as "killed")."""
    if is_out_of_memory(error):
        writer.send(("oom", None))
        return
    try:
        writer.send(("error", error))
    except Exception:  # noqa: BLE001 - an unpicklable error
        writer.send(("error", RuntimeError(f"step raised {type(error).__name__}: {error}")))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def plan_accumulation(step: Callable[[int], object], effective_batch: int, *, start: int = 1,
                      max_memory: int | None = None, model: torch.nn.Module | None = None,
                      timeout: float | None = None) -> list[int]:
    """One call from "my model runs out of memory at this batch" to a window plan.

    Finds the largest micro-batch ``step`` runs at (up to ``effective_batch``; within
    ``max_memory`` bytes when given, as ``find_micro_batch_size``), then returns this
    rank's micro-batch sizes adding up (over all ranks, under torch.distributed) to exactly
    ``effective_batch``. Train with ``Accumulator(model, opt, FixedSteps(len(sizes)))``;
    pass ``model`` so the probe's gradients are cleared, and ``timeout`` to bound each try
    (see ``find_micro_batch_size``).
    """
    effective_batch = check_positive_int("effective_batch", effective_batch)
    world, rank = 1, 0
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    cap = max(start, -(-effective_batch // world))
    micro = find_micro_batch_size(step, start, cap, max_memory=max_memory, model=model, timeout=timeout)
    return plan_micro_batches(effective_batch, micro, world)[rank]
