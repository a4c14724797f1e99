"""JAX: our accumulation steps vs optax.MultiSteps and vs a plain jitted grad step, side by side.

Every competitor is one jitted function per micro-batch (forward, backward, accumulate,
and the optimizer update when the window closes), run on the same batches; rounds
rotate the order so machine noise hits all alike; medians are printed as Markdown.

- plain step: ``jax.grad`` + Adam every micro-batch (no accumulation, the floor);
- optax.MultiSteps(adam, k): the anchor (equal weights, inner update computed every
  micro-step and selected with ``where``);
- ``gradaccum.jax.accumulate(adam, k)``: item-weighted, update under ``lax.cond``;
- ``AccumulatingTrainState`` + ``make_train_step`` with ``FixedSteps(k)``, with the default
  ``nonfinite="skip_micro_batch"`` (gradient checked per micro-batch) and ``"skip_window"``
  (checked once per window);
- the same with ``GSNR`` (per-sample gradients by ``vmap(grad)``, moments, decision
  under jit), against the plain step (the cost of the statistics).

Each model runs twice: with the carried state copied by every step, and donated to it
(``donate_argnums=0``, ``make_train_step(..., donate=True)``), where XLA updates in place.

    python benchmarks/jax_accumulation.py [--rounds 9] [--windows 25]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from itertools import product
from typing import Any

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _jax_timing import median_ms  # benchmarks/ is on sys.path when run as a script
from gradaccum import GSNR, FixedSteps
from gradaccum.jax import AccumulatingTrainState, accumulate, make_train_step

CONFIGS = [  # (name, widths, micro-batch, k)
    ("MLP 40-256-256-10 (reference)", (40, 256, 256, 10), 32, 4),
    ("MLP 512-1024-1024-10", (512, 1024, 1024, 10), 64, 4),
]


class MLP(fnn.Module):
    widths: tuple[int, ...]

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.widths[1:-1]:
            x = fnn.relu(fnn.Dense(width)(x))
        return fnn.Dense(self.widths[-1])(x)


def competitors(widths: tuple[int, ...], micro: int, k: int, donate: bool) -> dict[str, tuple[Callable, Any]]:
    """name -> (jitted step(carry, batch) -> carry, initial carry); ``donate``: carries donated to the step."""
    model = MLP(widths)
    params = model.init(jax.random.key(0), jnp.zeros((1, widths[0])))["params"]

    def losses(p: Any, batch: dict) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, batch["x"]), batch["y"])

    def mean_grad(p: Any, batch: dict) -> Any:
        return jax.grad(lambda q: losses(q, batch).mean())(p)

    def optax_step(tx: optax.GradientTransformation, **kwargs: Any) -> tuple[Callable, Any]:
        @partial(jax.jit, donate_argnums=0 if donate else ())
        def step(carry: tuple, batch: dict) -> tuple:
            p, s = carry
            updates, s = tx.update(mean_grad(p, batch), s, p, **{k: v(batch) for k, v in kwargs.items()})
            return optax.apply_updates(p, updates), s

        own = jax.tree.map(jnp.copy, params)  # a donated carry must not share buffers with another
        return step, (own, tx.init(own))

    def state_step(rule: Any, nonfinite: str = "skip_micro_batch") -> tuple[Callable, Any]:
        train_step = make_train_step(losses, donate=donate)
        state = AccumulatingTrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.copy, params),
                                              tx=optax.adam(1e-3), rule=rule, nonfinite=nonfinite)
        return (lambda s, batch: train_step(s, batch)[0]), state

    return {
        "plain": optax_step(optax.adam(1e-3)),
        "multisteps": optax_step(optax.MultiSteps(optax.adam(1e-3), k)),
        "accumulate": optax_step(accumulate(optax.adam(1e-3), k), items=lambda b: len(b["y"])),
        "train_state": state_step(FixedSteps(k)),
        "train_state_sw": state_step(FixedSteps(k), "skip_window"),
        # tau out of reach: every window runs to the cap, k micro-batches, like the others
        "gaga": state_step(GSNR(1e9, increment=micro, max_samples=micro * k, scale="mean")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--windows", type=int, default=25, help="optimizer steps per timed round")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, float32\n")
    print("| model | micro-batch x k | donated | plain ms/micro | MultiSteps ms/micro | `accumulate` | ratio | "
          "train state FixedSteps | ratio | same, skip_window | ratio | train state GSNR | ratio vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, widths, micro, k), donate in product(CONFIGS, (False, True)):
        rng = np.random.default_rng(0)
        batches = [{"x": jnp.asarray(rng.normal(size=(micro, widths[0])), jnp.float32),
                    "y": jnp.asarray(rng.integers(0, widths[-1], micro), jnp.int32)} for _ in range(k * args.windows)]
        runs = competitors(widths, micro, k, donate)
        med = median_ms(runs, batches, args.rounds)
        print(f"| {name} | {micro} x {k} | {'yes' if donate else 'no'} | {med['plain']:.3f} | "
              f"{med['multisteps']:.3f} | {med['accumulate']:.3f} | "
              f"{med['accumulate'] / med['multisteps']:.3f}x | {med['train_state']:.3f} | "
              f"{med['train_state'] / med['multisteps']:.3f}x | {med['train_state_sw']:.3f} | "
              f"{med['train_state_sw'] / med['multisteps']:.3f}x | {med['gaga']:.3f} | "
              f"{med['gaga'] / med['plain']:.2f}x |")


if __name__ == "__main__":
    main()
