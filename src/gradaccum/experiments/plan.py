"""`gradaccum plan`: the largest micro-batch within a memory budget, and the window plan."""

from __future__ import annotations

import importlib
from functools import partial
from typing import Callable

import torch
from torch import nn

from .. import plan_micro_batches
from ..torch import find_micro_batch_size, measure_peak_memory
from .errors import SettingsError
from .trainer_torch import mlp
from .snn import SpikingClassifier

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
         max_size: int | None = None) -> dict[str, object]:
    """Probe the micro-batch within ``max_memory_mib`` and plan a window of ``effective_batch``."""
    if not 0 < max_memory_mib < float("inf"):
        raise SettingsError(f"max_memory must be a positive finite number of MiB, got {max_memory_mib}")
    step = resolve_step(model)
    budget = int(max_memory_mib * 2**20)
    cap = effective_batch if max_size is None else min(max_size, effective_batch)
    if start > cap:
        raise SettingsError(f"start ({start}) must be <= max_size and the effective batch ({cap})")
    micro = find_micro_batch_size(step, start, cap, max_memory=budget)
    sizes = plan_micro_batches(effective_batch, micro)[0]
    peak = measure_peak_memory(step, micro)
    return {"micro_batch": micro, "micro_batches_per_window": len(sizes), "sizes": sizes,
            "peak_memory_mib": None if peak is None else peak / 2**20}
