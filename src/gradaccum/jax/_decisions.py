"""Stopping rules traced under ``jit``: one function per rule type, in a registry.

The core rules decide on the host with Python floats; inside a jitted step the same
decision must be an array. Each function here reads the rule's own settings and the
core's array formulas (``gsnr_terms``, ``norm_test_sums``), so the two backends test the
same statistic against the same threshold; the tests hold them equal on the same moments.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp

from .._core.rules import GSNR, FixedSteps, NormTest, StoppingRule
from .._core.statistics import gsnr_terms, gsnr_value, norm_test_sums
from ._window import Window

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


def _bounded(rule: GSNR | NormTest, n: jax.Array, test: jax.Array) -> jax.Array:
    """The core's ``_SampleRule`` bounds: stop at the cap, never below max(2, min_samples)."""
    return (n >= rule.max_samples) | ((n >= max(2, rule.min_samples or 0)) & test)


@register_decision(GSNR)
def _gsnr(rule: GSNR, window: Window) -> tuple[jax.Array, dict[str, jax.Array]]:
    n = window.items
    terms = [gsnr_terms(m, m2, n) for m, m2 in zip(jax.tree.leaves(window.mean), jax.tree.leaves(window.m2))]
    total = sum(t for t, _ in terms)
    elements = sum(c for _, c in terms)
    size = sum(m.size for m in jax.tree.leaves(window.mean))
    value = jnp.where(n >= 2, gsnr_value(total, elements, n, rule.scale), jnp.nan)
    return _bounded(rule, n, value > rule.tau), {
        "samples": n, "gsnr": value, "capped": n >= rule.max_samples, "zero_variance_elements": size - elements}


@register_decision(NormTest)
def _norm_test(rule: NormTest, window: Window) -> tuple[jax.Array, dict[str, jax.Array]]:
    n = window.items
    sums = [norm_test_sums(m, m2) for m, m2 in zip(jax.tree.leaves(window.mean), jax.tree.leaves(window.m2))]
    variance_of_mean = sum(s for s, _ in sums) / (n - 1) / n
    bound = rule.theta**2 * sum(q for _, q in sums)
    ratio = jnp.where(bound > 0, variance_of_mean / jnp.where(bound > 0, bound, 1), jnp.inf)
    ratio = jnp.where(n >= 2, ratio, jnp.nan)
    return _bounded(rule, n, ratio <= 1.0), {"samples": n, "norm_test": ratio, "capped": n >= rule.max_samples}
