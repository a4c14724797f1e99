"""JAX per-sample statistics: the sum-of-squares path and the vmap path against a loop over samples."""

from __future__ import annotations

import functools
import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradaccum import GSNR, FixedSteps, NormTest, WindowView
from gradaccum._core.moments import Moments
from gradaccum.jax import AccumulatingTrainState, layer_paths, make_train_step, statistics_path

from .jax_reference import MODEL, data, init_params, loss_fn, max_abs_diff, moments_of

F64 = {"param_dtype": jnp.float64}


class SequenceNet(fnn.Module):
    """Dense on (B, T, d) inputs (per-sample squares do not factor), pooled, then a 2-D Dense."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.tanh(fnn.Dense(5, **F64)(x.reshape(x.shape[0], 3, 2)))
        return fnn.Dense(3, **F64)(h.mean(1))


class ConvNet(fnn.Module):
    """A Conv layer: no sum-of-squares entry, so the whole model goes through vmap."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.relu(fnn.Conv(2, (3,), **F64)(x[..., None]))
        return fnn.Dense(3, **F64)(h.reshape(h.shape[0], -1))


class SharedDense(fnn.Module):
    """One Dense applied twice: its per-sample gradient is a sum of two outer products."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer = fnn.Dense(6, **F64)
        return fnn.Dense(3, **F64)(layer(fnn.tanh(layer(x))))


def tokens(x: jax.Array) -> jax.Array:
    """Integer tokens in [0, 7) from the float features: a sequence of 6 per sample."""
    return (jnp.abs(x) * 3).astype(jnp.int32) % 7


class TokenNet(fnn.Module):
    """Embed -> LayerNorm -> mean over positions -> Dense: layers with per-layer VJPs."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.LayerNorm(param_dtype=jnp.float64)(fnn.Embed(7, 4, param_dtype=jnp.float64)(tokens(x)))
        return fnn.Dense(3, **F64)(h.mean(1))


class TiedTokenNet(fnn.Module):
    """Embedding tied to the output (``Embed.attend``): the table is used twice per sample."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed = fnn.Embed(3, 4, param_dtype=jnp.float64)
        h = jnp.tanh(fnn.Dense(4, **F64)(embed(tokens(x) % 3).mean(1)))
        return embed.attend(h)


class OwnParam(fnn.Module):
    """A parameter declared next to submodules: no leaf layer owns it."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", fnn.initializers.ones, (6,), jnp.float64)
        return fnn.Dense(3, **F64)(x * scale)


