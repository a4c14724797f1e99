"""Lightning's ``examples/pytorch/basics/transformer.py`` with gradaccum.

The structure is Lightning's example: a ``LanguageModel`` LightningModule around the demo
``Transformer`` (``lightning.pytorch.demos``), ``F.nll_loss`` over every target, SGD at lr 20,
``random_split`` into train, validation and test sets of ``(input, target)`` blocks, and
``Trainer(gradient_clip_val=0.25, max_epochs=...)``, ``fit`` then ``test``. The data is the
standard library's source as bytes (the example downloads WikiText-2), in blocks as the demo's
``WikiText2`` dataset cuts them.

What gradaccum changes (``--mode``):

- ``fixed``: the ``Accumulating`` mixin (``gradaccum.integrations.lightning``) with manual
  optimization; ``configure_accumulation`` returns ``FixedSteps(k)``, ``training_step`` calls
  ``self.accumulate(loss, target.numel())`` where it returned the loss, and the clipping moves
  from ``Trainer(gradient_clip_val=...)`` (automatic optimization only) to the Accumulator's
  ``clip_grad_norm``. A window ends with its epoch, as ``accumulate_grad_batches`` does: the
  epoch's last batch applies the partial window, weighted by its real item count (the epoch's
  last batch is short, so its micro-batches differ in size).
- ``planned``: ``configure_accumulation`` returns ``NoiseScalePlanner``, which sizes each window
  from the gradient noise scale earlier windows measured.
- ``monitor``: the example's module unchanged, with a ``gradaccum.torch.Monitor`` built by a
  small callback when training starts.

    python examples/lightning_lm.py [--mode fixed|planned|monitor] [--size tiny|real] [--dtype float64]
    python examples/lightning_lm.py --check   # fixed windows against the full batch, float64
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, replace

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer
from torch.utils.data import DataLoader, Dataset, random_split

from _common import (
    VOCAB,
    checked_args,
    max_difference,
    parser,
    report_check,
    report_monitor,
    report_planned,
    token_stream,
)
from gradaccum import FixedSteps, NoiseScalePlanner
from gradaccum.integrations.lightning import Accumulating
from gradaccum.torch import Monitor


@dataclass(frozen=True)
class Config:
    block_size: int = 16
    batch_size: int = 4
    accumulate: int = 4  # micro-batches per fixed window
    train_blocks: int | None = 38  # 10 batches an epoch, the last of 2 blocks (None: the whole corpus)
    eval_blocks: int = 8  # validation and test blocks each
    max_epochs: int = 2
    lr: float = 1.0
    gradient_clip_val: float = 0.25
    ninp: int = 16
    nhead: int = 2
    nhid: int = 16
    nlayers: int = 1


SIZES = {
    "tiny": Config(),
    # the example's demo Transformer and Trainer; batch 20 x 4 micro-batches per window
    "real": Config(lr=20.0, block_size=35, batch_size=20, train_blocks=None, eval_blocks=2000, max_epochs=20, ninp=200,
                   nhead=2, nhid=200,
                   nlayers=2),
}


class ByteText(Dataset):
    """The standard library's sources as ``(input, target)`` blocks, cut as the demo's ``WikiText2`` cuts."""

    def __init__(self, block_size: int, blocks: int | None) -> None:
        max_bytes = None if blocks is None else (blocks + 1) * block_size + 1
        self.data = torch.from_numpy(token_stream(max_bytes)[:max_bytes].astype("int64"))
        self.block_size = block_size

    @property
    def vocab_size(self) -> int:
        return VOCAB

    def __len__(self) -> int:
        return len(self.data) // self.block_size - 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        end = start + self.block_size
        return self.data[start:end], self.data[start + 1:end + 1]


class LanguageModel(L.LightningModule):
    """Lightning's example module as it is (dropout off: per-sample statistics refuse active dropout)."""

    def __init__(self, vocab_size: int, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Transformer(vocab_size=vocab_size, ninp=cfg.ninp, nhead=cfg.nhead, nhid=cfg.nhid,
                                 nlayers=cfg.nlayers, dropout=0.0)

    def training_step(self, batch, batch_idx):
        input, target = batch
        output = self.model(input, target)
        loss = F.nll_loss(output, target.view(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        input, target = batch
        output = self.model(input, target)
        loss = F.nll_loss(output, target.view(-1))
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        input, target = batch
        output = self.model(input, target)
        loss = F.nll_loss(output, target.view(-1))
        self.log("test_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.cfg.lr)


class AccumulatingLanguageModel(Accumulating, LanguageModel):
    """The same module, its windows decided by a rule or a planner (the changes are marked)."""

    def __init__(self, vocab_size: int, cfg: Config, rule, record: bool = False) -> None:
        super().__init__(vocab_size, cfg)
        self.automatic_optimization = False  # gradaccum: the Accumulator steps the optimizer
        self.accumulation_kwargs = {"clip_grad_norm": cfg.gradient_clip_val}  # was Trainer(gradient_clip_val=...)
        self.rule = rule
        self.batches: list | None = [] if record else None  # the micro-batches trained on, for the check

    def configure_accumulation(self):
        return self.rule

    def forward(self, input, target):
        return self.model(input, target)

    def training_step(self, batch, batch_idx):
        input, target = batch
        output = self(input, target)  # the module's own forward: the statistics watch it
        loss = F.nll_loss(output, target.view(-1))
        self.log("train_loss", loss, prog_bar=True)
        if self.batches is not None:
            self.batches.append((input.clone(), target.clone()))
        self.accumulate(loss, target.numel())  # was: return loss (nll_loss is the mean over every target)


class NoiseMonitor(L.Callback):
    """Builds a ``Monitor`` on the module's model and the ``LightningOptimizer`` when training starts."""

    monitor: Monitor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: LanguageModel) -> None:
        self.monitor = Monitor(pl_module.model, trainer.optimizers[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: LanguageModel) -> None:
        self.monitor.close()


def full_batch_reference(initial: LanguageModel, batches: list, history: list, cfg: Config) -> torch.nn.Module:
    """Each window's micro-batches as one batch: one forward, one backward of the mean loss over
    every target of the window, clipping, one SGD step."""
    model = copy.deepcopy(initial.model).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    start = 0
    for record in history:
        window, start = batches[start:start + record.micro_batches], start + record.micro_batches
        input = torch.cat([x for x, _ in window])
        target = torch.cat([y for _, y in window])
        F.nll_loss(model(input, target), target.view(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad()
    assert start == len(batches), "every micro-batch trained on is in a window"
    return model


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the tiny loaders need none
    # Lightning 2.6 calls a pytree API that torch 2.13 deprecates (not the example's to fix)
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
    args = checked_args(parser(__doc__.splitlines()[0]), argv)
    cfg = SIZES[args.size]
    if args.check:  # one epoch: windows of 4, 4 and the epoch's last 2 micro-batches
        cfg = replace(cfg, max_epochs=1)
        torch.set_default_dtype(torch.float64)  # the reference runs outside the Trainer's "64-true"
    L.seed_everything(42, verbose=False)
    blocks = None if cfg.train_blocks is None else cfg.train_blocks + 2 * cfg.eval_blocks
    dataset = ByteText(cfg.block_size, blocks)
    n = len(dataset)
    train_dataset, val_dataset, test_dataset = random_split(dataset, [n - 2 * cfg.eval_blocks, cfg.eval_blocks,
                                                                      cfg.eval_blocks])
    train_dataloader = DataLoader(train_dataset, batch_size=cfg.batch_size, shuffle=True)
    val_dataloader = DataLoader(val_dataset, batch_size=cfg.batch_size, shuffle=False)
    test_dataloader = DataLoader(test_dataset, batch_size=cfg.batch_size, shuffle=False)

    callbacks: list[L.Callback] = []
    if args.mode == "monitor":
        # the module as it is, stepping on whole windows' worth of blocks
        train_dataloader = DataLoader(train_dataset, batch_size=cfg.batch_size * cfg.accumulate, shuffle=True)
        model = LanguageModel(vocab_size=dataset.vocab_size, cfg=cfg)
        callbacks.append(NoiseMonitor())
        clip = cfg.gradient_clip_val
    else:
        rule = FixedSteps(cfg.accumulate) if args.mode == "fixed" else NoiseScalePlanner(
            1.0, min_batch=cfg.batch_size, micro_batch=cfg.batch_size, max_batch=8 * cfg.accumulate * cfg.batch_size)
        model = AccumulatingLanguageModel(vocab_size=dataset.vocab_size, cfg=cfg, rule=rule, record=args.check)
        clip = None  # Lightning clips under automatic optimization only; the Accumulator clips the window
    initial = copy.deepcopy(model)
    trainer = L.Trainer(gradient_clip_val=clip, max_epochs=cfg.max_epochs, accelerator="cpu",
                        precision="64-true" if args.dtype == "float64" else "32-true", callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, train_dataloader, val_dataloader)
    trainer.test(model, test_dataloader, verbose=False)
    print(f"global_step {trainer.global_step}, test_loss {float(trainer.callback_metrics['test_loss']):.4f}")
    if args.mode == "monitor":
        report_monitor(callbacks[0].monitor.rows)
        return
    history = model.accumulator.history
    if args.mode == "planned":
        report_planned(history, model.accumulator.planner.decay)
    else:
        print(f"windows (micro-batches): {[r.micro_batches for r in history]}")
    if args.check:
        reference = full_batch_reference(initial, model.batches, history, cfg)
        report_check(max_difference(model.model.parameters(), reference.parameters()), 1e-10, len(history))


if __name__ == "__main__":
    main()
