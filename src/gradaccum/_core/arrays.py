"""Array code that runs on Python numbers too: each formula written once, for the host and the backends.

The core writes a formula against the array API; a backend runs it on its tensors (JAX traces
it under ``jit``). Host-side callers (a planner planning from step records, a rule deciding on
Python floats) run the same code: ``namespace`` gives NumPy's namespace where every operand
is a Python number, ``host_array`` makes such an operand a NumPy float64 0-d array, and
``python`` turns the result back into the Python number it holds. NumPy's float64 arithmetic
is Python's, so the host gets the numbers Python code would give.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace


def is_python(*values: Any) -> bool:
    """Whether every value is a Python number (``int``, ``float`` or ``bool``), not an array or a
    NumPy scalar (which the host-side code itself makes)."""
    return all(type(v) in (int, float, bool) for v in values)


def namespace(*values: Any) -> Any:
    """The array namespace of the arrays among ``values``; NumPy's where all are Python numbers."""
    arrays = [v for v in values if not isinstance(v, (int, float))]
    return array_namespace(*arrays) if arrays else array_namespace(np.empty(0))


def host_array(value: Any) -> Any:
    """A Python number as a NumPy float64 0-d array (an array as it is)."""
    return np.asarray(value, dtype=np.float64) if isinstance(value, (int, float)) else value


def python(value: Any) -> Any:
    """A 0-d array (or a Python scalar) as the Python bool, int or float it holds."""
    if type(value) in (bool, int, float):
        return value
    dtype = str(value.dtype)
    if "bool" in dtype:
        return bool(value)
    if "int" in dtype:
        return int(value)
    return float(value)


def ratio_or_inf(a: Any, b: Any) -> Any:
    """``a / b`` where ``b > 0``, NaN where ``a`` or ``b`` is NaN (nothing was measured, e.g. a
    window of one micro-batch), else ``inf`` (no signal), never dividing by a non-positive ``b``:
    the noise scale ``tr(Sigma) / |G|^2`` and every ratio whose denominator may have no signal.
    Python numbers give a Python float (by Python's own float64 arithmetic, the same numbers,
    without a round trip through arrays: a rule decides on them at every micro-batch); arrays
    an array of their dtype."""
    if is_python(a, b):
        a, b = float(a), float(b)
        return math.nan if math.isnan(a) or math.isnan(b) else a / b if b > 0 else math.inf
    host = is_python(a, b)
    xp = namespace(a, b)
    if isinstance(b, (int, float)):  # an array's dtype for a Python denominator
        b = xp.asarray(b, dtype=getattr(a, "dtype", xp.float64))
    positive = b > 0
    out = xp.where(positive, a / xp.where(positive, b, xp.ones_like(b)), xp.asarray(math.inf, dtype=b.dtype))
    out = xp.where(xp.isnan(b) | xp.isnan(xp.asarray(a, dtype=b.dtype)), xp.asarray(math.nan, dtype=b.dtype), out)
    return python(out) if host else out
