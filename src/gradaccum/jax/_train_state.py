"""A Flax ``TrainState`` that accumulates, and the jitted step that drives it.

The window lives in the state (``state.window``), so checkpointing the state keeps a
partial window; the optimizer update runs under ``jax.lax.cond`` only when the rule
closes the window, so a micro-step that only accumulates never pays for it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct
from flax.training import train_state
from flax.training.train_state import OVERWRITE_WITH_GRADIENT

from .._core.config import AccumulationConfig, as_rule
from .._core.micro_batch import micro_batch_terms
from .._core.moments import moments_from_sums
from .._core.noise_scale import noise_terms, window_terms
from .._core.planners import Planner, PlanSummary, after_window, is_planner
from .._core.rules import FixedSteps, StoppingRule, statistics_kind, statistics_source
from .._core.statistics import gsnr_of
from .._core.validation import check_choice
from ._decisions import traced_decision
from ._layer_stats import LOG, PATHS, statistics_path, sums_and_squares
from ._refusal import reraised
from ._window import (
    COUNT_MAX,
    Window,
    all_finite,
    check_counts,
    increment_moments,
    increment_norms,
    squared_norm,
    unzip,
    weighted_sum,
)

NONFINITE_POLICIES = ("skip_micro_batch", "skip_window")
LossFn = Callable[..., jax.Array]  # (params, batch) or, with rng, (params, batch, rng) -> per-example losses


class PlanState(NamedTuple):
    """A planner's state in the train state: the summary of the windows so far (the core's
    ``PlanSummary``, as arrays updated at every close) and the current window's length."""

    summary: PlanSummary
    planned: jax.Array

    @classmethod
    def start(cls, planner: Any, params: Any) -> PlanState:
        dtype = jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32)
        # a buffer of its own per field: a donated step donates each leaf, and one buffer
        # shared by two leaves would be donated twice
        summary = PlanSummary(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                              *(jnp.zeros((), dtype) for _ in range(4)))
        return cls(summary, jnp.asarray(planner.plan_from(summary), jnp.int32))

    def after(self, planner: Any, window: Window, applied: jax.Array) -> PlanState:
        """The state after ``window`` closed: its items and (noise planners) its noise terms
        join the summary; the plan is renewed at the planner's boundaries (``every``)."""
        dtype = self.summary.trace.dtype
        signal = jnp.zeros((), dtype)
        if window.sum_norms is not None:
            trace, squared = window_terms(window.samples, window.sum_norms, squared_norm(window.grad_sum))
        elif window.weighted is not None:  # the micro-batch source's norm statistics
            trace, squared = micro_batch_terms(window.measured, window.samples, window.weighted,
                                               squared_norm(window.grad_sum))
        elif window.m2 is not None:  # per-element moments: the noise terms and the GSNR signal
            means, m2s = window.element_moments()
            trace, squared = noise_terms(window.samples, means, m2s)
            gsnr = gsnr_of(means, m2s, window.samples, "sample")[0]
            signal = (gsnr - 1 / jnp.maximum(window.samples, 1)).astype(dtype)
        else:
            trace = squared = jnp.zeros((), dtype)
        counts = applied & (window.samples >= 2) & jnp.isfinite(trace) if planner.needs_statistics \
            else jnp.zeros((), bool)
        decay = getattr(planner, "decay", 0.9)
        summary = after_window(self.summary, decay, window.items, counts, trace.astype(dtype), squared.astype(dtype),
                               signal)
        boundary = summary.steps % getattr(planner, "every", 1) == 0
        planned = jnp.where(boundary, jnp.asarray(planner.plan_from(summary), jnp.int32), self.planned)
        return PlanState(summary, planned)


