"""Per-sample gradient sums of squares from one backward pass, layer by layer.

``jax.vmap(jax.grad(loss))`` runs a per-sample backward through the whole model and
writes every sample's gradient to memory: 10x-50x a plain step on an MLP on the CPU.
Here the ordinary backward of the summed loss also yields, for each Flax layer that
owns parameters, the gradient D of that loss with respect to the layer's output: a
zero is added to the output (through ``flax.linen.intercept_methods``) and
differentiated along with the parameters. With the layer's input X and D:

- a registered closed form (a ``LayerStats`` given to ``register_layer_stats``, the
  contract torch's registry has) gives the sum over samples of squared per-sample gradients
  directly: ``nn.Dense`` on (B, d_in) inputs, ``S2_kernel = (X*X)^T (D*D)`` and
  ``S2_bias = sum_b D*D`` (docs/design.md, "Per-sample statistics"), one extra matrix product;
- any other leaf layer (``nn.Conv``, ``nn.LayerNorm``, ``nn.Embed``, ``nn.Dense`` on
  sequences, ...) gets its per-sample gradients from a ``vmap`` of that layer's own
  VJP on (X_i, D_i): only its parameters times B are materialized, not the model's.

A model where that does not hold (a parameter outside a leaf layer, a layer called
twice or through another method such as ``Embed.attend``, a layer with other
collections such as BatchNorm statistics, several inputs) falls back to ``vmap`` as a
whole; ``statistics_path`` says which path was taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .._core.rules import KINDS
from .._core.validation import check_choice
from ._window import weighted_sum

LOG = logging.getLogger("gradaccum.jax")
PATHS = ("auto", "vmap")  # how per-sample statistics are computed: one-backward paths where they apply, or vmap
SumSquares = Callable[[Any, jax.Array, jax.Array], "dict[str, jax.Array] | None"]
SumNorms = Callable[[Any, jax.Array, jax.Array], "jax.Array | None"]


@dataclass(frozen=True)
class LayerStats:
    """How one Flax layer type yields per-sample statistics from its input and output gradient.

    The JAX side of the contract torch's ``gradaccum.torch.LayerStats`` states (docs/design.md,
    "Layer registry: one contract"): the same field names where the meaning is the same. Both
    functions take ``(module, inputs, output_grad)`` with the samples on the leading axis,
    ``output_grad`` the gradient of the (masked) summed loss, and return ``None`` where they
    do not apply to these shapes; a layer without an entry, or whose entry returns ``None``,
    gets its per-sample gradients from a ``vmap`` of its own VJP (exact, slower).

    Attributes:
      name: names the entry in messages (as torch's ``LayerStats.name``).
      sum_squares: ``{param name: sum over samples of g_i**2}``, the per-element statistics'
        closed form.
      sum_norms: ``sum over samples of |g_i|^2`` over all the layer's parameters together, a
        scalar: the norm path's closed form. Without it the norm path sums ``sum_squares``
        (or the per-sample VJP's squares).
    """

    name: str
    sum_squares: SumSquares | None = None
    sum_norms: SumNorms | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"LayerStats: name must be a non-empty str, got {self.name!r}")
        for field in ("sum_squares", "sum_norms"):
            fn = getattr(self, field)
            if fn is not None and not callable(fn):
                raise TypeError(f"LayerStats {self.name!r}: {field} must be a function or None, "
                                f"got {type(fn).__name__}")


REGISTRY: dict[type, LayerStats] = {}


def register_layer_stats(*module_types: type) -> Callable[[LayerStats], LayerStats]:
    """Register ``LayerStats`` for Flax module types (the type and its subclasses that keep its
    ``__call__``): ``register_layer_stats(nn.Dense)(LayerStats("dense", sum_squares=...))``."""
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, fnn.Module)):
            raise TypeError(f"register_layer_stats: {t!r} is not a flax.linen.Module subclass")

    def add(stats: LayerStats) -> LayerStats:
        if not isinstance(stats, LayerStats):
            raise TypeError(f"register_layer_stats takes a gradaccum.jax.LayerStats, got {type(stats).__name__}")
        for t in module_types:
            REGISTRY[t] = stats
        return stats

    return add


def lookup(module: Any) -> LayerStats | None:
    """The entry for ``module``'s type, or the nearest registered base class.

    A subclass that overrides ``__call__`` computes something else than the registered type,
    and JAX has no explained-gradient check (torch's ``_explained``) to catch a closed form
    that no longer holds: it gets no entry (its own per-sample VJP), unless registered itself.
    """
    for t in type(module).__mro__:
        if t in REGISTRY:
            return REGISTRY[t] if type(module).__call__ is t.__call__ else None
    return None


def _sum_over_samples(per_sample: jax.Array) -> jax.Array:
    """Sum over the leading axis as a vector-matrix product (XLA CPU reduces the leading axis slowly)."""
    rows = per_sample.reshape(per_sample.shape[0], -1)
    return (jnp.ones((rows.shape[0],), rows.dtype) @ rows).reshape(per_sample.shape[1:])


def _plain_product(module: fnn.Dense) -> bool:
    """Whether the layer computes ``x @ kernel``: a ``dot_general`` of its own (a quantized or
    scaled product) has other per-sample gradients than the closed forms assume."""
    return module.dot_general is None and module.dot_general_cls is None


def _dense(module: fnn.Dense, x: jax.Array, d: jax.Array) -> dict[str, jax.Array] | None:
    if x.ndim != 2 or not _plain_product(module):  # several positions per sample: g_i = sum_t x_it^T d_it
        return None  # does not factor
    d2 = d * d
    out = {"kernel": (x * x).T @ d2}
    if module.use_bias:
        out["bias"] = _sum_over_samples(d2)
    return out


def _dense_norms(module: fnn.Dense, x: jax.Array, d: jax.Array) -> jax.Array | None:
    """``|x_i|^2 |d_i|^2`` on (B, d_in) inputs; over T positions the Gram form
    ``sum_{t,s} (x_t . x_s)(d_t . d_s)`` where it costs less than the per-sample gradient."""
    if not _plain_product(module):
        return None
    b = x.shape[0]
    x3, d3 = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])
    positions, n_in, n_out = x3.shape[1], x3.shape[2], d3.shape[2]
    bias = ((d3.sum(1)) ** 2).sum() if module.use_bias else 0.0
    if positions == 1:
        return (jnp.einsum("bi,bi->b", x3[:, 0], x3[:, 0]) * jnp.einsum("bo,bo->b", d3[:, 0], d3[:, 0])).sum() + bias
    if positions * (n_in + n_out) > n_in * n_out:
        return None
    return (jnp.einsum("bti,bsi->bts", x3, x3) * jnp.einsum("bto,bso->bts", d3, d3)).sum() + bias


register_layer_stats(fnn.Dense)(LayerStats("dense", sum_squares=_dense, sum_norms=_dense_norms))


def _per_layer_vmap(module: fnn.Module, params: Any, x: jax.Array, d: jax.Array) -> dict[str, jax.Array]:
    """Sum of squared per-sample gradients of one layer's parameters, by vmap over (x_i, d_i)."""
    layer = module.clone(parent=None)

    def sample_grad(xi: jax.Array, di: jax.Array) -> Any:
        _, vjp = jax.vjp(lambda p: layer.apply({"params": p}, xi[None])[0], params)
        return vjp(di)[0]

    grads = jax.vmap(sample_grad)(x, d)
    return {name: _sum_over_samples(g * g) for name, g in grads.items()}


class _Call(NamedTuple):
    path: tuple[str, ...]
    module: fnn.Module
    method: str
    simple: bool  # one positional array argument, an array output, only parameters
    input: jax.ShapeDtypeStruct | None
    output: jax.ShapeDtypeStruct | None


def _owns_params(module: fnn.Module) -> bool:
    """A leaf layer: parameters of its own and no submodule parameters."""
    params = module.variables.get("params", {})
    return bool(params) and all(not hasattr(v, "keys") for v in params.values())


def _uses_batch_statistics(module: fnn.Module, args: tuple, kwargs: dict) -> bool:
    """A BatchNorm normalising with the batch's own statistics (train mode)."""
    if not isinstance(module, fnn.BatchNorm):
        return False
    flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    return not fnn.merge_param("use_running_average", module.use_running_average, flag)


def _record(calls: list[_Call], context: Any, args: tuple, kwargs: dict, y: Any) -> bool:
    """Append the call if it is a leaf layer's; say whether it can be perturbed."""
    module = context.module
    if context.method_name == "__call__" and _uses_batch_statistics(module, args, kwargs):
        raise ValueError(f"BatchNorm at {'/'.join(module.path)} normalises with batch statistics (train mode): "
                         "it mixes the samples, so per-sample gradients do not exist; use a rule without "
                         "statistics (FixedSteps), use_running_average=True, or a per-sample normalisation "
                         "such as LayerNorm or GroupNorm")
    if context.method_name == "setup" or not _owns_params(module):  # setup creates, it does not compute
        return False
    # the input may be a NumPy batch called eagerly (not traced): an array all the same, or the
    # first layer would be left out here but not in the shapes traced before, misaligning the rest
    simple = (context.method_name == "__call__" and len(args) == 1 and not kwargs and isinstance(y, jax.Array)
              and isinstance(args[0], (jax.Array, np.ndarray)) and set(module.variables) == {"params"})
    output = jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y)) if simple else None
    x = jax.ShapeDtypeStruct(jnp.shape(args[0]), jnp.result_type(args[0])) if simple else None
    calls.append(_Call(tuple(module.path), module, context.method_name, simple, x, output))
    return simple


def _calls(loss_fn: Callable, params: Any, batch: Any) -> list[_Call]:
    """The leaf-layer calls ``loss_fn`` makes, in order (traced for shapes only)."""
    calls: list[_Call] = []

    def record(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        y = next_fun(*args, **kwargs)
        _record(calls, context, args, kwargs, y)
        return y

    with fnn.intercept_methods(record):  # a new function each time: a cached trace would skip `record`
        jax.eval_shape(lambda p, b: loss_fn(p, b), params, batch)
    return calls


def statistics_path(loss_fn: Callable, params: Any, batch: Any, path: str = "auto") -> str:
    """How ``make_train_step(path=...)`` gets per-sample statistics for this model:
    ``"sum_of_squares"`` (every layer's registered ``sum_squares`` applies), ``"layers"`` (some
    layers by their own per-sample VJP), or ``"vmap: <why>"`` (per-sample gradients of the model).

    ``path`` (``PATHS``): ``"auto"`` takes the one-backward paths where the model allows,
    ``"vmap"`` always the per-example gradients.

    Raises ValueError for a model whose samples are not independent (train-mode BatchNorm),
    and for a ``path`` not in ``PATHS``.
    """
    check_choice("path", path, PATHS)
    calls = _calls(loss_fn, params, batch)
    if path == "vmap":
        return "vmap: asked for"
    odd = [c for c in calls if not c.simple]
    if odd:
        c = odd[0]
        return (f"vmap: {type(c.module).__name__} at {'/'.join(c.path)} is called through {c.method}, with "
                "several inputs or has other collections than params")
    paths = [c.path for c in calls]
    if len(set(paths)) != len(paths):
        return "vmap: a layer with parameters is called more than once (its per-sample squares do not factor)"
    broadcast = _broadcast_call(loss_fn, params, batch, calls)
    if broadcast is not None:
        return (f"vmap: {type(broadcast.module).__name__} at {'/'.join(broadcast.path)} is broadcast over the batch "
                "(its input or output has no batch axis, e.g. positions arange(T)), so its per-sample gradients "
                "are not its own output gradient's rows")
    owned = {(*c.path, name) for c in calls for name in c.module.variables["params"]}
    leaves = set(traverse_util.flatten_dict(params if isinstance(params, dict) else dict(params)))
    if owned != leaves:
        missing = sorted("/".join(k) for k in leaves - owned)[:3]
        return f"vmap: parameters outside leaf layers ({', '.join(missing) or 'paths differ from params'})"
    closed = all(_runs_closed_form(c, "sum_squares") for c in calls)
    return "sum_of_squares" if closed else "layers"


def _broadcast_call(loss_fn: Callable, params: Any, batch: Any, calls: list[_Call]) -> _Call | None:
    """The first layer call whose leading sizes do not follow the batch, if any.

    The loss is traced once more (shapes only, no computation) with one example more: a
    layer that sees the batch has leading size B, then B + 1; one broadcast over it (a
    position embedding of ``arange(T)``) keeps its sizes, even where T == B.
    """
    size = jax.tree.leaves(batch)[0].shape[0]
    bigger = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1, *x.shape[1:]), jnp.result_type(x)), batch)
    grown = _calls(loss_fn, params, bigger)
    for a, b in zip(calls, grown):
        for s_a, s_b in ((a.input, b.input), (a.output, b.output)):
            if s_a is None or s_b is None:
                continue
            if not s_a.shape or s_a.shape[0] != size or not s_b.shape or s_b.shape[0] != size + 1:
                return a
    return None


