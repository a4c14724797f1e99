"""JAX backend with statistics rules: the traced decision equals the core's, the torch and
JAX backends agree on the same data and weights, non-finite micro-batches, resume mid-window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import serialization

from gradaccum import GSNR, BatchRamp, FixedSteps, GSNRPlanner, NoiseScalePlanner, NormTest, NormTestPlanner, WindowView
from gradaccum._core.moments import Moments
from gradaccum.jax import (
    AccumulatingTrainState,
    Window,
    accumulate,
    make_train_step,
    scale_by_items,
    traced_decision,
    window_kind,
)
from gradaccum.torch import Accumulator

from .jax_reference import MODEL, data, init_params, loss_fn, max_abs_diff, take
from .reference import mlp

STEP = make_train_step(loss_fn)
SGD = optax.sgd(0.1)
RULES = [
    GSNR(0.3, increment=4, max_samples=40),
    GSNR(1.5, increment=4, max_samples=40, scale="mean"),
    GSNR(0.1, increment=4, max_samples=40, min_samples=12),
    NormTest(0.8, increment=4, max_samples=40),
]


def random_window(n: int, seed: int) -> tuple[Window, list[Moments]]:
    """Moments of ``n`` random per-sample gradients, with a block of dead (all-zero) elements."""
    rng = np.random.default_rng(seed)
    shapes = [(5, 3), (3,), (4,)]
    means, m2s = [], []
    for shape in shapes:
        g = rng.normal(loc=rng.normal(size=shape) * 0.3, size=(n, *shape))
        g[:, 0] = 0.0  # a dead unit: mean 0 and variance 0
        means.append(g.mean(0))
        m2s.append(((g - g.mean(0)) ** 2).sum(0))
    window = Window(micro_batches=jnp.asarray(n // 4, jnp.int32), items=jnp.asarray(n, jnp.int32),
                    samples=jnp.asarray(n, jnp.int32), grad_sum=None,
                    mean=[jnp.asarray(m) for m in means], m2=[jnp.asarray(m) for m in m2s],
                    poisoned=jnp.asarray(False))
    return window, [Moments(n, m, m2) for m, m2 in zip(means, m2s)]


@pytest.mark.parametrize("rule", RULES + [FixedSteps(3)], ids=repr)
@pytest.mark.parametrize("n", [1, 2, 4, 12, 36, 40])
def test_traced_decision_equals_the_core_rule(rule, n: int) -> None:
    for seed in range(3):
        window, moments = random_window(n, seed)
        stop, info = jax.jit(traced_decision(rule), static_argnums=0)(rule, window)
        want = rule.decide(WindowView(n // 4, n, moments if rule.needs_statistics else None))
        assert bool(stop) == want.stop
        for key, value in want.info.items():
            np.testing.assert_allclose(float(info[key]), float(value), rtol=1e-12, equal_nan=True)


@pytest.mark.slow
def test_traced_decisions_stop_on_both_sides_of_tau() -> None:
    """The comparison itself: the same window stops for a tau just below its GSNR, not just above."""
    window, moments = random_window(12, 0)
    value = GSNR(1.0, increment=4, max_samples=40).decide(WindowView(3, 12, moments)).info["gsnr"]
    for tau, expected in ((value * 0.999, True), (value * 1.001, False)):
        rule = GSNR(tau, increment=4, max_samples=40)
        assert bool(traced_decision(rule)(rule, window)[0]) is expected


# --- the torch and JAX backends on the same data and weights ----------------------------------


def torch_twin(params) -> torch.nn.Module:
    """The torch MLP of tests.reference with the flax parameters copied in (kernel = weight.T)."""
    model = mlp()
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, name in zip(layers, ("Dense_0", "Dense_1", "Dense_2")):
            layer.weight.copy_(torch.from_numpy(np.array(params[name]["kernel"]).T))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
    return model


def run_twins(rule, seed: int, schedule=None):
    """The torch Accumulator and the JAX train state on the same 480 samples (micro-batches of
    4) from the same weights; the plans each saw before every micro-batch, and JAX's metrics
    of the micro-batches that closed a window. Checks the final weights agree. With
    ``schedule`` (items seen -> factor) both run Adam with that LR schedule over items."""
    batch, params = data(480, seed=seed), init_params()
    model = torch_twin(params)
    if schedule is None:
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule)
        tx = SGD
    else:
        acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=0.01), rule, lr_schedule=schedule)
        tx = optax.chain(optax.adam(0.01), scale_by_items(schedule))
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=params, tx=tx, rule=rule)
    x, y = torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"])
    plans, jax_windows = [], []
    for a in range(0, 480, 4):
        planned = state.planned_micro_batches
        plans.append((acc.planned_micro_batches, None if planned is None else int(planned)))
        acc.backward(torch.nn.functional.cross_entropy(model(x[a:a + 4]), y[a:a + 4]), 4)
        state, metrics = STEP(state, take(batch, slice(a, a + 4)))
        if bool(metrics["stop"]):
            jax_windows.append(metrics)
    twin = torch_twin(state.params)
    for ours, theirs in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)
    return acc, state, plans, jax_windows


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_torch_and_jax_give_the_same_windows_statistics_and_weights(rule) -> None:
    acc, state, _, jax_windows = run_twins(rule, seed=11)
    torch_windows = [r for r in acc.history if r.reason == "rule"]
    sizes = [int(m["items"]) for m in jax_windows]
    assert sizes == [r.items for r in torch_windows]
    assert len(set(sizes)) > 1, f"the rule should adapt on this problem, got windows {sizes}"
    key = "gsnr" if isinstance(rule, GSNR) else "norm_test"
    np.testing.assert_allclose([float(m[key]) for m in jax_windows], [r.info[key] for r in torch_windows],
                               rtol=1e-9)
    assert max_abs_diff(state.params, {k: v for k, v in init_params().items()}) > 1e-3


@pytest.mark.slow
def test_an_lr_schedule_over_items_is_the_same_on_both_backends() -> None:
    """A ramp changes the windows, so the schedule runs over items seen: torch's
    ``lr_schedule`` and optax's ``scale_by_items`` give Adam the same factors and weights."""
    def decay(items):
        return 1.0 / (1.0 + items / 100.0)

    ramp = BatchRamp(8, 32, over=240, micro_batch=4)
    acc, state, _, _ = run_twins(ramp, seed=3, schedule=decay)
    assert len({r.items for r in acc.history}) > 1
    assert int(state.opt_state[1].items_seen()) == sum(r.items for r in acc.history if r.reason == "rule")
    plain, _, _, _ = run_twins(ramp, seed=3, schedule=lambda items: 1.0)
    with torch.no_grad():
        moved = [float((a - b).abs().max()) for a, b in zip(acc.model.parameters(), plain.model.parameters())]
    assert max(moved) > 1e-3  # the schedule changed the run


