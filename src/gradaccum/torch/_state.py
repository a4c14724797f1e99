"""Validation of an Accumulator state dict, all of it before any of it is assigned.

A state that fails late (a missing key, a bad history record, a FixedSteps state loaded
into a GSNR accumulator) used to raise after the gradient sums were overwritten, and values
were trusted (``items=-100`` divided the gradient by -84; NaN sums passed under "raise").
With a planner the history is what every later window is planned from, so it is checked
record by record and against the counters, and the open window against its plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .._core import DecisionMonitor, StepRecord
from .._core.planners import Planner, check_history
from .._core.validation import check_positive_int

VERSION = 2
KEYS = ("version", "sums", "micro_batches", "items", "samples", "shift", "poisoned", "steps", "items_seen",
        "history", "statistics", "monitor")


def checked_state(state: Any, params: list[torch.nn.Parameter], stats: Any, planner: Planner | None = None
                  ) -> dict[str, Any]:
    """The values ``state`` holds, converted and validated; raises ValueError naming the key.
    With a planner, ``planned`` is the open window's plan (from the loaded history)."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict saved by Accumulator.state_dict(), got {type(state).__name__}")
    if state.get("version") != VERSION:
        raise ValueError(f"state version must be {VERSION} (saved by this version's Accumulator.state_dict()), "
                         f"got {state.get('version')!r}")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise ValueError(f"state is missing {', '.join(missing)}")
    out: dict[str, Any] = {}
    for key in ("micro_batches", "items", "samples", "steps", "shift", "items_seen"):
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"state['{key}'] must be a non-negative int, got {value!r}")
        out[key] = value
    if out["micro_batches"] == 0 and (out["items"] or out["samples"]):
        raise ValueError("state: a window with no micro-batch cannot hold items")
    if not isinstance(state["poisoned"], bool):
        raise ValueError(f"state['poisoned'] must be a bool, got {state['poisoned']!r}")
    out["poisoned"] = state["poisoned"]
    sums = state["sums"]
    if not isinstance(sums, (list, tuple)) or len(sums) != len(params):
        raise ValueError(f"state['sums'] must hold {len(params)} gradient sums (one per tracked parameter)")
    restored: list[torch.Tensor | None] = []
    for i, (s, p) in enumerate(zip(sums, params)):
        if s is None:
            restored.append(None)
            continue
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(p.shape):
            raise ValueError(f"state['sums'][{i}] must be a tensor of shape {tuple(p.shape)}, got "
                             f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
        if not out["poisoned"] and not bool(torch.isfinite(s).all()):
            raise ValueError(f"state['sums'][{i}] is not finite, but the window is not marked poisoned")
        restored.append(s.detach().to(device=p.device, dtype=p.dtype).clone())
    if out["micro_batches"] == 0 and any(s is not None for s in restored):
        raise ValueError("state: a window with no micro-batch cannot hold gradient sums")
    out["sums"] = restored
    history = state["history"]
    if not isinstance(history, (list, tuple)):
        raise ValueError("state['history'] must be a list of step records")
    try:
        out["history"] = [StepRecord(**r) for r in history]
    except TypeError as error:
        raise ValueError(f"state['history'] holds a bad step record: {error}") from None
    monitor = state["monitor"]
    names = {f.name for f in dataclasses.fields(DecisionMonitor)}
    if not isinstance(monitor, dict) or set(monitor) != names:
        raise ValueError(f"state['monitor'] must be a dict with {', '.join(sorted(names))}")
    out["monitor"] = DecisionMonitor(**monitor)
    statistics = state["statistics"]
    if stats is None:
        if statistics is not None:
            raise ValueError("state holds statistics, but this Accumulator's rule needs none "
                             "(it was saved with a statistics rule: build the Accumulator with the same rule)")
        out["statistics"] = None
    else:
        if statistics is None:
            raise ValueError("state holds no statistics, but this Accumulator's rule needs them "
                             "(it was saved with a rule without statistics: build the Accumulator with the same rule)")
        checked = stats.check_state(statistics)
        empty = stats.is_empty(checked)
        if out["micro_batches"] and empty and out["items"]:
            raise ValueError("state: the window holds items but no statistics")
        out["statistics"] = statistics
    if not all(math.isfinite(float(r.items)) for r in out["history"]):
        raise ValueError("state['history'] holds a non-finite item count")
    out["planned"] = None if planner is None else planned_window(out, planner)
    return out


def planned_window(out: dict[str, Any], planner: Planner) -> int:
    """The open window's plan from the checked history; the history must be every closed
    window's (as many records as ``steps``, their items adding up to ``items_seen``), and the
    open window shorter than its plan (it would have closed at it)."""
    history = out["history"]
    check_history(history, "state['history']")
    if len(history) != out["steps"]:
        raise ValueError(f"state['history'] holds {len(history)} records for state['steps']={out['steps']} windows: "
                         "a planner plans from every window's record (a state whose history was emptied or cut "
                         "cannot resume its plan)")
    total = sum(r.items for r in history)
    if total != out["items_seen"]:
        raise ValueError(f"state['history']: its records' items add up to {total}, not state['items_seen']="
                         f"{out['items_seen']}")
    planned = check_positive_int(f"{type(planner).__name__}.plan(state['history'])", planner.plan(history))
    if out["micro_batches"] >= planned:
        raise ValueError(f"state['micro_batches']={out['micro_batches']}: the open window is planned for {planned} "
                         "micro-batches and closes at its plan, so it cannot hold as many (a state saved with "
                         "another planner, or edited)")
    return planned