def layer_paths(loss_fn: Callable, params: Any, batch: Any, statistics: str = "elements") -> dict[str, str]:
    """Per leaf layer, the path ``sums_and_squares`` takes for ``statistics`` (``"elements"`` or
    ``"norms"``): ``"sum_of_squares"`` / ``"norms"`` (its registered ``sum_squares`` /
    ``sum_norms`` applies to these shapes) or ``"vmap"`` (its own per-sample VJP)."""
    check_choice("statistics", statistics, KINDS)
    out = {}
    for c in _calls(loss_fn, params, batch):
        if statistics == "norms" and _runs_closed_form(c, "sum_norms"):
            out["/".join(c.path)] = "norms"
        else:
            out["/".join(c.path)] = "sum_of_squares" if _runs_closed_form(c, "sum_squares") else "vmap"
    return out


def _closed_form(module: Any, field: str) -> Callable | None:
    """The registered ``sum_squares`` or ``sum_norms`` (``field``) of ``module``, if any."""
    entry = lookup(module)
    return None if entry is None else getattr(entry, field)


def _runs_closed_form(call: _Call, field: str) -> bool:
    """Whether the registered closed form (``field`` of its ``LayerStats``) returns a value for
    this call's shapes (it may decline with None, as ``nn.Dense`` does for sequences): the
    path that will really run."""
    closed = _closed_form(call.module, field)
    if closed is None or call.input is None:
        return False
    return jax.eval_shape(lambda x, d: closed(call.module, x, d), call.input, call.output) is not None


