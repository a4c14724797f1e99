"""Fixed-step accumulation as an optax ``GradientTransformation``, weighted by item counts.

``optax.MultiSteps`` averages its k micro-steps with equal weights, which is the mean
over items only when every micro-batch has the same size, and it cannot close a short
last window. ``accumulate`` takes each micro-batch's item count and an optional
``last`` flag; its state holds the partial window, so a checkpoint taken mid-window
resumes exactly. With every ``items`` equal it gives MultiSteps' updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._core.config import AccumulationConfig
from .._core.rules import FixedSteps
from .._core.validation import check_choice, check_positive_int
from ._window import all_finite, check_counts


class AccumulationState(NamedTuple):
    """State of ``accumulate``.

    Attributes:
      mini_step: micro-batches in the current window.
      items: items in the current window (the sum of the ``items`` passed).
      grad_sum: sum of ``items * updates`` over the window's micro-batches.
      inner_state: the wrapped optimizer's state.
      gradient_step: optimizer steps applied so far.
      poisoned: a micro-batch with a non-finite gradient joined the window
        (``nonfinite="skip_window"``): it closes without a step.
    """

    mini_step: jax.Array
    items: jax.Array
    grad_sum: Any
    inner_state: Any
    gradient_step: jax.Array
    poisoned: jax.Array


def accumulate(optimizer: optax.GradientTransformation, every_k: int | FixedSteps | AccumulationConfig,
               accumulator_dtype: Any = None, nonfinite: str = "skip_micro_batch"
               ) -> optax.GradientTransformationExtraArgs:
    """Wrap ``optimizer`` to step once per ``every_k`` micro-batches on the items' mean gradient.

    ``update(updates, state, params=None, *, items=1, last=False, **extra_args)``:
    ``updates`` is the micro-batch's *mean* gradient over its ``items`` items (a non-negative
    integer count, checked as the train step checks its weights when it is concrete); ``last=True``
    closes the window after this micro-batch whatever its length (the end of an epoch
    or a run). ``every_k`` may be an int, ``FixedSteps(k)`` or an ``AccumulationConfig``
    with the fixed rule. Between steps the returned updates are zeros, as with ``optax.MultiSteps``.
    A window whose items add up to 0 is dropped without a step. ``accumulator_dtype``
    defaults to the dtype of each parameter.

    A micro-batch whose updates hold NaN or Inf never reaches the inner optimizer:
    ``nonfinite="skip_micro_batch"`` (default) drops its gradient and items (it still
    counts toward the window's length, as in the train state and the torch Accumulator);
    ``"skip_window"`` closes its window without a step.

    The gradients are the caller's, so is their randomness: with dropout, draw each
    micro-batch's key afresh, ``jax.random.fold_in(key, micro_step)`` with a counter of
    micro-batches (a key reused across the micro-batches of a window repeats their masks).
    """
    check_choice("nonfinite", nonfinite, ("skip_micro_batch", "skip_window"))
    if isinstance(every_k, AccumulationConfig):
        every_k = every_k.make_rule()
        if not isinstance(every_k, FixedSteps):
            raise ValueError(f"every_k: accumulate closes windows by count only, got the rule {every_k!r}; "
                             "use AccumulatingTrainState for adaptive rules")
    k = every_k.k if isinstance(every_k, FixedSteps) else check_positive_int("every_k", every_k)
    inner = optax.with_extra_args_support(optimizer)

    def init(params: Any) -> AccumulationState:
        return AccumulationState(
            mini_step=jnp.zeros((), jnp.int32), items=jnp.zeros((), _count_dtype()),
            grad_sum=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=accumulator_dtype), params),
            inner_state=inner.init(params), gradient_step=jnp.zeros((), jnp.int32), poisoned=jnp.zeros((), bool))

    def update(updates: Any, state: AccumulationState, params: Any = None, *, items: Any = 1, last: Any = False,
               **extra_args: Any) -> tuple[Any, AccumulationState]:
        _check_items(items)
        finite = all_finite(updates)
        poisoned = state.poisoned | (~finite if nonfinite == "skip_window" else False)
        count = jnp.where(finite, jnp.asarray(items, _count_dtype()), 0)
        grad_sum = jax.tree.map(lambda s, u: s + jnp.where(finite, u * count.astype(u.dtype), 0).astype(s.dtype),
                                state.grad_sum, updates)
        total = state.items + count
        close = (state.mini_step + 1 >= k) | jnp.asarray(last, bool)

        def emit(_: None) -> tuple[Any, AccumulationState]:
            mean = jax.tree.map(lambda s, u: (s / total.astype(s.dtype)).astype(u.dtype), grad_sum, updates)
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            return new_updates, AccumulationState(
                jnp.zeros_like(state.mini_step), jnp.zeros_like(total), jax.tree.map(jnp.zeros_like, grad_sum),
                inner_state, state.gradient_step + 1, jnp.zeros_like(poisoned))

        def drop(_: None) -> tuple[Any, AccumulationState]:
            return zeros(), AccumulationState(jnp.zeros_like(state.mini_step), jnp.zeros_like(total),
                                              jax.tree.map(jnp.zeros_like, grad_sum), state.inner_state,
                                              state.gradient_step, jnp.zeros_like(poisoned))

        def hold(_: None) -> tuple[Any, AccumulationState]:
            return zeros(), AccumulationState(state.mini_step + 1, total, grad_sum, state.inner_state,
                                              state.gradient_step, poisoned)

        def zeros() -> Any:
            shapes = jax.eval_shape(lambda: inner.update(updates, state.inner_state, params, **extra_args)[0])
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        branch = jnp.where(close, jnp.where((total > 0) & ~poisoned, 0, 1), 2)
        return jax.lax.switch(branch, (emit, drop, hold), None)

    return optax.GradientTransformationExtraArgs(init, update)


def _count_dtype() -> Any:
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _check_items(items: Any) -> None:
    """Check a concrete ``items`` as the train step checks its weights (a traced one is the
    caller's to get right)."""
    if isinstance(items, jax.core.Tracer):
        return
    if isinstance(items, (str, bytes)) or np.ndim(items) != 0 or np.asarray(items).dtype == bool:
        raise TypeError(f"items must be a scalar count of the micro-batch's items, got {items!r}")
    check_counts("items", items)
