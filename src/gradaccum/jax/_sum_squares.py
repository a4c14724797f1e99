"""Per-sample gradient sums of squares without per-sample gradients, for Flax layers that allow it.

``jax.vmap(jax.grad(...))`` writes every sample's gradient to memory: B times the model
for each increment, 10x-50x a plain step on an MLP on the CPU. For ``nn.Dense`` on
(B, d_in) inputs the sum over samples of squared per-sample gradients factors
(DESIGN.md section 2): with X the layer input and D the gradient of the summed loss
with respect to its output, ``S2_kernel = (X*X)^T (D*D)`` and ``S2_bias = sum_b D*D``:
one extra matrix product. D comes from the same backward pass as the ordinary
gradient: a zero is added to each registered layer's output (through
``flax.linen.intercept_methods``) and differentiated along with the parameters.

A registry maps module types to their sum-of-squares function; a model that has a
parameter no registered layer owns exactly once (another layer type, a module called
twice) falls back to ``vmap`` as a whole, and ``statistics_path`` says which was used.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import flax.linen as fnn
import jax
import jax.numpy as jnp
from flax import traverse_util

LOG = logging.getLogger("gradaccum.jax")
SumSquares = Callable[[fnn.Module, jax.Array, jax.Array], dict[str, jax.Array]]
_REGISTRY: dict[type, SumSquares] = {}


def register_sum_squares(module_type: type) -> Callable[[SumSquares], SumSquares]:
    """Register ``fn(module, inputs, output_grad) -> {param name: sum over samples of g_i**2}``.

    ``inputs`` and ``output_grad`` keep the samples on their leading axis;
    ``output_grad`` is the gradient of the (masked) summed loss.
    """

    def register(fn: SumSquares) -> SumSquares:
        _REGISTRY[module_type] = fn
        return fn

    return register


def _sum_over_samples(per_sample: jax.Array) -> jax.Array:
    """Sum over the leading axis as a vector-matrix product (XLA CPU reduces the leading axis slowly)."""
    rows = per_sample.reshape(per_sample.shape[0], -1)
    return (jnp.ones((rows.shape[0],), rows.dtype) @ rows).reshape(per_sample.shape[1:])


@register_sum_squares(fnn.Dense)
def _dense(module: fnn.Dense, x: jax.Array, d: jax.Array) -> dict[str, jax.Array]:
    if x.ndim == 2:  # one position per sample: the squares factor, one extra GEMM
        d2 = d * d
        out = {"kernel": (x * x).T @ d2}
        if module.use_bias:
            out["bias"] = _sum_over_samples(d2)
        return out
    # several positions per sample (a sequence): g_i = sum_t x_it^T d_it does not factor
    xs, ds = x.reshape(x.shape[0], -1, x.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
    g = jnp.einsum("bti,bto->bio", xs, ds)
    out = {"kernel": _sum_over_samples(g * g)}
    if module.use_bias:
        b = ds.sum(1)
        out["bias"] = _sum_over_samples(b * b)
    return out


class _Call(NamedTuple):
    path: tuple[str, ...]
    module_type: type
    output: jax.ShapeDtypeStruct


def _registered(context: Any) -> bool:
    return context.method_name == "__call__" and type(context.module) in _REGISTRY


def _calls(loss_fn: Callable, params: Any, batch: Any) -> list[_Call]:
    """The registered layer calls ``loss_fn`` makes, in order (traced for shapes only)."""
    calls: list[_Call] = []

    def record(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        y = next_fun(*args, **kwargs)
        if _registered(context):
            calls.append(_Call(tuple(context.module.path), type(context.module),
                               jax.ShapeDtypeStruct(jnp.shape(y), jnp.result_type(y))))
        return y

    with fnn.intercept_methods(record):  # a new function each time: a cached trace would skip `record`
        jax.eval_shape(lambda p, b: loss_fn(p, b), params, batch)
    return calls


def statistics_path(loss_fn: Callable, params: Any, batch: Any) -> str:
    """``"sum_of_squares"`` when every parameter belongs to exactly one registered layer
    call, else ``"vmap: <why>"`` (the per-sample gradients are then materialized)."""
    calls = _calls(loss_fn, params, batch)
    paths = [c.path for c in calls]
    if len(set(paths)) != len(paths):
        return "vmap: a registered layer is called more than once (its per-sample squares do not factor)"
    owned = {(*c.path, name) for c in calls for name in _param_names(c.module_type, params, c.path)}
    leaves = set(traverse_util.flatten_dict(_as_dict(params)))
    if owned != leaves:
        missing = sorted("/".join(k) for k in leaves - owned)[:3]
        return f"vmap: parameters outside registered layers ({', '.join(missing) or 'path mismatch'})"
    return "sum_of_squares"


def _as_dict(params: Any) -> dict:
    return params if isinstance(params, dict) else dict(params)


def _param_names(module_type: type, params: Any, path: tuple[str, ...]) -> list[str]:
    node: Any = params
    for key in path:
        if not hasattr(node, "keys") or key not in node:
            return []
        node = node[key]
    return list(node.keys()) if hasattr(node, "keys") else []


def sums_and_squares(loss_fn: Callable, params: Any, batch: Any, weights: jax.Array
                     ) -> tuple[jax.Array, Any, Any]:
    """Per-example losses, the gradient sum S1 and the sum of squares S2 of the masked samples.

    Requires ``statistics_path(...) == "sum_of_squares"``.
    """
    calls = _calls(loss_fn, params, batch)
    zeros = [jnp.zeros(c.output.shape, c.output.dtype) for c in calls]

    modules: list[tuple[tuple[str, ...], fnn.Module]] = []  # static: filled while tracing

    def summed(p: Any, perturbations: list[jax.Array]) -> tuple[jax.Array, tuple]:
        inputs: list[jax.Array] = []
        modules.clear()

        def perturb(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
            y = next_fun(*args, **kwargs)
            if not _registered(context):
                return y
            inputs.append(args[0] if args else kwargs["inputs"])
            modules.append((tuple(context.module.path), context.module))
            return y + perturbations[len(inputs) - 1]

        with fnn.intercept_methods(perturb):
            losses = loss_fn(p, batch)
        return (losses * weights.astype(losses.dtype)).sum(), (losses, inputs)

    (s1, output_grads), (losses, inputs) = jax.grad(summed, argnums=(0, 1), has_aux=True)(params, zeros)
    squares: dict[tuple[str, ...], jax.Array] = {}
    for (path, module), x, d in zip(modules, inputs, output_grads):
        for name, value in _REGISTRY[type(module)](module, x, d).items():
            squares[(*path, name)] = value
    s2 = jax.tree_util.tree_map_with_path(lambda kp, _: squares[tuple(k.key for k in kp)], params)
    return losses, s1, s2
