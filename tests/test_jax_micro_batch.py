"""The JAX train state's micro-batch statistics source (docs/design.md, "Micro-batch statistics").

The window's terms against a float64 NumPy loop over the micro-batches' own gradients (uneven
micro-batches, token weights, a window of one micro-batch, a dropped micro-batch), unbiased on
linear regression at fixed parameters (closed-form noise terms, per element too), under ``jit``
with ``donate=True``, and resumed mid-window from a checkpoint.
"""

from __future__ import annotations

import functools
import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from gradaccum import GSNR, GSNRPlanner, NoiseScalePlanner, NormTest, NormTestPlanner
from gradaccum._core.micro_batch import element_moments, micro_batch_terms
from gradaccum.jax import AccumulatingTrainState, flush, make_train_step, window_kind
from gradaccum.jax._window import squared_norm

from .test_micro_batch import regression

F64 = {"param_dtype": jnp.float64}
NEVER = {"increment": 1, "max_samples": 10**6}  # a rule that decides but never stops before its cap


class TanhNet(fnn.Module):
    """Dense -> tanh -> Dense: every element has a gradient (no dead units)."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fnn.Dense(3, **F64)(jnp.tanh(fnn.Dense(5, **F64)(x)))


NET = TanhNet()


def net_loss(params, batch) -> jax.Array:
    logits = NET.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def token_loss(params, batch) -> jax.Array:
    """Per-example mean over the example's tokens (``batch["m"]`` marks them): weights are token counts."""
    logits = NET.apply({"params": params}, batch["x"])  # (B, T, 3)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return (losses * batch["m"]).sum(1) / jnp.maximum(batch["m"].sum(1), 1)


def _params(seed: int = 0):
    return NET.init(jax.random.key(seed), jnp.zeros((1, 4)))["params"]


def _batches(sizes, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(b, 4)), "y": rng.integers(0, 3, size=b)} for b in sizes]


def _state(rule, params=None, lr: float = 0.0) -> AccumulatingTrainState:
    return AccumulatingTrainState.create(apply_fn=None, params=_params() if params is None else params,
                                         tx=optax.sgd(lr), rule=rule)


@functools.cache
def _summed_grad(loss):
    """The gradient of ``sum_i w_i l_i``, compiled once per loss for all the loops that use it."""
    return jax.jit(jax.grad(lambda p, batch, w: (loss(p, batch) * w).sum()))


def _loop(params, loss, parts) -> tuple[list[np.ndarray], list[int]]:
    """Each micro-batch's gradient sum ``S_j`` (of ``sum_i w_i l_i``, flattened, float64 NumPy) and
    samples ``b_j`` (examples of non-zero weight), one micro-batch at a time."""
    sums, sizes = [], []
    grad = _summed_grad(loss)
    for batch, w in parts:
        grads = grad(params, batch, w)
        sums.append(np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)]))
        sizes.append(int(np.sum(np.asarray(w) > 0)))
    return sums, sizes


def _terms(sums, sizes) -> tuple[float, float, np.ndarray, np.ndarray, int]:
    """By the definitions: ``tr(Sigma)``, ``|G|^2``, the mean and the per-sample variance per element."""
    k, n = len(sums), sum(sizes)
    total = sum(sums)
    mean = total / n
    between = sum(b * (s / b - mean) ** 2 for s, b in zip(sums, sizes))  # sum_j b_j (g_j - g)^2
    variance = between / (k - 1)
    trace = float(variance.sum())
    return trace, float(mean @ mean) - trace / n, mean, variance, n


def _run(rule, loss, parts, **step_kwargs):
    step = make_train_step(loss, **step_kwargs)
    state, metrics = _state(rule), []
    for batch, w in parts:
        state, m = step(state, batch, w)
        metrics.append(m)
    return state, metrics


def _uneven(sizes=(3, 6, 1, 4), width: int = 6):
    """Micro-batches of ``sizes`` examples padded to one shape with weight-0 rows (one compile)."""
    out = []
    for b, batch in zip(sizes, _batches([width] * len(sizes))):
        out.append((batch, np.array([1] * b + [0] * (width - b), np.int32)))
    return out


