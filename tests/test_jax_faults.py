"""JAX backend under misuse and edge cases: donated states, refused factors and counts,
checkpoints of another rule, integer losses, empty flushes, and dropout keys per micro-batch."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import serialization

from gradaccum import GSNR, BatchRamp, FixedSteps, GSNRPlanner, NoiseScalePlanner, NormTest, NormTestPlanner
from gradaccum.jax import (
    AccumulatingTrainState,
    accumulate,
    flush,
    make_train_step,
    noise_value_and_grad,
    scale_by_items,
    statistics_path,
)
from gradaccum.torch import Accumulator

from .jax_reference import MODEL, data, init_params, loss_fn, max_abs_diff, moments_of, take
from .reference import mlp

SGD = optax.sgd(0.1)
STEP = make_train_step(loss_fn)
RULES = [
    FixedSteps(2),
    GSNR(1e9, increment=4, max_samples=8),  # per-element moments; closes at its cap of 8 samples
    NormTest(1e-9, increment=4, max_samples=8),  # the norm path
    BatchRamp(4, 8, over=16, micro_batch=4),
    BatchRamp(4, 12, over=3, micro_batch=4, unit="steps", stages=2),
    NoiseScalePlanner(c=0.1, min_batch=4, max_batch=12, micro_batch=4),
    NormTestPlanner(theta=0.9, min_batch=4, max_batch=12, micro_batch=4),
    GSNRPlanner(tau=4.0, min_batch=4, max_batch=12, micro_batch=4),
]


def new_state(rule, tx=SGD, params=None) -> AccumulatingTrainState:
    params = init_params() if params is None else params
    return AccumulatingTrainState.create(apply_fn=MODEL.apply, params=params, tx=tx, rule=rule)


def buffers(tree) -> list[int]:
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]


def keep_initial_params() -> optax.GradientTransformation:
    """An optimizer whose state starts as the parameters themselves (as an average of the
    weights or a lookahead's slow weights may): its leaves are the params' buffers."""
    return optax.GradientTransformation(lambda params: params, lambda updates, state, params=None: (updates, state))


# --- donate=True: no buffer shared in any initial state ----------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_no_two_leaves_of_an_initial_state_share_a_buffer(rule) -> None:
    for tx in (SGD, optax.chain(optax.adam(0.01), scale_by_items(lambda items: 1.0)), keep_initial_params()):
        pointers = buffers(new_state(rule, tx))
        assert len(pointers) == len(set(pointers)), f"{rule!r} with {tx}: a buffer appears twice"


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_every_rule_and_planner_trains_with_a_donated_state(rule) -> None:
    """The donated step runs from the first micro-batch on (each state passed is consumed),
    closes windows, and a flushed state donates too."""
    batch = data(24, seed=21)
    donated_step = make_train_step(loss_fn, donate=True)
    state = new_state(rule, params=jax.tree.map(jnp.copy, init_params()))
    for a in range(0, 20, 4):
        old = state
        state, _ = donated_step(state, take(batch, slice(a, a + 4)))
        assert jax.tree.leaves(old.params)[0].is_deleted()
    state = flush(state)
    state, metrics = donated_step(state, take(batch, slice(20, 24)))
    assert int(state.step) >= 2 and int(metrics["micro_batches"]) == 1
    assert max_abs_diff(state.params, init_params()) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("rule", [FixedSteps(2), NoiseScalePlanner(c=0.1, min_batch=4, max_batch=12, micro_batch=4)],
                         ids=repr)
def test_a_donated_run_gives_the_plain_runs_states(rule) -> None:
    batch = data(24, seed=21)
    donated_step = make_train_step(loss_fn, donate=True)
    donated = new_state(rule, params=jax.tree.map(jnp.copy, init_params()))
    plain = new_state(rule)
    for a in range(0, 24, 4):
        donated, _ = donated_step(donated, take(batch, slice(a, a + 4)))
        plain, _ = STEP(plain, take(batch, slice(a, a + 4)))
    assert int(donated.step) == int(plain.step) >= 2
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(donated), jax.tree.leaves(plain)))


def test_an_optimizer_state_that_starts_as_the_params_donates() -> None:
    batch = data(8, seed=22)
    step = make_train_step(loss_fn, donate=True)
    state = new_state(FixedSteps(1), tx=optax.chain(keep_initial_params(), SGD))
    for a in (0, 4):
        state, _ = step(state, take(batch, slice(a, a + 4)))
    assert int(state.step) == 2
    assert max_abs_diff(state.opt_state[0], init_params()) == 0  # the kept copy is the initial params


# --- scale_by_items: a NaN, infinite or negative factor is refused -----------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5])
def test_scale_by_items_refuses_a_bad_factor_called_eagerly(bad: float) -> None:
    tx = scale_by_items(lambda items: bad + 0 * items)
    updates = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"schedule\(items_seen=0\) must return a finite factor >= 0, got"):
        tx.update(updates, tx.init(updates), items=4)


@pytest.mark.slow
@pytest.mark.parametrize("bad", [np.nan, np.inf, -0.5])
def test_scale_by_items_refuses_a_bad_factor_in_the_jitted_step_and_changes_nothing(bad: float) -> None:
    """The first window (items_seen 0) gets factor 1, the second (items_seen 8) ``bad``: the
    close of the second is refused and the state passed to it stays usable."""
    tx = optax.chain(optax.sgd(0.1), scale_by_items(lambda seen: jnp.where(seen < 8, 1.0, bad)))
    batch = data(16, seed=23)
    state = new_state(FixedSteps(2), tx=tx)
    for a in (0, 4, 8):
        state, _ = STEP(state, take(batch, slice(a, a + 4)))
    before = jax.tree.map(np.asarray, state)
    with pytest.raises(ValueError, match=r"items_seen=8\) must return a finite factor >= 0"):
        STEP(state, take(batch, slice(12, 16)))
    with pytest.raises(ValueError, match="must return a finite factor"):
        flush(state)
    assert max_abs_diff(state.params, before.params) == 0 and int(state.window.micro_batches) == 1
    assert int(state.opt_state[1].items_seen()) == 8


def test_scale_by_items_allows_a_factor_of_zero() -> None:
    """The control: 0 is a valid factor (torch allows it): the window closes with no change."""
    tx = optax.chain(optax.sgd(0.1), scale_by_items(lambda seen: jnp.where(seen < 8, 1.0, 0.0)))
    batch = data(16, seed=23)
    state = new_state(FixedSteps(2), tx=tx)
    for a in (0, 4, 8):
        state, _ = STEP(state, take(batch, slice(a, a + 4)))
    after, _ = STEP(state, take(batch, slice(12, 16)))
    assert int(after.step) == 2 and max_abs_diff(after.params, state.params) == 0


def test_scale_by_items_without_the_compiled_check_still_checks_eagerly() -> None:
    """``check=False`` leaves the callback out of compiled steps only."""
    tx = scale_by_items(lambda seen: -1.0 + 0 * seen, check=False)
    updates = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="must return a finite factor"):
        tx.update(updates, tx.init(updates), items=1)
    scaled, _ = jax.jit(lambda u, s: tx.update(u, s, items=1))(updates, tx.init(updates))
    np.testing.assert_array_equal(np.asarray(scaled["w"]), [-1.0, -1.0])


def test_a_refusal_under_vmap_fires_only_for_the_bad_member() -> None:
    """Under vmap a cond runs both branches: the refusal checks its condition itself."""
    tx = scale_by_items(lambda seen: 1.0 - seen)  # negative once more than one item was seen
    updates = {"w": jnp.ones(2)}

    def update(rest):
        state = tx.init(updates)._replace(rest=rest)
        return tx.update(updates, state, items=1)[0]

    out = jax.jit(jax.vmap(update))(jnp.asarray([0, 1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out["w"]), [[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(Exception, match="must return a finite factor"):
        jax.block_until_ready(jax.jit(jax.vmap(update))(jnp.asarray([0, 3], jnp.int32)))


# --- item counts: refused, never wrapped, the same messages in accumulate ---------------------


def test_weights_whose_int32_sum_wraps_are_refused_and_change_nothing() -> None:
    """4 x 2**30 is 0 in int32: the window would hold 0 items and be dropped."""
    batch = data(8, seed=24)
    state, _ = STEP(new_state(FixedSteps(2)), take(batch, slice(0, 4)))
    with pytest.raises(ValueError, match=r"weights add up to 4294967296 items, above 2147483647"):
        STEP(state, take(batch, slice(4, 8)), np.full(4, 2**30))
    assert int(state.window.items) == 4
    state, metrics = STEP(state, take(batch, slice(4, 8)), np.full(4, 2**20))
    assert bool(metrics["stop"]) and int(metrics["items"]) == 4 + 4 * 2**20 and int(state.step) == 1


def test_a_window_whose_item_count_would_wrap_is_refused_before_the_step_runs() -> None:
    """Each micro-batch fits int32, the window of two does not: refused before the (donated)
    step runs, so the state passed stays usable."""
    batch = data(8, seed=24)
    weights = np.array([2**29, 2**29, 2**29, 0])
    step = make_train_step(loss_fn, donate=True)
    state, _ = step(new_state(FixedSteps(3), params=jax.tree.map(jnp.copy, init_params())),
                    take(batch, slice(0, 4)), weights)
    with pytest.raises(ValueError, match=r"the window holds 1610612736 items and this micro-batch adds 1610612736"):
        step(state, take(batch, slice(4, 8)), weights)
    assert int(state.window.items) == 3 * 2**29 and int(state.step) == 0
    state = flush(state)
    assert int(state.step) == 1


@pytest.mark.parametrize(("items", "weights", "message"), [
    (2.5, [2.5, 1, 1, 1], r" must hold non-negative integers \(item counts\), got "),
    (1e40, [1e40, 1, 1, 1], r": an item count above 2147483647 does not fit the window's int32 counts"),
    (-1, [-1, 1, 1, 1], r" must hold non-negative integers \(item counts\), got "),
    (np.nan, [np.nan, 1, 1, 1], r" must be finite numbers"),
], ids=["fractional", "1e40", "negative", "nan"])
def test_accumulate_refuses_the_counts_the_train_step_refuses_with_its_message(items, weights, message) -> None:
    params = init_params()
    tx = accumulate(SGD, 2)
    grads = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(ValueError, match="items" + message) as from_accumulate:
        tx.update(grads, tx.init(params), params, items=items)
    with pytest.raises(ValueError, match="weights" + message) as from_step:
        STEP(new_state(FixedSteps(2)), take(data(4), slice(0, 4)), np.array(weights))
    assert str(from_accumulate.value).split(", got")[0][len("items"):] == \
        str(from_step.value).split(", got")[0][len("weights"):]


def test_accumulate_refuses_a_boolean_count() -> None:
    params = init_params()
    tx = accumulate(SGD, 2)
    with pytest.raises(TypeError, match="items must be a scalar count"):
        tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params, items=True)


# --- integer losses -----------------------------------------------------------------------------


def rounded_loss(params, batch):
    return jnp.round(loss_fn(params, batch) * 10).astype(jnp.int32)


@pytest.mark.parametrize("rule, path", [(FixedSteps(2), "auto"), (GSNR(1e9, increment=4, max_samples=8), "auto"),
                                        (NormTest(1e-9, increment=4, max_samples=8), "vmap")], ids=str)
def test_an_integer_loss_is_refused_naming_its_dtype(rule, path: str) -> None:
    """An integer loss has no gradient: the window would silently get zeros."""
    with pytest.raises(TypeError, match="floating-point losses, got dtype int32"):
        make_train_step(rounded_loss, path=path)(new_state(rule), take(data(4), slice(0, 4)))
    with pytest.raises(TypeError, match="got dtype bool"):
        make_train_step(lambda p, b: loss_fn(p, b) > 1.0)(new_state(rule), take(data(4), slice(0, 4)))


def test_noise_value_and_grad_refuses_an_integer_loss() -> None:
    with pytest.raises(TypeError, match="floating-point losses, got dtype int32"):
        noise_value_and_grad(rounded_loss)(init_params(), take(data(4), slice(0, 4)))


# --- flush of an empty window -------------------------------------------------------------------


@pytest.mark.slow
def test_flushing_an_empty_window_leaves_a_step_ramp_where_it_was_as_torch_does() -> None:
    ramp = BatchRamp(4, 12, over=3, micro_batch=4, unit="steps", stages=2)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), ramp)
    assert acc.flush() is False and not acc.history  # torch: no step, no window counted
    state = new_state(ramp)
    flushed = flush(flush(state))
    assert int(flushed.plan.summary.steps) == 0 and int(flushed.step) == 0
    assert int(flushed.planned_micro_batches) == int(state.planned_micro_batches) == acc.planned_micro_batches
    batch = data(12, seed=25)
    plans = []
    for a in range(0, 12, 4):
        flushed, _ = STEP(flushed, take(batch, slice(a, a + 4)))
        plans.append(int(flushed.planned_micro_batches))
    plain = state
    for a in range(0, 12, 4):
        plain, _ = STEP(plain, take(batch, slice(a, a + 4)))
    assert max_abs_diff(flushed.plan, plain.plan) == 0 and max_abs_diff(flushed.params, plain.params) == 0
    assert len(set(plans)) > 1  # the ramp moved over these steps


def test_flush_still_closes_a_planned_partial_window() -> None:
    ramp = BatchRamp(8, 16, over=3, micro_batch=4, unit="steps", stages=2)
    state, _ = STEP(new_state(ramp), take(data(4, seed=25), slice(0, 4)))
    assert int(state.planned_micro_batches) == 2 and int(state.window.micro_batches) == 1
    closed = flush(state)
    assert int(closed.step) == 1 and int(closed.plan.summary.steps) == 1 and int(closed.plan.summary.items) == 4


# --- restoring a checkpoint saved under another rule --------------------------------------------


@pytest.mark.parametrize(("saved", "target", "found", "expected"), [
    (BatchRamp(8, 32, over=160, micro_batch=4), FixedSteps(2), "a planner's plan", "no plan"),
    (FixedSteps(2), BatchRamp(8, 32, over=160, micro_batch=4), "no plan", "a planner's plan"),
    (GSNR(1.0, increment=4, max_samples=40), FixedSteps(2), "per-element gradient moments", "gradient sums, no"),
    (FixedSteps(2), GSNR(1.0, increment=4, max_samples=40), "gradient sums, no", "per-element gradient moments"),
    (NormTest(0.8, increment=4, max_samples=40, source="per_sample"), GSNR(1.0, increment=4, max_samples=40),
     "per-sample norms", "per-element"),
], ids=lambda x: repr(x) if not isinstance(x, str) else None)
def test_from_bytes_of_another_rules_state_is_refused_naming_both(saved, target, found, expected) -> None:
    with pytest.raises(ValueError) as error:
        serialization.from_bytes(new_state(target), serialization.to_bytes(new_state(saved)))
    message = str(error.value)
    assert f"saved under {saved!r} (a window of" in message and found in message
    assert f"rule is {target!r} (a window of" in message and expected in message.split("rule is")[1]


def test_a_state_saved_without_its_rule_still_restores_and_is_still_checked() -> None:
    """A state dict without the rule's name (as an older version saved it) restores under the
    same kind of rule, and under another is refused with what it holds."""
    state, _ = STEP(new_state(FixedSteps(2)), take(data(4), slice(0, 4)))
    saved = serialization.to_state_dict(state)
    assert saved.pop("rule") == repr(FixedSteps(2))
    restored = serialization.from_state_dict(new_state(FixedSteps(3), params=init_params(seed=4)), saved)
    assert max_abs_diff(restored.params, state.params) == 0 and int(restored.window.items) == 4
    with pytest.raises(ValueError, match="saved under a rule this version did not record"):
        serialization.from_state_dict(new_state(GSNR(1.0, increment=4, max_samples=40)), saved)


# --- per-sample statistics of a NumPy batch, called without jit ---------------------------------


class Square(fnn.Module):
    """Every layer maps (B, 6) to (B, 6): perturbations shifted by one layer would still fit."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(2):
            x = jnp.tanh(fnn.Dense(6, param_dtype=jnp.float64)(x))
        return fnn.Dense(6, param_dtype=jnp.float64)(x)


SQUARE = Square()


def square_loss(params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(SQUARE.apply({"params": params}, batch["x"]), batch["y"])


@pytest.mark.slow
def test_statistics_of_a_numpy_batch_without_jit_equal_the_jitted_ones() -> None:
    """Eagerly (``noise_value_and_grad`` unjitted, ``make_train_step(jit=False)``), a NumPy batch
    reaches the first layer as a NumPy array: it must still be one of the layers whose output
    gradient is taken, or every later layer gets its neighbour's."""
    part = take(data(8, seed=29), slice(0, 8))
    params = SQUARE.init(jax.random.key(1), jnp.zeros((1, 6)))["params"]
    assert statistics_path(square_loss, params, part) == "sum_of_squares"
    eager = noise_value_and_grad(square_loss)(params, part)[1]
    jitted = jax.jit(noise_value_and_grad(square_loss))(params, part)[1]
    for key in ("trace", "squared_norm"):
        assert abs(float(eager[key]) - float(jitted[key])) < 1e-12 * abs(float(jitted[key]))


# --- dropout: a key per micro-batch --------------------------------------------------------------


class DropoutMLP(fnn.Module):
    """The reference MLP with dropout after each hidden layer (float64)."""

    @fnn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            x = fnn.relu(fnn.Dense(16, param_dtype=jnp.float64)(x))
            x = fnn.Dropout(0.5, deterministic=not train)(x)
        return fnn.Dense(3, param_dtype=jnp.float64)(x)


DROPOUT = DropoutMLP()
BASE = jax.random.key(7)


def dropout_loss(params, batch, rng):
    logits = DROPOUT.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def micro_batch_key(step: int, micro_batch: int) -> jax.Array:
    """The key the docstring promises the micro-batch ``micro_batch`` of window ``step``."""
    return jax.random.fold_in(jax.random.fold_in(BASE, step), micro_batch)


@jax.jit
def example_grad_in_batch(params, part, key, i):
    """Example ``i``'s gradient from the micro-batch's own forward (its batch dropout mask)."""
    return jax.grad(lambda p: dropout_loss(p, part, key)[i])(params)


@jax.jit
def example_grad_alone(params, example, key):
    """The gradient of a one-example batch's loss."""
    return jax.grad(lambda p: dropout_loss(p, example, key)[0])(params)


def per_sample_grads(params, part, key, per_example: bool) -> list:
    """Each example's gradient, one at a time: from the micro-batch's forward, or (the vmap
    path) from the example alone with ``fold_in(key, i)``."""
    if per_example:
        return [example_grad_alone(params, take(part, slice(i, i + 1)), jax.random.fold_in(key, i))
                for i in range(len(part["y"]))]
    return [example_grad_in_batch(params, part, key, i) for i in range(len(part["y"]))]


def reference_run(parts_per_window: list[list[dict]], per_example: bool, key=micro_batch_key) -> dict:
    """SGD on each window's mean gradient, the sum of its examples' gradients, computed one
    example at a time; micro-batch ``j`` of window ``step`` uses ``key(step, j)``."""
    params = DROPOUT.init(jax.random.key(0), jnp.zeros((1, 6)), train=False)["params"]
    for step, parts in enumerate(parts_per_window):
        grads = [g for j, part in enumerate(parts) for g in per_sample_grads(params, part, key(step, j), per_example)]
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, mean)
    return params


@pytest.mark.slow
@pytest.mark.parametrize(("rule", "path"), [
    (FixedSteps(2), "auto"), (GSNR(1e9, increment=4, max_samples=8), "auto"),
    (GSNR(1e9, increment=4, max_samples=8), "vmap"), (NormTest(1e-9, increment=4, max_samples=8), "auto"),
], ids=str)
def test_dropout_with_a_key_per_micro_batch_equals_the_reference(rule, path: str) -> None:
    batch = data(16, seed=26)
    parts = [take(batch, slice(a, a + 4)) for a in range(0, 16, 4)]
    params = DROPOUT.init(jax.random.key(0), jnp.zeros((1, 6)), train=False)["params"]
    step = make_train_step(dropout_loss, path=path)
    state = AccumulatingTrainState.create(apply_fn=DROPOUT.apply, params=params, tx=SGD, rule=rule)
    if path == "auto":  # the dropout model keeps the one-backward path
        bound = lambda p, b: dropout_loss(p, b, BASE)  # noqa: E731
        assert not statistics_path(bound, params, parts[0]).startswith("vmap")
    state, _ = step(state, parts[0], rng=BASE)
    per_example = path == "vmap"
    if isinstance(rule, GSNR):  # the window's moments are those of the examples' gradients under their masks
        grads = per_sample_grads(params, parts[0], micro_batch_key(0, 0), per_example)
        mean, m2 = moments_of(grads)
        assert max_abs_diff(state.window.mean, mean) < 1e-12
        assert max_abs_diff(state.window.m2, m2) < 1e-12
    for part in parts[1:]:
        state, metrics = step(state, part, rng=BASE)
    assert int(state.step) == 2 and bool(metrics["stop"])
    want = reference_run([parts[:2], parts[2:]], per_example)
    assert max_abs_diff(state.params, want) < 1e-12
    # the control: dropout is active and the keys matter (the rng passed as is to every micro-batch)
    assert max_abs_diff(state.params, reference_run([parts[:2], parts[2:]], per_example, lambda s, j: BASE)) > 1e-3


@pytest.mark.slow
def test_the_same_key_at_every_call_gives_each_micro_batch_its_own_masks() -> None:
    """Two micro-batches of the same examples, the same rng passed: different masks, so
    different losses (a key reused as is would repeat the masks)."""
    part = take(data(4, seed=27), slice(0, 4))
    params = DROPOUT.init(jax.random.key(0), jnp.zeros((1, 6)), train=False)["params"]
    state = AccumulatingTrainState.create(apply_fn=DROPOUT.apply, params=params, tx=SGD, rule=FixedSteps(3))
    step = make_train_step(dropout_loss)
    state, first = step(state, part, rng=BASE)
    state, second = step(state, part, rng=BASE)
    assert float(first["loss"]) != float(second["loss"])


@pytest.mark.slow
def test_noise_value_and_grad_passes_the_rng_as_given() -> None:
    part = take(data(4, seed=28), slice(0, 4))
    params = DROPOUT.init(jax.random.key(0), jnp.zeros((1, 6)), train=False)["params"]
    measured = jax.jit(lambda p, b, k: noise_value_and_grad(dropout_loss)(p, b, rng=k))
    (loss, grads), stats = measured(params, part, BASE)
    want_loss, want = jax.jit(jax.value_and_grad(lambda p: dropout_loss(p, part, BASE).mean()))(params)
    assert abs(float(loss) - float(want_loss)) < 1e-12 and max_abs_diff(grads, want) < 1e-12
    other = measured(params, part, jax.random.key(8))[0][0]  # the same compiled program, another key
    assert abs(float(other) - float(want_loss)) > 1e-6  # the key reached the dropout


def test_an_rng_for_a_loss_without_an_rng_parameter_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"loss_fn\(params, batch, rng\).*loss_fn\(params, batch\)"):
        STEP(new_state(FixedSteps(2)), take(data(4), slice(0, 4)), rng=BASE)
