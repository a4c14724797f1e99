"""``accumulate(..., measure_noise=True)``: the optax wrapper measuring the micro-batch noise terms.

The window's unbiased ``tr(Sigma)`` and ``|G|^2`` against a float64 loop over uneven
micro-batches (a window of one micro-batch, a dropped non-finite micro-batch, a micro-batch of
no items, a short last window), eager and under ``jax.jit``; their moving averages and
``noise_scale``; unbiased on the closed-form linear regression problem; and the checkpoint
format: without ``measure_noise`` exactly as before (a state saved before it existed loads),
with it refused across the two settings, naming ``measure_noise``.
"""

from __future__ import annotations

import base64
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from gradaccum.jax import accumulate
from gradaccum.jax._transform import AccumulationState, MeasuringAccumulationState, noise_scale

from .test_micro_batch import per_sample_gradients, regression

DECAY = 0.8
PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(())}

# (items, gradient or None for a NaN one, last): windows of 3 micro-batches unless ``last``
STREAM = [(1, [0.3, -1.2, 2.0, 0.4], False), (4, [1.1, 0.2, -0.7, 0.0], False), (2, [-0.5, 0.9, 0.3, 1.5], False),
          (3, [0.8, 0.8, -0.1, -0.3], False), (2, None, False), (5, [0.2, -0.4, 1.0, 0.6], False),  # NaN dropped
          (6, [1.0, 2.0, 3.0, 4.0], True),  # a window of one micro-batch: nothing measured
          (2, [0.1, 0.5, -0.9, 0.2], False), (0, [9.0, 9.0, 9.0, 9.0], False), (3, [-1.0, 0.3, 0.4, 0.1], True)]
STREAM = [(b, None if v is None else [x + 1.5 for x in v], last) for b, v, last in STREAM]  # a signal to measure


def _grads(values: list[float] | None) -> dict[str, jax.Array]:
    v = np.full(4, np.nan) if values is None else np.asarray(values, np.float64)
    return {"w": jnp.asarray(v[:3]), "b": jnp.asarray(v[3])}


def _reference(stream, every_k: int, decay: float) -> tuple[list[tuple[float, float]], float]:
    """Each closed window's (trace, |G|^2) from the micro-batches' sums ``S_j = b_j u_j`` in
    float64 (NaN below two measured micro-batches), and ``B_simple`` of their bias-corrected
    moving averages, the windows with a finite trace counting."""
    windows, sums, sizes, length = [], [], [], 0
    for items, values, last in stream:
        length += 1
        if values is not None and items > 0:
            sums.append(items * np.asarray(values, np.float64))
            sizes.append(items)
        if length == every_k or last:
            k, n = len(sums), sum(sizes)
            if k >= 2:
                total = np.sum(sums, axis=0)
                weighted = math.fsum(float(s @ s) / b for s, b in zip(sums, sizes))
                trace = (weighted - float(total @ total) / n) / (k - 1)
                windows.append((trace, (float(total @ total) / n - trace) / n))
            else:
                windows.append((math.nan, math.nan))
            sums, sizes, length = [], [], 0
    trace = squared = weight = 0.0
    for t, g in windows:
        if math.isfinite(t):
            trace, squared, weight = (decay * a + (1 - decay) * v for a, v in ((trace, t), (squared, g), (weight, 1)))
    return windows, (trace / weight) / (squared / weight) if squared > 0 else math.inf


