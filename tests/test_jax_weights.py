"""JAX per-example weights (token counts): the window's gradient is the mean over items.

Before, the train step took only a 0/1 mask, so an LM's per-token mean over a window with
padding was not expressible; a mask of 2, -1, 0.5 or NaN silently changed item counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradaccum import GSNR, FixedSteps
from gradaccum.jax import AccumulatingTrainState, make_train_step, statistics_path

from .jax_reference import MODEL, data, init_params, loss_fn, max_abs_diff, moments_of, sgd_step, take

LR = 0.1
SGD = optax.sgd(LR)
STEP = make_train_step(loss_fn)


def token_weighted_grad(params, batch, weights):
    """The reference: mean over all items, an example's loss counted weights[i] times."""
    w = jnp.asarray(weights, jnp.float64)
    return jax.grad(lambda p: (loss_fn(p, batch) * w).sum() / w.sum())(params)


@pytest.mark.slow
@pytest.mark.parametrize("rule", [FixedSteps(3), GSNR(1e9, increment=4, max_samples=10)], ids=["fixed", "gsnr"])
def test_weighted_window_is_the_item_mean(rule) -> None:
    batch = data(12, seed=3)
    weights = np.array([3, 1, 0, 2, 5, 1, 1, 4, 0, 2, 7, 1])  # token counts; 0 = padding
    params = init_params()
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=params, tx=SGD, rule=rule)
    for part in (slice(0, 4), slice(4, 8), slice(8, 12)):
        state, metrics = STEP(state, take(batch, part), weights[part])
    assert bool(metrics["stop"]) and int(metrics["items"]) == weights.sum() and int(metrics["samples"]) == 10
    want = sgd_step(params, token_weighted_grad(params, batch, weights), LR)
    assert max_abs_diff(state.params, want) < 1e-12


@pytest.mark.slow
def test_weighted_statistics_are_those_of_the_weighted_per_sample_gradients() -> None:
    """A sample's gradient is that of its weighted loss (w_i l_i); weight-0 examples are not samples."""
    batch = data(8, seed=4)
    weights = np.array([2, 1, 0, 3, 1, 1, 4, 2])
    params = init_params()
    rule = GSNR(1e9, increment=4, max_samples=64, scale="mean")
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=params, tx=SGD, rule=rule)
    for part in (slice(0, 4), slice(4, 8)):
        state, metrics = STEP(state, take(batch, part), weights[part])
    assert statistics_path(loss_fn, params, take(batch, slice(0, 4))) == "sum_of_squares"
    sample_grad = jax.jit(jax.grad(lambda p, one, w: w * loss_fn(p, one)[0]))  # compiled once, called per sample
    per_sample = [sample_grad(params, take(batch, slice(i, i + 1)), weights[i]) for i in range(8) if weights[i] > 0]
    mean, m2 = moments_of(per_sample)
    assert int(state.window.samples) == 7 and int(state.window.items) == 14
    assert max_abs_diff(state.window.mean, mean) < 1e-12
    assert max_abs_diff(state.window.m2, m2) < 1e-10
    want = rule.decision(7, jax.tree.leaves(mean), jax.tree.leaves(m2))[1]["gsnr"]
    assert float(metrics["gsnr"]) == pytest.approx(float(want), rel=1e-9)


@pytest.mark.parametrize(("name", "values", "message"), [
    ("weights", [1, -1, 2, 1], "non-negative integers"),
    ("weights", [1, 0.5, 2, 1], "non-negative integers"),
    ("weights", [1, np.nan, 2, 1], "finite"),
    ("mask", [1, 2, 0, 1], "0 or 1"),
    ("mask", [[1, 0, 0, 1]], "one value per example"),
])
def test_bad_weights_are_refused_and_change_nothing(name, values, message) -> None:
    batch = data(8, seed=5)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=FixedSteps(3))
    state, _ = STEP(state, take(batch, slice(0, 4)))
    before = state
    with pytest.raises(ValueError, match=message):
        STEP(state, take(batch, slice(4, 8)), **{name: np.array(values)})
    assert state is before and int(state.window.items) == 4
    with pytest.raises(ValueError, match="weights or mask, not both"):
        STEP(state, take(batch, slice(4, 8)), np.ones(4), mask=np.ones(4))
    state, metrics = STEP(state, take(batch, slice(4, 8)), mask=np.array([1, 1, 0, 1]))
    assert int(metrics["items"]) == 7


def test_padding_every_micro_batch_compiles_once() -> None:
    """The pattern docs/jax.md recommends: every micro-batch padded to one shape with weights: one compilation."""
    step = make_train_step(loss_fn)
    batch = data(10, seed=6)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=FixedSteps(3))
    for start in range(0, 10, 4):
        rows = np.arange(start, start + 4) % 10
        weights = (np.arange(start, start + 4) < 10).astype(np.int32)  # the short last one: padding weighs 0
        state, metrics = step(state, take(batch, rows), weights)
    assert int(metrics["items"]) == 10
    assert step.jitted._cache_size() == 1