def test_scale_by_items_refuses_a_call_without_items() -> None:
    tx = scale_by_items(lambda items: 1.0)
    with pytest.raises(TypeError, match="items"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    with pytest.raises(TypeError, match="schedule"):
        scale_by_items(0.5)


# --- non-finite micro-batches ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rule", [FixedSteps(3), GSNR(1e9, increment=4, max_samples=12)], ids=repr)
def test_skip_micro_batch_drops_its_items_and_gradient(rule) -> None:
    batch = data(12, seed=12)
    bad = {"x": batch["x"][4:8].copy(), "y": batch["y"][4:8]}
    bad["x"][1, 2] = np.nan
    clean = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=FixedSteps(2))
    for part in (take(batch, slice(0, 4)), take(batch, slice(8, 12))):
        clean, _ = STEP(clean, part)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=rule)
    state, _ = STEP(state, take(batch, slice(0, 4)))
    state, metrics = STEP(state, bad)
    assert not bool(metrics["finite"]) and int(metrics["items"]) == 4 and int(metrics["micro_batches"]) == 2
    if isinstance(rule, FixedSteps):
        state, metrics = STEP(state, take(batch, slice(8, 12)))
    else:  # the statistics rule needs the cap of 12 samples: give it one more micro-batch
        state, metrics = STEP(state, take(batch, slice(8, 12)))
        assert not bool(metrics["stop"])
        state = jax.jit(AccumulatingTrainState.close_window)(state)
    assert int(state.step) == 1
    assert max_abs_diff(state.params, clean.params) < 1e-12  # the window of the 8 finite samples


