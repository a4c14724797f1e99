"""Per-sample gradients of nn.MultiheadAttention without a per-sample backward.

Attention mixes positions but never samples, so one batched recomputation gives every
sample's gradient with respect to its own q, k, v projections and attention output;
each parameter's per-sample gradient is then a per-sample contraction, as for a
Linear layer over positions. Covers batch_first modules with one in_proj_weight,
no bias_k/bias_v, no zero attention, and no active attention dropout; other
configurations take the exact fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import Grads, LayerStats, PerSample
from ._registry import register_layer_stats as register


def _supported(module: nn.MultiheadAttention) -> bool:
    return bool(module.batch_first and module._qkv_same_embed_dim and module.bias_k is None
                and not module.add_zero_attn)


def _float_mask(module: nn.MultiheadAttention, kwargs: dict[str, Any], b: int, t: int, s: int,
                like: torch.Tensor) -> torch.Tensor | None:
    """attn_mask and key_padding_mask as one additive mask broadcastable to (B, H, T, S)."""
    mask = None
    attn_mask, padding = kwargs.get("attn_mask"), kwargs.get("key_padding_mask")
    if attn_mask is None and kwargs.get("is_causal", False):
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=like.device).triu(1)
    for m, shape in ((attn_mask, None), (padding, (b, 1, 1, s))):
        if m is None:
            continue
        add = torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(like.dtype)
        if shape is not None:
            add = add.view(shape)
        elif add.dim() == 3:
            add = add.view(b, module.num_heads, t, s)
        mask = add if mask is None else mask + add
    return mask


def _mha_per_sample(module: nn.MultiheadAttention, args: tuple, d: torch.Tensor, kwargs: dict[str, Any]) -> Grads:
    if module.training and module.dropout > 0:
        raise ValueError("per-sample statistics cannot replay MultiheadAttention with active dropout "
                         "(set dropout=0.0 or eval mode)")
    names = ("query", "key", "value")
    inputs = [args[i] if len(args) > i else kwargs[names[i]] for i in range(3)]
    x_q, x_k, x_v = (x.detach() for x in inputs)
    b, t, e = x_q.shape
    s, h = x_k.shape[1], module.num_heads
    w, bias = module.in_proj_weight, module.in_proj_bias
    w_parts = w.detach().chunk(3)
    b_parts = (None, None, None) if bias is None else bias.detach().chunk(3)
    with torch.enable_grad():
        q, k, v = (F.linear(x, wp, bp).detach().requires_grad_()
                   for x, wp, bp in zip((x_q, x_k, x_v), w_parts, b_parts))
        heads = [z.view(b, -1, h, e // h).transpose(1, 2) for z in (q, k, v)]
        q_h, k_h, v_h = heads
        attn = F.scaled_dot_product_attention(q_h, k_h, v_h, attn_mask=_float_mask(module, kwargs, b, t, s, q))
        a = attn.transpose(1, 2).reshape(b, t, e)
        d_a = d @ module.out_proj.weight.detach()
        d_q, d_k, d_v = torch.autograd.grad(a, (q, k, v), d_a)
    a = a.detach()
    grads: Grads = {
        "in_proj_weight": torch.cat([torch.einsum("bto,bti->boi", dz, x)
                                     for dz, x in ((d_q, x_q), (d_k, x_k), (d_v, x_v))], dim=1),
        "out_proj.weight": torch.einsum("bto,bti->boi", d, a),
    }
    if bias is not None:
        grads["in_proj_bias"] = torch.cat([d_q.sum(1), d_k.sum(1), d_v.sum(1)], dim=1)
    if module.out_proj.bias is not None:
        grads["out_proj.bias"] = d.sum(1)
    return {k: g for k, g in grads.items() if module.get_parameter(k).requires_grad}


# A subtree entry's functions take the call's keyword arguments as a fourth argument (LayerStats.subtree),
# which the table's three-argument PerSample does not say; `applies` is typed by nn.Module.
register(nn.MultiheadAttention)(LayerStats("attention", cast(PerSample, _mha_per_sample), subtree=True,
                                          applies=cast(Callable[[nn.Module], bool], _supported)))
