"""`gradaccum plan`: the largest micro-batch within a memory budget, and the window plan."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .. import plan_micro_batches
from ..torch import find_micro_batch_size, measure_peak_memory
from ..torch._memory import ProbeError
from .errors import SettingsError
from .snn import SpikingClassifier
from .trainer_torch import mlp

BUILT_IN = ("mlp", "snn")


def _built_in_step(name: str, m: int) -> None:
    torch.manual_seed(0)
    model = mlp() if name == "mlp" else SpikingClassifier()
    x, y = torch.randn(m, 40), torch.randint(0, 10, (m,))
    nn.functional.cross_entropy(model(x), y).backward()


def resolve_step(model: str) -> Callable[[int], object]:
    """A built-in model's training step, or a user's ``module:function`` taking the micro-batch."""
    if model in BUILT_IN:
        return partial(_built_in_step, model)
    module_name, _, attr = model.partition(":")
    if not module_name or not attr:
        raise SettingsError(f"model must be one of {', '.join(BUILT_IN)} or module:function, got {model!r}")
    try:
        step = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise SettingsError(f"model: cannot load {model!r}: {error}") from None
    if not callable(step):
        raise SettingsError(f"model: {model!r} is not callable")
    return step


def plan(model: str, effective_batch: int, max_memory_mib: float, start: int = 1,
         max_size: int | None = None, probes: int = 3, timeout: float | None = 600.0) -> dict[str, object]:
    """Probe the micro-batch within ``max_memory_mib`` ``probes`` times and plan a window of
    ``effective_batch`` from the smallest result.

    A probe measures peak resident memory in forked children, and that peak depends on the
    state of the machine and of this process (memory the allocator holds free is reused
    without raising it), so probes can disagree: every probe's micro-batch is returned
    (``probed``), and the plan uses the smallest, which fit every time. ``timeout`` bounds each
    try (seconds). A budget too small for a micro-batch of 1 raises SettingsError with the
    memory that micro-batch needs."""
    if not 0 < max_memory_mib < float("inf"):
        raise SettingsError(f"max_memory must be a positive finite number of MiB, got {max_memory_mib}")
    if probes < 1:
        raise SettingsError(f"probes must be a positive integer, got {probes}")
    step = resolve_step(model)
    budget = int(max_memory_mib * 2**20)
    cap = effective_batch if max_size is None else min(max_size, effective_batch)
    if start > cap:
        raise SettingsError(f"start ({start}) must be <= max_size and the effective batch ({cap})")
    try:
        probed = [find_micro_batch_size(step, start, cap, max_memory=budget, timeout=timeout) for _ in range(probes)]
    except ProbeError as error:
        raise SettingsError(f"model: {error}") from None
    except RuntimeError as error:
        if "does not fit" not in str(error):
            raise
        raise SettingsError(_too_small(step, start, max_memory_mib, timeout)) from None
    micro = min(probed)
    sizes = plan_micro_batches(effective_batch, micro)[0]
    peaks = [measure_peak_memory(step, micro, timeout=timeout) for _ in range(probes)]
    known = [p / 2**20 for p in peaks if p is not None]
    return {"micro_batch": micro, "micro_batches_per_window": len(sizes), "sizes": sizes, "probed": probed,
            "peak_memory_mib": max(known) if known else None,
            "peak_memory_mib_range": (min(known), max(known)) if known else None}


def _too_small(step: Callable[[int], object], start: int, max_memory_mib: float, timeout: float | None) -> str:
    """What to say when not even ``start`` fits: its measured peak, and the fix."""
    peak = measure_peak_memory(step, start, timeout=timeout)
    needs = "it ran out of memory" if peak is None else f"it needs {peak / 2**20:.1f} MiB"
    if start == 1:
        return (f"max_memory: even a micro-batch of 1 does not fit in {max_memory_mib:g} MiB ({needs}): raise "
                "--max-memory, or shrink the model")
    return (f"max_memory: micro-batch start={start} does not fit in {max_memory_mib:g} MiB ({needs}): lower --start "
            "(1 is the smallest) or raise --max-memory")