def test_skip_window_drops_the_whole_window_without_a_step() -> None:
    batch = data(12, seed=13)
    bad = {"x": batch["x"][4:8].copy(), "y": batch["y"][4:8]}
    bad["x"][0, 0] = np.inf
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=FixedSteps(3),
                                          nonfinite="skip_window")
    for part in (take(batch, slice(0, 4)), bad, take(batch, slice(8, 12))):
        state, metrics = STEP(state, part)
    assert bool(metrics["stop"]) and int(state.step) == 0  # closed, dropped, no optimizer step
    assert max_abs_diff(state.params, init_params()) == 0
    assert int(state.window.items) == 0 and not bool(state.window.poisoned)  # the next window is clean
    state, _ = STEP(state, take(batch, slice(0, 4)))
    assert int(state.window.items) == 4


def nan_gradient_loss(params, batch):
    """Finite losses (sqrt(0) = 0) whose gradient is nan (0/0): only the gradient check can tell."""
    bias = params["Dense_0"]["bias"][0]
    return loss_fn(params, batch) + jnp.sqrt(bias - bias)


@pytest.mark.slow
@pytest.mark.parametrize("nonfinite", ["skip_micro_batch", "skip_window"])
@pytest.mark.parametrize("rule", [FixedSteps(3), GSNR(1e9, increment=4, max_samples=12)], ids=repr)
def test_finite_loss_with_a_nan_gradient_is_caught(rule, nonfinite: str) -> None:
    batch = data(12, seed=16)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=rule,
                                          nonfinite=nonfinite)
    state, _ = STEP(state, take(batch, slice(0, 4)))
    state, bad = make_train_step(nan_gradient_loss)(state, take(batch, slice(4, 8)))
    assert np.isfinite(float(bad["loss"]))
    assert bool(bad["finite"]) == (nonfinite == "skip_window")  # skip_window checks the gradient at the close
    state, metrics = STEP(state, take(batch, slice(8, 12)))
    if nonfinite == "skip_window":  # the window closes at 12 samples / 3 micro-batches, without a step
        assert bool(metrics["stop"]) and int(state.step) == 0
        assert max_abs_diff(state.params, init_params()) == 0
    else:  # the bad micro-batch was dropped: 8 samples over 3 micro-batches
        assert int(metrics["items"]) == 8 and int(metrics["micro_batches"]) == 3
        state = jax.jit(AccumulatingTrainState.close_window)(state)
        assert int(state.step) == 1 and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


