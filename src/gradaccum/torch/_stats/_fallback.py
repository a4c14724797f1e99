"""The exact fallbacks for modules no registry entry covers: vmap, else a loop.

Per sample, the module is run again on that sample's inputs alone and the gradient
of its outputs, weighted by that sample's output gradient, is taken with respect to
all of the module's parameters (children included). ``vmap_per_sample`` does this
for all samples at once with torch.func; where vmap cannot (an operator without a
batching rule, random operators), ``loop_per_sample`` does it sample by sample.
Both are exact for modules that treat samples independently and run deterministically
(no active dropout inside the module); ``paths`` reports which one ran.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._registry import Grads

BATCHED_KWARGS = {"key_padding_mask"}  # keyword inputs known to carry the batch on dim 0


def batch_dims(module: nn.Module, n_outputs: int) -> tuple[int, list[int]]:
    """Batch dim of the first input and of each flattened output (recurrent layers differ)."""
    if isinstance(module, nn.RNNBase):
        seq = 0 if module.batch_first else 1
        return seq, [seq] + [1] * (n_outputs - 1)  # (output, h_n) or (output, (h_n, c_n))
    if isinstance(module, nn.MultiheadAttention):
        seq = 0 if module.batch_first else 1
        return seq, [seq] + [0] * (n_outputs - 1)  # (attn_output, attn_weights)
    return 0, [0] * n_outputs


def loop_per_sample(module: nn.Module, args: tuple, kwargs: dict[str, Any],
                    grad_outputs: list[torch.Tensor | None], batch: int) -> Grads:
    """Per-sample gradients ``{name: (B, *shape)}`` of every trainable parameter of ``module``."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    in_dim, out_dims = batch_dims(module, len(grad_outputs))
    out = {n: torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device) for n, p in zip(names, params)}
    for i in range(batch):
        sample_args = tuple(_take(a, in_dim if k == 0 or not isinstance(module, nn.RNNBase) else 1, i)
                            for k, a in enumerate(args))
        sample_kwargs = {k: _take(v, 0, i) if k in BATCHED_KWARGS else v for k, v in kwargs.items()}
        with torch.enable_grad():
            outputs, _ = tree_flatten(module(*sample_args, **sample_kwargs))
        pairs = [(o, _take(g, out_dims[k], i)) for k, (o, g) in enumerate(zip(outputs, grad_outputs))
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        if not pairs:
            continue
        grads = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n][i] = g
    return out


def _take(value: Any, dim: int, i: int) -> Any:
    """Sample ``i`` of a tensor (kept as a batch of one), recursing into tuples."""
    if isinstance(value, torch.Tensor):
        return value.narrow(dim, i, 1)
    if isinstance(value, (tuple, list)):
        leaves, spec = tree_flatten(value)
        return tree_unflatten([_take(v, dim, i) for v in leaves], spec)
    return value


def vmap_per_sample(module: nn.Module, args: tuple, kwargs: dict[str, Any],
                    grad_outputs: list[torch.Tensor | None], batch: int) -> Grads:
    """Per-sample gradients ``{name: (B, *shape)}`` with one vmapped vector-Jacobian product."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    in_dim, out_dims = batch_dims(module, len(grad_outputs))
    arg_dims = [in_dim if k == 0 or not isinstance(module, nn.RNNBase) else 1 for k in range(len(args))]
    used = [k for k, g in enumerate(grad_outputs) if g is not None]
    batched_kwargs = {k: v for k, v in kwargs.items() if k in BATCHED_KWARGS and isinstance(v, torch.Tensor)}
    fixed_kwargs = {k: v for k, v in kwargs.items() if k not in batched_kwargs}

    def one(sample_args: tuple, sample_kwargs: dict, cotangents: tuple) -> Grads:
        inputs = tuple(a.unsqueeze(d) if isinstance(a, torch.Tensor) else a for a, d in zip(sample_args, arg_dims))
        extra = {k: v.unsqueeze(0) for k, v in sample_kwargs.items()}

        def outputs(p: Grads) -> tuple:
            leaves, _ = tree_flatten(functional_call(module, p, inputs, {**fixed_kwargs, **extra}))
            return tuple(leaves[k] for k in used)

        _, pullback = vjp(outputs, params)
        return pullback(tuple(c.unsqueeze(out_dims[k]) for c, k in zip(cotangents, used)))[0]

    in_dims = (tuple(d if isinstance(a, torch.Tensor) else None for a, d in zip(args, arg_dims)),
               {k: 0 for k in batched_kwargs}, tuple(out_dims[k] for k in used))
    with warnings.catch_warnings():
        # torch warns when an operator has no batching rule and vmap loops inside; still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return vmap(one, in_dims=in_dims)(args, batched_kwargs, tuple(grad_outputs[k] for k in used))