@pytest.mark.slow
def test_norm_terms_equal_a_float64_loop_over_uneven_micro_batches() -> None:
    parts = _uneven()
    theta = 1e-3
    _, metrics = _run(NormTest(theta, source="micro_batch", **NEVER), net_loss, parts)
    for j in range(1, len(parts)):
        trace, squared, _, _, n = _terms(*_loop(_params(), net_loss, parts[: j + 1]))
        m = metrics[j]
        assert int(m["samples"]) == n
        assert float(m["noise_scale"]) == pytest.approx(trace / squared, rel=1e-9)
        ratio = (trace / n) / (theta**2 * (squared + trace / n))
        assert float(m["norm_test"]) == pytest.approx(ratio, rel=1e-9)
    # one micro-batch: no variance (the rule's ratios are not finite; it does not pass)
    assert not math.isfinite(float(metrics[0]["noise_scale"])) and not math.isfinite(float(metrics[0]["norm_test"]))
    assert not bool(metrics[0]["stop"])


@pytest.mark.slow
def test_per_element_gsnr_equals_a_float64_loop_over_uneven_micro_batches() -> None:
    parts = _uneven()
    for scale in ("sample", "mean"):
        _, metrics = _run(GSNR(1e9, scale=scale, source="micro_batch", **NEVER), net_loss, parts)
        _, _, mean, variance, n = _terms(*_loop(_params(), net_loss, parts))
        want = np.mean(mean**2 / variance) * (n if scale == "mean" else 1)
        assert int(metrics[-1]["zero_variance_elements"]) == 0
        assert float(metrics[-1]["gsnr"]) == pytest.approx(want, rel=1e-9)
        assert math.isnan(float(metrics[0]["gsnr"]))  # one micro-batch: no variance


@pytest.mark.slow
def test_planner_summary_holds_the_window_terms() -> None:
    """A planner's first window (3 micro-batches, planned ahead) adds the loop's terms to its average."""
    parts = _uneven(sizes=(2, 5, 3))
    for planner in (NoiseScalePlanner(c=1.0, min_batch=18, max_batch=60, micro_batch=6, source="micro_batch"),
                    GSNRPlanner(tau=4.0, min_batch=18, max_batch=60, micro_batch=6, source="micro_batch")):
        state, metrics = _run(planner, net_loss, parts)
        assert bool(metrics[-1]["stop"]) and not any(bool(m["stop"]) for m in metrics[:-1])
        trace, squared, _, _, _ = _terms(*_loop(_params(), net_loss, parts))
        summary = state.plan.summary
        assert float(summary.trace / summary.weight) == pytest.approx(trace, rel=1e-9)
        assert float(summary.squared / summary.weight) == pytest.approx(squared, rel=1e-9)


@pytest.mark.slow
def test_token_weights_count_examples_as_samples() -> None:
    """Token counts as weights: ``S_j`` is the gradient of the examples' summed token losses, ``b_j``
    the examples with tokens (an example of weight 0 is padding)."""
    rng = np.random.default_rng(7)
    parts = []
    for b in (4, 4, 4):
        m = (rng.random((b, 5)) < 0.6).astype(np.float64)
        m[0, 0] = 1.0
        m[-1] = 0.0  # a padding example
        batch = {"x": rng.normal(size=(b, 5, 4)), "y": rng.integers(0, 3, size=(b, 5)), "m": m}
        parts.append((batch, m.sum(1).astype(np.int32)))
    _, metrics = _run(NormTest(1e-3, source="micro_batch", **NEVER), token_loss, parts)
    trace, squared, _, _, n = _terms(*_loop(_params(), token_loss, parts))
    assert int(metrics[-1]["samples"]) == n == 9
    assert int(metrics[-1]["items"]) == sum(int(w.sum()) for _, w in parts)
    assert float(metrics[-1]["noise_scale"]) == pytest.approx(trace / squared, rel=1e-9)


@pytest.mark.slow
def test_a_window_of_one_micro_batch_has_no_variance() -> None:
    """The norm test waits for a second micro-batch (theta 10 passes any measured window); a
    window the cap closes after one micro-batch records NaN, which no planner averages."""
    parts = _uneven(sizes=(4, 4))
    _, metrics = _run(NormTest(10.0, increment=4, max_samples=64, source="micro_batch"), net_loss, parts)
    assert not bool(metrics[0]["stop"]) and bool(metrics[1]["stop"])
    _, metrics = _run(NormTest(10.0, increment=4, max_samples=4, source="micro_batch"), net_loss, parts[:1])
    assert bool(metrics[0]["stop"]) and not math.isfinite(float(metrics[0]["noise_scale"]))
    planner = NoiseScalePlanner(c=1.0, min_batch=4, max_batch=64, micro_batch=4, source="micro_batch")
    state, _ = _run(planner, net_loss, parts[:1])
    assert int(state.planned_micro_batches) == 2  # a measuring window has two micro-batches at least
    state = flush(state)
    assert int(state.step) == 1 and float(state.plan.summary.weight) == 0.0  # applied, not measured


