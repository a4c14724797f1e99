"""The partial window a jitted train step carries in its state, and how a micro-batch joins it.

Everything here is traced: the window is a pytree of arrays, so it is checkpointed with
the rest of the train state and a run resumed mid-window goes on exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .._core.micro_batch import element_moments, merge_micro_batch
from .._core.moments import chan_merge

COUNT_MAX = int(np.iinfo(np.int32).max)  # a window counts its items in int32
KINDS = ("none", "elements", "norms", "micro_batch", "micro_batch_elements")  # what a window keeps


@struct.dataclass
class Window:
    """A partial accumulation window.

    Attributes:
      micro_batches: micro-batches in the window so far (skipped ones included).
      items: items (examples, or the weights given: token counts) the window's gradient
        averages over so far.
      samples: examples with a non-zero weight: the units per-sample statistics count.
      grad_sum: sum over items of their gradients (rules without statistics), else None.
      mean: per-element mean of the per-sample gradients (rules with statistics), else None.
      m2: per-element sum of squared deviations from ``mean`` (rules with statistics), else None.
      sum_norms: the norm path's ``sum_i |g_i|^2`` over the window's samples (rules reading
        ``statistics = "norms"``, with ``grad_sum``), else None.
      poisoned: a micro-batch with a non-finite gradient joined (``nonfinite="skip_window"``).
      measured: the micro-batch source's ``k``, micro-batches with samples that joined (rules
        with ``source="micro_batch"``, with ``grad_sum``), else None.
      weighted: the micro-batch source's ``sum_j |S_j|^2 / b_j`` over those micro-batches (norm
        statistics), else None. With per-element statistics the source keeps ``m2`` instead:
        the between-micro-batch ``sum_j b_j (g_j - g)^2`` per element (``mean`` is None).
    """

    micro_batches: jax.Array
    items: jax.Array
    samples: jax.Array
    grad_sum: Any
    mean: Any
    m2: Any
    poisoned: jax.Array
    sum_norms: Any = None
    measured: Any = None
    weighted: Any = None

    if TYPE_CHECKING:  # added by flax.struct.dataclass, which mypy does not see

        def replace(self, **changes: Any) -> Window: ...

    @classmethod
    def empty(cls, params: Any, kind: str | bool) -> Window:
        """An empty window with zeroed buffers shaped like ``params``, for statistics of
        ``kind`` (``KINDS``): ``"none"`` (the gradient sum), ``"elements"`` (per-element
        moments), ``"norms"`` (the gradient sum and ``sum_i |g_i|^2``), ``"micro_batch"`` (the
        gradient sum and the micro-batches' ``k`` and ``sum_j |S_j|^2 / b_j``) or
        ``"micro_batch_elements"`` (the gradient sum, ``k`` and the between-micro-batch ``M2``);
        a bool means ``"elements"`` (True) or ``"none"``. ``gradaccum.jax.window_kind(rule)``
        says which a rule needs."""
        if isinstance(kind, bool):
            kind = "elements" if kind else "none"
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        def zeros() -> Any:
            return jax.tree.map(jnp.zeros_like, params)

        elements = kind == "elements"
        micro = kind.startswith("micro_batch")
        dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
        return cls(
            micro_batches=jnp.zeros((), jnp.int32), items=jnp.zeros((), jnp.int32), samples=jnp.zeros((), jnp.int32),
            grad_sum=None if elements else zeros(), mean=zeros() if elements else None,
            m2=zeros() if elements or kind == "micro_batch_elements" else None, poisoned=jnp.zeros((), bool),
            sum_norms=jnp.zeros((), dtype) if kind == "norms" else None,
            measured=jnp.zeros((), jnp.int32) if micro else None,
            weighted=jnp.zeros((), dtype) if kind == "micro_batch" else None,
        )

    def mean_gradient(self) -> Any:
        """The gradient of the mean loss over every item of the window: the sum of the
        per-sample gradients (of weighted losses) over the window's items."""
        denominator = jnp.maximum(self.items, 1)
        if self.mean is not None:  # sum = mean * samples
            return jax.tree.map(lambda m: m * (self.samples.astype(m.dtype) / denominator.astype(m.dtype)), self.mean)
        return jax.tree.map(lambda s: s / denominator.astype(s.dtype), self.grad_sum)

    def element_moments(self) -> tuple[list[jax.Array], list[jax.Array]]:
        """The means and M2s the per-element rules read, one per leaf: the per-sample moments,
        or the micro-batch source's as ``Moments`` (the core's ``element_moments``: M2 scaled
        to ``k - 1`` degrees of freedom, NaN below two micro-batches)."""
        if self.mean is not None:
            return jax.tree.leaves(self.mean), jax.tree.leaves(self.m2)
        pairs = [element_moments(self.measured, self.samples, s, m2)[1:]
                 for s, m2 in zip(jax.tree.leaves(self.grad_sum), jax.tree.leaves(self.m2))]
        return [m for m, _ in pairs], [m2 for _, m2 in pairs]

    def add_sum(self, grad_sum: Any, items: jax.Array, samples: jax.Array) -> Window:
        """Add a micro-batch given as the gradient of its summed loss and its item count."""
        return self.replace(micro_batches=self.micro_batches + 1, items=self.items + items,
                            samples=self.samples + samples, grad_sum=jax.tree.map(jnp.add, self.grad_sum, grad_sum))

    def add_norms(self, grad_sum: Any, sum_norms: jax.Array, items: jax.Array, samples: jax.Array) -> Window:
        """Add a micro-batch on the norm path: its gradient sum and ``sum_i |g_i|^2``."""
        return self.add_sum(grad_sum, items, samples).replace(sum_norms=self.sum_norms + sum_norms)

    def add_micro_batch(self, grad_sum: Any, squared: jax.Array, items: jax.Array, samples: jax.Array) -> Window:
        """Add a micro-batch on the micro-batch source: its gradient sum ``S_j``, ``|S_j|^2``
        (``squared``) and counts. A micro-batch without samples (all weights 0, or dropped as
        non-finite: its increment is zeros) is not measured."""
        has = samples > 0
        out = self.add_sum(grad_sum, items, samples).replace(measured=self.measured + has.astype(jnp.int32))
        if self.weighted is not None:
            b = jnp.maximum(samples, 1).astype(self.weighted.dtype)
            out = out.replace(weighted=self.weighted + jnp.where(has, squared.astype(self.weighted.dtype) / b, 0))
        if self.m2 is not None:  # before the sum takes the micro-batch: Chan's update against it
            def merged(m2: jax.Array, total: jax.Array, s: jax.Array) -> jax.Array:
                return merge_micro_batch(m2, total, self.samples, s, samples)

            out = out.replace(m2=jax.tree.map(merged, self.m2, self.grad_sum, grad_sum))
        return out

    def add_moments(self, items: jax.Array, n: jax.Array, mean: Any, m2: Any) -> Window:
        """Merge an increment's moments into the window's: the core's ``chan_merge``."""
        pairs = jax.tree.map(lambda ma, m2a, mb, m2b: chan_merge(self.samples, ma, m2a, n, mb, m2b)[1:],
                             self.mean, self.m2, mean, m2)
        new_mean, new_m2 = unzip(pairs, self.mean)
        return self.replace(micro_batches=self.micro_batches + 1, items=self.items + items,
                            samples=self.samples + n, mean=new_mean, m2=new_m2)


def check_counts(name: str, counts: Any, *, binary: bool = False) -> np.ndarray | None:
    """Refuse concrete item counts (``weights``, ``mask``, ``items``) that would silently change
    a window's item count: not finite, negative, fractional (or not 0/1 for a mask), above
    int32's largest value, or adding up past it (the int32 sum would wrap: 4 x 2**30 is 0).
    The train step and ``accumulate`` give the same messages. Returns the counts as NumPy
    (None for a traced value, the caller's to get right)."""
    if isinstance(counts, jax.core.Tracer):
        return None
    if isinstance(counts, (str, bytes)):
        raise TypeError(f"{name} must be item counts (numbers), got {counts!r}")
    values = np.asarray(counts)  # numpy, not jnp: inside jit a jnp op on a constant is traced too
    if values.dtype == bool:
        return values
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise TypeError(f"{name} must be item counts (integers or floats), got dtype {values.dtype}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite numbers, got {values.tolist()}")
    allowed = "0 or 1" if binary else "non-negative integers (item counts)"
    if np.any(values < 0) or np.any(values != np.round(values)) or (binary and np.any(values > 1)):
        raise ValueError(f"{name} must hold {allowed}, got {values.tolist()}")
    if np.any(values > COUNT_MAX):
        raise ValueError(f"{name}: an item count above {COUNT_MAX} does not fit the window's int32 counts, "
                         f"got {values.max():.6g}")
    total = int(values.astype(np.int64).sum())
    if total > COUNT_MAX:
        raise ValueError(f"{name} add up to {total} items, above {COUNT_MAX} (the window's int32 count would "
                         "wrap): split the micro-batch or pass smaller counts")
    return values


def increment_moments(per_sample: Any, weights: jax.Array) -> tuple[jax.Array, Any, Any]:
    """Count, mean and M2 of the per-sample gradients of the weighted losses
    (``weights[i] * grad l_i``; leading axis = samples), two-pass.

    Examples of weight 0 (padding) are left out of every moment (padding must still be
    finite: 0 * nan is nan). The sums over samples are written as products with a vector:
    XLA's CPU backend runs a reduction over the leading axis of a (B, d_in, d_out) array
    about 15x slower than the equivalent matrix-vector product.
    """
    leaves = jax.tree.leaves(per_sample)
    batch = leaves[0].shape[0]
    present = (weights > 0).astype(jnp.int32)
    n = present.sum(dtype=jnp.int32)

    def moments(g: jax.Array) -> tuple[jax.Array, jax.Array]:
        keep = present.astype(g.dtype)
        rows = g.reshape(batch, -1) * weights.astype(g.dtype)[:, None]
        mean = (keep @ rows) / jnp.maximum(n, 1).astype(g.dtype)
        deviation = rows - mean
        return mean.reshape(g.shape[1:]), (keep @ (deviation * deviation)).reshape(g.shape[1:])

    mean, m2 = unzip(jax.tree.map(moments, per_sample), per_sample)
    return n, mean, m2


def increment_norms(per_sample: Any, weights: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    """Count, gradient sum and ``sum_i |g_i|^2`` of the per-sample gradients of the weighted
    losses (leading axis = samples); examples of weight 0 add nothing."""
    batch = jax.tree.leaves(per_sample)[0].shape[0]
    n = (weights > 0).sum(dtype=jnp.int32)
    rows = jax.tree.map(lambda g: g.reshape(batch, -1) * weights.astype(g.dtype)[:, None], per_sample)
    ones = jnp.ones((batch,), jax.tree.leaves(per_sample)[0].dtype)
    grad_sum = jax.tree.map(lambda r, g: (ones @ r).reshape(g.shape[1:]), rows, per_sample)
    return n, grad_sum, squared_norm(rows)


def squared_norm(tree: Any) -> jax.Array:
    """The squared norm of every leaf together, in float32 or wider (a float32 zero to start
    from: it widens nothing, and a tree without leaves gives an array too)."""
    start = jnp.zeros((), jnp.float32)
    def square(x: jax.Array) -> jax.Array:
        wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # widened before the products: a float16
        return jnp.vdot(wide, wide)  # sum's |S|^2 passes 65504 long before float32's range

    return sum((square(x) for x in jax.tree.leaves(tree)), start)


def unzip(pairs: Any, like: Any) -> tuple[Any, Any]:
    """Split a tree of (a, b) tuples, shaped like ``like``, into two trees."""
    return jax.tree.map(lambda _, pair: pair[0], like, pairs), jax.tree.map(lambda _, pair: pair[1], like, pairs)


def weighted_sum(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_i w_i l_i`` in float32 or wider: in float16 a micro-batch of 76,800 examples (or
    large token counts) overflows the sum and the whole micro-batch would be dropped as
    non-finite. The gradient reaching each example is still its weight, in its own dtype."""
    dtype = jnp.promote_types(losses.dtype, jnp.float32)
    return (losses.astype(dtype) * weights.astype(dtype)).sum()


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf is finite.

    ``x * 0`` is 0 for a finite element and nan for inf or nan, so one fused sum per leaf
    answers without overflow; on the CPU it is about 2.4x faster than ``isfinite(x).all()``.
    """
    return jnp.isfinite(sum((x * 0).sum() for x in jax.tree.leaves(tree)))