class AccumulatingTrainState(train_state.TrainState):
    """``TrainState`` plus a partial accumulation window and the rule that closes it.

    ``step`` counts optimizer steps (windows applied), as in Flax. Create it with
    ``AccumulatingTrainState.create(apply_fn=..., params=..., tx=..., rule=...)``; ``rule``
    is a stopping rule (``FixedSteps(k)``, ``GSNR(...)``, ``NormTest(...)``) or an
    ``AccumulationConfig``. ``nonfinite`` says what a micro-batch with a non-finite loss
    or gradient does: ``"skip_micro_batch"`` (checked per micro-batch: it counts toward
    the window's length, its items and gradient are dropped) or ``"skip_window"`` (the
    whole window is dropped without an optimizer step; the loss is checked per
    micro-batch, the gradient once when the window closes, which is cheaper).
    """

    rule: StoppingRule = struct.field(pytree_node=False)
    nonfinite: str = struct.field(pytree_node=False)
    window: Window
    plan: PlanState | None = None

    @classmethod
    def create(cls, *, apply_fn: Any, params: Any, tx: Any,
               rule: StoppingRule | Planner | AccumulationConfig | None = None,
               nonfinite: str = "skip_micro_batch", **kwargs: Any) -> AccumulatingTrainState:
        """A new state with ``step=0``, ``tx.init(params)`` and an empty window shaped like ``params``."""
        if rule is None:
            raise TypeError("rule is required: a stopping rule such as gradaccum.FixedSteps(4) or an "
                            "AccumulationConfig")
        stopping: StoppingRule = as_rule(rule)  # a stopping rule or a planner
        if not is_planner(stopping):
            traced_decision(stopping)
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        leaves = jax.tree.leaves(params)
        if not leaves:
            raise ValueError("params must hold at least one array")
        for leaf in leaves:
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                raise TypeError(f"params must hold floating-point arrays, got one of dtype {jnp.asarray(leaf).dtype}")
        window = Window.empty(params, window_kind(stopping))
        plan = PlanState.start(stopping, params) if is_planner(stopping) else None
        state = super().create(apply_fn=apply_fn, params=params, tx=tx, rule=stopping, nonfinite=nonfinite,
                               window=window, plan=plan, **kwargs)
        # a typed step counter: a Python 0 would make the first step's state differ in type
        # from the next one's, and the jitted step compile twice
        return _unshared(state.replace(step=jnp.zeros((), jnp.int32)))

    def close_window(self) -> AccumulatingTrainState:
        """Apply the window's mean gradient (unless it is empty or poisoned) and start a new one.

        The window counts as closed even when it holds no micro-batch (a planner's summary
        counts it); ``flush`` leaves an empty window alone."""
        window = self.window
        grads = window.mean_gradient()
        apply = (window.items > 0) & ~window.poisoned & all_finite(grads)
        stepped = jax.lax.cond(apply, lambda s: s.apply_gradients(grads=grads, items=window.items), lambda s: s, self)
        plan = None if self.plan is None else self.plan.after(self.rule, window, apply)
        return stepped.replace(window=Window.empty(self.params, window_kind(self.rule)), plan=plan)

    def apply_gradients(self, *, grads: Any, items: Any = None, **kwargs: Any) -> AccumulatingTrainState:
        """Flax's ``apply_gradients``; with ``items`` (the window's item count) an optimizer that
        takes optax's extra arguments gets it, which ``scale_by_items`` (an LR schedule over items
        seen) reads."""
        if items is None or not isinstance(self.tx, optax.GradientTransformationExtraArgs) \
                or OVERWRITE_WITH_GRADIENT in grads:
            return super().apply_gradients(grads=grads, **kwargs)
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, items=items)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, **kwargs)

    @property
    def planned_micro_batches(self) -> jax.Array | None:
        """With a planner, the micro-batches of the current window (fixed before it starts),
        as ``Accumulator.planned_micro_batches`` in torch; None with a stopping rule."""
        return None if self.plan is None else self.plan.planned


