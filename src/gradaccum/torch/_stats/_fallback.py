"""The exact fallbacks for what no registry entry covers: vmap, else a loop over samples.

Per sample, a module is run again on that sample's inputs alone and the gradient of its
outputs, weighted by that sample's output gradient, is taken with respect to the chosen
parameters. ``vmap_per_sample`` does this for all samples at once with torch.func;
where vmap cannot (an operator without a batching rule, random operators, in-place
ops), ``loop_per_sample`` does it sample by sample. Both serve an unregistered module
(its whole subtree) and the whole model (parameters the hooks cannot explain: a weight
used outside its module, a layer broadcast over the batch). Both are exact for code that
treats samples independently and runs deterministically; the collector checks the
result against the real gradient, so a random forward (active dropout) is refused, not
trusted.

``Replay`` says which inputs carry the batch and on which dimension; floating inputs and
output gradients are cast to the parameters' dtype (under autocast the hooks saw
bfloat16/float16 activations), so the replay runs in the parameters' precision.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._registry import Grads

BATCHED_KWARGS = {"key_padding_mask"}  # keyword inputs of layers known to carry the batch on dim 0


def batch_dims(module: nn.Module, n_outputs: int) -> tuple[int, list[int]]:
    """Batch dim of the first input and of each flattened output (recurrent layers differ)."""
    if isinstance(module, nn.RNNBase):
        seq = 0 if module.batch_first else 1
        return seq, [seq] + [1] * (n_outputs - 1)  # (output, h_n) or (output, (h_n, c_n))
    if isinstance(module, nn.MultiheadAttention):
        seq = 0 if module.batch_first else 1
        return seq, [seq] + [0] * (n_outputs - 1)  # (attn_output, attn_weights)
    return 0, [0] * n_outputs


@dataclass
class Replay:
    """One recorded call, ready to be run again per sample.

    Attributes:
      module: the module called.
      args, kwargs: its inputs (detached).
      arg_dims, kwarg_dims: the batch dimension of each tensor input, None for inputs
        shared by every sample.
      grads: the gradient of the summed loss with respect to each flattened output (None
        where an output did not reach the loss).
      out_dims: the batch dimension of each flattened output.
    """

    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    arg_dims: list[int | None]
    kwarg_dims: dict[str, int | None]
    grads: list[torch.Tensor | None]
    out_dims: list[int]

    @classmethod
    def of_layer(cls, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                 grads: list[torch.Tensor | None]) -> Replay:
        """A layer's call: batch on its own batch dims, known batched keyword inputs."""
        in_dim, out_dims = batch_dims(module, len(grads))
        arg_dims = [(in_dim if k == 0 or not isinstance(module, nn.RNNBase) else 1)
                    if isinstance(a, torch.Tensor) else None for k, a in enumerate(args)]
        kwarg_dims = {k: 0 if k in BATCHED_KWARGS and isinstance(v, torch.Tensor) else None
                      for k, v in kwargs.items()}
        return cls(module, args, kwargs, arg_dims, kwarg_dims, grads, out_dims)

    @classmethod
    def of_model(cls, module: nn.Module, args: tuple, kwargs: dict[str, Any],
                 grads: list[torch.Tensor | None], n: int) -> Replay:
        """The whole model's call: every tensor input whose leading size is n carries the batch."""

        def dim(v: Any) -> int | None:
            return 0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else None

        return cls(module, args, kwargs, [dim(a) for a in args], {k: dim(v) for k, v in kwargs.items()},
                   grads, [0] * len(grads))

    def cast_to(self, dtype: torch.dtype) -> Replay:
        """Floating inputs and output gradients in ``dtype``."""

        def cast(v: Any) -> Any:
            return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        return Replay(self.module, tuple(cast(a) for a in self.args), {k: cast(v) for k, v in self.kwargs.items()},
                      self.arg_dims, self.kwarg_dims, [None if g is None else cast(g) for g in self.grads],
                      self.out_dims)


def loop_per_sample(call: Replay, names: list[str], batch: int) -> Grads:
    """Per-sample gradients ``{name: (B, *shape)}`` of the module's parameters ``names``."""
    module = call.module
    params = [module.get_parameter(n) for n in names]
    out = {n: torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device) for n, p in zip(names, params)}
    for i in range(batch):
        sample_args = tuple(_take(a, d, i) for a, d in zip(call.args, call.arg_dims))
        sample_kwargs = {k: _take(v, call.kwarg_dims[k], i) for k, v in call.kwargs.items()}
        with torch.enable_grad():
            outputs, _ = tree_flatten(module(*sample_args, **sample_kwargs))
        pairs = [(o, _take(g, call.out_dims[k], i)) for k, (o, g) in enumerate(zip(outputs, call.grads))
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if not pairs:
            continue
        grads = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n][i] = g
    return out


def _take(value: Any, dim: int | None, i: int) -> Any:
    """Sample ``i`` of a tensor (kept as a batch of one), recursing into tuples."""
    if dim is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.narrow(dim, i, 1)
    if isinstance(value, (tuple, list)):
        leaves, spec = tree_flatten(value)
        return tree_unflatten([_take(v, dim, i) for v in leaves], spec)
    return value


def vmap_per_sample(call: Replay, names: list[str], batch: int) -> Grads:
    """Per-sample gradients ``{name: (B, *shape)}`` with one vmapped vector-Jacobian product."""
    module = call.module
    params = {n: module.get_parameter(n).detach() for n in names}
    used = [k for k, g in enumerate(call.grads) if g is not None]
    batched_args = tuple(a if d is not None else None for a, d in zip(call.args, call.arg_dims))
    batched_kwargs = {k: v for k, v in call.kwargs.items() if call.kwarg_dims[k] is not None}

    def one(sample_args: tuple, sample_kwargs: dict, cotangents: tuple) -> Grads:
        inputs = tuple(s.unsqueeze(d) if d is not None else a
                       for s, a, d in zip(sample_args, call.args, call.arg_dims))
        kwargs = {k: sample_kwargs[k].unsqueeze(call.kwarg_dims[k]) if k in sample_kwargs else v
                  for k, v in call.kwargs.items()}

        def outputs(p: Grads) -> tuple:
            leaves, _ = tree_flatten(functional_call(module, p, inputs, kwargs, strict=False))
            return tuple(leaves[k] for k in used)

        pullback = vjp(outputs, params)[1]
        return pullback(tuple(c.unsqueeze(call.out_dims[k]) for c, k in zip(cotangents, used)))[0]

    in_dims = (tuple(call.arg_dims), {k: call.kwarg_dims[k] for k in batched_kwargs},
               tuple(call.out_dims[k] for k in used))
    with warnings.catch_warnings():
        # torch warns when an operator has no batching rule and vmap loops inside; still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return vmap(one, in_dims=in_dims)(batched_args, batched_kwargs, tuple(call.grads[k] for k in used))