@pytest.mark.slow  # compiles the update (over a second)
def test_the_terms_equal_a_float64_loop_over_uneven_micro_batches_under_jit() -> None:
    """Under ``jax.jit`` (the other tests run the update eagerly)."""
    tx = accumulate(optax.sgd(0.0), 3, measure_noise=True, noise_decay=DECAY)
    update = jax.jit(tx.update)
    state = tx.init(PARAMS)
    assert isinstance(state, MeasuringAccumulationState) and math.isnan(float(noise_scale(state)))
    closed = []
    for items, values, last in STREAM:
        _, state = update(_grads(values), state, PARAMS, items=items, last=last)
        if int(state.mini_step) == 0:  # the window closed
            closed.append((float(state.noise.trace), float(state.noise.squared_norm)))
            assert int(state.noise.measured) == 0 and float(state.noise.weighted) == 0.0
    windows, b_simple = _reference(STREAM, 3, DECAY)
    assert len(closed) == len(windows) == 4
    for (trace, squared), (want_trace, want_squared) in zip(closed, windows):
        if math.isnan(want_trace):
            assert math.isnan(trace) and math.isnan(squared)  # nothing measured, never a number
        else:
            assert trace == pytest.approx(want_trace, rel=1e-12)
            assert squared == pytest.approx(want_squared, rel=1e-12)
    assert 0 < b_simple < math.inf and float(noise_scale(state)) == pytest.approx(b_simple, rel=1e-12)
    assert float(noise_scale((optax.EmptyState(), state))) == float(noise_scale(state))  # inside a chain's state


def test_the_open_window_keeps_k_and_the_weighted_squares() -> None:
    tx = accumulate(optax.sgd(0.0), 4, measure_noise=True)
    update, state = jax.jit(tx.update), tx.init(PARAMS)
    for items, values, _ in STREAM[:3]:
        _, state = update(_grads(values), state, PARAMS, items=items)
    want = math.fsum(b * float(np.asarray(v) @ np.asarray(v)) for b, v, _ in STREAM[:3])
    assert int(state.noise.measured) == 3 and float(state.noise.weighted) == pytest.approx(want, rel=1e-13)


@pytest.mark.slow  # compiles the scanned, vmapped update (over a second)
@pytest.mark.parametrize(("k", "anisotropic"), [(2, False), (4, True)])
def test_unbiased_on_linear_regression(k: int, anisotropic: bool) -> None:
    """800 windows of ``k`` uneven micro-batches (1, 2, 3 samples) at fixed parameters, each
    window scanned through the jitted update and the windows vmapped: the averaged terms are
    within 3 standard errors of the closed-form ``tr(Sigma)`` and ``|G|^2``."""
    rng, delta, scales, sigma, trace, squared = regression(5, anisotropic, seed=300 + k)
    windows, sizes = 800, [1 + j % 3 for j in range(k)]
    means = np.stack([np.stack([per_sample_gradients(rng, delta, scales, sigma, b).mean(0) for b in sizes])
                      for _ in range(windows)])  # (windows, k, d): each micro-batch's mean gradient
    tx = accumulate(optax.sgd(0.0), k, measure_noise=True)
    params = jnp.zeros(len(delta))

    def window(grads: jax.Array) -> tuple[jax.Array, jax.Array]:
        def one(state, part):
            g, b = part
            return tx.update(g, state, params, items=b)[1], None
        state, _ = jax.lax.scan(one, tx.init(params), (grads, jnp.asarray(sizes)))
        return state.noise.trace, state.noise.squared_norm

    traces, squares = (np.asarray(a) for a in jax.jit(jax.vmap(window))(jnp.asarray(means)))
    for got, want in ((traces, trace), (squares, squared)):
        assert np.all(np.isfinite(got))
        assert abs(got.mean() - want) < 3 * got.std(ddof=1) / math.sqrt(windows), (got.mean(), want)


@pytest.mark.slow  # compiles the update (over a second)
def test_a_finite_gradient_whose_squares_overflow_is_kept_and_measures_nothing() -> None:
    """float32 elements of 1e20 are finite but their squares are not: the exact element check
    keeps the micro-batch (its gradient steps), and its window's terms are NaN, not infinite."""
    params = {"w": jnp.zeros(2, jnp.float32)}
    tx = accumulate(optax.sgd(1.0), 2, measure_noise=True)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.asarray([1e20, 1.0], jnp.float32)}, state, params, items=1)
    updates, state = tx.update({"w": jnp.asarray([1.0, 2.0], jnp.float32)}, state, params, items=1)
    assert int(state.gradient_step) == 1 and float(updates["w"][0]) == pytest.approx(-5e19, rel=1e-6)
    assert math.isnan(float(state.noise.trace)) and math.isnan(float(state.noise.squared_norm))
    assert float(state.noise.weight) == 0.0 and math.isnan(float(noise_scale(state)))