def test_planners_plan_two_micro_batches_at_least() -> None:
    for cls, extra in ((NoiseScalePlanner, {"c": 1e-6}), (NormTestPlanner, {"theta": 0.9})):
        for source, fewest in (("micro_batch", 2), ("per_sample", 1)):
            state = _state(cls(min_batch=4, max_batch=64, micro_batch=4, source=source, **extra))
            assert int(state.planned_micro_batches) == fewest


@pytest.mark.slow
def test_a_dropped_micro_batch_is_not_measured() -> None:
    """A micro-batch with a NaN loss is dropped (it counts toward the window's length only): the
    terms are the loop's over the others."""
    parts = _uneven(sizes=(3, 2, 4))
    bad = dict(parts[1][0])
    bad["x"] = bad["x"].copy()
    bad["x"][0, 0] = np.nan
    with_bad = [parts[0], (bad, parts[1][1]), parts[2]]
    for rule in (NormTest(1e-3, source="micro_batch", **NEVER), GSNR(1e9, source="micro_batch", **NEVER)):
        _, metrics = _run(rule, net_loss, with_bad)
        assert not bool(metrics[1]["finite"]) and int(metrics[-1]["micro_batches"]) == 3
        trace, squared, mean, variance, n = _terms(*_loop(_params(), net_loss, [parts[0], parts[2]]))
        assert int(metrics[-1]["samples"]) == n
        if isinstance(rule, NormTest):
            assert float(metrics[-1]["noise_scale"]) == pytest.approx(trace / squared, rel=1e-9)
        else:
            assert float(metrics[-1]["gsnr"]) == pytest.approx(np.mean(mean**2 / variance), rel=1e-9)


def test_a_finite_gradient_whose_square_overflows_is_kept() -> None:
    """float32: a gradient of norm ~1e25 is finite though its squared norm is not; the exact
    element check keeps it (the window is applied), and its statistic is not finite."""
    params = jax.tree.map(lambda p: p.astype(jnp.float32), _params())
    step = make_train_step(lambda p, b: net_loss(p, b) * 1e25)
    state = AccumulatingTrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.0),
                                          rule=NormTest(1e-3, increment=2, max_samples=4, source="micro_batch"))
    for batch in _batches([2, 2]):
        state, m = step(state, {"x": batch["x"].astype(np.float32), "y": batch["y"]})
        assert bool(m["finite"])
    assert bool(m["stop"]) and int(state.step) == 1
    assert not math.isfinite(float(m["noise_scale"]))


TRAINING = [NormTest(0.3, increment=6, max_samples=24, source="micro_batch"),
            GSNR(3.0, scale="mean", increment=6, max_samples=24, source="micro_batch"),
            NoiseScalePlanner(c=2.0, min_batch=12, max_batch=48, micro_batch=6, source="micro_batch")]


@pytest.mark.slow
@pytest.mark.parametrize("rule", TRAINING, ids=["norm_test", "gsnr", "planner"])
def test_jit_with_donate_equals_without(rule) -> None:
    runs = []
    for donate in (False, True):
        step = make_train_step(net_loss, donate=donate)
        state = _state(rule, lr=0.1)
        history = []
        for batch in _batches([6] * 12, seed=11):
            state, m = step(state, batch)
            history.append({k: np.asarray(v).tolist() for k, v in m.items()})
        runs.append((history, jax.tree.map(np.asarray, state.params)))
    np.testing.assert_equal(runs[0][0], runs[1][0])  # NaN equals NaN here (a window's first micro-batch)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(runs[0][1]), jax.tree.leaves(runs[1][1])))
    assert sum(h["stop"] for h in runs[0][0]) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("rule", TRAINING, ids=["norm_test", "gsnr", "planner"])
def test_a_checkpoint_mid_window_resumes_exactly(rule) -> None:
    step = make_train_step(net_loss)
    batches = _batches([6] * 12, seed=12)

    def run(resume_at: int | None) -> tuple[list, list]:
        state, history = _state(rule, lr=0.1), []
        for i, batch in enumerate(batches):
            if i == resume_at:
                assert int(state.window.micro_batches) > 0  # mid-window
                state = serialization.from_bytes(_state(rule, lr=0.1), serialization.to_bytes(state))
            state, m = step(state, batch)
            history.append({k: np.asarray(v).tolist() for k, v in m.items()})
        return history, [np.asarray(x) for x in jax.tree.leaves(state.params)]

    whole = run(None)
    stops = [i for i, h in enumerate(whole[0]) if h["stop"]]
    resumed = run(stops[0] + 2)
    np.testing.assert_equal(resumed[0], whole[0])
    assert all(np.array_equal(a, b) for a, b in zip(whole[1], resumed[1]))


