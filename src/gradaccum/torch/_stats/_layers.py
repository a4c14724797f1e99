"""Per-layer statistics: Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm.

Notation: X is a layer's input, D the gradient of the *sum* of per-sample losses with
respect to its output, both with the batch on dim 0. Every function is exact; the
tests compare each against a loop over samples in float64 (docs/design.md, "Per-sample statistics").
"""

from __future__ import annotations

import functools
import operator
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from ._choice import samples_per_product
from ._increment import sum_of_squares
from ._registry import Grads, LayerStats, NormParts, Projector, RowSquares, Squares, channels_first_positions
from ._registry import register_layer_stats as register

_V = TypeVar("_V")


def _with_bias(module: nn.Module, grads: dict[str, _V], bias: _V) -> dict[str, _V]:
    if getattr(module, "bias", None) is not None and module.bias.requires_grad:
        grads["bias"] = bias
    return grads


def _own(module: nn.Module, grads: dict[str, _V]) -> dict[str, _V]:
    """Keep only the parameters that train."""
    return {k: v for k, v in grads.items() if getattr(module, k).requires_grad}


# ---------------------------------------------------------------- Linear
def _linear_per_sample(module: nn.Linear, args: tuple, d: torch.Tensor) -> Grads:
    x = args[0]
    b = x.shape[0]
    x3, d3 = x.reshape(b, -1, x.shape[-1]), d.reshape(b, -1, d.shape[-1])  # positions folded
    weight = torch.einsum("bto,bti->boi", d3, x3)
    return _own(module, _with_bias(module, {"weight": weight}, d3.sum(1)))


def _linear_sum_squares(module: nn.Linear, args: tuple, d: torch.Tensor, project: Projector
                        ) -> tuple[Squares, Grads, Grads] | None:
    """The closed form of ``sum_i g_i^2``, a block of rows at a time (``RowSquares``): at one position
    per sample ``(D^2)^T X^2`` (one GEMM), over T positions each sample's ``(D_i^T X_i)^2`` made for a
    block of rows and a few samples at a time and summed in place (``_choice`` says when per-sample
    gradients made whole cost less). The check's sums ``(D^T X) v`` are two GEMVs and its magnitudes
    come from norms (``_linear_magnitudes``): no pass over the sums of squares."""
    x = args[0]
    if x.dim() < 2 or x.shape[0] == 0:
        return None
    b = x.shape[0]
    xf, df = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
    positions = xf.shape[0] // b
    if positions == 1:
        write = _linear_rows(xf, df)
        bias_squares = sum_of_squares(df)  # the write squares D again: holding D^2 until then cost 2 MiB on the MLP
        d_columns = bias_squares.sqrt()
    else:
        write = _linear_sequence_rows(xf.view(b, positions, -1), df.view(b, positions, -1))
        bias_squares = df.view(b, positions, -1).sum(1).square_().sum(0)
        d_columns = sum_of_squares(df).sqrt_()
    squares: Squares = {"weight": RowSquares(module.weight.shape, write, x.dtype, x.device)}
    v = project.vector(xf.shape[-1], x.dtype, x.device)
    sums = {"weight": df.T @ (xf @ v)}  # (D^T X) v, two GEMVs
    magnitudes = _linear_magnitudes(module, d_columns, torch.linalg.vector_norm(xf), xf.shape[0],
                                    project.norm(xf.shape[-1]))
    return (_own(module, _with_bias(module, squares, bias_squares)), _own(module, _with_bias(module, sums, df.sum(0))),
            magnitudes)


def _linear_rows(x: torch.Tensor, d: torch.Tensor):
    """Rows ``start:stop`` of ``sum_i (d_i x_i^T)^2`` (elementwise) = ``(D^2)^T X^2``: the one
    extra GEMM, a block of output rows at a time. ``X^2`` is made for the first block and
    dropped after the last, so it is held for one layer at a time."""
    held: list[torch.Tensor] = []

    def write(start: int, stop: int, out: torch.Tensor) -> None:
        if not held:
            held.append(x.square())
        torch.mm(d[:, start:stop].square().T, held[0], out=out)
        if stop == d.shape[1]:
            held.clear()

    return write


def _linear_sequence_rows(x3: torch.Tensor, d3: torch.Tensor):
    """Rows ``start:stop`` of ``sum_i (D_i^T X_i)^2`` for ``(B, T, *)`` inputs: the samples' products
    of those rows, ``samples_per_product`` samples at a time (one batched GEMM), squared in place and
    summed into ``out``; no more than ``_choice.PRODUCTS`` elements of them are held at once."""
    b, n_in = x3.shape[0], x3.shape[-1]

    def write(start: int, stop: int, out: torch.Tensor) -> None:
        d_rows = d3[:, :, start:stop].transpose(1, 2)  # (B, rows, T)
        step = samples_per_product(stop - start, n_in)
        for first in range(0, b, step):
            products = torch.bmm(d_rows[first:first + step], x3[first:first + step]).square_()
            if first == 0:
                torch.sum(products, 0, out=out)
            else:
                out.add_(products.sum(0))

    return write