def _checked_squares(call: _Call, squares: Any, params: Any) -> dict[str, jax.Array]:
    """A registered ``sum_squares``' answer, refused unless it has one array per parameter of
    the layer, of that parameter's shape (a wrong one would misplace or drop a parameter's S2)."""
    entry = lookup(call.module)
    name = "?" if entry is None else entry.name
    where = f"LayerStats {name!r} on {type(call.module).__name__} at {'/'.join(call.path)}"
    if not isinstance(squares, dict) or set(squares) != set(params):
        got = sorted(squares) if isinstance(squares, dict) else type(squares).__name__
        raise ValueError(f"{where}: sum_squares must return a dict with one entry per parameter "
                         f"{sorted(params)}, got {got}")
    for key, value in squares.items():
        if jnp.shape(value) != jnp.shape(params[key]):
            raise ValueError(f"{where}: sum_squares[{key!r}] has shape {jnp.shape(value)}, the parameter "
                             f"{jnp.shape(params[key])}")
    return squares


def sums_and_squares(loss_fn: Callable, params: Any, batch: Any, weights: jax.Array, statistics: str = "elements"
                     ) -> tuple[jax.Array, Any, Any]:
    """Per-example losses, the gradient sum S1 and the sum of squares S2 of the masked
    samples (``statistics="norms"``: ``sum_i |g_i|^2``, a scalar, instead of S2).

    Requires ``statistics_path(...)`` to be ``"sum_of_squares"`` or ``"layers"``.
    """
    check_choice("statistics", statistics, KINDS)
    zeros = [jnp.zeros(c.output.shape, c.output.dtype) for c in _calls(loss_fn, params, batch)]  # type: ignore[union-attr]
    calls: list[_Call] = []  # static: filled while tracing

    def summed(p: Any, perturbations: list[jax.Array]) -> tuple[jax.Array, tuple]:
        inputs: list[jax.Array] = []
        calls.clear()

        def perturb(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
            y = next_fun(*args, **kwargs)
            if not _record(calls, context, args, kwargs, y):
                return y
            inputs.append(args[0])
            return y + perturbations[len(inputs) - 1]

        with fnn.intercept_methods(perturb):
            losses = loss_fn(p, batch)
        return weighted_sum(losses, weights), (losses, inputs)

    (s1, output_grads), (losses, inputs) = jax.grad(summed, argnums=(0, 1), has_aux=True)(params, zeros)
    squares: dict[tuple[str, ...], jax.Array] = {}
    total = jnp.zeros((), jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32))
    for call, x, d in zip(calls, inputs, output_grads):
        norms = _closed_form(call.module, "sum_norms") if statistics == "norms" else None
        layer_norms = norms(call.module, x, d) if norms else None
        if layer_norms is not None:
            total = total + layer_norms
            continue
        layer_params = params
        for key in call.path:
            layer_params = layer_params[key]
        closed = _closed_form(call.module, "sum_squares")
        layer_squares = closed(call.module, x, d) if closed else None
        if layer_squares is None:
            layer_squares = _per_layer_vmap(call.module, layer_params, x, d)
        else:
            layer_squares = _checked_squares(call, layer_squares, layer_params)
        if statistics == "norms":
            total = total + sum(v.sum() for v in layer_squares.values())
            continue
        for name, value in layer_squares.items():
            squares[call.path + (name,)] = value
    if statistics == "norms":
        return losses, s1, total
    s2 = jax.tree_util.tree_map_with_path(lambda kp, _: squares[tuple(k.key for k in kp)], params)
    return losses, s1, s2