def test_a_checkpoint_of_another_source_is_refused() -> None:
    saved = _state(NormTest(0.3, source="micro_batch"))
    with pytest.raises(ValueError, match="source='micro_batch'.*statistics='norms'"):
        serialization.from_bytes(_state(NormTest(0.3, source="per_sample")), serialization.to_bytes(saved))
    with pytest.raises(ValueError, match="micro-batch norms.*per-element variance of its micro-batches"):
        serialization.from_bytes(_state(GSNR(3.0, source="micro_batch")), serialization.to_bytes(saved))


def test_window_kinds() -> None:
    assert window_kind(NormTest(0.3, source="micro_batch")) == "micro_batch"
    assert window_kind(GSNR(3.0, source="micro_batch")) == "micro_batch_elements"
    assert window_kind(GSNRPlanner(tau=3.0, min_batch=4, max_batch=8, micro_batch=2,
                                   source="micro_batch")) == "micro_batch_elements"
    assert window_kind(NormTest(0.3, source="per_sample")) == "norms" and window_kind(GSNR(3.0)) == "elements"
    state = _state(NormTest(0.3, source="micro_batch"))
    assert state.window.mean is None and state.window.m2 is None and state.window.sum_norms is None  # no buffer
    state = _state(GSNR(3.0, source="micro_batch"))
    assert state.window.mean is None and state.window.m2 is not None  # one parameter-sized buffer


# ------------------------------------------------------- unbiased at fixed parameters (closed form)


def _linear_loss(params, batch) -> jax.Array:
    return (batch["x"] @ params["w"] - batch["y"]) ** 2 / 2


@pytest.mark.slow
@pytest.mark.parametrize("anisotropic", [False, True], ids=["isotropic", "anisotropic"])
@pytest.mark.parametrize("k", [2, 4, 8, 32])
def test_unbiased_on_linear_regression(k: int, anisotropic: bool) -> None:
    """400 windows of ``k`` uneven micro-batches (1, 2, 3 samples) run through the train step,
    scanned over the micro-batches and vmapped over the windows inside one ``jit``: the averaged
    ``tr(Sigma)``, ``|G|^2`` and per-element variances are within 3 standard errors of the
    closed form (``delta = w - w*``; ``y = x . w* + eps``)."""
    rng, delta, scales, sigma, trace, squared = regression(6, anisotropic, seed=200 + k)
    cov = scales**2
    variance = cov * (delta @ (cov * delta) + sigma**2) + (cov * delta) ** 2
    windows, width, d = 400, 3, len(delta)
    x = rng.normal(size=(windows, k, width, d)) * scales
    y = x @ np.zeros(d) - (x @ delta - sigma * rng.normal(size=(windows, k, width)))  # residual x.delta - eps
    sizes = 1 + np.arange(k) % 3
    weights = np.broadcast_to((np.arange(width)[None, :] < sizes[:, None]).astype(np.int32), (windows, k, width))
    params = {"w": jnp.zeros(d)}  # w = 0, w* = -delta: x . w - y = x . delta - eps
    step = make_train_step(_linear_loss, jit=False)
    out = {}
    for name, rule in (("norms", NormTest(1e-9, source="micro_batch", **NEVER)),
                       ("elements", GSNR(1e9, source="micro_batch", **NEVER))):
        start = AccumulatingTrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.0), rule=rule)

        def window(xs, ys, ws, start=start):
            def micro(state, part):
                return step(state, {"x": part[0], "y": part[1]}, part[2])[0], None
            return jax.lax.scan(micro, start, (xs, ys, ws))[0].window

        out[name] = jax.jit(jax.vmap(window))(x, y, weights)
    w = out["norms"]
    terms = jax.vmap(lambda w: micro_batch_terms(w.measured, w.samples, w.weighted, squared_norm(w.grad_sum)))(w)
    w = out["elements"]
    per_element = jax.vmap(lambda w: element_moments(w.measured, w.samples, w.grad_sum["w"], w.m2["w"]))(w)
    estimates = [(np.asarray(terms.trace), trace), (np.asarray(terms.squared_norm), squared),
                 (np.asarray(per_element.m2) / (np.asarray(per_element.n)[:, None] - 1), variance)]
    assert np.all(np.asarray(w.measured) == k)
    for values, want in estimates:
        mean, error = values.mean(0), values.std(0, ddof=1) / math.sqrt(windows)
        assert np.all(np.abs(mean - want) <= 3 * error), (mean, want, error)
