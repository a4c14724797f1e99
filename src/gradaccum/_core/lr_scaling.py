"""Learning-rate coupling to the realized batch size (docs/design.md, "Learning rate"), opt-in.

An adaptive rule changes the effective batch every step; whether the learning rate
should follow is a modelling choice, so nothing scales unless asked.
"""

from __future__ import annotations

import math

from .validation import check_choice, check_positive_int

LR_SCALINGS = ("linear", "sqrt")


def lr_factor(mode: str, batch: int, reference_batch: int) -> float:
    """``batch / reference_batch`` ("linear", Goyal et al. 2017, for SGD) or its square
    root ("sqrt", Malladi et al. 2022, for Adam)."""
    check_choice("lr_scaling", mode, LR_SCALINGS)
    check_positive_int("batch", batch)
    check_positive_int("reference_batch", reference_batch)
    ratio = batch / reference_batch
    return ratio if mode == "linear" else math.sqrt(ratio)
