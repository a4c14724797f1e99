"""Small float64 JAX problems and slow references shared by the JAX tests (x64 is set in conftest.py)."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(fnn.Module):
    """d_in -> hidden -> hidden -> d_out with ReLU, float64, like tests.reference.mlp."""

    hidden: int = 16
    d_out: int = 3

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(2):
            x = fnn.relu(fnn.Dense(self.hidden, param_dtype=jnp.float64)(x))
        return fnn.Dense(self.d_out, param_dtype=jnp.float64)(x)


MODEL = MLP()


def init_params(d_in: int = 6, seed: int = 0):
    return MODEL.init(jax.random.key(seed), jnp.zeros((1, d_in)))["params"]


def loss_fn(params, batch) -> jax.Array:
    """Per-example cross-entropy."""
    logits = MODEL.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def data(n: int, d_in: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded classification problem: a linear teacher plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    y = (x @ rng.normal(size=(d_in, 3)) + rng.normal(scale=0.5, size=(n, 3))).argmax(1)
    return {"x": x, "y": y}


def take(batch: dict, part) -> dict:
    return {k: v[part] for k, v in batch.items()}


@jax.jit
def full_batch_grad(params, batch):
    """The reference: the gradient of the mean loss over the whole window, in one call."""
    return jax.grad(lambda p: loss_fn(p, batch).mean())(params)


@jax.jit
def masked_mean_grad(params, batch, mask):
    """The gradient of the mean loss over the examples ``mask`` selects."""
    return jax.grad(lambda p: (loss_fn(p, batch) * mask).sum() / mask.sum())(params)


def split_masks(bounds: list[int]) -> list[np.ndarray]:
    """One 0/1 mask over all examples per micro-batch [a, b): fixed shapes, so one compilation."""
    masks = []
    for a, b in zip(bounds, bounds[1:]):
        mask = np.zeros(bounds[-1])
        mask[a:b] = 1
        masks.append(mask)
    return masks


def moments_of(per_sample) -> tuple:
    """Mean and M2 by their definitions of per-sample gradient trees (a list of trees, or one tree
    of stacked leaves), in NumPy float64 on the host: jax.numpy would compile each operation
    once per leaf shape, seconds on a model of many parameters."""
    host = jax.device_get(per_sample)
    stacked = jax.tree.map(lambda *g: np.stack(g), *host) if isinstance(host, list) else host
    mean = jax.tree.map(lambda g: g.mean(0), stacked)
    return mean, jax.tree.map(lambda g, m: ((g - m) ** 2).sum(0), stacked, mean)


def max_abs_diff(a, b) -> float:
    """The largest absolute difference of two trees' leaves, in NumPy on the host: the same
    numbers as in jax.numpy, without compiling an operation per leaf shape."""
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def sgd_step(params, grads, lr: float):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)