def _unshared(tree: Any) -> Any:
    """``tree`` with every buffer that a leaf shares with an earlier leaf copied.

    A donated step donates each leaf of the state, and XLA refuses a buffer donated twice
    ("Attempt to donate the same buffer twice"): an optimizer whose state starts as the
    parameters themselves, or params holding one array twice, would crash the first step."""
    seen: set[Any] = set()

    def own(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array):
            return leaf
        buffers = _buffers(leaf)
        if buffers & seen:
            return jnp.copy(leaf)
        seen.update(buffers)
        return leaf

    return jax.tree.map(own, tree)


def _buffers(leaf: jax.Array) -> set[Any]:
    """The device buffers of ``leaf`` (its identity where they cannot be read)."""
    if leaf.size == 0:
        return {id(leaf)}  # nothing to donate; empty buffers may share an address
    try:
        return {(str(shard.device), shard.data.unsafe_buffer_pointer()) for shard in leaf.addressable_shards}
    except (AttributeError, RuntimeError, NotImplementedError):
        return {id(leaf)}


# --- restoring a checkpoint: the saved window must be the one the target's rule keeps ----------

_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(AccumulatingTrainState)
                     if f.metadata.get("pytree_node", True))


def _state_dict(state: AccumulatingTrainState) -> dict[str, Any]:
    """Flax's state dict of the train state, plus the rule it was saved under (its repr), so
    restoring it under another rule names both."""
    out: dict[str, Any] = {name: serialization.to_state_dict(getattr(state, name)) for name in _DATA_FIELDS}
    out["rule"] = repr(state.rule)
    return out


def _from_state_dict(target: AccumulatingTrainState, state: Any) -> AccumulatingTrainState:
    """Restore ``state`` into ``target`` after checking that it holds the window (and plan)
    that ``target``'s rule keeps; a state saved under another kind of rule is refused with
    both named, instead of failing inside Flax (AttributeError) or, for a planner's state
    restored under a stopping rule, loading a plan nothing reads."""
    if not isinstance(state, dict) or not isinstance(state.get("window"), dict):
        raise ValueError(f"state must be the state dict of an AccumulatingTrainState (with a 'window'), "
                         f"got {type(state).__name__}")
    found = _layout(_saved_kind(state["window"]), state.get("plan") is not None)
    expected = _layout(window_kind(target.rule), target.plan is not None)
    if found != expected:
        saved = state.get("rule", "a rule this version did not record")
        raise ValueError(f"cannot restore a train state saved under {saved} ({found}) into one whose rule is "
                         f"{target.rule!r} ({expected}): create the target state with the rule it was saved with")
    state = dict(state)
    state.pop("rule", None)
    missing = [name for name in _DATA_FIELDS if name not in state]
    if missing or set(state) - set(_DATA_FIELDS):
        raise ValueError(f"state dict of an AccumulatingTrainState: missing {missing}, unknown "
                         f"{sorted(set(state) - set(_DATA_FIELDS))}")
    return target.replace(**{name: serialization.from_state_dict(getattr(target, name), state[name], name=name)
                             for name in _DATA_FIELDS})


def _saved_kind(window: dict[str, Any]) -> str:
    if window.get("mean") is not None:
        return "elements"
    if window.get("measured") is not None:
        return "micro_batch" if window.get("weighted") is not None else "micro_batch_elements"
    return "norms" if window.get("sum_norms") is not None else "none"


def _layout(kind: str, planned: bool) -> str:
    """What a window of ``kind`` keeps, in words, and whether a plan comes with it."""
    words = {"none": "a window of gradient sums",
             "elements": "a window of per-element gradient moments (statistics='elements')",
             "norms": "a window of gradient sums and per-sample norms (statistics='norms')",
             "micro_batch": "a window of gradient sums and micro-batch norms (source='micro_batch')",
             "micro_batch_elements": "a window of gradient sums and the per-element variance of its micro-batches "
                                     "(source='micro_batch', statistics='elements')"}[kind]
    return f"{words} and a planner's plan" if planned else f"{words}, no plan"


serialization.register_serialization_state(AccumulatingTrainState, _state_dict, _from_state_dict, override=True)


