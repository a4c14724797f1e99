"""Flax's ``examples/lm1b`` with gradaccum: the same train step, windows in the train state.

The structure is lm1b's ``train.py`` and ``models.py``, cut down: a decoder-only
``TransformerLM`` (fixed sinusoidal positions, pre-norm blocks of ``nn.SelfAttention`` and an
MLP, dropout, a ``logitdense`` head) that shifts its inputs right and predicts them, padding
(token 0) weighted out of the cross-entropy, ``optax.adamw`` on a linear warmup then
reciprocal-square-root schedule, a dropout key folded with the step, and evaluation every
``eval_every_steps`` steps. The data is the standard library's source as bytes, one paragraph
per row, padded to one length (so one compilation).

What gradaccum changes (``--mode``):

- ``fixed``: ``AccumulatingTrainState.create(..., rule=FixedSteps(k))`` instead of Flax's
  ``TrainState`` and ``make_train_step(loss_fn, donate=True)`` instead of lm1b's ``train_step``:
  ``loss_fn`` returns each row's mean loss over its tokens and the step takes the rows' token
  counts as ``weights``, so each window's update is that of the mean over the window's tokens.
  ``state.step`` counts optimizer steps (windows), which the schedule counts too.
- ``planned``: the rule is ``NoiseScalePlanner``; the windows' lengths are planned inside the
  jitted step from the noise terms earlier windows measured (``state.plan``). The number of
  steps is then not known in advance: the schedule runs over tokens
  (``gradaccum.jax.scale_by_items``), and training stops after the fixed run's token budget.
- ``monitor``: lm1b's own train step with ``jax.value_and_grad`` replaced by
  ``gradaccum.jax.noise_value_and_grad``, whose noise terms ``gradaccum.MonitorLog`` records.

    python examples/flax_lm.py [--mode fixed|planned|monitor] [--size tiny|real] [--dtype float64]
    python examples/flax_lm.py --check   # fixed windows against the full batch (lm1b's own step), float64
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from flax.training import train_state

from _common import (
    CHECK_WINDOWS,
    VOCAB,
    checked_args,
    documents,
    max_difference,
    parser,
    print_noise_scale,
    report_check,
    report_monitor,
)
from gradaccum import FixedSteps, MonitorLog, NoiseScalePlanner
from gradaccum.jax import AccumulatingTrainState, make_train_step, noise_value_and_grad, scale_by_items


@dataclass(frozen=True)
class Config:
    """lm1b's ``configs/default.py`` (``real``), and a tiny one."""

    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_target_length: int = 32
    train_rows: int = 64
    eval_rows: int = 16
    num_train_steps: int = 6
    eval_every_steps: int = 3
    learning_rate: float = 0.01
    warmup_steps: int = 2
    weight_decay: float = 0.1
    emb_dim: int = 16
    num_heads: int = 2
    num_layers: int = 1
    qkv_dim: int = 16
    mlp_dim: int = 32
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    seed: int = 0


SIZES = {
    "tiny": Config(),
    "real": Config(per_device_batch_size=32, gradient_accumulation_steps=4, max_target_length=128, train_rows=17_000,
                   eval_rows=1_000, num_train_steps=20_000, eval_every_steps=1_000, learning_rate=0.0016,
                   warmup_steps=1_000, emb_dim=512, num_heads=8, num_layers=6, qkv_dim=512, mlp_dim=2048),
}


# --------------------------------------------------------------------------- models.py, cut down

@struct.dataclass
class TransformerConfig:
    vocab_size: int
    dtype: Any = jnp.float32
    emb_dim: int = 512
    num_heads: int = 8
    num_layers: int = 6
    qkv_dim: int = 512
    mlp_dim: int = 2048
    max_len: int = 2048
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    deterministic: bool = False
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.normal(stddev=1e-6)


def shift_right(x: jax.Array) -> jax.Array:
    """Shift the inputs right by one position (a 0 first): position t predicts token t."""
    return jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]