class FrozenBatchNorm(fnn.Module):
    """BatchNorm on running averages (per-sample well defined) holds a second collection."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.BatchNorm(use_running_average=True, dtype=jnp.float64, param_dtype=jnp.float64)(fnn.Dense(5, **F64)(x))
        return fnn.Dense(3, **F64)(h)


MODELS = {"mlp": MODEL, "sequence": SequenceNet(), "conv": ConvNet(), "shared": SharedDense(), "tokens": TokenNet(),
          "tied": TiedTokenNet(), "own_param": OwnParam(), "batch_norm": FrozenBatchNorm()}
PATHS = {"mlp": "sum_of_squares", "sequence": "layers", "conv": "layers",
         "shared": "vmap: a layer with parameters is called more than once", "tokens": "layers",
         "tied": "vmap: Embed at Embed_0 is called through attend", "own_param": "vmap: parameters outside leaf layers",
         "batch_norm": "vmap: BatchNorm at BatchNorm_0"}


def losses_of(model: fnn.Module, extra=None):
    def losses(params, batch):
        logits = model.apply({"params": params, **(extra or {})}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return losses


def reference_moments(losses, params, batch, mask):
    """One jax.grad per kept sample, then mean and M2 by their definitions (the one-sample
    gradient is compiled once and called per sample, not traced per sample)."""
    sample_grad = jax.jit(jax.grad(lambda p, one: losses(p, one)[0]))
    grads = [sample_grad(params, {k: v[i:i + 1] for k, v in batch.items()}) for i in np.flatnonzero(mask)]
    return moments_of(grads)


MASK = np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1])


@functools.cache
def masked_case(name: str):
    """The model ``name`` on 10 examples, 8 of them kept by ``MASK``: its parameters, losses and
    the loop's moments, computed once for the tests of both paths and both kinds of window."""
    model, batch = MODELS[name], data(10, seed=31)
    variables = jax.jit(model.init)(jax.random.key(1), batch["x"][:1])
    params = variables["params"]
    # BatchNorm keeps its statistics in float32 whatever param_dtype says: cast them for a float64 test
    extra = jax.tree.map(lambda v: v.astype(jnp.float64), {k: v for k, v in variables.items() if k != "params"})
    losses = losses_of(model, extra)
    return model, batch, params, losses, reference_moments(losses, params, batch, MASK)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_window_moments_equal_a_loop_over_samples(name: str, path: str) -> None:
    model, batch, params, losses, (mean, m2) = masked_case(name)
    assert statistics_path(losses, params, batch).startswith(PATHS[name])
    mask = MASK
    rule = GSNR(1e9, increment=10, max_samples=100)
    state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), rule=rule)
    step = make_train_step(losses, path=path)
    half = {k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}
    state, _ = step(state, half[0], mask[:5])
    state, metrics = step(state, half[1], mask[5:])  # two increments, merged
    assert int(metrics["items"]) == 8
    assert max_abs_diff(state.window.mean, mean) < 1e-12
    assert max_abs_diff(state.window.m2, m2) < 1e-10 * max(1.0, max(float(np.abs(x).max()) for x in
                                                                     jax.tree.leaves(m2)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_norm_path_equals_a_loop_over_samples(name: str, path: str) -> None:
    """NormTest on the norm path (no per-element moments in the window): after two masked
    increments its ratio and noise scale equal the core rule's on the loop's moments."""
    model, batch, params, losses, (mean, m2) = masked_case(name)
    mask = MASK
    rule = NormTest(1e-9, increment=10, max_samples=100, source="per_sample")
    state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), rule=rule)
    assert state.window.mean is None and state.window.sum_norms is not None
    step = make_train_step(losses, path=path)
    half = {k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}
    state, _ = step(state, half[0], mask[:5])
    state, metrics = step(state, half[1], mask[5:])
    want = rule.decide(WindowView(2, 8, [Moments(8, m, v) for m, v in zip(jax.tree.leaves(mean), jax.tree.leaves(m2))]))
    assert int(metrics["samples"]) == 8
    for key in ("norm_test", "noise_scale"):
        np.testing.assert_allclose(float(metrics[key]), want.info[key], rtol=1e-9)
    if path == "auto" and PATHS[name] == "sum_of_squares":
        assert set(layer_paths(losses, params, half[0], statistics="norms").values()) == {"norms"}


@pytest.mark.slow
def test_sum_of_squares_and_vmap_windows_decide_alike() -> None:
    """Both paths give the same GSNR and windows on a run of the reference MLP."""
    batch = data(240, seed=32)
    rule = GSNR(1.5, increment=4, max_samples=40, scale="mean")
    runs = {}
    for path in ("auto", "vmap"):
        step = make_train_step(loss_fn, path=path)
        state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=optax.sgd(0.1),
                                              rule=rule)
        closed = []
        for a in range(0, 240, 4):
            state, metrics = step(state, {k: v[a:a + 4] for k, v in batch.items()})
            if bool(metrics["stop"]):
                closed.append((int(metrics["items"]), float(metrics["gsnr"])))
        runs[path] = (closed, state.params)
    assert [c[0] for c in runs["auto"][0]] == [c[0] for c in runs["vmap"][0]]
    np.testing.assert_allclose([c[1] for c in runs["auto"][0]], [c[1] for c in runs["vmap"][0]], rtol=1e-9)
    assert max_abs_diff(runs["auto"][1], runs["vmap"][1]) < 1e-12


def test_path_choice_is_checked() -> None:
    with pytest.raises(ValueError, match="path must be one of"):
        make_train_step(loss_fn, path="ghost")