def window_kind(rule: StoppingRule) -> str:
    """What the window keeps for ``rule`` (``Window.empty``): ``"none"``; per-sample statistics,
    ``"elements"`` or ``"norms"``; or, with ``source="micro_batch"``, ``"micro_batch"`` (norm
    statistics) or ``"micro_batch_elements"`` (per-element)."""
    if not rule.needs_statistics:
        return "none"
    kind = statistics_kind(rule)
    if statistics_source(rule, elements=True, backend="the JAX backend") == "per_sample":
        return kind
    return "micro_batch" if kind == "norms" else "micro_batch_elements"


def make_train_step(loss_fn: LossFn, *, path: str = "auto", donate: bool = False, jit: bool = True
                    ) -> Callable[..., tuple[AccumulatingTrainState, dict]]:
    """The step ``(state, batch, weights=None, *, mask=None, rng=None) -> (state, metrics)`` for one micro-batch.

    ``loss_fn(params, batch)`` returns the per-example losses, shape ``(B,)``, floating point
    (an integer loss has no gradient and is refused); every leaf
    of ``batch`` has the examples on its leading axis. ``weights`` (shape ``(B,)``,
    non-negative integers) are the examples' item counts: with per-example losses that
    are means over each example's tokens, pass the token counts and the window's gradient
    is the mean over the window's tokens, as ``Accumulator.backward(loss, count)`` gives
    in torch. A weight of 0 leaves an example out (padding: a short last micro-batch
    need not change shapes). ``mask`` is the same with 0/1 values only. Without either,
    every example counts once. The window's gradient is ``sum_i w_i grad l_i / sum_i w_i``
    over all its examples, whatever the micro-batch sizes.

    Dropout and other randomness: pass a PRNG key as ``rng`` and write
    ``loss_fn(params, batch, rng)``, for instance
    ``model.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})``.
    The step folds the position of the micro-batch into it,
    ``rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), state.window.micro_batches)``,
    so the same key may be passed at every call (as Flax's examples fold in the step) and
    every micro-batch of every window draws its own masks; a fresh key per call works too.
    The window's gradient is that of the losses computed with those masks. Per-sample
    statistics are exact under dropout too: on the one-backward paths the samples' gradients
    come from the batch's own forward; on the per-example ``vmap`` path each example's loss is
    computed alone, with the key folded with its index in the micro-batch
    (``jax.random.fold_in(rng, i)``), so examples still draw independent masks.

    With a rule that needs statistics, each micro-batch is an increment whose moments
    are merged into the window's (the core's ``chan_merge``); a sample is an example of
    non-zero weight and its gradient is that of ``w_i l_i``.
    ``path`` says how they are computed (which statistics, ``"elements"`` or ``"norms"``, is
    the rule's ``statistics``): ``path="auto"`` takes the per-sample sums of squares from one
    backward pass when every parameter belongs to a leaf Flax layer called once (closed form
    for ``nn.Dense`` and the layers given to ``register_layer_stats``, a per-layer vmap for
    others; see ``statistics_path``), else per-example gradients from
    ``jax.vmap(jax.grad(...))``; ``path="vmap"`` always uses the latter (exact two-pass
    moments in float32 too).

    Weights given as concrete arrays are checked before the jitted step runs (finite,
    non-negative integers up to int32's largest value, adding up to no more than it; 0/1 for
    ``mask``): a fractional or negative count, or an int32 sum that wraps, would silently
    change the window's item count. A micro-batch whose items would take the window past that
    value is refused too (a window counts its items in int32).

    ``donate=True`` donates the state passed in to the step (``donate_argnums=0``): XLA then
    updates params, optimizer state and window in place instead of copying them through
    the ``lax.cond`` (measured 1.6x faster on a 1.6M-parameter MLP); the old state and
    every array it shares (the ``params`` it was created from) are invalid afterwards, also
    when the compiled step raises (a ``scale_by_items`` factor refused as it runs); the
    checks made before it runs (weights, counts) leave the state passed in usable.

    ``metrics`` holds ``loss`` (mean over this micro-batch's items), ``stop`` (the window
    closed), ``finite`` (loss and gradient; the loss only under ``"skip_window"``), ``items``,
    ``samples`` and ``micro_batches`` of the window so far (before a close resets it),
    ``step``, and the rule's info (``gsnr``, ``norm_test``, ...).
    """
    check_choice("path", path, PATHS)
    step = partial(_train_step, loss_fn, path)
    jitted = step if not jit else jax.jit(step, donate_argnums=0) if donate else jax.jit(step)
    takes_rng: list[bool] = []  # checked once, at the first call with rng
    largest = [0]  # the most items a concrete micro-batch has had: bounds the windows' counts

    def checked_step(state: AccumulatingTrainState, batch: Any, weights: Any = None, *, mask: Any = None,
                     rng: Any = None) -> tuple[AccumulatingTrainState, dict]:
        if mask is not None:
            if weights is not None:
                raise ValueError("pass weights or mask, not both (a mask is 0/1 weights)")
            (weights, items), name = _check_weights("mask", mask, binary=True), "mask"
        elif weights is not None:
            (weights, items), name = _check_weights("weights", weights, binary=False), "weights"
        else:
            items, name = _leading_size(batch), "batch"
        if items is not None:
            largest[0] = max(largest[0], items)
            _check_room(name, state, items, largest[0])
        if rng is not None and not takes_rng:
            _check_takes_rng(loss_fn)
            takes_rng.append(True)
        try:
            return jitted(state, batch, weights, rng)
        except jax.errors.JaxRuntimeError as error:
            reraised(error)

    checked_step.jitted = jitted  # type: ignore[attr-defined]
    return checked_step


