"""PyTorch behind the critical-batch measurement: a ``BranchProblem`` for a model and its
optimizer, and the noise scale measured online at a checkpoint's parameters.

``TorchProblem`` implements ``critical_batch.BranchProblem``: a checkpoint is a copy of the
model and its optimizer (``checkpoint(model, optimizer)``), a branch trains a fresh copy of it
with plain ``loss.backward(); optimizer.step()`` at the branch's learning rate.

``online_noise_scales`` measures, at the checkpoint's parameters (nothing is stepped: a copy of
the model under an SGD at learning rate 0), what the planners read online:

- ``B_simple`` by each statistics source of the Accumulator (``source="per_sample"`` and
  ``"micro_batch"``): windows of ``per_window`` micro-batches closed by a
  ``NoiseScalePlanner`` whose window is fixed (``min_batch = max_batch``), the unbiased
  ``tr(Sigma)`` and ``|G|^2`` of each window from its record, averaged over the windows, and
  their ratio (the ratio of averaged terms, not an average of per-window ratios, which is
  biased low);
- Adam's preconditioned noise scale ``tr(P Sigma) / G^T P G`` with ``P = diag(1 / (sqrt(v_hat)
  + eps))`` from the checkpoint's Adam state (AdaptDL/Pollux's "preconditioned gradient noise
  scale"), by the micro-batch estimator weighted by ``P`` on the same micro-batches: per window
  of ``k`` micro-batches of ``b_j`` samples and mean gradients ``g_j`` (window mean ``g``, ``n``
  samples), ``(k - 1) tr(P Sigma) ~ sum_j b_j |g_j - g|_P^2`` and ``G^T P G ~ |g|_P^2 -
  tr(P Sigma) / n`` (``gradaccum._core.micro_batch``, with a weighted norm), the terms averaged
  over the windows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import NoiseScalePlanner
from .._core.noise_scale import noise_scale
from ..torch import Accumulator

LossOf = Callable[[torch.nn.Module, Any], torch.Tensor]
"""``loss_of(model, batch)``: the batch's mean loss (a scalar tensor)."""


def checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, Any]:
    """A copy of ``model`` and ``optimizer`` (its state included) that later training leaves alone."""
    return copy.deepcopy((model, optimizer))


