"""One training run of one arm on mnist1d: the unit that tuning and the final seeds repeat."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .. import GSNR, FixedSteps, NormTest, StoppingRule
from ..torch import Accumulator
from .config import ExperimentConfig
from .mnist1d_data import MNIST1D


def mlp() -> nn.Module:
    """The reference MLP 40-256-256-10 with ReLU."""
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_rule(arm: str, params: dict[str, float], cfg: ExperimentConfig) -> StoppingRule:
    """The stopping rule of an arm; every arm feeds micro-batches of ``cfg.increment``."""
    if arm == "baseline":
        return FixedSteps(1)
    if arm == "baseline512":
        return FixedSteps(max(1, cfg.max_samples // cfg.increment))
    if arm in ("gaga", "gaga_mean"):
        return GSNR(params["tau"], increment=cfg.increment, max_samples=cfg.max_samples,
                    scale="sample" if arm == "gaga" else "mean")
    if arm == "normtest":
        return NormTest(params["theta"], increment=cfg.increment, max_samples=cfg.max_samples)
    raise ValueError(f"unknown arm {arm!r}")


@dataclass
class RunResult:
    """What one run measured; JSON-serialisable via ``asdict``.

    ``batch_sizes`` are the windows the rule closed; a partial window left at the end
    of the budget (applied by ``flush``) is counted in ``flushed_items`` instead.
    """

    arm: str
    params: dict[str, float]
    seed: int
    test_accuracy: float
    final_val_accuracy: float
    val_curve: list[tuple[int, float]]
    steps: int
    batch_sizes: list[int]
    flushed_items: int
    statistic: list[float | None]
    wall_seconds: float
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def increments(n: int, size: int, budget: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of ``size`` drawn epoch by epoch from seeded shuffles, ``budget`` samples in all."""
    seen = 0
    while seen < budget:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - size + 1, size):
            if seen >= budget:
                return
            take = min(size, budget - seen)
            seen += take
            yield order[i:i + take]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_run(arm: str, params: dict[str, float], seed: int, data: MNIST1D, cfg: ExperimentConfig) -> RunResult:
    """Train the reference MLP with Adam for ``cfg.budget`` samples; validate every ``cfg.eval_every``.

    ``cfg.backend`` picks the PyTorch Accumulator or the JAX train state (``runs_jax``).
    """
    if cfg.backend == "jax":
        try:
            from .runs_jax import train_run_jax  # jax is an optional extra
        except ImportError as error:
            raise ValueError(f"backend: 'jax' needs the jax extra (pip install 'gradaccum[jax]'): {error}") from None

        return train_run_jax(arm, params, seed, data, cfg)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    torch.manual_seed(seed)
    model = mlp()
    acc = Accumulator(model, torch.optim.Adam(model.parameters(), lr=params["lr"]), make_rule(arm, params, cfg))
    curve: list[tuple[int, float]] = []
    seen, next_eval = 0, cfg.eval_every
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)  # "not adapting": recorded, shown in the report
        for idx in increments(len(y), cfg.increment, cfg.budget, torch.Generator().manual_seed(seed)):
            acc.backward(nn.functional.cross_entropy(model(x[idx]), y[idx]), len(idx))
            seen += len(idx)
            if seen >= next_eval:
                curve.append((seen, accuracy(model, x_val, y_val)))
                next_eval += cfg.eval_every
        acc.flush()
    wall = time.perf_counter() - start
    final_val = accuracy(model, x_val, y_val)
    return RunResult(
        arm=arm, params=dict(params), seed=seed,
        test_accuracy=accuracy(model, torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)),
        final_val_accuracy=final_val, val_curve=curve, steps=len(acc.history),
        batch_sizes=[r.items for r in acc.history if r.reason == "rule"],
        flushed_items=sum(r.items for r in acc.history if r.reason == "flush"),
        statistic=[r.info.get("gsnr", r.info.get("norm_test")) for r in acc.history],
        wall_seconds=wall, warnings=sorted({str(w.message) for w in caught}),
    )