def _check_takes_rng(loss_fn: LossFn) -> None:
    """With ``rng``, ``loss_fn`` is called as ``loss_fn(params, batch, rng)``: say so if it cannot be."""
    try:
        inspect.signature(loss_fn).bind(None, None, None)
    except TypeError:
        raise TypeError(f"rng is passed to loss_fn as a third argument, loss_fn(params, batch, rng), but "
                        f"{getattr(loss_fn, '__name__', loss_fn)}{inspect.signature(loss_fn)} does not take it: "
                        "add the rng parameter (and pass it to apply as rngs={'dropout': rng})") from None
    except ValueError:  # no signature to read (a builtin): the call will tell
        pass


def _check_weights(name: str, weights: Any, binary: bool) -> tuple[Any, int | None]:
    """Refuse weights that would silently change the item count (when they are concrete);
    the weights and their sum (None when traced)."""
    if isinstance(weights, jax.core.Tracer):
        return weights, None
    if np.ndim(weights) != 1:
        raise ValueError(f"{name} must be a vector with one value per example, got shape {np.shape(weights)}")
    counts = check_counts(name, weights, binary=binary)
    if counts is None:  # traced after all: the step's to get right
        return weights, None
    return weights, int(counts.astype(np.int64).sum())


def _leading_size(batch: Any) -> int | None:
    leaves = jax.tree.leaves(batch)
    return int(np.shape(leaves[0])[0]) if leaves and np.ndim(leaves[0]) else None


def _check_room(name: str, state: AccumulatingTrainState, items: int, largest: int) -> None:
    """Refuse a micro-batch whose items would take the window past int32's largest count (the
    sum would wrap and the window be dropped). Where the rule bounds the micro-batches of a
    window and they cannot reach it at the largest micro-batch seen, this is arithmetic; else
    (windows near 2**31 items, or a rule of unknown length) it reads the window's count."""
    bound = _micro_batch_bound(state.rule)
    held = state.window.items
    if (bound is not None and bound * largest <= COUNT_MAX) or isinstance(held, jax.core.Tracer):
        return
    count = int(held)
    if count + items > COUNT_MAX:
        raise ValueError(f"{name}: the window holds {count} items and this micro-batch adds {items}, more than the "
                         f"{COUNT_MAX} its int32 count can hold: close windows sooner (a smaller rule, or flush()) "
                         "or pass smaller item counts")


