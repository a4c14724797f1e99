"""The zoo's patterns that exist in Flax, through the jitted train step, against a loop over samples.

nanoGPT-style LM (token and position embeddings with ``wpe(arange(T))`` broadcast over the
batch, a causal attention block, the head tied through ``Embed.attend``, per-token losses with
padding weighed by token counts), for B != T and B == T; an LSTM tagger (``nn.RNN``); a
ResNet-like CNN with GroupNorm; the reference MLP. Float64 (x64 in conftest.py).
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradaccum import GSNR
from gradaccum.jax import AccumulatingTrainState, make_train_step, statistics_path

from .jax_reference import max_abs_diff, moments_of

F64 = {"param_dtype": jnp.float64}
VOCAB, DIM = 13, 8


class NanoGPT(fnn.Module):
    block: int = 8

    @fnn.compact
    def __call__(self, idx):
        wte = fnn.Embed(VOCAB, DIM, **F64)
        x = wte(idx) + fnn.Embed(self.block, DIM, **F64)(jnp.arange(idx.shape[1]))  # broadcast over B
        h = fnn.LayerNorm(**F64)(x)
        h = fnn.MultiHeadDotProductAttention(num_heads=2, **F64)(h, mask=fnn.make_causal_mask(idx))
        x = x + h
        x = x + fnn.Dense(DIM, **F64)(fnn.gelu(fnn.Dense(4 * DIM, **F64)(fnn.LayerNorm(**F64)(x))))
        return wte.attend(fnn.LayerNorm(**F64)(x))  # tied head


class ResNetLike(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.relu(fnn.Conv(4, (3, 3), **F64)(x))
        # one residual block: a second, identical one adds compile time, not a pattern
        r = fnn.relu(fnn.GroupNorm(num_groups=2, **F64)(fnn.Conv(4, (3, 3), use_bias=False, **F64)(h)))
        h = fnn.relu(h + fnn.GroupNorm(num_groups=2, **F64)(fnn.Conv(4, (3, 3), use_bias=False, **F64)(r)))
        return fnn.Dense(3, **F64)(h.mean(axis=(1, 2)))


class LSTMTagger(fnn.Module):
    @fnn.compact
    def __call__(self, idx):
        h = fnn.RNN(fnn.OptimizedLSTMCell(6, param_dtype=jnp.float64))(fnn.Embed(VOCAB, 6, **F64)(idx))
        return fnn.Dense(VOCAB, **F64)(h)


class MLP(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        for _ in range(2):
            x = fnn.relu(fnn.Dense(16, **F64)(x))
        return fnn.Dense(3, **F64)(x)


def lm_case(block: int, model: fnn.Module | None = None):
    model = NanoGPT(block=block) if model is None else model

    def losses(params, batch):
        """Per-example mean over counted tokens (the weights are the token counts)."""
        logits = model.apply({"params": params}, batch["idx"])
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]) * batch["keep"]
        return per_token.sum(1) / jnp.maximum(batch["keep"].sum(1), 1)

    def batch(n, seed):
        rng = np.random.default_rng(seed)
        keep = (rng.random((n, block)) > 0.3).astype(np.float64)
        keep[:, 0] = 1
        return {"idx": rng.integers(0, VOCAB, (n, block)), "labels": rng.integers(0, VOCAB, (n, block)), "keep": keep}

    return model, losses, batch, lambda b: b["keep"].sum(1).astype(np.int32), lambda b: b["idx"][:1]


def classifier_case(model, shape):
    def losses(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    def batch(n, seed):
        rng = np.random.default_rng(seed)
        return {"x": rng.normal(size=(n, *shape)), "y": rng.integers(0, 3, n)}

    return model, losses, batch, lambda b: np.ones(len(b["y"]), np.int32), lambda b: b["x"][:1]


CASES = {
    "nanogpt": lambda: lm_case(8),
    "nanogpt_B_eq_T": lambda: lm_case(6),
    "lstm": lambda: lm_case(8, LSTMTagger()),
    "resnet_groupnorm": lambda: classifier_case(ResNetLike(), (6, 6, 1)),
    "mlp": lambda: classifier_case(MLP(), (5,)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_jax_zoo_window_moments_equal_the_loop(name: str) -> None:
    model, losses, make_batch, weights_of, first = CASES[name]()
    increments = [make_batch(6, 1), make_batch(6, 2)]
    params = jax.jit(model.init)(jax.random.key(0), first(increments[0]))["params"]
    rule = GSNR(1e9, increment=6, max_samples=64, scale="mean")
    state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1), rule=rule)
    step = make_train_step(losses)
    for batch in increments:
        state, metrics = step(state, batch, weights_of(batch))
    # the reference: one gradient per sample, in a loop (compiled once, not traced per sample)
    sample_grad = jax.jit(jax.grad(lambda p, one, wi: wi * losses(p, one)[0]))
    per_sample = []
    for batch in increments:
        w = weights_of(batch)
        for i in range(6):
            per_sample.append(sample_grad(params, jax.tree.map(lambda v, i=i: v[i:i + 1], batch), w[i]))
    mean, m2 = moments_of(per_sample)
    assert max_abs_diff(state.window.mean, mean) < 1e-12
    assert max_abs_diff(state.window.m2, m2) < 1e-9 * max(float(np.abs(x).max()) for x in jax.tree.leaves(m2))
    want = rule.decision(12, jax.tree.leaves(mean), jax.tree.leaves(m2))[1]["gsnr"]  # the definition, in NumPy
    assert float(metrics["gsnr"]) == pytest.approx(float(want), rel=1e-9)
    if name.startswith("nanogpt"):  # the broadcast position embedding is found, also for B == T
        path = statistics_path(losses, params, increments[0])
        assert path.startswith("vmap") and ("broadcast" in path or "attend" in path), path