def test_without_measure_noise_the_state_is_as_before() -> None:
    state = accumulate(optax.sgd(0.1), 3).init(PARAMS)
    assert type(state) is AccumulationState
    assert set(serialization.to_state_dict(state)) == {"mini_step", "items", "grad_sum", "inner_state",
                                                       "gradient_step", "poisoned"}


# A mid-window state of ``accumulate(optax.sgd(0.1, momentum=0.9), 3)`` over params
# {"w": [0, 1, 2], "b": 0.5}, saved with flax.serialization.to_bytes before ``measure_noise``
# existed: one window applied (items 2, 3, 1), one micro-batch of 4 items open.
OLD_CHECKPOINT = (
    "hqltaW5pX3N0ZXDHDgGTkKVpbnQzMsQEAQAAAKVpdGVtc8cUAZOQp2Zsb2F0NjTECAAAAAAAABBAqGdyYWRfc3VtgqFixxQBk5CnZmxvYXQ2NMQI"
    "AAAAAAAA6D+hd8clAZORA6dmbG9hdDY0xBgAAAAAAADwPwAAAAAAAADAAAAAAAAA4D+raW5uZXJfc3RhdGWCoTCBpXRyYWNlgqFixxQBk5CnZm"
    "xvYXQ2NMQIAAAAAAAA1D+hd8clAZORA6dmbG9hdDY0xBirqqqqqqraP6uqqqqqquq/q6qqqqqqyj+hMYCtZ3JhZGllbnRfc3RlcMcOAZOQpWlu"
    "dDMyxAQBAAAAqHBvaXNvbmVkxwoBk5CkYm9vbMQBAA==")
OLD_PARAMS = {"w": jnp.arange(3.0), "b": jnp.asarray(0.5)}
OLD_STREAM = ((2, 1.0), (3, -0.5), (1, 2.0), (4, 0.25), (1, 3.0), (2, -1.0))


def _old_grads(scale: float) -> dict[str, jax.Array]:
    return {"w": jnp.asarray([1.0, -2.0, 0.5]) * scale, "b": jnp.asarray(0.75) * scale}


@pytest.mark.slow  # compiles the update (over a second)
def test_a_checkpoint_saved_before_measure_noise_existed_loads_and_resumes_exactly() -> None:
    tx = accumulate(optax.sgd(0.1, momentum=0.9), 3)
    update = jax.jit(tx.update)
    restored = serialization.from_bytes(tx.init(OLD_PARAMS), base64.b64decode(OLD_CHECKPOINT))
    whole = tx.init(OLD_PARAMS)
    for items, scale in OLD_STREAM[:4]:
        _, whole = update(_old_grads(scale), whole, OLD_PARAMS, items=items)
    for items, scale in OLD_STREAM[4:]:
        got, restored = update(_old_grads(scale), restored, OLD_PARAMS, items=items)
        want, whole = update(_old_grads(scale), whole, OLD_PARAMS, items=items)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))
    assert int(restored.gradient_step) == 2
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, whole))


def test_a_state_of_the_other_setting_is_refused_naming_measure_noise() -> None:
    measuring = accumulate(optax.sgd(0.1, momentum=0.9), 3, measure_noise=True)
    plain = accumulate(optax.sgd(0.1, momentum=0.9), 3)
    with pytest.raises(ValueError, match="saved without measure_noise .* make the optimizer with the measure_noise"):
        serialization.from_bytes(measuring.init(OLD_PARAMS), base64.b64decode(OLD_CHECKPOINT))
    saved = serialization.to_bytes(measuring.init(OLD_PARAMS))
    with pytest.raises(ValueError, match="noise"):  # Flax's own refusal: the fields differ by 'noise'
        serialization.from_bytes(plain.init(OLD_PARAMS), saved)
    grads = _old_grads(1.0)
    with pytest.raises(ValueError, match="made by accumulate\\(..., measure_noise=False\\), updated by one with "
                                         "measure_noise=True"):
        measuring.update(grads, plain.init(OLD_PARAMS), OLD_PARAMS, items=2)
    with pytest.raises(ValueError, match="measure_noise=True\\), updated by one with measure_noise=False"):
        plain.update(grads, measuring.init(OLD_PARAMS), OLD_PARAMS, items=2)
    with pytest.raises(ValueError, match="noise_scale\\(state\\): .*make the optimizer with measure_noise=True"):
        noise_scale(plain.init(OLD_PARAMS))


