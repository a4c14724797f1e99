"""A small, fast demonstration of exact accumulation (`gradaccum demo`).

It checks, in float64, that a window of uneven micro-batches applies the same gradient
as one full batch, then trains a small MLP with micro-batches of 16 and an effective
batch of 64 on a synthetic task, and writes what it measured to ``demo.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import FixedSteps
from ..torch import Accumulator


def _mlp(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).to(dtype)


def _teacher_data(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g, dtype=dtype)
    teacher = torch.randn(20, 5, generator=g, dtype=dtype)
    return x, (x @ teacher).argmax(1)


def exactness_check(sizes: tuple[int, ...] = (32, 32, 20, 12), seed: int = 0) -> float:
    """Max abs difference between the accumulated and the full-batch gradient (float64)."""
    x, y = _teacher_data(sum(sizes), seed, torch.float64)
    model = _mlp(seed, torch.float64)
    want = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    seen: list[torch.Tensor] = []

    class Capture(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            seen.extend(p.grad.detach().clone() for p in self.param_groups[0]["params"])
            return super().step(closure)

    acc = Accumulator(model, Capture(model.parameters(), lr=0.0), FixedSteps(len(sizes)))
    start = 0
    for n in sizes:
        part = slice(start, start + n)
        start += n
        acc.backward(nn.functional.cross_entropy(model(x[part]), y[part]), count=n)
    return max(float((a - b).abs().max()) for a, b in zip(seen, want))


def run_demo(out_dir: Path, *, epochs: int = 5, seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Run the demo and write ``demo.json`` to ``out_dir``; returns what it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    error = exactness_check(seed=seed)
    x, y = _teacher_data(2048 + 512, seed + 1, torch.float32)
    (x_train, y_train), (x_test, y_test) = (x[:2048], y[:2048]), (x[2048:], y[2048:])
    model = _mlp(seed, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    acc = Accumulator(model, opt, FixedSteps(4))  # micro-batch 16 x 4 = effective batch 64
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in tqdm(range(epochs), desc="demo epochs", disable=quiet):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), 16):
            idx = order[i : i + 16]
            acc.backward(nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]), count=len(idx))
        acc.flush()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    result = {
        "max_abs_error_vs_full_batch_float64": error,
        "optimizer_steps": acc.steps,
        "effective_batch": acc.history[0].items,
        "micro_batch": 16,
        "test_accuracy": accuracy,
        "train_seconds": time.perf_counter() - t0,
    }
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
