"""A finished Accumulator or Monitor leaves nothing alive: its model, its recorded calls and
their tensors are freed once the user drops them (the per-sample recorder's hooks sit on graph
nodes the garbage collector cannot see into, so they must not hold their calls)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from gradaccum import GSNR, NoiseScalePlanner
from gradaccum.experiments.lm_task import ByteGPT
from gradaccum.torch import Accumulator, Monitor

pytestmark = pytest.mark.slow  # each scans every object the collector tracks, twice


def _gpt() -> ByteGPT:
    torch.manual_seed(0)
    return ByteGPT(context=8, dim=16, layers=1)  # positions broadcast over the batch, a tied head


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(step))


def _loss(model: ByteGPT, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))


def _accumulate(rule: object) -> Callable[[], weakref.ref]:
    def train() -> weakref.ref:
        model = _gpt()
        acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3), rule)
        for step in range(6):
            batch = _tokens(step)
            acc.backward(_loss(model, batch), batch[:, 1:].numel(), samples=len(batch))
        acc.flush()
        return weakref.ref(model)

    return train


def _monitor(source: str) -> Callable[[], weakref.ref]:
    def train() -> weakref.ref:
        model = _gpt()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with Monitor(model, optimizer, source=source, accumulation=2 if source == "micro_batch" else "mean"):
            for step in range(6):
                _loss(model, _tokens(step)).div(2 if source == "micro_batch" else 1).backward()
                if source != "micro_batch" or step % 2:
                    optimizer.step()
                    optimizer.zero_grad()
        return weakref.ref(model)

    return train


def _tensors() -> int:
    """Tensors the collector tracks (``type``: some objects warn when asked for ``__class__``)."""
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("train", [
    _accumulate(NoiseScalePlanner(0.5, min_batch=4, max_batch=8, micro_batch=4, source="per_sample")),
    _accumulate(GSNR(2.0, max_samples=8, increment=4, scale="mean")),
    _accumulate(NoiseScalePlanner(0.5, min_batch=8, max_batch=8, micro_batch=4, source="micro_batch")),
    _monitor("per_sample"),
    _monitor("micro_batch"),
], ids=["planner_per_sample", "gsnr_elements", "planner_micro_batch", "monitor_per_sample", "monitor_micro_batch"])
def test_the_model_and_every_recorded_tensor_are_freed_after_training(train: Callable[[], weakref.ref]) -> None:
    gc.collect()
    before = _tensors()
    model = train()
    gc.collect()
    assert model() is None, "the model is still alive after training: something holds it"
    after = _tensors()
    assert after <= before
