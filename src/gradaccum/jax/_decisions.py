"""Stopping rules traced under ``jit``: one function per rule type, in a registry.

Inside a jitted step a decision must be an array. The core's sample rules define their
decision once on arrays (``GSNR.decision``, ``NormTest.decision``, array-API code), and
the entries here run exactly that on the window's moments; a rule type of the user's own
registers its traced decision with ``register_decision``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax

from .._core.micro_batch import micro_batch_terms
from .._core.noise_scale import window_terms
from .._core.rules import GSNR, FixedSteps, NormTest, StoppingRule
from ._window import Window, squared_norm

TracedDecision = Callable[[Any, Window], tuple[jax.Array, dict[str, jax.Array]]]
_DECISIONS: dict[type, TracedDecision] = {}
F = TypeVar("F", bound=TracedDecision)


def register_decision(rule_type: type) -> Callable[[F], F]:
    """Register ``fn(rule, window) -> (stop, info)`` as the traced decision of ``rule_type``."""

    def register(fn: F) -> F:
        _DECISIONS[rule_type] = fn
        return fn

    return register


def traced_decision(rule: StoppingRule) -> TracedDecision:
    """The traced decision of ``rule``'s type, or a TypeError naming what is missing."""
    for cls in type(rule).__mro__:
        if cls in _DECISIONS:
            return _DECISIONS[cls]
    known = ", ".join(sorted(c.__name__ for c in _DECISIONS))
    raise TypeError(f"rule {type(rule).__name__} has no traced decision for the JAX backend (known: {known}); "
                    "register one with gradaccum.jax.register_decision")


@register_decision(FixedSteps)
def _fixed_steps(rule: FixedSteps, window: Window) -> tuple[jax.Array, dict[str, jax.Array]]:
    return window.micro_batches >= rule.k, {}


@register_decision(GSNR)
@register_decision(NormTest)
def _sample_rule(rule: GSNR | NormTest, window: Window) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The core rule's own ``decision``, traced on the window's moments (per-sample, or the
    micro-batch means' as ``Moments``), or on the norm terms of either source
    (``NormTest.decision_from_terms``)."""
    if window.sum_norms is not None:
        trace, squared = window_terms(window.samples, window.sum_norms, squared_norm(window.grad_sum))
        return rule.decision_from_terms(window.samples, trace, squared)  # type: ignore[union-attr]
    if window.weighted is not None:  # the micro-batch source's norm statistics
        trace, squared = micro_batch_terms(window.measured, window.samples, window.weighted,
                                           squared_norm(window.grad_sum))
        return rule.decision_from_terms(window.samples, trace, squared)  # type: ignore[union-attr]
    return rule.decision(window.samples, *window.element_moments())
