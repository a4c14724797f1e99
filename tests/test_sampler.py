"""MicroBatchSampler: reproducible, resumable micro-batches for changing windows."""

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


@pytest.mark.parametrize(("saved", "loaded", "key"), [
    (dict(seed=1, shuffle=True), dict(seed=1, shuffle=False), "shuffle"),
    (dict(seed=1, drop_last=True), dict(seed=1, drop_last=False), "drop_last"),
    (dict(seed=1), dict(seed=2), "seed"),
])
def test_a_state_loads_only_into_a_sampler_with_the_same_settings(saved, loaded, key) -> None:
    """The state held no ``shuffle`` (a shuffled run resumed unshuffled, silently)."""
    source = MicroBatchSampler(42, 4, **saved)
    next(iter(source))
    target = MicroBatchSampler(42, 4, **loaded)
    with pytest.raises(ValueError, match=f"saved with {key}="):
        target.load_state_dict(source.state_dict())
    assert (target.epoch, target.served) == (0, 0)


@pytest.mark.parametrize("key", ["seed", "shuffle", "size"])
def test_a_state_without_a_setting_is_refused_by_name(key: str) -> None:
    """A state lacking ``seed`` loaded into a sampler with any seed (the check was skipped)."""
    source = MicroBatchSampler(40, 4, seed=1)
    next(iter(source))
    state = {k: v for k, v in source.state_dict().items() if k != key}
    target = MicroBatchSampler(40, 4, seed=9)
    with pytest.raises(ValueError, match=f"sampler state is missing {key}"):
        target.load_state_dict(state)
    assert (target.epoch, target.served) == (0, 0)


def test_load_state_dict_during_a_live_iterator_does_not_mix_epochs() -> None:
    """A live iterator kept its epoch's permutation and served the loaded position from it (the
    examples of one epoch at another's position), then counted an epoch that was not served.
    It now raises; a new iterator serves exactly what the state says, and of two iterators
    only the newer serves."""
    reference = MicroBatchSampler(40, 4, seed=3)
    epochs = [list(reference) for _ in range(3)]
    sampler = MicroBatchSampler(40, 4, seed=3)
    live = iter(sampler)
    assert next(live) == epochs[0][0]
    sampler.load_state_dict({**sampler.state_dict(), "epoch": 1, "served": 3})
    with pytest.raises(RuntimeError, match="overtaken by a newer one or by load_state_dict"):
        next(live)
    assert (sampler.epoch, sampler.served) == (1, 3)
    assert list(sampler) == epochs[1][3:]
    assert (sampler.epoch, sampler.served) == (2, 0)
    older, newer = iter(sampler), iter(sampler)
    assert next(newer) == epochs[2][0]
    with pytest.raises(RuntimeError, match="overtaken"):
        next(older)
    assert next(newer) == epochs[2][1]


def test_a_short_last_micro_batch_is_split_so_that_every_rank_gets_examples() -> None:
    """Rank 1 got an empty last micro-batch (an IndexError in the DataLoader's collate)."""
    ranks = [list(MicroBatchSampler(10, 4, seed=5, num_replicas=2, rank=r, drop_last=False)) for r in range(2)]
    assert all(len(batch) > 0 for batches in ranks for batch in batches)
    assert [len(b) for b in ranks[0]] == [4, 1] and [len(b) for b in ranks[1]] == [4, 1]
    single = list(MicroBatchSampler(10, 8, seed=5, drop_last=False))
    assert [a + b for a, b in zip(*ranks)] == single  # each global micro-batch, split between the ranks
    for _x, y in DataLoader(dataset(10), batch_sampler=MicroBatchSampler(10, 4, num_replicas=2, rank=1,
                                                                        drop_last=False)):
        assert len(y) > 0
    with pytest.raises(ValueError, match="drop_last=False: the epoch's last micro-batch holds 1 example"):
        MicroBatchSampler(9, 4, num_replicas=2, rank=0, drop_last=False)


def test_any_int_seed_gives_reproducible_epochs() -> None:
    """The seed 2**70 overflowed the generator at the first epoch; a seed the generator took
    before gives the same permutations as before."""
    big = [list(MicroBatchSampler(10, 2, seed=2**70)) for _ in range(2)]
    assert big[0] == big[1] and sorted(i for b in big[0] for i in b) == list(range(10))
    for seed in (0, 7, -3):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(seed * 1_000_003)).tolist()
        assert [i for b in MicroBatchSampler(10, 2, seed=seed) for i in b] == order
