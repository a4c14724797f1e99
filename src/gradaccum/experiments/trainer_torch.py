"""The mnist1d run on the PyTorch backend: the reference MLP, Adam, the Accumulator."""

from __future__ import annotations

import torch
from torch import nn

from ..torch import Accumulator
from .arms import ARM_TABLE
from .config import ExperimentConfig
from .mnist1d_data import MNIST1D
from .run_record import Trained, increments, train_loop, window


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

    def backward(idx: torch.Tensor) -> bool:
        return acc.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]), len(idx))

    evaluations, wall, diverged, caught = train_loop(
        increments(len(y), cfg.increment, cfg.budget, torch.Generator().manual_seed(seed)), backward,
        lambda: accuracy(model, x_val, y_val), cfg.eval_every, acc.flush)
    windows = [window(r) for r in acc.history]
    return Trained(windows, [(e.samples, e.val) for e in evaluations], accuracy(model, x_val, y_val),
                   accuracy(model, x_test, y_test), wall, diverged, caught, evaluations)
