"""Fixed-step accumulation as an optax ``GradientTransformation``, weighted by item counts.

``optax.MultiSteps`` averages its k micro-steps with equal weights, which is the mean
over items only when every micro-batch has the same size, and it cannot close a short
last window. ``accumulate`` takes each micro-batch's item count and an optional
``last`` flag; its state holds the partial window, so a checkpoint taken mid-window
resumes exactly. With every ``items`` equal it gives MultiSteps' updates.

With ``measure_noise=True`` it also measures the gradient noise scale from the micro-batches'
own gradients (``_core.micro_batch``): each micro-batch's squared gradient norm is taken in the
pass its finiteness check makes, the open window keeps two scalars (``k`` and
``sum_j |S_j|^2 / b_j``), and each close records the window's unbiased ``tr(Sigma)`` and
``|G|^2`` and their moving averages (``noise_scale`` reads ``B_simple``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct

from .._core.config import AccumulationConfig
from .._core.micro_batch import micro_batch_terms
from .._core.noise_scale import NoiseScaleEMA, averaged_noise_scale
from .._core.rules import FixedSteps
from .._core.validation import check_choice, check_positive_int
from ._window import all_finite, check_counts, squared_norm


class AccumulationState(NamedTuple):
    """State of ``accumulate``.

    Attributes:
      mini_step: micro-batches in the current window.
      items: items in the current window (the sum of the ``items`` passed).
      grad_sum: sum of ``items * updates`` over the window's micro-batches.
      inner_state: the wrapped optimizer's state.
      gradient_step: optimizer steps applied so far.
      poisoned: a micro-batch with a non-finite gradient joined the window
        (``nonfinite="skip_window"``): it closes without a step.
    """

    mini_step: jax.Array
    items: jax.Array
    grad_sum: Any
    inner_state: Any
    gradient_step: jax.Array
    poisoned: jax.Array


class NoiseMeasurement(NamedTuple):
    """The noise terms ``accumulate(..., measure_noise=True)`` measures, in items (the
    ``items`` passed: a micro-batch of mean gradient ``u_j`` over ``b_j`` items has the
    gradient sum ``S_j = b_j u_j``).

    Attributes:
      measured: k, the open window's micro-batches measured (finite, with items).
      weighted: ``sum_j |S_j|^2 / b_j = sum_j b_j |u_j|^2`` over them.
      trace: the last closed window's unbiased ``tr(Sigma)`` (one item's gradient variance);
        NaN where nothing was measured (before any close, a window of fewer than two measured
        micro-batches, or a square beyond the dtype's range).
      squared_norm: the last closed window's unbiased ``|G|^2`` (NaN as ``trace``).
      average_trace, average_squared, weight: the moving averages (``NoiseScaleEMA``) of the
        terms of the windows applied, not yet divided by their weight.
    """

    measured: jax.Array
    weighted: jax.Array
    trace: jax.Array
    squared_norm: jax.Array
    average_trace: jax.Array
    average_squared: jax.Array
    weight: jax.Array


@struct.dataclass
class MeasuringAccumulationState:
    """State of ``accumulate(..., measure_noise=True)``: ``AccumulationState``'s fields and the
    noise measurement (``noise``). Restoring a state saved without ``measure_noise`` into it is
    refused (``flax.serialization.from_state_dict``), as is the other way round."""

    mini_step: jax.Array
    items: jax.Array
    grad_sum: Any
    inner_state: Any
    gradient_step: jax.Array
    poisoned: jax.Array
    noise: NoiseMeasurement


def accumulate(optimizer: optax.GradientTransformation, every_k: int | FixedSteps | AccumulationConfig,
               accumulator_dtype: Any = None, nonfinite: str = "skip_micro_batch", *, measure_noise: bool = False,
               noise_decay: float = 0.9) -> optax.GradientTransformationExtraArgs:
    """Wrap ``optimizer`` to step once per ``every_k`` micro-batches on the items' mean gradient.

    ``update(updates, state, params=None, *, items=1, last=False, **extra_args)``:
    ``updates`` is the micro-batch's *mean* gradient over its ``items`` items (a non-negative
    integer count, checked as the train step checks its weights when it is concrete); ``last=True``
    closes the window after this micro-batch whatever its length (the end of an epoch
    or a run). ``every_k`` may be an int, ``FixedSteps(k)`` or an ``AccumulationConfig``
    with the fixed rule. Between steps the returned updates are zeros, as with ``optax.MultiSteps``.
    A window whose items add up to 0 is dropped without a step. ``accumulator_dtype``
    defaults to the dtype of each parameter.

    A micro-batch whose updates hold NaN or Inf never reaches the inner optimizer:
    ``nonfinite="skip_micro_batch"`` (default) drops its gradient and items (it still
    counts toward the window's length, as in the train state and the torch Accumulator);
    ``"skip_window"`` closes its window without a step.

    The gradients are the caller's, so is their randomness: with dropout, draw each
    micro-batch's key afresh, ``jax.random.fold_in(key, micro_step)`` with a counter of
    micro-batches (a key reused across the micro-batches of a window repeats their masks).

    ``measure_noise=True`` measures the gradient noise at no extra pass over a micro-batch's
    gradient: its squared norm is the finiteness check's reduction, and the state
    (``MeasuringAccumulationState``) keeps each window's unbiased ``tr(Sigma)`` and ``|G|^2``
    (``state.noise``, in items) and their moving averages with ``noise_decay`` (the weight of
    the past), whose ratio ``noise_scale(state)`` reads: McCandlish et al.'s ``B_simple``, in
    items. A window needs two measured micro-batches; with fewer its terms are NaN and it does
    not join the averages. Without it the state is ``AccumulationState``, as before.
    """
    check_choice("nonfinite", nonfinite, ("skip_micro_batch", "skip_window"))
    if not isinstance(measure_noise, bool):
        raise TypeError(f"measure_noise must be True or False, got {measure_noise!r}")
    if isinstance(noise_decay, bool) or not isinstance(noise_decay, (int, float)) or not 0 < noise_decay < 1:
        raise ValueError(f"noise_decay must be a number in (0, 1), the moving averages' weight of the past, got "
                         f"{noise_decay!r}")
    ema = NoiseScaleEMA(float(noise_decay))
    if isinstance(every_k, AccumulationConfig):
        rule = every_k.make_rule()
        if not isinstance(rule, FixedSteps):
            raise ValueError(f"every_k: accumulate closes windows by count only, got the rule {rule!r}; "
                             "use AccumulatingTrainState for adaptive rules")
        every_k = rule
    k = every_k.k if isinstance(every_k, FixedSteps) else check_positive_int("every_k", every_k)
    inner = optax.with_extra_args_support(optimizer)

    def init(params: Any) -> AccumulationState | MeasuringAccumulationState:
        fields = (jnp.zeros((), jnp.int32), jnp.zeros((), _count_dtype()),
                  jax.tree.map(lambda p: jnp.zeros_like(p, dtype=accumulator_dtype), params),
                  inner.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
        if not measure_noise:
            return AccumulationState(*fields)
        return MeasuringAccumulationState(*fields, noise=_no_noise())

    def update(updates: Any, state: AccumulationState | MeasuringAccumulationState, params: Any = None, *,
               items: Any = 1, last: Any = False, **extra_args: Any) -> tuple[Any, Any]:
        _check_items(items)
        _check_measuring(state, measure_noise)
        if measure_noise:
            squared = _squares(updates)  # the finiteness check's own reduction
            finite = jax.lax.cond(jnp.isfinite(squared), lambda: jnp.asarray(True), lambda: all_finite(updates))
        else:
            finite = all_finite(updates)
        poisoned = state.poisoned | (~finite if nonfinite == "skip_window" else False)
        count = jnp.where(finite, jnp.asarray(items, _count_dtype()), 0)
        grad_sum = jax.tree.map(lambda s, u: s + jnp.where(finite, u * count.astype(u.dtype), 0).astype(s.dtype),
                                state.grad_sum, updates)
        total = state.items + count
        close = (state.mini_step + 1 >= k) | jnp.asarray(last, bool)
        noise = None
        if isinstance(state, MeasuringAccumulationState):  # measure_noise (_check_measuring)
            noise = _measured(state.noise, count, squared)

        def make(mini_step: Any, items: Any, sums: Any, inner_state: Any, step: Any, bad: Any,
                 applied: bool | None) -> AccumulationState | MeasuringAccumulationState:
            fields = (mini_step, items, sums, inner_state, step, bad)
            if noise is None:
                return AccumulationState(*fields)
            return MeasuringAccumulationState(*fields, noise=noise if applied is None else
                                              _closed(noise, total, grad_sum, applied, ema))

        def emit(_: None) -> tuple[Any, Any]:
            mean = jax.tree.map(lambda s, u: (s / total.astype(s.dtype)).astype(u.dtype), grad_sum, updates)
            new_updates, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            return new_updates, make(jnp.zeros_like(state.mini_step), jnp.zeros_like(total),
                                     jax.tree.map(jnp.zeros_like, grad_sum), inner_state, state.gradient_step + 1,
                                     jnp.zeros_like(poisoned), True)

        def drop(_: None) -> tuple[Any, Any]:
            return zeros(), make(jnp.zeros_like(state.mini_step), jnp.zeros_like(total),
                                 jax.tree.map(jnp.zeros_like, grad_sum), state.inner_state, state.gradient_step,
                                 jnp.zeros_like(poisoned), False)

        def hold(_: None) -> tuple[Any, Any]:
            return zeros(), make(state.mini_step + 1, total, grad_sum, state.inner_state, state.gradient_step,
                                 poisoned, None)

        def zeros() -> Any:
            shapes = jax.eval_shape(lambda: inner.update(updates, state.inner_state, params, **extra_args)[0])
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        branch = jnp.where(close, jnp.where((total > 0) & ~poisoned, 0, 1), 2)
        return jax.lax.switch(branch, (emit, drop, hold), None)

    return optax.GradientTransformationExtraArgs(init, update)


def noise_scale(state: Any) -> jax.Array:
    """``B_simple``, in items, of the moving averages of the noise terms that
    ``accumulate(..., measure_noise=True)`` measured: their ``tr(Sigma) / |G|^2``. ``state``:
    its state, or an optax state holding it (a chain's tuple). NaN before any window was
    measured; infinite where the averaged ``|G|^2`` is not positive (no signal measured)."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MeasuringAccumulationState))
             if isinstance(s, MeasuringAccumulationState)]
    if len(found) != 1:
        raise ValueError(f"noise_scale(state): state must hold one state of accumulate(..., measure_noise=True), "
                         f"found {len(found)}; make the optimizer with measure_noise=True")
    noise = found[0].noise
    return averaged_noise_scale(noise.average_trace, noise.average_squared, noise.weight)


def _no_noise() -> NoiseMeasurement:
    """Nothing measured yet (a buffer of its own per field: a donated state donates each leaf)."""
    dtype = _count_dtype()
    return NoiseMeasurement(jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.full((), math.nan, dtype),
                            jnp.full((), math.nan, dtype), *(jnp.zeros((), dtype) for _ in range(3)))


def _squares(tree: Any) -> jax.Array:
    """The squared norm of every leaf together, each leaf's squares summed in float32 or wider:
    one fused reduction per leaf, NaN or Inf whenever an element is (or a square overflows)."""
    total = jnp.zeros((), _count_dtype())
    for x in jax.tree.leaves(tree):
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        total = total + jnp.sum(jnp.real(x * jnp.conj(x)) if jnp.iscomplexobj(x) else x * x).astype(total.dtype)
    return total


def _measured(noise: NoiseMeasurement, count: jax.Array, squared: jax.Array) -> NoiseMeasurement:
    """With one more micro-batch of ``count`` items (0: dropped or empty, not measured) and mean
    gradient of squared norm ``squared``: ``|S_j|^2 / b_j = b_j |u_j|^2``."""
    measured = count > 0
    weighted = noise.weighted + jnp.where(measured, count * squared.astype(count.dtype), 0).astype(noise.weighted.dtype)
    return noise._replace(measured=noise.measured + measured.astype(jnp.int32), weighted=weighted)


def _closed(noise: NoiseMeasurement, items: jax.Array, grad_sum: Any, applied: bool,
            ema: NoiseScaleEMA) -> NoiseMeasurement:
    """The window's unbiased terms (``micro_batch_terms`` against ``|S|^2`` of its sum, one pass
    at the close), NaN where they are not finite; an applied window's join the averages."""
    dtype = noise.weighted.dtype
    trace, squared = micro_batch_terms(noise.measured, items.astype(dtype), noise.weighted,
                                       squared_norm(grad_sum).astype(dtype))
    counts = jnp.isfinite(trace) & jnp.isfinite(squared) & jnp.isfinite(noise.weighted)
    nan = jnp.full((), math.nan, dtype)
    trace, squared = jnp.where(counts, trace, nan), jnp.where(counts, squared, nan)
    old = (noise.average_trace, noise.average_squared, noise.weight)
    new = ema.update(old, (trace, squared, 1.0)) if applied else old
    kept = [jnp.where(counts, a, b) for a, b in zip(new, old)]
    return NoiseMeasurement(jnp.zeros_like(noise.measured), jnp.zeros_like(noise.weighted), trace, squared, *kept)


def _check_measuring(state: Any, measure_noise: bool) -> None:
    """Refuse a state made by ``accumulate`` with the other ``measure_noise``."""
    if isinstance(state, MeasuringAccumulationState) != measure_noise:
        raise ValueError(f"state: made by accumulate(..., measure_noise={not measure_noise}), updated by one with "
                         f"measure_noise={measure_noise}; make the optimizer with the measure_noise its state was "
                         "made (or saved) with")


_STATE_FIELDS = tuple(AccumulationState._fields)


def _measuring_state_dict(state: MeasuringAccumulationState) -> dict[str, Any]:
    """Flax's state dict: ``AccumulationState``'s fields and ``noise``."""
    return {name: serialization.to_state_dict(getattr(state, name)) for name in (*_STATE_FIELDS, "noise")}


def _measuring_from_state_dict(target: MeasuringAccumulationState, state: Any) -> MeasuringAccumulationState:
    """Restore a state saved by ``accumulate(..., measure_noise=True)``; one saved without it
    (no ``noise``) is refused, naming the setting."""
    if not isinstance(state, dict) or set(state) != {*_STATE_FIELDS, "noise"}:
        found = "without measure_noise (no 'noise')" if isinstance(state, dict) and set(state) == \
            set(_STATE_FIELDS) else f"of another layout ({type(state).__name__})"
        raise ValueError(f"cannot restore a state of accumulate saved {found} into one made with "
                         "measure_noise=True: make the optimizer with the measure_noise the state was saved with")
    return MeasuringAccumulationState(**{name: serialization.from_state_dict(getattr(target, name), state[name],
                                                                             name=name)
                                         for name in (*_STATE_FIELDS, "noise")})


serialization.register_serialization_state(MeasuringAccumulationState, _measuring_state_dict,
                                           _measuring_from_state_dict, override=True)


def _count_dtype() -> Any:
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _check_items(items: Any) -> None:
    """Check a concrete ``items`` as the train step checks its weights (a traced one is the
    caller's to get right)."""
    if isinstance(items, jax.core.Tracer):
        return
    if isinstance(items, (str, bytes)) or np.ndim(items) != 0 or np.asarray(items).dtype == bool:
        raise TypeError(f"items must be a scalar count of the micro-batch's items, got {items!r}")
    check_counts("items", items)
