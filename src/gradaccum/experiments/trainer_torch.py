"""The mnist1d run on the PyTorch backend: the reference MLP, Adam, the Accumulator."""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from ..torch import Accumulator, NonFiniteError
from .arms import ARM_TABLE
from .config import ExperimentConfig
from .mnist1d_data import MNIST1D
from .run_record import Evaluation, Trained, Window, increments


def mlp() -> nn.Module:
    """The reference MLP 40-256-256-10 with ReLU."""
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_torch(arm: str, params: dict[str, float], seed: int, data: MNIST1D, cfg: ExperimentConfig) -> Trained:
    """Train for ``cfg.budget`` samples, validating every ``cfg.eval_every``; a non-finite
    loss or gradient stops the run as diverged."""
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    torch.manual_seed(seed)
    model = mlp()
    acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=params["lr"]), ARM_TABLE[arm].rule(params, cfg))
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    curve: list[tuple[int, float]] = []
    evaluations: list[Evaluation] = []
    seen, next_eval, diverged, steps, evaluating = 0, cfg.eval_every, False, 0, 0.0
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)  # "not adapting": recorded, shown in the report
        try:
            for idx in increments(len(y), cfg.increment, cfg.budget, torch.Generator().manual_seed(seed)):
                steps += acc.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]), len(idx))
                seen += len(idx)
                if seen >= next_eval:
                    now = time.perf_counter()
                    val = accuracy(model, x_val, y_val)
                    curve.append((seen, val))
                    evaluations.append(Evaluation(seen, steps, now - start - evaluating, val,
                                                  accuracy(model, x_test, y_test)))
                    evaluating += time.perf_counter() - now
                    next_eval += cfg.eval_every
            acc.flush()
        except NonFiniteError:
            diverged = True
    wall = time.perf_counter() - start - evaluating
    windows = [Window(r.items, r.micro_batches, r.skipped, r.reason, r.info.get("gsnr", r.info.get("norm_test")))
               for r in acc.history]
    return Trained(windows, curve, accuracy(model, x_val, y_val), accuracy(model, x_test, y_test), wall, diverged,
                   sorted({str(w.message) for w in caught}), evaluations)
