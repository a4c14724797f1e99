"""JAX backend: the applied gradient is the full-batch mean gradient for any split.

float64 against one call on the whole window (``full_batch_grad``); the optax wrapper
against ``optax.MultiSteps`` where both apply (equal micro-batches).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradaccum import GSNR, FixedSteps, NormTest
from gradaccum.jax import AccumulatingTrainState, accumulate, flush, make_train_step

from .jax_reference import (
    MODEL,
    data,
    full_batch_grad,
    init_params,
    loss_fn,
    masked_mean_grad,
    max_abs_diff,
    sgd_step,
    split_masks,
    take,
)

LR = 0.1
STEP = make_train_step(loss_fn)
SGD = optax.sgd(LR)  # one object: the optimizer is a static field of the state, a new one recompiles


def splits(total: int):
    """Random cut points of ``total`` samples into 1..total micro-batches (sizes 1, uneven, whole)."""
    return st.sets(st.integers(1, total - 1), max_size=total - 1).map(
        lambda cuts: [0, *sorted(cuts), total])


# micro-batches per window where the count is compiled in (a FixedSteps rule, ``accumulate``'s
# every_k): one compilation each, so a few counts: a window of one, the counts of the named
# splits above (compiled once for both), uneven windows of 8, and 24 micro-batches of one item
COUNTS = (1, 2, 3, 8, 24)


def splits_into(total: int, counts: tuple[int, ...] = COUNTS):
    """Random cut points of ``total`` samples into one of ``counts`` micro-batches (random, uneven sizes)."""
    return st.sampled_from(counts).flatmap(
        lambda k: st.sets(st.integers(1, total - 1), min_size=k - 1, max_size=k - 1)).map(
        lambda cuts: [0, *sorted(cuts), total])


def new_state(rule, params=None):
    return AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params() if params is None else params,
                                         tx=SGD, rule=rule)


@pytest.mark.slow
@pytest.mark.parametrize("bounds", [[0, 1, 8, 24], [0, 24], [0, 23, 24]])
def test_train_state_uneven_micro_batches_equal_full_batch(bounds: list[int]) -> None:
    batch = data(24)
    state = new_state(FixedSteps(len(bounds) - 1))
    for a, b in zip(bounds, bounds[1:]):
        assert int(state.step) == 0
        state, metrics = STEP(state, take(batch, slice(a, b)))
    assert bool(metrics["stop"]) and int(metrics["items"]) == 24 and int(state.step) == 1
    want = sgd_step(init_params(), full_batch_grad(init_params(), batch), LR)
    assert max_abs_diff(state.params, want) < 1e-12


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(bounds=splits_into(24))
def test_train_state_fixed_steps_equals_full_batch(bounds: list[int]) -> None:
    """Random splits, each micro-batch given as a mask over the 24 examples (one compilation per count)."""
    batch = data(24)
    state = new_state(FixedSteps(len(bounds) - 1))
    for mask in split_masks(bounds):
        assert int(state.step) == 0
        state, metrics = STEP(state, batch, mask)
    assert bool(metrics["stop"]) and int(metrics["items"]) == 24 and int(state.step) == 1
    want = sgd_step(init_params(), full_batch_grad(init_params(), batch), LR)
    assert max_abs_diff(state.params, want) < 1e-12
    assert int(state.window.items) == 0 and int(state.window.micro_batches) == 0  # a fresh window


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(bounds=splits(24), scale=st.sampled_from(["sample", "mean"]))
def test_statistics_rule_applies_the_full_batch_mean(bounds: list[int], scale: str) -> None:
    """With a rule that gathers per-sample moments the applied gradient is their merged mean."""
    batch = data(24, seed=1)
    state = new_state(GSNR(1e9, increment=1, max_samples=24, scale=scale))  # only the cap stops it
    for mask in split_masks(bounds):
        state, metrics = STEP(state, batch, mask)
    assert bool(metrics["stop"]) and bool(metrics["capped"])
    want = sgd_step(init_params(), full_batch_grad(init_params(), batch), LR)
    assert max_abs_diff(state.params, want) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("rule", [FixedSteps(3), NormTest(1e-9, increment=4, max_samples=20)])
def test_mask_leaves_padding_out(rule) -> None:
    """A short last micro-batch padded to the common shape with a mask == the unpadded one."""
    batch = data(20, seed=2)
    parts = [take(batch, slice(0, 8)), take(batch, slice(8, 16)), take(batch, slice(16, 20))]
    plain = new_state(rule)
    for part in parts:
        plain, _ = STEP(plain, part)
    padded = new_state(rule)
    last = {k: np.concatenate([v, v[:4]]) for k, v in parts[2].items()}  # 4 real + 4 junk examples
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    for part, m in ((parts[0], None), (parts[1], None), (last, mask)):
        padded, metrics = STEP(padded, part, m)
    assert int(metrics["items"]) == 20 and int(padded.step) == 1
    assert max_abs_diff(padded.params, plain.params) < 1e-12
    want = sgd_step(init_params(), full_batch_grad(init_params(), batch), LR)
    assert max_abs_diff(padded.params, want) < 1e-12


@pytest.mark.slow
def test_flush_applies_the_short_last_window_by_its_own_size() -> None:
    batch = data(30, seed=3)
    state = new_state(FixedSteps(4))
    for a in range(0, 30, 10):  # 3 of 4 micro-batches: a short last window
        state, _ = STEP(state, take(batch, slice(a, a + 10)))
    assert int(state.step) == 0
    state = flush(state)
    assert int(state.step) == 1 and int(state.window.items) == 0
    want = sgd_step(init_params(), full_batch_grad(init_params(), batch), LR)
    assert max_abs_diff(state.params, want) < 1e-12
    # dividing by k (the short-window bug, Lightning #19987) would be 3/4 of the step
    wrong = sgd_step(init_params(), jax.tree.map(lambda g: g * 3 / 4, full_batch_grad(init_params(), batch)), LR)
    assert max_abs_diff(wrong, want) > 1e-4
    assert max_abs_diff(flush(state).params, state.params) == 0  # flushing an empty window: no step


def test_windows_follow_each_other() -> None:
    """Two windows of two micro-batches each: the second starts from the first's parameters."""
    batch = data(16, seed=4)
    state = new_state(FixedSteps(2))
    for a in range(0, 16, 4):
        state, _ = STEP(state, take(batch, slice(a, a + 4)))
    first = sgd_step(init_params(), full_batch_grad(init_params(), take(batch, slice(0, 8))), LR)
    second = sgd_step(first, full_batch_grad(first, take(batch, slice(8, 16))), LR)
    assert int(state.step) == 2 and max_abs_diff(state.params, second) < 1e-12