@pytest.mark.slow  # compiles the update (over a second)
def test_a_measuring_checkpoint_resumes_mid_window_exactly() -> None:
    tx = accumulate(optax.sgd(0.1, momentum=0.9), 3, measure_noise=True)
    update, whole = jax.jit(tx.update), tx.init(OLD_PARAMS)
    for items, scale in OLD_STREAM[:4]:
        _, whole = update(_old_grads(scale), whole, OLD_PARAMS, items=items)
    restored = serialization.from_bytes(tx.init(OLD_PARAMS), serialization.to_bytes(whole))
    for items, scale in OLD_STREAM[4:]:
        _, restored = update(_old_grads(scale), restored, OLD_PARAMS, items=items)
        _, whole = update(_old_grads(scale), whole, OLD_PARAMS, items=items)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b, equal_nan=True)), restored, whole))
    assert float(restored.noise.weight) > 0 and float(noise_scale(restored)) == float(noise_scale(whole))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"measure_noise": 1}, TypeError, "measure_noise must be True or False"),
    ({"measure_noise": True, "noise_decay": 1.0}, ValueError, "noise_decay must be a number in \\(0, 1\\)"),
    ({"measure_noise": True, "noise_decay": 0}, ValueError, "noise_decay must be a number in \\(0, 1\\)"),
])
def test_bad_settings_are_refused_naming_them(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        accumulate(optax.sgd(0.1), 2, **kwargs)


@pytest.mark.slow  # compiles the update (over a second)
def test_a_dropped_window_records_its_terms_and_does_not_join_the_averages() -> None:
    """``nonfinite="skip_window"``: a window with a NaN micro-batch closes without a step; its
    finite micro-batches' terms are recorded, the averages (of applied windows) stay as they were."""
    tx = accumulate(optax.sgd(0.1), 3, nonfinite="skip_window", measure_noise=True)
    state = tx.init(PARAMS)
    stream = [(1, STREAM[0][1], False), (4, STREAM[1][1], False), (2, None, False)]
    for items, values, last in stream:
        _, state = tx.update(_grads(values), state, PARAMS, items=items, last=last)
    (want_trace, want_squared), *_ = _reference(stream, 3, DECAY)[0]
    assert int(state.gradient_step) == 0 and int(state.mini_step) == 0
    assert float(state.noise.trace) == pytest.approx(want_trace, rel=1e-12)
    assert float(state.noise.squared_norm) == pytest.approx(want_squared, rel=1e-12)
    assert float(state.noise.weight) == 0.0 and math.isnan(float(noise_scale(state)))


def test_float16_gradients_measure_their_window_as_float64_does_from_the_same_sums() -> None:
    """A float16 window sum's |S|^2 passes float16's range (65504) long before float32's: it is
    squared in float32, so the window's terms are finite and equal float64's from the same sums."""
    from gradaccum._core.micro_batch import micro_batch_terms

    opt = accumulate(optax.sgd(0.1), 2, measure_noise=True)
    params = {"w": jnp.zeros(1000, jnp.float16)}
    state = opt.init(params)
    rng = np.random.default_rng(0)
    weighted = 0.0
    for _ in range(2):
        u = jnp.asarray(1.0 + 0.1 * rng.normal(size=1000), jnp.float16)
        weighted += 64 * float(np.sum(np.asarray(u, np.float64) ** 2))
        window = state.grad_sum["w"] + u * jnp.asarray(64, jnp.float16)  # the sum the close sees
        _, state = opt.update({"w": u}, state, params, items=64)
    s = np.asarray(window, np.float64)
    want = micro_batch_terms(2, 128, weighted, float(s @ s))
    assert math.isfinite(float(state.noise.trace)) and math.isfinite(float(state.noise.squared_norm))
    assert float(state.noise.trace) == pytest.approx(float(want[0]), rel=1e-3)
    assert float(state.noise.squared_norm) == pytest.approx(float(want[1]), rel=1e-3)
