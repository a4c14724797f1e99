"""MicroBatchSampler: reproducible, resumable micro-batches for changing windows (issue 13)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradaccum import BatchRamp, NoiseScalePlanner
from gradaccum.torch import Accumulator, MicroBatchSampler

from .reference import mlp


def dataset(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_epochs_are_permutations_from_the_seed_and_ranks_split_each_micro_batch() -> None:
    sampler = MicroBatchSampler(23, 4, seed=3, drop_last=False)
    epochs = [[i for batch in sampler for i in batch] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(23)) and epochs[0] != epochs[1]
    assert epochs[0] == [i for batch in MicroBatchSampler(23, 4, seed=3, drop_last=False) for i in batch]
    ranks = [list(MicroBatchSampler(24, 3, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    single = list(MicroBatchSampler(24, 6, seed=1))
    assert [a + b for a, b in zip(*ranks)] == single  # each global micro-batch, split between the ranks


@pytest.mark.parametrize("planner", [BatchRamp(8, 32, over=300, micro_batch=8),
                                     NoiseScalePlanner(c=2.0, min_batch=16, max_batch=48, micro_batch=8)], ids=repr)
def test_a_run_resumed_mid_epoch_and_mid_window_is_bitwise_the_same(planner) -> None:
    """Checkpoint (model, optimizer, Accumulator, sampler) mid-window in the second epoch,
    rebuild everything and load: the run continues on the same data to the same weights."""
    data = dataset()

    def build():
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, opt, Accumulator(model, opt, planner), MicroBatchSampler(len(data), 8, seed=7)

    def train(model, acc, sampler, batches: int, start: int = 0) -> int:
        done = start
        while done < batches:
            for x, y in DataLoader(data, batch_sampler=sampler):
                acc.backward(torch.nn.functional.cross_entropy(model(x), y), len(y))
                done += 1
                if done == batches:
                    return done
        return done

    model, opt, acc, sampler = build()
    train(model, acc, sampler, 70)
    straight = [p.detach().clone() for p in model.parameters()]
    model, opt, acc, sampler = build()
    cut = train(model, acc, sampler, 30)
    while acc.window_micro_batches == 0:  # stop where a window is open
        cut = train(model, acc, sampler, cut + 1, start=cut)
    assert sampler.epoch == 1 and sampler.served > 0  # mid-epoch too
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict(),
             "sampler": sampler.state_dict()}
    model, opt, acc, sampler = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    acc.load_state_dict(saved["acc"])
    sampler.load_state_dict(saved["sampler"])
    train(model, acc, sampler, 70, start=cut)
    assert all(torch.equal(a, b) for a, b in zip(straight, model.parameters()))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(size=0, micro_batch=4), "size must be a positive int"),
    (dict(size=10, micro_batch=0), "micro_batch must be a positive int"),
    (dict(size=3, micro_batch=4), "holds no full micro-batch"),
    (dict(size=10, micro_batch=2, num_replicas=2, rank=2), "rank must be an int in"),
])
def test_bad_settings_name_the_argument(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MicroBatchSampler(**kwargs)


def test_a_state_from_other_settings_is_refused_and_changes_nothing() -> None:
    sampler = MicroBatchSampler(40, 4, seed=1)
    next(iter(sampler))
    before = sampler.state_dict()
    for bad, match in (({**before, "seed": 2}, "saved with seed=2"), ({**before, "served": 99}, "served must be"),
                       ({"epoch": 0}, "from MicroBatchSampler.state_dict")):
        with pytest.raises(ValueError, match=match):
            sampler.load_state_dict(bad)
        assert sampler.state_dict() == before