def _micro_batch_bound(rule: Any) -> int | None:
    """The most micro-batches with items that one window holds under ``rule`` (None: unknown)."""
    if isinstance(rule, FixedSteps):
        return rule.k
    max_samples = getattr(rule, "max_samples", None)  # GSNR, NormTest: each micro-batch with items adds a sample
    if isinstance(max_samples, int):
        return max_samples
    top, micro = getattr(rule, "end", None) or getattr(rule, "max_batch", None), getattr(rule, "micro_batch", None)
    if isinstance(top, int) and isinstance(micro, int) and micro > 0:  # the planners' largest window
        return max(-(-top // micro), 1)
    return None


def _check_batch(batch: Any, weights: jax.Array | None) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("batch must hold at least one array")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(f"every array in batch must have the examples on its leading axis, got leading sizes {sizes}")
    size = int(jnp.shape(leaves[0])[0])  # the one leading size (the check above)
    if size < 1:
        raise ValueError("batch must hold at least one example, got an empty micro-batch")
    if weights is not None and jnp.shape(weights) != (size,):
        raise ValueError(f"weights (or mask) must have shape ({size},) like the batch, got {jnp.shape(weights)}")
    return size


def _with_key(loss_fn: LossFn, key: jax.Array | None) -> Callable[[Any, Any], jax.Array]:
    """``loss_fn`` as ``(params, batch) -> losses``, with ``key`` as its third argument if given."""
    return loss_fn if key is None else (lambda params, batch: loss_fn(params, batch, key))


def _check_losses(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, size: int) -> None:
    """Refuse, at trace time, losses that are not per-example or not floating point (an
    integer loss has no gradient: the window would silently get zeros)."""
    losses = jax.eval_shape(loss_fn, params, batch)
    if not isinstance(losses, jax.ShapeDtypeStruct) or losses.shape != (size,):
        raise ValueError(f"loss_fn must return per-example losses of shape ({size},), got "
                         f"{getattr(losses, 'shape', type(losses).__name__)}")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return floating-point losses, got dtype {losses.dtype}: an integer or boolean "
                        "loss has no gradient (every window would get zeros); return the losses before rounding "
                        "or casting them")


def _summed_loss(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, weights: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    total = weighted_sum(loss_fn(params, batch), weights)
    return total, total


def _example_loss(loss_fn: Callable[[Any, Any], jax.Array], params: Any, example: Any) -> jax.Array:
    return loss_fn(params, jax.tree.map(lambda x: x[None], example))[0]


def _per_example(loss_fn: LossFn, key: jax.Array | None, params: Any, batch: Any) -> tuple[jax.Array, Any]:
    """Per-example losses and gradients by ``vmap``, each example's loss computed alone; with
    ``key``, example ``i`` gets ``fold_in(key, i)`` (independent dropout masks, as in the batch)."""
    if key is None:
        return jax.vmap(jax.value_and_grad(partial(_example_loss, loss_fn)), in_axes=(None, 0))(params, batch)

    def example_loss(p: Any, example: Any, index: jax.Array) -> jax.Array:
        return loss_fn(p, jax.tree.map(lambda x: x[None], example), jax.random.fold_in(key, index))[0]

    size = jax.tree.leaves(batch)[0].shape[0]
    return jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(params, batch, jnp.arange(size))


def _zero_unless(finite: jax.Array, tree: Any) -> Any:
    """``tree`` where ``finite``, else zeros: a dropped micro-batch adds nothing but its length.

    A select XLA fuses into the addition that follows, where a ``lax.cond`` would copy
    the window's buffers on every micro-step.
    """
    return jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), tree)