def sample_batches(data: Sequence[torch.Tensor], batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless batches of ``batch_size`` samples of ``data`` (tensors indexed by sample), epoch by
    epoch from shuffles seeded by ``seed``; a batch larger than the data is refused."""
    n = len(data[0])
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training samples")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield tuple(t[idx] for t in data)


@dataclass
class TorchProblem:
    """``BranchProblem`` for a PyTorch model: ``loss_of`` (module-level, so a worker process can
    run it), the training tensors and the fixed evaluation batch."""

    loss_of: LossOf
    train: tuple[torch.Tensor, ...]
    evaluation: tuple[torch.Tensor, ...]

    def restore(self, checkpoint: tuple[torch.nn.Module, Any]) -> tuple[torch.nn.Module, Any]:
        return copy.deepcopy(checkpoint)

    def step(self, state: tuple[torch.nn.Module, Any], batch: Any, lr: float) -> tuple[torch.nn.Module, Any]:
        model, optimizer = state
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(model, batch)
        if not torch.isfinite(loss):  # a diverged branch: its parameters become NaN, the evaluation says so
            for p in model.parameters():
                p.data.fill_(math.nan)
            return state
        loss.backward()
        optimizer.step()
        return state

    def loss(self, state: tuple[torch.nn.Module, Any]) -> float:
        with torch.no_grad():
            return float(self.loss_of(state[0], self.evaluation))

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        return sample_batches(self.train, batch_size, seed)


def accumulator_noise_scale(model: torch.nn.Module, loss_of: LossOf, micro_batches: Iterator[Any], per_window: int,
                            windows: int, source: str, count_of: Callable[[Any], tuple[int, int]]) -> dict[str, float]:
    """``B_simple`` by the Accumulator's ``source`` over ``windows`` windows of ``per_window``
    micro-batches at ``model``'s parameters (a copy; nothing changes): the ratio of the mean
    ``tr(Sigma)`` and mean ``|G|^2`` of the windows' records. ``count_of(batch)``: the
    micro-batch's (items, samples), e.g. (tokens, sequences)."""
    copy_ = copy.deepcopy(model)
    batches = [next(micro_batches) for _ in range(per_window * windows)]
    sizes = {count_of(b)[1] for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"micro_batches: the online windows need micro-batches of one size, got {sorted(sizes)}")
    micro = sizes.pop()
    planner = NoiseScalePlanner(1.0, min_batch=micro * per_window, max_batch=micro * per_window, micro_batch=micro,
                                source=source)
    acc = Accumulator(copy_, torch.optim.SGD(copy_.parameters(), lr=0.0), planner)
    for batch in batches:
        items, samples = count_of(batch)
        acc.backward(loss_of(copy_, batch), items, samples=samples)
    terms = [(r.info["trace"], r.info["squared_norm"]) for r in acc.history]
    if len(terms) != windows or any(r.micro_batches != per_window for r in acc.history):
        raise RuntimeError(f"expected {windows} windows of {per_window} micro-batches, the Accumulator closed "
                           f"{[r.micro_batches for r in acc.history]}")
    trace = math.fsum(t for t, _ in terms) / windows
    squared = math.fsum(g for _, g in terms) / windows
    return {"b_simple": noise_scale(trace, squared), "trace": trace, "squared_norm": squared, "windows": windows}


def adam_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """Adam's preconditioner ``1 / (sqrt(v_hat) + eps)`` for each trainable parameter of ``model``,
    in order (None when the optimizer holds no ``exp_avg_sq`` and ``step`` for every one)."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    weights = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        state, group = optimizer.state.get(p, {}), groups.get(id(p), {})
        if "exp_avg_sq" not in state or "step" not in state or "betas" not in group:
            return None
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        weights.append(1.0 / (v_hat.sqrt() + group["eps"]))
    return weights


def weighted_noise_scale(model: torch.nn.Module, loss_of: LossOf, micro_batches: Iterator[Any], per_window: int,
                         windows: int, weights: Sequence[torch.Tensor] | None, samples_of: Callable[[Any], int]
                         ) -> dict[str, float]:
    """The micro-batch estimator of ``tr(P Sigma) / G^T P G`` (module docstring) over ``windows``
    windows of ``per_window`` micro-batches, ``P`` the diagonal ``weights`` (one tensor per
    parameter of ``model.parameters()`` that has a gradient, in order; None: the identity,
    ``B_simple``). Float64 sums; the model is not changed."""
    if per_window < 2:
        raise ValueError(f"per_window must be >= 2: a window needs two micro-batches to have a variance, "
                         f"got {per_window}")
    params = [p for p in model.parameters() if p.requires_grad]
    ws = [torch.ones_like(p, dtype=torch.float64) for p in params] if weights is None else \
        [w.detach().to(torch.float64) for w in weights]
    if len(ws) != len(params) or any(w.shape != p.shape for w, p in zip(ws, params)):
        raise ValueError("weights: one tensor per trainable parameter of the model, of its shape")
    traces, squares = [], []
    for _ in range(windows):
        total = [torch.zeros_like(w) for w in ws]
        weighted, n = 0.0, 0
        for _ in range(per_window):
            batch = next(micro_batches)
            b = samples_of(batch)
            grads = torch.autograd.grad(loss_of(model, batch), params)
            for t, g in zip(total, grads):
                t.add_(g.detach().to(torch.float64), alpha=b)
            weighted += b * math.fsum(float((w * g.detach().to(torch.float64) ** 2).sum()) for g, w in zip(grads, ws))
            n += b
        squared_sum = math.fsum(float((w * t * t).sum()) for t, w in zip(total, ws)) / n  # n |g|_P^2
        trace = max(weighted - squared_sum, 0.0) / (per_window - 1)
        traces.append(trace)
        squares.append(squared_sum / n - trace / n)
    trace, squared = math.fsum(traces) / windows, math.fsum(squares) / windows
    return {"b_simple": noise_scale(trace, squared), "trace": trace, "squared_norm": squared, "windows": windows}


def online_noise_scales(state: tuple[torch.nn.Module, Any], loss_of: LossOf,
                        micro_batches: Callable[[], Iterator[Any]], per_window: int, windows: int,
                        count_of: Callable[[Any], tuple[int, int]]) -> dict[str, dict[str, float]]:
    """At a checkpoint ``(model, optimizer)``: ``B_simple`` by each source and Adam's
    preconditioned noise scale (module docstring), each on the same micro-batches
    (``micro_batches()`` starts the same stream each time)."""
    model, optimizer = state
    out = {source: accumulator_noise_scale(model, loss_of, micro_batches(), per_window, windows, source, count_of)
           for source in ("per_sample", "micro_batch")}
    weights = adam_weights(model, optimizer)
    if weights is not None:
        out["adam"] = weighted_noise_scale(model, loss_of, micro_batches(), per_window, windows, weights,
                                           lambda batch: count_of(batch)[1])
    return out
