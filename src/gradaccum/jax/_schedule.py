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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

_BLOCK = 1 << 24  # items are counted exactly in two int32: blocks of 2**24 and the rest


class ScaleByItemsState(NamedTuple):
    """Items applied so far, exactly: ``blocks * 2**24 + rest`` (int32 each, up to 2**55 items)."""

    blocks: jax.Array
    rest: jax.Array

    def items_seen(self) -> jax.Array:
        """The count as a float (float64 under x64, else float32: exact up to 2**24)."""
        dtype = jnp.result_type(float)
        return self.blocks.astype(dtype) * _BLOCK + self.rest.astype(dtype)


def scale_by_items(schedule: Callable[[jax.Array], Any]) -> optax.GradientTransformationExtraArgs:
    """Multiply the update by ``schedule(items_seen)`` (a traceable function of a float array).

    ``update`` takes the window's item count as the extra argument ``items`` (the train state
    gives it); called without it, as by a plain ``TrainState``, it raises TypeError naming it.
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
        factor = jnp.asarray(schedule(state.items_seen()))
        scaled = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
        rest = state.rest + jnp.asarray(items, jnp.int32)
        return scaled, ScaleByItemsState(state.blocks + rest // _BLOCK, rest % _BLOCK)

    return optax.GradientTransformationExtraArgs(init, update)
