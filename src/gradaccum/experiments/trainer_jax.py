"""The mnist1d run on the JAX backend (``--backend jax``).

Same data order (the seeded index stream of ``run_record.increments``), same MLP shape
(40-256-256-10, Flax), Adam, same rules; the state carries the window and a jitted step
decides under ``jax.lax.cond``. Initial weights come from Flax's initialiser, so the
numbers differ from the torch run's by seed, not by method.
"""

from __future__ import annotations

import time
from typing import Any, cast

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._core.monitor import DecisionMonitor
from ..jax import AccumulatingTrainState, flush, make_train_step
from .arms import ARM_TABLE
from .config import ExperimentConfig
from .mnist1d_data import MNIST1D
from .run_record import Trained, Window, increments, reporter


class FlaxMLP(fnn.Module):
    """The reference MLP 40-256-256-10 with ReLU, in float32."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = fnn.relu(fnn.Dense(256, dtype=jnp.float32, param_dtype=jnp.float32)(x))
        x = fnn.relu(fnn.Dense(256, dtype=jnp.float32, param_dtype=jnp.float32)(x))
        return fnn.Dense(10, dtype=jnp.float32, param_dtype=jnp.float32)(x)


MODEL = FlaxMLP()


def per_example_loss(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    logits = MODEL.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


@jax.jit
def _correct(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    # Module.apply is typed for mutable collections too (an (output, state) pair); none are asked for here
    logits = cast(jax.Array, MODEL.apply({"params": params}, x))
    return (logits.argmax(1) == y).sum()


def accuracy(params: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(_correct(params, x, y)) / len(y)


_STEP = make_train_step(per_example_loss, donate=True)


def train_jax(arm: str, params: dict[str, float], seed: int, data: MNIST1D, cfg: ExperimentConfig) -> Trained:
    """Train the Flax MLP with Adam for ``cfg.budget`` samples; validate every ``cfg.eval_every``.

    A micro-batch with a non-finite loss or gradient is dropped by the step (it cannot stop
    a jitted loop); any such micro-batch marks the run as diverged.
    """
    x, y = data.x_train.astype(np.float32), data.y_train.astype(np.int32)
    x_val = data.x_val.astype(np.float32)  # converted once, validated every eval_every samples
    rule = ARM_TABLE[arm].rule(params, cfg)
    state = AccumulatingTrainState.create(
        apply_fn=MODEL.apply,
        params=MODEL.init(jax.random.key(seed), jnp.zeros((1, x.shape[1]), jnp.float32))["params"],
        tx=optax.adam(params["lr"]), rule=rule)
    size = cfg.increment
    curve: list[tuple[int, float]] = []
    metrics_seen: list[dict[str, jax.Array]] = []
    seen, next_eval = 0, cfg.eval_every
    full = np.ones(size, np.int32)
    start = time.perf_counter()
    report = reporter()
    for idx in increments(len(y), size, cfg.budget, np.random.default_rng(seed)):
        rows = np.asarray(idx)
        weights = full
        if len(rows) < size:  # the budget's last, short increment: padded, so one compiled shape
            weights = (np.arange(size) < len(rows)).astype(np.int32)
            rows = np.resize(rows, size)
        state, metrics = _STEP(state, {"x": x[rows], "y": y[rows]}, weights)
        metrics_seen.append(metrics)  # device arrays: read once at the end, no host sync per micro-batch
        seen += len(idx)
        if report is not None:
            report(len(idx))
        if seen >= next_eval:
            curve.append((seen, accuracy(state.params, x_val, data.y_val)))
            next_eval += cfg.eval_every
    flushed_items = int(state.window.items)
    flushed_micro = int(state.window.micro_batches)
    state = flush(state)
    wall = time.perf_counter() - start
    host = jax.device_get(metrics_seen)
    diverged = not all(bool(m["finite"]) for m in host)
    closed = [m for m in host if m["stop"]]
    key = "gsnr" if closed and "gsnr" in closed[0] else "norm_test"
    monitor, caught = DecisionMonitor(), set()
    for m in closed if rule.needs_statistics else []:
        message = monitor.observe(int(m["micro_batches"]), bool(m.get("capped", False)))
        if message:
            caught.add(message)
    windows = [Window(int(m["items"]), int(m["micro_batches"]), int(m["items"]) == 0, "rule",
                      float(m[key]) if key in m else None) for m in closed]
    if flushed_micro:
        windows.append(Window(flushed_items, flushed_micro, flushed_items == 0, "flush"))
    return Trained(windows, curve, accuracy(state.params, x_val, data.y_val),
                   accuracy(state.params, data.x_test.astype(np.float32), data.y_test), wall, diverged, sorted(caught))