def _increment(loss_fn: LossFn, path: str, params: Any, batch: Any, weights: jax.Array,
               key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any, Any]:
    """Per-example losses and the count, mean and M2 of this micro-batch's per-sample
    gradients of the weighted losses."""
    batched = _with_key(loss_fn, key)
    taken = statistics_path(batched, params, batch, path)
    LOG.info("per-sample statistics by %s", taken)
    if not taken.startswith("vmap"):
        losses, s1, s2 = sums_and_squares(batched, params, batch, weights)
        n = (weights > 0).sum(dtype=jnp.int32)
        pairs = jax.tree.map(lambda a, b: moments_from_sums(n, a, b)[1:], s1, s2)  # (mean, m2) per leaf
        return losses, n, *unzip(pairs, params)
    losses, per_sample = _per_example(loss_fn, key, params, batch)
    return losses, *increment_moments(per_sample, weights)


def _norm_increment(loss_fn: LossFn, path: str, params: Any, batch: Any, weights: jax.Array,
                    key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any, jax.Array]:
    """Per-example losses, the count, the gradient sum and ``sum_i |g_i|^2`` of this
    micro-batch's per-sample gradients of the weighted losses (the norm path)."""
    batched = _with_key(loss_fn, key)
    taken = statistics_path(batched, params, batch, path)
    LOG.info("per-sample norms by %s", taken)
    if not taken.startswith("vmap"):
        losses, s1, total = sums_and_squares(batched, params, batch, weights, statistics="norms")
        return losses, (weights > 0).sum(dtype=jnp.int32), s1, total
    losses, per_sample = _per_example(loss_fn, key, params, batch)
    return losses, *increment_norms(per_sample, weights)


def _train_step(loss_fn: LossFn, path: str, state: AccumulatingTrainState, batch: Any,
                weights: jax.Array | None = None, rng: jax.Array | None = None
                ) -> tuple[AccumulatingTrainState, dict[str, Any]]:
    size = _check_batch(batch, weights)
    weights = jnp.ones((size,), jnp.int32) if weights is None else jnp.asarray(weights).astype(jnp.int32)
    items = weights.sum(dtype=jnp.int32)
    window = state.window
    key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, state.step), window.micro_batches)
    _check_losses(_with_key(loss_fn, key), state.params, batch, size)
    squared = None
    add: Callable[..., Window]  # the window's add for what this micro-batch brings
    increment: tuple[Any, ...]
    if window.measured is not None:  # the micro-batch source: the plain gradient and its squared norm
        grad_sum, loss_sum = jax.grad(partial(_summed_loss, _with_key(loss_fn, key)), has_aux=True)(
            state.params, batch, weights)
        n = (weights > 0).sum(dtype=jnp.int32)
        squared = squared_norm(grad_sum)
        add, increment, gradient = window.add_micro_batch, (grad_sum, squared, items, n), grad_sum
    elif window.sum_norms is not None:
        losses, n, grad_sum, total = _norm_increment(loss_fn, path, state.params, batch, weights, key)
        loss_sum = weighted_sum(losses, weights)
        add, increment, gradient = window.add_norms, (grad_sum, total, items, n), (grad_sum, total)
    elif window.mean is not None:
        losses, n, mean, m2 = _increment(loss_fn, path, state.params, batch, weights, key)
        loss_sum = weighted_sum(losses, weights)
        add, increment, gradient = window.add_moments, (items, n, mean, m2), (mean, m2)
    else:
        grad_sum, loss_sum = jax.grad(partial(_summed_loss, _with_key(loss_fn, key)), has_aux=True)(
            state.params, batch, weights)
        n = (weights > 0).sum(dtype=jnp.int32)
        add, increment, gradient = window.add_sum, (grad_sum, items, n), grad_sum
    if state.nonfinite == "skip_window":
        # the whole window goes if anything is non-finite: add unchecked and test the window's
        # gradient once, when it closes (a per-micro-batch test costs ~0.2x of a step)
        finite = jnp.isfinite(loss_sum)
        added = add(*increment).replace(poisoned=window.poisoned | ~finite)
    else:
        finite = jnp.isfinite(loss_sum) & (all_finite(gradient) if squared is None else _finite(squared, gradient))
        added = add(*_zero_unless(finite, increment))
    if state.plan is not None:  # a planner: the window's length was fixed before it started
        stop, info = added.micro_batches >= state.plan.planned, {"planned": state.plan.planned}
    else:
        stop, info = traced_decision(state.rule)(state.rule, added)
    stop = jnp.asarray(stop)
    grown = state.replace(window=added)
    new_state = jax.lax.cond(stop, AccumulatingTrainState.close_window, lambda s: s, grown)
    metrics = {"loss": loss_sum / jnp.maximum(items, 1).astype(loss_sum.dtype), "stop": stop, "finite": finite,
               "items": added.items, "samples": added.samples, "micro_batches": added.micro_batches,
               "step": new_state.step, **info}
    return new_state, metrics


