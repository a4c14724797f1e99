"""The exact fallback for modules no registry entry covers: a loop over samples.

For each sample the module is run again on that sample's inputs alone and the
gradient of its outputs, weighted by that sample's output gradient, is taken with
respect to all of the module's parameters (children included). Exact for any module
that treats samples independently; slow, which is why ``paths`` reports it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._registry import Grads

_BATCHED_KWARGS = {"key_padding_mask"}  # keyword inputs known to carry the batch on dim 0


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
        sample_kwargs = {k: _take(v, 0, i) if k in _BATCHED_KWARGS else v for k, v in kwargs.items()}
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