def sinusoidal_init(max_len: int, d_feature: int) -> np.ndarray:
    """lm1b's fixed sinusoidal position table, shape ``(1, max_len, d_feature)``."""
    pe = np.zeros((max_len, d_feature), dtype=np.float32)
    position = np.arange(0, max_len)[:, np.newaxis]
    scale_factor = -np.log(10000.0) / (d_feature // 2 - 1)
    div_term = np.exp(np.arange(0, d_feature // 2) * scale_factor)
    pe[:, :d_feature // 2] = np.sin(position * div_term)
    pe[:, d_feature // 2:2 * (d_feature // 2)] = np.cos(position * div_term)
    return pe[np.newaxis]


class MlpBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        config = self.config
        x = nn.Dense(config.mlp_dim, dtype=config.dtype, kernel_init=config.kernel_init,
                     bias_init=config.bias_init)(inputs)
        x = nn.relu(x)
        x = nn.Dropout(rate=config.dropout_rate)(x, deterministic=config.deterministic)
        output = nn.Dense(inputs.shape[-1], dtype=config.dtype, kernel_init=config.kernel_init,
                          bias_init=config.bias_init)(x)
        return nn.Dropout(rate=config.dropout_rate)(output, deterministic=config.deterministic)


class DecoderBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs: jax.Array, decoder_mask: jax.Array) -> jax.Array:
        config = self.config
        x = nn.LayerNorm(dtype=config.dtype)(inputs)
        x = nn.SelfAttention(num_heads=config.num_heads, dtype=config.dtype, qkv_features=config.qkv_dim,
                             kernel_init=config.kernel_init, bias_init=config.bias_init, use_bias=False,
                             broadcast_dropout=False, dropout_rate=config.attention_dropout_rate,
                             deterministic=config.deterministic)(x, mask=decoder_mask)
        x = nn.Dropout(rate=config.dropout_rate)(x, deterministic=config.deterministic)
        x = x + inputs
        z = nn.LayerNorm(dtype=config.dtype)(x)
        return x + MlpBlock(config=config)(z)


class TransformerLM(nn.Module):
    """lm1b's decoder-only language model (no decoding cache, no packed examples)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        config = self.config
        decoder_mask = nn.combine_masks(nn.make_attention_mask(inputs > 0, inputs > 0, dtype=config.dtype),
                                        nn.make_causal_mask(inputs, dtype=config.dtype))
        y = nn.Embed(num_embeddings=config.vocab_size, features=config.emb_dim,
                     embedding_init=nn.initializers.normal(stddev=1.0))(shift_right(inputs.astype("int32")))
        y = y + sinusoidal_init(config.max_len, config.emb_dim)[:, :inputs.shape[1]]
        y = nn.Dropout(rate=config.dropout_rate)(y, deterministic=config.deterministic)
        y = y.astype(config.dtype)
        for lyr in range(config.num_layers):
            y = DecoderBlock(config=config, name=f"encoderdecoderblock_{lyr}")(y, decoder_mask)
        y = nn.LayerNorm(dtype=config.dtype, name="encoderdecoder_norm")(y)
        return nn.Dense(config.vocab_size, dtype=config.dtype, kernel_init=config.kernel_init,
                        bias_init=config.bias_init, name="logitdense")(y)


# --------------------------------------------------------------------------- train.py, cut down

def rsqrt_schedule(init_value: float, shift: int = 0) -> Callable:
    def schedule(count):
        return init_value * (count + shift) ** -.5 * shift ** .5

    return schedule


def create_learning_rate_schedule(learning_rate: float, warmup_steps: int) -> Callable:
    """A reciprocal-square-root schedule with linear warmup (lm1b's)."""
    return optax.join_schedules([optax.linear_schedule(init_value=0, end_value=learning_rate,
                                                       transition_steps=warmup_steps),
                                 rsqrt_schedule(init_value=learning_rate, shift=warmup_steps)],
                                boundaries=[warmup_steps])


def compute_weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                                   ) -> tuple[jax.Array, jax.Array]:
    """Each row's summed cross-entropy over its weighted positions, and its weight sum (lm1b
    sums over the whole batch; per row here, so that a row is a sample)."""
    loss = -jnp.sum(jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype) * nn.log_softmax(logits), axis=-1)
    return (loss * weights).sum(-1), weights.sum(-1)


def make_loss_fn(model: TransformerLM) -> Callable:
    def loss_fn(params, batch, rng=None):
        """Each row's mean loss over its tokens (padding, token 0, weighted out)."""
        inputs = batch["inputs"]
        weights = jnp.where(inputs > 0, 1, 0).astype(model.config.dtype)
        rngs = None if rng is None else {"dropout": rng}
        logits = model.apply({"params": params}, inputs, rngs=rngs)
        loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights)
        return loss / jnp.maximum(weight_sum, 1)

    return loss_fn


def token_counts(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The rows' item counts: the tokens each row's mean loss is over."""
    return (batch["inputs"] > 0).sum(axis=1).astype(np.int32)


def train_step(state: train_state.TrainState, batch: dict, model: TransformerLM, dropout_rng: jax.Array | None):
    """lm1b's train step, one batch one update (the monitor mode measures it; the check's reference)."""
    inputs = batch["inputs"]
    weights = jnp.where(inputs > 0, 1, 0).astype(model.config.dtype)

    def loss_fn(params):
        rngs = None if dropout_rng is None else {"dropout": jax.random.fold_in(dropout_rng, state.step)}
        logits = model.apply({"params": params}, inputs, rngs=rngs)
        loss, weight_sum = compute_weighted_cross_entropy(logits, inputs, weights)
        return loss.sum() / weight_sum.sum()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}


def monitored_train_step(state: train_state.TrainState, batch: dict, model: TransformerLM,
                         dropout_rng: jax.Array | None):
    """lm1b's train step with ``noise_value_and_grad`` for ``value_and_grad``: the same update,
    plus the batch's noise terms from the same backward."""
    value_and_grad = noise_value_and_grad(make_loss_fn(model))
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, state.step)
    weights = (batch["inputs"] > 0).sum(axis=1).astype(jnp.int32)
    (loss, grads), stats = value_and_grad(state.params, batch, weights, rng=rng)
    return state.apply_gradients(grads=grads), {"loss": loss, **stats}


@functools.partial(jax.jit, static_argnums=2)
def eval_step(params, batch, model: TransformerLM):
    model = TransformerLM(model.config.replace(deterministic=True))  # lm1b's eval_config
    inputs = batch["inputs"]
    weights = jnp.where(inputs > 0, 1.0, 0.0).astype(model.config.dtype)
    loss, weight_sum = compute_weighted_cross_entropy(model.apply({"params": params}, inputs), inputs, weights)
    return loss.sum(), weight_sum.sum()


def evaluate(params, eval_batches: list[dict], model: TransformerLM) -> float:
    sums = [eval_step(params, batch, model) for batch in eval_batches]
    return float(sum(s for s, _ in sums) / sum(w for _, w in sums))


def get_datasets(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one paragraph each, its first ``max_target_length`` bytes, padded with 0."""
    docs = documents()[:cfg.train_rows + cfg.eval_rows]
    rows = np.zeros((len(docs), cfg.max_target_length), np.int32)
    for i, doc in enumerate(docs):
        row = np.frombuffer(doc[:cfg.max_target_length], np.uint8)
        rows[i, :len(row)] = row
    return rows[:cfg.train_rows], rows[cfg.train_rows:]


def batches(rows: np.ndarray, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of ``batch_size`` rows, reshuffled every epoch, forever (lm1b repeats its data)."""
    for epoch in range(1 << 62):
        order = np.random.default_rng((seed, epoch)).permutation(len(rows))
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            yield {"inputs": rows[order[i:i + batch_size]]}


def train_and_evaluate(cfg: Config, mode: str, dtype: Any, deterministic: bool, windows: list | None = None):
    """lm1b's training loop; returns the final state, the model and the initial params.
    ``windows``, if given, receives each window's micro-batches (for the check)."""
    train_rows, eval_rows = get_datasets(cfg)
    eval_batches = [{"inputs": eval_rows[i:i + cfg.per_device_batch_size]}
                    for i in range(0, len(eval_rows), cfg.per_device_batch_size)]
    model = TransformerLM(TransformerConfig(vocab_size=VOCAB, dtype=dtype, emb_dim=cfg.emb_dim,
                                            num_heads=cfg.num_heads, num_layers=cfg.num_layers, qkv_dim=cfg.qkv_dim,
                                            mlp_dim=cfg.mlp_dim, max_len=cfg.max_target_length,
                                            dropout_rate=cfg.dropout_rate,
                                            attention_dropout_rate=cfg.attention_dropout_rate,
                                            deterministic=deterministic))
    rng = jax.random.PRNGKey(cfg.seed)
    rng, init_rng = jax.random.split(rng)
    dropout_rng = None if deterministic else rng
    init = jax.jit(lambda key, x: jax.tree.map(lambda p: p.astype(dtype), model.init(key, x)["params"]))
    params = init(init_rng, jnp.ones((cfg.per_device_batch_size, cfg.max_target_length), jnp.int32))
    initial = jax.tree.map(np.asarray, params)  # a host copy: a donated step invalidates params
    learning_rate_fn = create_learning_rate_schedule(cfg.learning_rate, cfg.warmup_steps)
    adamw = functools.partial(optax.adamw, b1=0.9, b2=0.98, eps=1e-9, weight_decay=cfg.weight_decay)

    if mode == "monitor":  # lm1b's loop as it is, one batch of a window's rows per step
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=adamw(learning_rate_fn))
        step = jax.jit(functools.partial(monitored_train_step, model=model))
        log = MonitorLog()
        train_iter = batches(train_rows, cfg.per_device_batch_size * cfg.gradient_accumulation_steps, cfg.seed)
        for i in range(cfg.num_train_steps):
            state, metrics = step(state, next(train_iter), dropout_rng=dropout_rng)
            metrics = jax.device_get(metrics)
            row = log.record(int(metrics["samples"]), float(metrics["trace"]), float(metrics["squared_norm"]))
            print(f"step {i}: loss {float(metrics['loss']):.4f}, noise scale {row['noise_scale']:.4g} (this batch), "
                  f"{row['noise_scale_ema']:.4g} (moving average)")
            if (i + 1) % cfg.eval_every_steps == 0:
                print(f"step {i + 1}: eval loss {evaluate(state.params, eval_batches, model):.4f}")
        return state, model, initial, log

    tokens_per_step = cfg.gradient_accumulation_steps * cfg.per_device_batch_size * cfg.max_target_length
    if mode == "fixed":
        rule, tx = FixedSteps(cfg.gradient_accumulation_steps), adamw(learning_rate_fn)
    else:  # c * B_simple rows, from one micro-batch to eight nominal windows; the schedule over tokens,
        # in steps' worth of (nominal) tokens
        rule = NoiseScalePlanner(1.0, min_batch=cfg.per_device_batch_size, micro_batch=cfg.per_device_batch_size,
                                 max_batch=8 * cfg.gradient_accumulation_steps * cfg.per_device_batch_size)
        tx = optax.chain(adamw(cfg.learning_rate), scale_by_items(
            lambda tokens: learning_rate_fn(tokens / tokens_per_step) / cfg.learning_rate))
    state = AccumulatingTrainState.create(apply_fn=model.apply, params=params, tx=tx, rule=rule)
    p_train_step = make_train_step(make_loss_fn(model), donate=True)  # jitted; the state is updated in place
    train_iter = batches(train_rows, cfg.per_device_batch_size, cfg.seed)
    max_tokens = cfg.num_train_steps * tokens_per_step  # the planned run's budget
    tokens = loss_sum = 0.0
    window: list = []
    while int(state.step) < cfg.num_train_steps if mode == "fixed" else tokens < max_tokens:
        batch = next(train_iter)
        weights = token_counts(batch)
        state, metrics = p_train_step(state, batch, weights, rng=dropout_rng)
        window.append(batch)
        loss_sum += float(metrics["loss"]) * int(weights.sum())
        if metrics["stop"]:
            items = int(metrics["items"])
            tokens += items
            print(f"step {int(state.step) - 1}: loss {loss_sum / items:.4f}, {int(metrics['micro_batches'])} "
                  f"micro-batches, {items} tokens")
            if windows is not None:
                windows.append(window)
            window, loss_sum = [], 0.0
            if int(state.step) % cfg.eval_every_steps == 0:
                print(f"step {int(state.step)}: eval loss {evaluate(state.params, eval_batches, model):.4f}")
    return state, model, initial, None


def full_batch_reference(initial, windows: list, model: TransformerLM, cfg: Config):
    """lm1b's own train step (Flax's ``TrainState``, ``optax.adamw`` on the schedule) on one big
    batch per window: the window's micro-batches stacked."""
    learning_rate_fn = create_learning_rate_schedule(cfg.learning_rate, cfg.warmup_steps)
    tx = optax.adamw(learning_rate_fn, b1=0.9, b2=0.98, eps=1e-9, weight_decay=cfg.weight_decay)
    state = train_state.TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.asarray, initial), tx=tx)
    step = jax.jit(functools.partial(train_step, model=model, dropout_rng=None))
    for window in windows:
        state, _ = step(state, {"inputs": np.concatenate([b["inputs"] for b in window])})
    return state.params


def main(argv: list[str] | None = None) -> None:
    args = checked_args(parser(__doc__.splitlines()[0]), argv)
    cfg = SIZES[args.size]
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    if args.check:  # no dropout: the reference's one batch cannot draw the micro-batches' masks
        cfg = replace(cfg, num_train_steps=CHECK_WINDOWS, eval_every_steps=CHECK_WINDOWS + 1)
    windows: list | None = [] if args.check else None
    state, model, initial, log = train_and_evaluate(cfg, args.mode, dtype, deterministic=args.check, windows=windows)
    if args.mode == "monitor":
        report_monitor(log.rows, "noise_value_and_grad")
    elif args.mode == "planned":
        summary = jax.device_get(state.plan.summary)  # the moving averages the planner reads
        trace, squared = float(summary.trace), float(summary.squared)
        value = math.nan if float(summary.weight) == 0 else trace / squared if squared > 0 else math.inf
        print_noise_scale(value,
                          f"NoiseScalePlanner, moving average over {int(summary.steps)} windows")
    if args.check:
        reference = full_batch_reference(initial, windows, model, cfg)
        report_check(max_difference(jax.tree.leaves(state.params), jax.tree.leaves(reference)), 1e-10, len(windows))


if __name__ == "__main__":
    main()
