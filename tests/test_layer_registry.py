"""One layer-registry contract in both backends: ``register_layer_stats(*types)(LayerStats(...))``,
checked the same way, found through the type's MRO; a registered Flax layer's closed forms run
and equal a loop over samples in float64."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from torch import nn

from gradaccum import GSNR, NormTest
from gradaccum.torch import LayerStats as TorchLayerStats
from gradaccum.torch import register_layer_stats as torch_register
from gradaccum.torch._stats import REGISTRY as TORCH_REGISTRY

jax = pytest.importorskip("jax")
fnn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")
jnp = jax.numpy

from gradaccum.jax import (  # noqa: E402
    AccumulatingTrainState,
    LayerStats,
    layer_paths,
    make_train_step,
    noise_value_and_grad,
    register_layer_stats,
    statistics_path,
)
from gradaccum.jax._layer_stats import REGISTRY, lookup  # noqa: E402

from .jax_reference import data, max_abs_diff, moments_of  # noqa: E402

# --- torch: the contract's checks ---------------------------------------------------------------


class _TorchCustom(nn.Linear):
    pass


def _torch_entry() -> TorchLayerStats:
    return TorchLayerStats("custom", per_sample=lambda module, args, d: {})


def test_torch_registry_refuses_what_is_not_a_layer_stats_or_a_module_type_and_registers_nothing() -> None:
    with pytest.raises(TypeError, match="register_layer_stats: 'linear' is not an nn.Module subclass"):
        torch_register(_TorchCustom, "linear")(_torch_entry())
    assert _TorchCustom not in TORCH_REGISTRY  # the valid type before the bad one is not registered either
    with pytest.raises(TypeError, match="register_layer_stats takes a LayerStats, got function"):
        torch_register(_TorchCustom)(lambda module, args, d: {})  # type: ignore[arg-type]
    assert _TorchCustom not in TORCH_REGISTRY


# --- JAX: the same contract ---------------------------------------------------------------------


class Scale(fnn.Module):
    """``y = x * w + b`` per feature: not a Flax layer the library knows."""

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("w", fnn.initializers.normal(1.0), (x.shape[-1],), jnp.float64)
        b = self.param("b", fnn.initializers.normal(1.0), (x.shape[-1],), jnp.float64)
        return x * w + b


class Net(fnn.Module):
    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fnn.Dense(3, param_dtype=jnp.float64)(fnn.tanh(Scale()(x)))


MODEL = Net()


def losses_of(model: fnn.Module):
    """``(params, batch) -> per-example losses`` of a classifier."""

    def losses(params, batch) -> jax.Array:
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return losses


losses = losses_of(MODEL)


def windows_by_path(model: fnn.Module, rule, params, batch) -> dict:
    """The window after one micro-batch of ``batch``, on ``path="auto"`` and on ``path="vmap"``."""
    out = {}
    for path in ("auto", "vmap"):
        state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), rule=rule)
        out[path] = make_train_step(losses_of(model), path=path)(state, batch)[0].window
    return out


CALLED: list[str] = []  # which closed forms ran (appended while tracing)


def scale_squares(module, x, d):
    CALLED.append("sum_squares")
    return {"w": ((x * d) ** 2).sum(0), "b": (d * d).sum(0)} if x.ndim == 2 else None


def scale_norms(module, x, d):
    CALLED.append("sum_norms")
    return ((x * d) ** 2).sum() + (d * d).sum() if x.ndim == 2 else None


@pytest.fixture
def registered() -> Iterator[LayerStats]:
    entry = register_layer_stats(Scale)(LayerStats("scale", sum_squares=scale_squares, sum_norms=scale_norms))
    CALLED.clear()
    try:
        yield entry
    finally:
        REGISTRY.pop(Scale, None)


def loop_per_sample(params, batch, mask) -> list:
    """The slow reference: each kept sample's gradient, one ``jax.grad`` at a time (compiled once,
    called per sample)."""
    sample_grad = jax.jit(jax.grad(lambda p, one: losses(p, one)[0]))
    return [sample_grad(params, {k: v[i:i + 1] for k, v in batch.items()}) for i in np.flatnonzero(mask)]


def run(rule, path: str, params, batch, mask):
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=params, tx=optax.sgd(0.1), rule=rule)
    step = make_train_step(losses, path=path)
    for part in (slice(0, 5), slice(5, 10)):
        state, _ = step(state, {k: v[part] for k, v in batch.items()}, mask[part])
    return state


def test_jax_registry_refuses_what_is_not_a_layer_stats_or_a_module_type_and_registers_nothing() -> None:
    with pytest.raises(TypeError, match="register_layer_stats: 'dense' is not a flax.linen.Module subclass"):
        register_layer_stats(Scale, "dense")
    with pytest.raises(TypeError, match="is not a flax.linen.Module subclass"):
        register_layer_stats(nn.Linear)  # a torch layer
    with pytest.raises(TypeError, match="register_layer_stats takes a gradaccum.jax.LayerStats, got function"):
        register_layer_stats(Scale)(scale_squares)
    with pytest.raises(TypeError, match="register_layer_stats takes a gradaccum.jax.LayerStats, got LayerStats"):
        register_layer_stats(Scale)(_torch_entry())  # torch's entry is not JAX's
    assert Scale not in REGISTRY
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        LayerStats(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LayerStats 'scale': sum_norms must be a function or None, got int"):
        LayerStats("scale", sum_norms=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_a_registered_flax_layer_runs_its_closed_forms_and_equals_the_loop(registered, path: str) -> None:
    """Per-element moments and ``sum_i |g_i|^2`` over two masked increments: the custom layer's
    ``sum_squares`` / ``sum_norms`` on ``path="auto"``, the whole model's vmap on ``"vmap"``,
    both equal to a loop over samples in float64."""
    batch, mask = data(10, seed=5), np.array([1, 1, 0, 1, 1, 1, 1, 0, 1, 1])
    params = MODEL.init(jax.random.key(0), batch["x"][:1])["params"]
    want = {"auto": "sum_of_squares", "vmap": "vmap: asked for"}[path]
    assert statistics_path(losses, params, batch, path) == want
    assert layer_paths(losses, params, batch) == {"Scale_0": "sum_of_squares", "Dense_0": "sum_of_squares"}
    assert layer_paths(losses, params, batch, statistics="norms") == {"Scale_0": "norms", "Dense_0": "norms"}
    grads = loop_per_sample(params, batch, mask)
    mean, m2 = moments_of(grads)
    CALLED.clear()
    state = run(GSNR(1e9, increment=10, max_samples=100), path, params, batch, mask)
    assert ("sum_squares" in CALLED) == (path == "auto")
    assert int(state.window.samples) == 8
    assert max_abs_diff(state.window.mean, mean) < 1e-12
    assert max_abs_diff(state.window.m2, m2) < 1e-10
    CALLED.clear()
    state = run(NormTest(1e-9, increment=10, max_samples=100, source="per_sample"), path, params, batch, mask)
    assert ("sum_norms" in CALLED) == (path == "auto")
    total = sum(float((leaf * leaf).sum()) for g in jax.device_get(grads) for leaf in jax.tree.leaves(g))
    np.testing.assert_allclose(float(state.window.sum_norms), total, rtol=1e-12)


def test_without_an_entry_the_layer_takes_its_own_vjp() -> None:
    batch = data(6, seed=6)
    params = MODEL.init(jax.random.key(0), batch["x"][:1])["params"]
    assert statistics_path(losses, params, batch) == "layers"
    assert layer_paths(losses, params, batch)["Scale_0"] == "vmap"


def test_a_subclass_inherits_the_entry_unless_it_overrides_call() -> None:
    """Lookup by MRO, as in torch; a subclass with its own ``__call__`` computes something else,
    which JAX has no check to catch, so it takes its own per-sample VJP (exact)."""

    class Same(fnn.Dense):
        pass

    class Doubled(fnn.Dense):
        def __call__(self, x):
            return 2 * super().__call__(x)

    assert lookup(Same(3)) is lookup(fnn.Dense(3)) is not None
    assert lookup(Doubled(3)) is None

    class Both(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return Doubled(3, param_dtype=jnp.float64)(fnn.tanh(Same(4, param_dtype=jnp.float64)(x)))

    model, batch = Both(), data(6, seed=7)
    params = model.init(jax.random.key(1), batch["x"][:1])["params"]
    assert layer_paths(losses_of(model), params, batch) == {"Same_0": "sum_of_squares", "Doubled_0": "vmap"}
    runs = windows_by_path(model, GSNR(1e9, increment=6, max_samples=64), params, batch)
    assert max_abs_diff(runs["auto"].m2, runs["vmap"].m2) < 1e-10
    assert max_abs_diff(runs["auto"].mean, runs["vmap"].mean) < 1e-12


def test_a_dense_with_its_own_dot_general_takes_its_own_vjp() -> None:
    """``nn.Dense(dot_general=...)`` computes another product than ``x @ kernel``: the closed
    forms decline, and the numbers equal the whole model's vmap."""

    def doubled(*args, **kwargs):
        return 2 * jax.lax.dot_general(*args, **kwargs)

    class Net2(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(3, param_dtype=jnp.float64, dot_general=doubled)(x)

    model, batch = Net2(), data(6, seed=10)
    params = model.init(jax.random.key(2), batch["x"][:1])["params"]
    assert layer_paths(losses_of(model), params, batch, statistics="norms") == {"Dense_0": "vmap"}
    runs = windows_by_path(model, GSNR(1e9, increment=6, max_samples=64), params, batch)
    assert max_abs_diff(runs["auto"].m2, runs["vmap"].m2) < 1e-10
    runs = windows_by_path(model, NormTest(1e-9, increment=6, max_samples=64, source="per_sample"), params, batch)
    np.testing.assert_allclose(float(runs["auto"].sum_norms), float(runs["vmap"].sum_norms), rtol=1e-12)


@pytest.mark.parametrize("answer, message", [
    (lambda x, d: {"w": ((x * d) ** 2).sum(0)}, r"sum_squares must return a dict with one entry per"
                                                r" parameter \['b', 'w'\], got \['w'\]"),
    (lambda x, d: {"w": ((x * d) ** 2).sum(0)[None], "b": (d * d).sum(0)}, r"sum_squares\['w'\] has shape"),
])
def test_a_closed_form_of_the_wrong_parameters_or_shapes_is_refused_naming_the_entry(answer, message: str) -> None:
    register_layer_stats(Scale)(LayerStats("odd", sum_squares=lambda module, x, d: answer(x, d)))
    try:
        batch = data(4, seed=8)
        params = MODEL.init(jax.random.key(0), batch["x"][:1])["params"]
        state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=params, tx=optax.sgd(0.1),
                                              rule=GSNR(1e9, increment=4, max_samples=64))
        with pytest.raises(ValueError, match=rf"LayerStats 'odd' on Scale at Scale_0: {message}"):
            make_train_step(losses)(state, batch)
    finally:
        REGISTRY.pop(Scale, None)


def test_the_computation_path_is_path_and_statistics_says_what_is_measured() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'statistics'"):
        make_train_step(losses, statistics="vmap")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'statistics'"):
        noise_value_and_grad(losses, statistics="vmap")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="path must be one of 'auto', 'vmap', got 'norms'"):
        noise_value_and_grad(losses, path="norms")
    batch = data(4, seed=9)
    params = MODEL.init(jax.random.key(0), batch["x"][:1])["params"]
    with pytest.raises(ValueError, match="path must be one of"):
        statistics_path(losses, params, batch, "elements")
    with pytest.raises(ValueError, match="statistics must be one of 'elements', 'norms', got 'vmap'"):
        layer_paths(losses, params, batch, statistics="vmap")


def test_the_torch_entry_type_is_refused_by_the_jax_registry_and_back() -> None:
    with pytest.raises(TypeError, match="register_layer_stats takes a LayerStats, got LayerStats"):
        torch_register(_TorchCustom)(LayerStats("scale"))  # type: ignore[arg-type]
    assert _TorchCustom not in TORCH_REGISTRY