class TrainBatchNorm(fnn.Module):
    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = fnn.BatchNorm(use_running_average=False, dtype=jnp.float64, param_dtype=jnp.float64)(x)
        return fnn.Dense(3, **F64)(h)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_train_mode_batch_norm_is_refused_for_statistics_but_fine_for_fixed_steps(path: str) -> None:
    model, batch = TrainBatchNorm(), data(8, seed=33)
    variables = model.init(jax.random.key(0), batch["x"])

    def losses(params, b):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, b["x"],
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

    def fresh(rule):
        return AccumulatingTrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1),
                                             rule=rule)

    with pytest.raises(ValueError, match="BatchNorm at BatchNorm_0 normalises with batch statistics"):
        make_train_step(losses, path=path)(fresh(GSNR(1.0, increment=8, max_samples=16)), batch)
    state, metrics = make_train_step(losses)(fresh(FixedSteps(1)), batch)
    assert int(state.step) == 1 and bool(metrics["finite"])


@pytest.mark.slow
def test_statistics_path_reports_the_path_that_runs_when_a_closed_form_declines() -> None:
    """A registered closed form that returns None for these shapes: the layer's own VJP
    runs, and ``statistics_path`` / ``layer_paths`` say so (they said "sum_of_squares")."""
    from gradaccum.jax import LayerStats, layer_paths, register_layer_stats
    from gradaccum.jax._layer_stats import REGISTRY

    class Scaled(fnn.Dense):
        pass

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3, **F64)(fnn.tanh(Scaled(4, **F64)(x)))

    model = Net()

    def losses(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    register_layer_stats(Scaled)(LayerStats("declines", sum_squares=lambda module, x, d: None))

    try:
        batch = data(6, seed=2)
        params = jax.jit(model.init)(jax.random.key(0), batch["x"][:1])["params"]
        assert statistics_path(losses, params, batch) == "layers"
        assert layer_paths(losses, params, batch) == {"Scaled_0": "vmap", "Dense_0": "sum_of_squares"}
        state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1),
                                              rule=GSNR(1e9, increment=6, max_samples=64))
        state, _ = make_train_step(losses)(state, batch)
        per_sample = jax.jit(jax.vmap(
            lambda b: jax.grad(lambda p: losses(p, jax.tree.map(lambda v: v[None], b))[0])(params)))(batch)
        mean, m2 = moments_of(per_sample)
        assert max_abs_diff(state.window.mean, mean) < 1e-12 and max_abs_diff(state.window.m2, m2) < 1e-10
    finally:
        REGISTRY.pop(Scaled, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "sequence", "conv", "shared"])
def test_noise_value_and_grad_is_value_and_grad_plus_the_loops_terms(name: str) -> None:
    """The JAX measure-only path: the mean loss and gradient of ``jax.value_and_grad`` and the
    batch's unbiased noise terms, equal to the loop's; a MonitorLog records them."""
    from gradaccum import MonitorLog
    from gradaccum._core.noise_scale import noise_terms
    from gradaccum.jax import noise_value_and_grad

    model, batch = MODELS[name], data(9, seed=33)
    params = jax.jit(model.init)(jax.random.key(2), batch["x"][:1])["params"]
    losses = losses_of(model)
    (loss, grads), stats = jax.jit(noise_value_and_grad(losses))(params, batch)
    want_loss, want_grads = jax.value_and_grad(lambda p: losses(p, batch).mean())(params)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)
    assert max_abs_diff(grads, want_grads) < 1e-12
    mean, m2 = reference_moments(losses, params, batch, np.ones(9))
    trace, squared = noise_terms(9, jax.tree.leaves(mean), jax.tree.leaves(m2))
    assert int(stats["samples"]) == 9
    assert float(stats["trace"]) == pytest.approx(float(trace), rel=1e-9)
    assert float(stats["squared_norm"]) == pytest.approx(float(squared), rel=1e-9, abs=1e-12 * float(trace))
    log = MonitorLog()
    row = log.record(**jax.device_get(stats))
    assert row["noise_scale"] == pytest.approx(float(trace) / float(squared) if float(squared) > 0 else math.inf)
