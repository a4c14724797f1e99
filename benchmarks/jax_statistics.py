"""JAX per-sample statistics: the layer path vs whole-model vmap vs the plain gradient, side by side.

Per increment of B samples, jitted, on the same batches, rounds rotated, medians:
- plain: ``jax.grad`` of the summed loss (what a step without statistics computes);
- layers: the GSNR train step with ``path="auto"`` (one backward; closed form for
  ``nn.Dense``, a per-layer VJP vmap for other leaf layers);
- vmap: the same step with ``path="vmap"`` (per-sample gradients of the whole model).
The GSNR tau is out of reach, so no window closes during timing: the numbers are the
statistics' cost, not the optimizer's.

    python benchmarks/jax_statistics.py [--rounds 9] [--steps 50]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _jax_timing import median_ms  # benchmarks/ is on sys.path when run as a script
from gradaccum import GSNR
from gradaccum.jax import AccumulatingTrainState, make_train_step, statistics_path


class MLP(fnn.Module):
    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = fnn.relu(fnn.Dense(256)(x))
        return fnn.Dense(10)(fnn.relu(fnn.Dense(256)(x)))


class ConvNet(fnn.Module):
    """Conv1d over the 40 mnist1d positions, then a Dense head."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.relu(fnn.Conv(32, (5,))(x[..., None]))
        h = fnn.relu(fnn.Conv(32, (5,))(h))
        return fnn.Dense(10)(h.reshape(h.shape[0], -1))


class TokenNet(fnn.Module):
    """Embed -> LayerNorm -> Dense on 40 tokens per sample, pooled, then a Dense head."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = (jnp.abs(x) * 8).astype(jnp.int32) % 64
        h = fnn.LayerNorm()(fnn.Embed(64, 64)(tokens))
        h = fnn.relu(fnn.Dense(64)(h)).mean(1)
        return fnn.Dense(10)(h)


MODELS = [("MLP 40-256-256-10", MLP()), ("Conv1d 32x5, 32x5 + Dense", ConvNet()),
          ("Embed + LayerNorm + Dense (40 tokens)", TokenNet())]


def steps(model: fnn.Module, batch_size: int) -> tuple[dict[str, tuple[Callable, Any]], str]:
    params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]

    def losses(p: Any, batch: dict) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch["x"]), batch["y"])

    plain_grad = jax.jit(jax.grad(lambda p, b: losses(p, b).sum()))
    rule = GSNR(1e9, increment=batch_size, max_samples=10**9)
    # the plain carry holds the last gradient, so waiting for the carry waits for the backward
    runs: dict[str, tuple[Callable, Any]] = {"plain": (lambda c, b: (c[0], plain_grad(c[0], b)), (params, params))}
    for path in ("auto", "vmap"):
        step = make_train_step(losses, path=path)
        state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3), rule=rule)
        runs[path] = ((lambda s, b, step=step: step(s, b)[0]), state)
    probe = {"x": jnp.zeros((batch_size, 40)), "y": jnp.zeros((batch_size,), jnp.int32)}
    return runs, statistics_path(losses, params, probe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=50, help="increments per timed round")
    parser.add_argument("--batch", type=int, default=32, help="samples per increment")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, float32, increments of {args.batch}\n")
    print("| model | parameters | path (auto) | plain grad ms | layers ms | / plain | vmap ms | / plain "
          "| vmap / layers |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    batches = [{"x": jnp.asarray(rng.normal(size=(args.batch, 40)), jnp.float32),
                "y": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)} for _ in range(args.steps)]
    for name, model in MODELS:
        runs, path = steps(model, args.batch)
        size = sum(x.size for x in jax.tree.leaves(runs["plain"][1][0]))
        med = median_ms(runs, batches, args.rounds)
        print(f"| {name} | {size:,} | {path} | {med['plain']:.3f} | {med['auto']:.3f} | "
              f"{med['auto'] / med['plain']:.2f}x | {med['vmap']:.3f} | {med['vmap'] / med['plain']:.2f}x | "
              f"{med['vmap'] / med['auto']:.2f}x |")


if __name__ == "__main__":
    main()