def _finite(squared: jax.Array, grads: Any) -> jax.Array:
    """Whether every element of ``grads`` is finite, read from their squared norm (taken anyway
    for the micro-batch source): a NaN or Inf element makes it non-finite; only then, since a
    finite gradient's square may overflow, does the exact element check run."""
    return jax.lax.cond(jnp.isfinite(squared), lambda g: jnp.ones((), bool), all_finite, grads)


@jax.jit
def _flush(state: AccumulatingTrainState) -> AccumulatingTrainState:
    return jax.lax.cond(state.window.micro_batches > 0, AccumulatingTrainState.close_window, lambda s: s, state)


def flush(state: AccumulatingTrainState) -> AccumulatingTrainState:
    """Close the current window now (the short last window of a run), jitted.

    A window without a micro-batch is left as it is, as the torch ``Accumulator.flush``
    does: no optimizer step, and a planner's summary does not count it (a ramp over steps
    does not advance)."""
    try:
        return _flush(state)
    except jax.errors.JaxRuntimeError as error:
        reraised(error)


def noise_value_and_grad(loss_fn: LossFn, *, path: str = "auto"
                         ) -> Callable[..., tuple[tuple[jax.Array, Any], dict]]:
    """``jax.value_and_grad`` of the mean loss, plus the batch's gradient noise terms from the
    same backward: ``f(params, batch, weights=None, *, rng=None) -> ((loss, grads), stats)``.

    A drop-in for an unchanged JAX training loop that wants to measure (``gradaccum.MonitorLog``
    records the rows): ``loss`` and ``grads`` are the mean over the batch's items (``weights``:
    item counts per example, as in ``make_train_step``), and ``stats`` holds ``samples``,
    ``trace`` and ``squared_norm``, the unbiased ``tr(Sigma)`` and ``|G|^2`` of the per-sample
    gradients of the weighted losses, from the norm path (``nn.Dense`` closed forms, per-layer
    VJPs, or the whole model's vmap: ``statistics_path`` says which). With ``rng`` (dropout),
    ``loss_fn(params, batch, rng)`` gets it as given: the loop owns its keys (on the vmap path
    example ``i`` gets ``jax.random.fold_in(rng, i)``). Traceable: jit it. ``path`` is as in
    ``make_train_step`` (``"vmap"``: the whole model's per-example gradients always).
    """
    check_choice("path", path, PATHS)

    def value_grad_and_noise(params: Any, batch: Any, weights: Any = None, *, rng: Any = None
                             ) -> tuple[tuple[jax.Array, Any], dict]:
        size = _check_batch(batch, weights)
        weights = jnp.ones((size,), jnp.int32) if weights is None else jnp.asarray(weights).astype(jnp.int32)
        _check_losses(_with_key(loss_fn, rng), params, batch, size)
        losses, n, grad_sum, total = _norm_increment(loss_fn, path, params, batch, weights, rng)
        items = jnp.maximum(weights.sum(dtype=jnp.int32), 1)
        grads = jax.tree.map(lambda g: g / items.astype(g.dtype), grad_sum)
        trace, squared = window_terms(n, total, squared_norm(grad_sum))
        loss = weighted_sum(losses, weights) / items
        return (loss, grads), {"samples": n, "trace": trace, "squared_norm": squared}

    return value_grad_and_noise
