"""Lightning (issue 15): a module with the Accumulating mixin trains under Trainer(...) with a rule
or a planner; windows equal the full-batch step in float64, the scheduler and global_step count
windows, the records reach the logs, and a checkpoint keeps the partial window."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from gradaccum import BatchRamp, FixedSteps
from gradaccum.integrations.lightning import Accumulating



def data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


class Classifier(Accumulating, L.LightningModule):
    def __init__(self, rule) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net()
        self.rule = rule

    def configure_accumulation(self):
        return self.rule

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05)
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.accumulate(loss, len(y))


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def uneven(n_windows: int) -> list[list[int]]:
    """Micro-batches of 5, 3 and 4 samples: windows of 12."""
    out = []
    for w in range(n_windows):
        out += [list(range(12 * w + a, 12 * w + b)) for a, b in ((0, 5), (5, 8), (8, 12))]
    return out


def full_batch_steps(net: nn.Module, dataset: TensorDataset, windows: list) -> nn.Module:
    """A copy of ``net`` after one AdamW step (and scheduler step) per window of sample indices."""
    reference = copy.deepcopy(net)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for window in windows:
        x, y = dataset[window]
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
        scheduler.step()
    return reference


def test_windows_through_the_trainer_equal_the_full_batch_steps_in_float64() -> None:
    dataset = data(36)
    module = Classifier(FixedSteps(3))
    initial = copy.deepcopy(module.net)
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(dataset, batch_sampler=uneven(3)))
    reference = full_batch_steps(initial, dataset, [slice(12 * w, 12 * (w + 1)) for w in range(3)])
    for ours, theirs in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)
    assert fit.global_step == 3 and module.lr_schedulers().last_epoch == 3
    assert fit.logged_metrics["gradaccum/items"] == 12 and fit.logged_metrics["gradaccum/micro_batches"] == 3


def test_a_planner_changes_the_windows_and_global_step_counts_them() -> None:
    module = Classifier(BatchRamp(8, 32, over=96, micro_batch=8))
    fit = trainer(max_epochs=1)
    fit.fit(module, DataLoader(data(160), batch_size=8))
    sizes = [r.items for r in module.accumulator.history]
    assert sizes[0] == 8 and max(sizes) == 32
    assert fit.global_step == len(sizes) and module.lr_schedulers().last_epoch == len(sizes)


def test_a_checkpoint_keeps_the_partial_window(tmp_path) -> None:
    loader = DataLoader(data(32), batch_size=8)  # 4 micro-batches per epoch, windows of 3: open across epochs
    whole = Classifier(FixedSteps(3))
    trainer(max_epochs=3).fit(whole, loader)
    first = Classifier(FixedSteps(3))
    fit = trainer(max_epochs=1)
    fit.fit(first, loader)
    assert first.accumulator.window_micro_batches == 1
    fit.save_checkpoint(tmp_path / "one.ckpt")
    resumed = Classifier(FixedSteps(3))
    trainer(max_epochs=3).fit(resumed, loader, ckpt_path=tmp_path / "one.ckpt")
    assert [r.items for r in resumed.accumulator.history] == [24] * 4  # 12 micro-batches of 8, windows of 3
    for ours, theirs in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(ours, theirs)


def test_automatic_optimization_is_refused_by_name() -> None:
    module = Classifier(FixedSteps(2))
    module.automatic_optimization = True
    with pytest.raises(ValueError, match="automatic_optimization"):
        trainer(max_epochs=1).fit(module, DataLoader(data(16), batch_size=8))


@pytest.mark.slow
def test_ddp_with_two_processes_equals_one_process(tmp_path) -> None:
    """Two CPU processes (gloo, tests/_ddp_worker.py): each window is both ranks' micro-batches; both
    ranks' weights equal one process stepping on their union."""
    from .test_ddp import run_two_ranks

    ranks = run_two_ranks(tmp_path, "lightning")
    dataset = data(64)
    # Lightning gives each rank a DistributedSampler (shuffled, seed 0, epoch 0): window w is
    # both ranks' micro-batches 2w and 2w + 1
    orders = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        orders.append(list(sampler))
    reference = full_batch_steps(net(), dataset,
                                 [[i for order in orders for i in order[8 * w:8 * (w + 1)]] for w in range(4)])
    for result in ranks:
        assert result["global_step"] == 4
        for ours, theirs in zip(result["params"], reference.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-13)