# --- the optax wrapper -------------------------------------------------------------------------


def micro_grads(params, batch, bounds):
    """Each micro-batch's *mean* gradient and item count, as a plain optax loop has them."""
    return [(masked_mean_grad(params, batch, mask), int(mask.sum())) for mask in split_masks(bounds)]


@functools.cache
def accumulated_sgd(every_k: int) -> tuple[optax.GradientTransformation, Callable]:
    """``accumulate(sgd, every_k)`` and its jitted update, made once per count (a new one recompiles)."""
    tx = accumulate(optax.sgd(LR), every_k)
    return tx, jax.jit(tx.update)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(bounds=splits_into(24))
def test_accumulate_weights_micro_batches_by_items(bounds: list[int]) -> None:
    params, batch = init_params(), data(24, seed=5)
    tx, update = accumulated_sgd(len(bounds) - 1)
    state = tx.init(params)
    for grads, items in micro_grads(params, batch, bounds):
        updates, state = update(grads, state, params, items=items)
    want = sgd_step(params, full_batch_grad(params, batch), LR)
    assert max_abs_diff(optax.apply_updates(params, updates), want) < 1e-12
    assert int(state.gradient_step) == 1 and int(state.mini_step) == 0


@pytest.mark.slow
def test_accumulate_matches_multisteps_with_equal_micro_batches() -> None:
    params, batch = init_params(), data(48, seed=6)
    ours, theirs = accumulate(optax.adam(0.01), 4), optax.MultiSteps(optax.adam(0.01), 4, accumulator_dtype=jnp.float64)
    p_ours, p_theirs = params, params
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for a in range(0, 48, 4):  # 3 windows of 4 micro-batches of 4
        part = take(batch, slice(a, a + 4))
        u_ours, s_ours = update_ours(full_batch_grad(p_ours, part), s_ours, p_ours, items=4)
        u_theirs, s_theirs = update_theirs(full_batch_grad(p_theirs, part), s_theirs, p_theirs)
        assert max_abs_diff(u_ours, u_theirs) < 1e-12  # zeros between steps, the same step at the end
        p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)
    assert int(s_ours.gradient_step) == int(s_theirs.gradient_step) == 3
    assert max_abs_diff(p_ours, p_theirs) < 1e-12 and max_abs_diff(p_ours, params) > 1e-3


@pytest.mark.slow
def test_accumulate_unequal_micro_batches_differ_from_multisteps_equal_weights() -> None:
    """The control: MultiSteps' equal weights are not the mean over items when sizes differ."""
    params, batch = init_params(), data(20, seed=7)
    bounds = [0, 2, 20]
    ours, theirs = accumulate(optax.sgd(LR), 2), optax.MultiSteps(optax.sgd(LR), 2)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for grads, items in micro_grads(params, batch, bounds):
        u_ours, s_ours = ours.update(grads, s_ours, params, items=items)
        u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
    want = sgd_step(params, full_batch_grad(params, batch), LR)
    assert max_abs_diff(optax.apply_updates(params, u_ours), want) < 1e-12
    assert max_abs_diff(optax.apply_updates(params, u_theirs), want) > 1e-4


@pytest.mark.slow
def test_accumulate_last_closes_a_short_window_and_empty_windows_are_dropped() -> None:
    params, batch = init_params(), data(12, seed=8)
    tx = accumulate(optax.sgd(LR), 5)
    state = tx.init(params)
    grads = micro_grads(params, batch, [0, 5, 12])
    updates, state = tx.update(grads[0][0], state, params, items=grads[0][1])
    updates, state = tx.update(grads[1][0], state, params, items=grads[1][1], last=True)
    want = sgd_step(params, full_batch_grad(params, batch), LR)
    assert max_abs_diff(optax.apply_updates(params, updates), want) < 1e-12
    updates, state = tx.update(grads[0][0], state, params, items=0, last=True)  # a window of 0 items
    assert int(state.gradient_step) == 1 and max_abs_diff(updates, jax.tree.map(jnp.zeros_like, params)) == 0


def test_donated_step_gives_the_same_state_and_consumes_the_old_one() -> None:
    batch = data(16, seed=9)
    donated_step = make_train_step(loss_fn, donate=True)
    plain = new_state(FixedSteps(2))
    donated = new_state(FixedSteps(2), params=jax.tree.map(jnp.copy, init_params()))
    for a in range(0, 16, 4):
        plain, _ = STEP(plain, take(batch, slice(a, a + 4)))
        old = donated
        donated, _ = donated_step(donated, take(batch, slice(a, a + 4)))
    assert max_abs_diff(donated.params, plain.params) == 0 and int(donated.step) == 2
    assert jax.tree.leaves(old.params)[0].is_deleted()  # the input state was updated in place
