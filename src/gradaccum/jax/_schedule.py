"""An LR schedule over items seen, for windows whose length changes (docs/design.md, "Planned windows").

With a planner the number of optimizer steps is not known in advance, so a schedule over steps
(optax's ``count``) cannot say where training is. ``scale_by_items(schedule)`` multiplies the
update by ``schedule(items_seen)``, the items of every window applied before this one, as the
torch ``Accumulator(lr_schedule=...)`` multiplies the learning rate: the factor scales the whole
update, so it equals a learning-rate factor for SGD, Adam and AdamW alike (their weight decay is
multiplied by the learning rate too). Chain it last: ``optax.chain(optax.adamw(lr),
gradaccum.jax.scale_by_items(schedule))``. ``AccumulatingTrainState`` passes each window's item
count to the optimizer (``items=``, optax's extra arguments), so the count lives in the
optimizer state and is checkpointed with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._refusal import refuse_where

_BLOCK = 1 << 24  # items are counted exactly in two int32: blocks of 2**24 and the rest


class ScaleByItemsState(NamedTuple):
    """Items applied so far, exactly: ``blocks * 2**24 + rest`` (int32 each, up to 2**55 items)."""

    blocks: jax.Array
    rest: jax.Array

    def items_seen(self) -> jax.Array:
        """The count as a float (float64 under x64, else float32: exact up to 2**24)."""
        dtype = jnp.result_type(float)
        return self.blocks.astype(dtype) * _BLOCK + self.rest.astype(dtype)


def scale_by_items(schedule: Callable[[jax.Array], Any], *, check: bool = True
                   ) -> optax.GradientTransformationExtraArgs:
    """Multiply the update by ``schedule(items_seen)`` (a traceable function of a float array).

    Chain it last, after the optimizer, as optax's own learning-rate schedules are applied:
    ``optax.chain(optax.adam(lr), scale_by_items(schedule))``. Chained before Adam (or any
    optimizer that normalises its input) the factor scales the gradient that Adam divides by
    its own running magnitude: a constant factor then cancels, and a changing one survives only
    through the moments' lag, so the schedule would not be the learning-rate factor it is meant
    to be.

    ``update`` takes the window's item count as the extra argument ``items`` (the train state
    gives it); called without it, as by a plain ``TrainState``, it raises TypeError naming it.
    A factor that is NaN, infinite or negative is refused, as the torch ``lr_schedule`` refuses
    it: ``Refused`` (a ValueError) names ``items_seen`` and the factor, right away when ``update``
    runs eagerly, else when the compiled step runs (the train step and ``flush`` raise it as
    such; a step of your own under ``jit`` raises JAX's runtime error with that message inside,
    on an accelerator possibly at the next synchronisation). A factor of 0 is allowed (no update).
    Under ``jit`` the check is a host callback that runs only for a bad factor, but its presence
    takes the compiled step off JAX's fast dispatch path: about 1 ms more per call measured on
    a CPU, whatever the model's size. ``check=False`` leaves it out of compiled steps, and a bad
    factor is then applied as it is: only for a schedule known to stay finite and non-negative.
    """
    if not callable(schedule):
        raise TypeError(f"schedule must be a callable items_seen -> factor, got {type(schedule).__name__}")

    def init(params: Any) -> ScaleByItemsState:
        del params
        return ScaleByItemsState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update(updates: Any, state: ScaleByItemsState, params: Any = None, *, items: Any = None,
               **extra: Any) -> tuple[Any, ScaleByItemsState]:
        del params, extra
        if items is None:
            raise TypeError("scale_by_items needs the window's item count: update(..., items=...); "
                            "gradaccum.jax.AccumulatingTrainState passes it")
        seen = state.items_seen()
        factor = _checked_factor(schedule(seen), seen, compiled=check)
        scaled = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
        rest = state.rest + jnp.asarray(items, jnp.int32)
        return scaled, ScaleByItemsState(state.blocks + rest // _BLOCK, rest % _BLOCK)

    return optax.GradientTransformationExtraArgs(init, update)


def _checked_factor(value: Any, seen: jax.Array, compiled: bool = True) -> jax.Array:
    """The schedule's factor as a real scalar array, refused (``Refused``) when it is NaN,
    infinite or negative: applied, it would poison or reverse every later update. A traced
    factor is checked only with ``compiled`` (the check's callback has a cost per call)."""
    factor = jnp.asarray(value)
    if factor.shape != () or not (jnp.issubdtype(factor.dtype, jnp.floating)
                                  or jnp.issubdtype(factor.dtype, jnp.integer)):
        raise TypeError(f"schedule(items_seen) must return a real scalar factor, got shape {factor.shape} "
                        f"and dtype {factor.dtype}")
    if not compiled and isinstance(factor, jax.core.Tracer):
        return factor
    refuse_where(~(factor >= 0) | jnp.isinf(factor),
                 lambda s, f: f"scale_by_items: schedule(items_seen={s:.17g}) must return a finite factor >= 0, "
                              f"got {f}: fix the schedule (clip it at 0, guard its divisions)",
                 seen, factor)
    return factor