# --- checkpoint mid-window ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rule", [FixedSteps(4), GSNR(1.5, increment=4, max_samples=16, scale="mean")], ids=repr)
def test_train_state_resumes_mid_window_exactly(rule) -> None:
    batch = data(64, seed=14)
    parts = [take(batch, slice(a, a + 4)) for a in range(0, 64, 4)]
    straight = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=optax.adam(0.01),
                                             rule=rule)
    for part in parts:
        straight, _ = STEP(straight, part)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=optax.adam(0.01), rule=rule)
    cut = 0
    while cut < 6 or int(state.window.micro_batches) == 0:  # checkpoint where a window is partial
        state, _ = STEP(state, parts[cut])
        cut += 1
    assert int(state.step) >= 1 and cut < len(parts) - 4
    saved = serialization.to_bytes(state)
    template = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(seed=99), tx=optax.adam(0.01),
                                             rule=rule)
    resumed = serialization.from_bytes(template, saved)
    for part in parts[cut:]:
        resumed, _ = STEP(resumed, part)
    assert int(resumed.step) == int(straight.step) > 1
    assert max_abs_diff(resumed.params, straight.params) == 0
    # the control: resuming with the partial window dropped does not give the same weights
    dropped = jax.jit(lambda s: s.replace(window=Window.empty(s.params, window_kind(rule))))(
        serialization.from_bytes(template, saved))
    for part in parts[cut:]:
        dropped, _ = STEP(dropped, part)
    assert max_abs_diff(dropped.params, straight.params) > 1e-6


@pytest.mark.slow
def test_optax_state_resumes_mid_window_exactly() -> None:
    params, batch = init_params(), data(40, seed=15)
    tx = accumulate(optax.adam(0.01), 3)
    update = jax.jit(tx.update)
    mean_grad = jax.jit(jax.grad(lambda p, part: loss_fn(p, part).mean()))  # compiled once, called per part
    grads = [mean_grad(params, take(batch, slice(a, a + 5))) for a in range(0, 40, 5)]

    def run(state, p, gs):
        for g in gs:
            u, state = update(g, state, p, items=5)
            p = optax.apply_updates(p, u)
        return state, p

    _, straight = run(tx.init(params), params, grads)
    half_state, half_params = run(tx.init(params), params, grads[:4])
    assert int(half_state.mini_step) == 1
    restored = serialization.from_bytes(tx.init(init_params(seed=5)), serialization.to_bytes(half_state))
    _, resumed = run(restored, half_params, grads[4:])
    assert max_abs_diff(resumed, straight) == 0


# --- planners: the window's length fixed before it starts, planned inside jit ------------------
PLANNERS = [
    BatchRamp(8, 32, over=160, micro_batch=4),
    BatchRamp(8, 40, over=12, micro_batch=4, unit="steps", stages=3),
    NoiseScalePlanner(c=0.1, min_batch=8, max_batch=64, micro_batch=4, every=2),
    NormTestPlanner(theta=0.9, min_batch=8, max_batch=64, micro_batch=4),
    GSNRPlanner(tau=4.0, min_batch=8, max_batch=64, micro_batch=4),
]


@pytest.mark.slow
@pytest.mark.parametrize("planner", PLANNERS, ids=repr)
def test_torch_and_jax_plan_the_same_windows(planner) -> None:
    """The core's planners run on host records in torch and on the traced state's summary in
    JAX (the same formulas, array code): the same windows, plans and weights."""
    _, _, plans, _ = run_twins(planner, seed=12)
    assert all(a == b for a, b in plans)
    assert len({a for a, _ in plans}) > 1, "the plan should change on this problem"


def test_a_planned_train_state_resumes_mid_window_with_its_plan() -> None:
    planner = NoiseScalePlanner(c=0.1, min_batch=8, max_batch=64, micro_batch=4)
    batch = data(160, seed=13)
    parts = [take(batch, slice(a, a + 4)) for a in range(0, 160, 4)]
    straight = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=planner)
    for part in parts:
        straight, _ = STEP(straight, part)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=planner)
    cut = 0
    while cut < 12 or int(state.window.micro_batches) == 0:
        state, _ = STEP(state, parts[cut])
        cut += 1
    template = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(seed=5), tx=SGD, rule=planner)
    resumed = serialization.from_bytes(template, serialization.to_bytes(state))
    assert int(resumed.planned_micro_batches) == int(state.planned_micro_batches)
    for part in parts[cut:]:
        resumed, _ = STEP(resumed, part)
    assert max_abs_diff(resumed.params, straight.params) == 0
    assert int(resumed.plan.summary.steps) == int(straight.plan.summary.steps) > 3
