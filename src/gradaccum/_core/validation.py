"""Argument checks shared by every backend.

Every check names the argument and says what was expected, so a user who passes
``k=0`` reads ``k must be a positive int, got 0`` instead of a failure far away.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int if it is an integer >= 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {value!r} ({type(value).__name__})")
    result = float(value)
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {result!r}")
    return result


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return choices[choices.index(value)]


def real_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number: a Python or NumPy int or float, or a
    0-dim array or tensor of one (``.item()`` of it); None otherwise (bools included)."""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        value = value.item()  # a NumPy scalar, a 0-dim array or tensor: its Python number
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)

