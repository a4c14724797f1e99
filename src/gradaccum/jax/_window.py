"""The partial window a jitted train step carries in its state, and how a micro-batch joins it.

Everything here is traced: the window is a pytree of arrays, so it is checkpointed with
the rest of the train state and a run resumed mid-window goes on exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Window:
    """A partial accumulation window.

    Attributes:
      micro_batches: micro-batches in the window so far (skipped ones included).
      items: items (samples) the window's gradient averages over so far.
      grad_sum: sum over items of their gradients (rules without statistics), else None.
      mean: per-element mean of the per-sample gradients (rules with statistics), else None.
      m2: per-element sum of squared deviations from ``mean`` (rules with statistics), else None.
      poisoned: a micro-batch with a non-finite gradient joined (``nonfinite="skip_window"``).
    """

    micro_batches: jax.Array
    items: jax.Array
    grad_sum: Any
    mean: Any
    m2: Any
    poisoned: jax.Array

    @classmethod
    def empty(cls, params: Any, statistics: bool) -> Window:
        """An empty window with zeroed buffers shaped like ``params``."""
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return cls(
            micro_batches=jnp.zeros((), jnp.int32), items=jnp.zeros((), jnp.int32),
            grad_sum=None if statistics else zeros(), mean=zeros() if statistics else None,
            m2=zeros() if statistics else None, poisoned=jnp.zeros((), bool),
        )

    def mean_gradient(self) -> Any:
        """The gradient of the mean loss over every item of the window."""
        if self.mean is not None:
            return self.mean
        denominator = jnp.maximum(self.items, 1)
        return jax.tree.map(lambda s: s / denominator.astype(s.dtype), self.grad_sum)

    def add_sum(self, grad_sum: Any, items: jax.Array) -> Window:
        """Add a micro-batch given as the gradient of its summed loss and its item count."""
        return self.replace(micro_batches=self.micro_batches + 1, items=self.items + items,
                            grad_sum=jax.tree.map(jnp.add, self.grad_sum, grad_sum))

    def add_moments(self, n: jax.Array, mean: Any, m2: Any) -> Window:
        """Merge an increment's moments into the window's (Chan et al.'s parallel formula)."""
        total = self.items + n

        def merged(ma: jax.Array, m2a: jax.Array, mb: jax.Array, m2b: jax.Array) -> tuple[jax.Array, jax.Array]:
            w = n.astype(ma.dtype) / jnp.maximum(total, 1).astype(ma.dtype)  # 0 for an empty increment
            delta = mb - ma
            return ma + delta * w, m2a + m2b + delta * delta * (self.items.astype(ma.dtype) * w)

        pairs = jax.tree.map(merged, self.mean, self.m2, mean, m2)
        new_mean, new_m2 = unzip(pairs, self.mean)
        return self.replace(micro_batches=self.micro_batches + 1, items=total, mean=new_mean, m2=new_m2)


def increment_moments(per_sample: Any, mask: jax.Array | None) -> tuple[jax.Array, Any, Any]:
    """Count, mean and M2 of per-sample gradients (leading axis = samples), two-pass.

    ``mask`` (0/1 per sample) leaves padded samples out of every moment (padding must
    still be finite: 0 * nan is nan). The sums over samples are written as products
    with the weight vector: XLA's CPU backend runs a reduction over the leading axis of
    a (B, d_in, d_out) array about 15x slower than the equivalent matrix-vector product.
    """
    leaves = jax.tree.leaves(per_sample)
    batch = leaves[0].shape[0]
    weights = jnp.ones((batch,), jnp.int32) if mask is None else mask.astype(jnp.int32)
    n = weights.sum(dtype=jnp.int32)

    def moments(g: jax.Array) -> tuple[jax.Array, jax.Array]:
        w = weights.astype(g.dtype)
        rows = g.reshape(batch, -1)
        mean = (w @ rows) / jnp.maximum(n, 1).astype(g.dtype)
        deviation = rows - mean
        return mean.reshape(g.shape[1:]), (w @ (deviation * deviation)).reshape(g.shape[1:])

    mean, m2 = unzip(jax.tree.map(moments, per_sample), per_sample)
    return n, mean, m2


def unzip(pairs: Any, like: Any) -> tuple[Any, Any]:
    """Split a tree of (a, b) tuples, shaped like ``like``, into two trees."""
    structure = jax.tree.structure(like)
    leaves = structure.flatten_up_to(pairs)
    return (structure.unflatten([a for a, _ in leaves]), structure.unflatten([b for _, b in leaves]))


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite.

    ``x * 0`` is 0 for a finite element and nan for inf or nan, so one fused sum per leaf
    answers without overflow; on the CPU it is about 2.4x faster than ``isfinite(x).all()``.
    """
    return jnp.isfinite(sum((x * 0).sum() for x in jax.tree.leaves(tree)))