def _linear_magnitudes(module: nn.Linear, d_columns: torch.Tensor, x_norm: torch.Tensor, rows: int,
                       v_norm: float) -> Grads:
    """The check's magnitudes as Cauchy-Schwarz bounds from norms already at hand,
    ``sum_r |d_rj| |x_r . v| <= |D_:j| |X|_F |v|`` over the rows r (samples x positions), so that
    no absolute value of an activation, and no pass over the sums of squares, is formed."""
    return _own(module, _with_bias(module, {"weight": d_columns * (x_norm * v_norm)},
                                   d_columns * rows**0.5))


def _linear_norms(module: nn.Linear, args: tuple, d: torch.Tensor, project: Projector) -> NormParts:
    """``sum_i |g_i|^2`` without per-sample gradients: for one position per sample
    ``|d_i x_i^T|^2 = |x_i|^2 |d_i|^2``; for T positions the Gram form
    ``sum_{t,s} (x_t . x_s)(d_t . d_s)`` or the per-sample gradient, whichever costs less.
    The check's magnitudes: ``_linear_magnitudes``."""
    x = args[0]
    b = x.shape[0]
    xf, df = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
    rows, n_in, n_out = xf.shape[0], xf.shape[1], df.shape[1]
    positions = rows // b
    x_rows = torch.linalg.vector_norm(xf, dim=1).square_()
    if positions == 1:
        d_rows = torch.linalg.vector_norm(df, dim=1).square_()
        weight, bias = torch.dot(x_rows, d_rows), d_rows.sum()
    else:
        x3, d3 = xf.view(b, positions, n_in), df.view(b, positions, n_out)
        if positions * (n_in + n_out) <= n_in * n_out:
            weight = (torch.bmm(x3, x3.transpose(1, 2)) * torch.bmm(d3, d3.transpose(1, 2))).sum()
        else:
            chunk = max(1, (1 << 24) // (n_in * n_out))
            weight = functools.reduce(operator.add, (_squared(torch.bmm(d3[s:s + chunk].transpose(1, 2),
                                                                        x3[s:s + chunk]))
                                                     for s in range(0, b, chunk)))
        bias = _squared(d3.sum(1))
    v = project.vector(n_in, x.dtype, x.device)
    d_columns = sum_of_squares(df).sqrt_()  # (vector_norm over dim 0 is a slow strided reduction)
    squared = _with_bias(module, {"weight": weight}, bias)
    sums = _with_bias(module, {"weight": df.T @ (xf @ v)}, df.sum(0))
    magnitudes = _linear_magnitudes(module, d_columns, x_rows.sum().sqrt(), rows, project.norm(n_in))
    return NormParts(_own(module, squared), _own(module, sums), magnitudes, rows)


def _linear_values(module: nn.Linear, args: tuple, d: torch.Tensor, name: str, index: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients at flat element indices, ``(B, len(index))``, without the rest:
    ``g_i[r, c] = sum_t d_i[t, r] x_i[t, c]`` (the precision guard's recomputation). The columns
    are gathered with ``index_select`` on the (samples x positions, features) matrices: the same
    products and sums as advanced indexing of the last dimension, which measured 5x slower."""
    x = args[0]
    b = x.shape[0]
    xf, df = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
    positions = xf.shape[0] // b if b else 0
    if name == "bias":
        return df.index_select(1, index).view(b, positions, -1).sum(1)
    rows, cols = index // xf.shape[-1], index % xf.shape[-1]
    chunk = max(1, (1 << 24) // max(1, xf.shape[0]))
    return torch.cat([(df.index_select(1, rows[s:s + chunk]) * xf.index_select(1, cols[s:s + chunk]))
                      .view(b, positions, -1).sum(1) for s in range(0, len(index), chunk)], dim=1)


def _squared(t: torch.Tensor) -> torch.Tensor:
    return (t * t).sum()


register(nn.Linear)(LayerStats("linear", _linear_per_sample, _linear_sum_squares, _linear_norms, values=_linear_values))


# ---------------------------------------------------------------- Conv1d / Conv2d
def _conv_per_sample(module: nn.Module, args: tuple, d: torch.Tensor) -> Grads:
    """Each sample's weight and bias gradient from the layer's own backward, vmapped over the
    samples (``torch.func``): every padding mode, stride, dilation and group count as the layer
    defines it. On the CPU this measured 2.6x faster than the unfold-and-contract form
    (Opacus', BackPACK's) on a 32-channel ResNet block (benchmarks/statistics_overhead.py)."""
    params = {k: p.detach() for k, p in module.named_parameters(recurse=False)}

    def one(x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        pull = vjp(lambda p: functional_call(module, p, (x.unsqueeze(0),)), params)[1]
        return pull(g.unsqueeze(0))[0]

    return _own(module, vmap(one)(args[0], d))


register(nn.Conv1d, nn.Conv2d)(LayerStats("conv", _conv_per_sample, positions=channels_first_positions))


# ---------------------------------------------------------------- Embedding
def _embedding_rows(module: nn.Embedding, args: tuple, d: torch.Tensor):
    """Per (sample, token id) gradient rows: unique keys, their rows, and the token ids."""
    if module.sparse:
        raise ValueError("per-sample statistics do not support nn.Embedding(sparse=True): its gradient is a "
                         "sparse tensor; use sparse=False with a statistics rule")
    idx = args[0]
    b, vocab = idx.shape[0], module.num_embeddings
    keys = (torch.arange(b, device=idx.device).view(-1, *[1] * (idx.dim() - 1)) * vocab + idx).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(len(unique), d.shape[-1], dtype=d.dtype, device=d.device)
    rows.index_add_(0, inverse, d.reshape(-1, d.shape[-1]))
    tokens = unique % vocab
    if module.padding_idx is not None:
        rows[tokens == module.padding_idx] = 0  # nn.Embedding gives padding_idx no gradient
    return unique // vocab, tokens, rows


def _embedding_per_sample(module: nn.Embedding, args: tuple, d: torch.Tensor) -> Grads:
    sample, tokens, rows = _embedding_rows(module, args, d)
    out = torch.zeros(args[0].shape[0], *module.weight.shape, dtype=d.dtype, device=d.device)
    out[sample, tokens] = rows
    return _own(module, {"weight": out})


def _embedding_sum_squares(module: nn.Embedding, args: tuple, d: torch.Tensor, project: Projector
                           ) -> tuple[Squares, Grads]:
    _, tokens, rows = _embedding_rows(module, args, d)
    squares = torch.zeros_like(module.weight, dtype=d.dtype).index_add_(0, tokens, rows * rows)
    projected = rows @ project.vector(rows.shape[-1], rows.dtype, rows.device)
    sums = torch.zeros(module.num_embeddings, dtype=d.dtype, device=d.device).index_add_(0, tokens, projected)
    squares_of: Squares = {"weight": squares}
    return _own(module, squares_of), _own(module, {"weight": sums})


def _embedding_norms(module: nn.Embedding, args: tuple, d: torch.Tensor, project: Projector) -> NormParts:
    _, tokens, rows = _embedding_rows(module, args, d)
    v = project.vector(rows.shape[-1], rows.dtype, rows.device)
    idx = args[0].reshape(-1)
    vocab = torch.zeros(module.num_embeddings, dtype=d.dtype, device=d.device)
    sums = vocab.clone().index_add_(0, tokens, rows @ v)
    magnitudes = vocab.index_add_(0, idx, d.reshape(-1, d.shape[-1]).abs() @ v)
    return NormParts(_own(module, {"weight": _squared(rows)}), _own(module, {"weight": sums}),
                     _own(module, {"weight": magnitudes}), idx.numel())


def _embedding_values(module: nn.Embedding, args: tuple, d: torch.Tensor, name: str, index: torch.Tensor
                      ) -> torch.Tensor:
    """Per-sample gradients at flat element indices, ``(B, len(index))``, from the per-(sample,
    token) rows: a row adds to the elements of its token's embedding."""
    sample, tokens, rows = _embedding_rows(module, args, d)
    token, column = index // module.embedding_dim, index % module.embedding_dim
    out = torch.zeros(args[0].shape[0], len(index), dtype=d.dtype, device=d.device)
    chunk = max(1, (1 << 24) // max(1, len(tokens)))
    for s in range(0, len(index), chunk):
        hit = (tokens[:, None] == token[None, s:s + chunk]).to(d.dtype)  # (rows, chunk)
        out[:, s:s + chunk].index_add_(0, sample, rows[:, column[s:s + chunk]] * hit)
    return out


register(nn.Embedding)(LayerStats("embedding", _embedding_per_sample, _embedding_sum_squares, _embedding_norms,
                                  values=_embedding_values))


# ---------------------------------------------------------------- LayerNorm / GroupNorm
def _layer_norm_per_sample(module: nn.LayerNorm, args: tuple, d: torch.Tensor) -> Grads:
    x = args[0]
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    inner = tuple(range(1, x.dim() - len(module.normalized_shape)))  # positions within a sample
    grads: Grads = {}
    if module.weight is not None:
        grads["weight"] = (d * x_hat).sum(dim=inner) if inner else d * x_hat
    if getattr(module, "bias", None) is not None:
        grads["bias"] = d.sum(dim=inner) if inner else d
    return _own(module, grads)


def _group_norm_per_sample(module: nn.GroupNorm, args: tuple, d: torch.Tensor) -> Grads:
    x = args[0]
    x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
    spatial = tuple(range(2, x.dim()))
    grads: Grads = {}
    if module.affine:
        grads["weight"] = (d * x_hat).sum(dim=spatial) if spatial else d * x_hat
        grads["bias"] = d.sum(dim=spatial) if spatial else d
    return _own(module, grads)


register(nn.LayerNorm)(LayerStats("layer_norm", _layer_norm_per_sample))
register(nn.GroupNorm)(LayerStats("group_norm", _group_norm_per_sample, positions=channels_first_positions))
