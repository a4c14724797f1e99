"""Accelerate's ``gradient_accumulation_for_autoregressive_models.py`` with gradaccum.

The structure is Accelerate's example: ``get_dataloaders`` with a ``collate_fn`` that pads each
micro-batch to its longest row and sets the padding's labels to -100, a causal LM from
``transformers`` with its own loss, AdamW and a scheduler from ``transformers``,
``accelerator.prepare``, gradient clipping, a window that ends with the epoch (the original's
``remainder``), and the perplexity on the validation set after every epoch. The model is a
GPT-2 built from a config (nothing downloaded), the data the standard library's source as
bytes, one paragraph per row.

Accelerate's script counts the window's tokens itself, prefetching the window's micro-batches
to pass ``num_items_in_batch`` to the model; with gradaccum the micro-batches are used as they
come (``--mode``):

- ``fixed``: ``gradaccum.integrations.accelerate.accumulator(accelerator, model, optimizer,
  FixedSteps(k), scheduler=lr_scheduler, clip_grad_norm=max_grad_norm)``, then
  ``acc.backward(outputs.loss, gradaccum.token_count(batch["labels"]))`` per micro-batch.
  ``token_count`` leaves each row's first label out: the model shifts the labels inside, so it
  never predicts it, and its mean loss is over the others.
- ``planned``: the same with ``NoiseScalePlanner``, which sizes each window from the gradient
  noise scale earlier windows measured.
- ``monitor``: the plain Accelerate loop (``accelerator.backward``, ``clip_grad_norm_``,
  ``optimizer.step()``) with a ``gradaccum.torch.Monitor`` on the prepared optimizer.

    python examples/accelerate_lm.py [--mode fixed|planned|monitor] [--size tiny|real] [--dtype float64]
    python examples/accelerate_lm.py --check   # fixed windows against the full batch, float64
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, get_constant_schedule_with_warmup, set_seed
from transformers.utils import logging as hf_logging

import gradaccum
from _common import (
    EOT,
    VOCAB,
    checked_args,
    documents,
    max_difference,
    parser,
    report_check,
    report_monitor,
    report_planned,
)
from gradaccum import FixedSteps, NoiseScalePlanner
from gradaccum.integrations.accelerate import accumulator
from gradaccum.torch import Monitor

HF_TOLERANCE = 1e-6  # transformers' loss casts the logits to float32


@dataclass(frozen=True)
class Config:
    lr: float = 1e-3
    num_epochs: int = 2
    seed: int = 42
    batch_size: int = 4  # per device
    gradient_accumulation_steps: int = 4  # gradaccum's windows; the Accelerator's own stays 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 2
    max_length: int = 32  # bytes per row
    train_rows: int = 38  # 10 micro-batches per epoch, the last of 2 rows
    eval_rows: int = 16
    eval_batch_size: int = 8
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 16


SIZES = {
    "tiny": Config(),
    "real": Config(lr=3e-4, num_epochs=3, batch_size=8, gradient_accumulation_steps=8, warmup_steps=100,
                   max_length=512, train_rows=16_000, eval_rows=1_000, eval_batch_size=32, n_layer=12, n_head=12,
                   n_embd=768),
}


def get_dataloaders(accelerator: Accelerator, cfg: Config) -> tuple[DataLoader, DataLoader]:
    """The train and validation loaders: one paragraph of the sources per row (its first
    ``max_length`` bytes), micro-batches padded to their longest row."""
    rows = [{"input_ids": list(doc[:cfg.max_length])} for doc in documents()[:cfg.train_rows + cfg.eval_rows]]
    train, validation = rows[:cfg.train_rows], rows[cfg.train_rows:]

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        max_length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), max_length), EOT, dtype=torch.long)  # the pad token
        for i, e in enumerate(examples):
            input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        # the model shifts the labels itself (labels = input_ids); padding is not predicted
        labels = torch.where(input_ids == EOT, -100, input_ids)
        return {"input_ids": input_ids, "labels": labels}

    train_dataloader = DataLoader(train, shuffle=False, collate_fn=collate_fn, batch_size=cfg.batch_size)
    eval_dataloader = DataLoader(validation, shuffle=False, collate_fn=collate_fn, batch_size=cfg.eval_batch_size)
    return train_dataloader, eval_dataloader


def make_model(cfg: Config, dtype: torch.dtype) -> GPT2LMHeadModel:
    """GPT-2 from a config; dropout off (per-sample statistics refuse active dropout)."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=cfg.max_length, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT,
                        eos_token_id=EOT, pad_token_id=EOT)
    return GPT2LMHeadModel(config).to(dtype)


@torch.no_grad()
def perplexity(model: torch.nn.Module, eval_dataloader: DataLoader) -> tuple[float, float]:
    """The validation loss (mean over its predicted tokens) and its exponential."""
    model.eval()
    total = tokens = 0.0
    for batch in eval_dataloader:
        outputs = model(**batch, use_cache=False)
        count = int(gradaccum.token_count(batch["labels"]))
        total += outputs.loss.item() * count
        tokens += count
    model.train()
    eval_loss = total / tokens
    try:
        return eval_loss, math.exp(eval_loss)
    except OverflowError:
        return eval_loss, float("inf")


def training_function(cfg: Config, args, windows: list | None = None):
    """Accelerate's training function; returns the Accumulator (or the Monitor) and the model.
    ``windows``, if given, receives each window's micro-batches (for the check)."""
    accelerator = Accelerator(cpu=True)  # gradient_accumulation_steps stays 1: gradaccum decides the windows
    set_seed(cfg.seed)
    if args.mode == "monitor":  # the plain loop steps on whole windows' worth of rows
        cfg = replace(cfg, batch_size=cfg.batch_size * cfg.gradient_accumulation_steps)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, cfg)
    model = make_model(cfg, getattr(torch, args.dtype))
    initial = copy.deepcopy(model)
    model = model.to(accelerator.device)
    optimizer = AdamW(params=model.parameters(), lr=cfg.lr)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=cfg.warmup_steps)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)

    if args.mode == "monitor":
        return train_monitored(accelerator, model, optimizer, lr_scheduler, train_dataloader, eval_dataloader, cfg)

    if args.mode == "fixed":
        rule = FixedSteps(cfg.gradient_accumulation_steps)
    else:  # c * B_simple rows, from one micro-batch to eight nominal windows
        rule = NoiseScalePlanner(1.0, min_batch=cfg.batch_size, micro_batch=cfg.batch_size,
                                 max_batch=8 * cfg.gradient_accumulation_steps * cfg.batch_size)
    # instead of accelerator.backward(loss), clip_grad_norm_, optimizer.step(), lr_scheduler.step(), zero_grad()
    acc = accumulator(accelerator, model, optimizer, rule, scheduler=lr_scheduler, clip_grad_norm=cfg.max_grad_norm)
    for epoch in range(cfg.num_epochs):
        model.train()
        window, loss_sum = [], 0.0
        for batch in train_dataloader:
            outputs = model(**batch, use_cache=False)
            count = gradaccum.token_count(batch["labels"])  # the labels the model's mean loss is over
            window.append(batch)
            loss_sum += outputs.loss.item() * int(count)
            if acc.backward(outputs.loss, count):  # the window closed: clipped, stepped, scheduled
                log_window(accelerator, acc, epoch, window, loss_sum, windows)
                window, loss_sum = [], 0.0
        if acc.flush():  # the window ends with the epoch, as the original's `remainder` does
            log_window(accelerator, acc, epoch, window, loss_sum, windows)
        eval_loss, ppl = perplexity(model, eval_dataloader)
        accelerator.print(f"epoch {epoch}:: eval perplexity: {ppl:.4f} eval_loss: {eval_loss:.4f}")
    accelerator.end_training()
    return acc, model, initial


def log_window(accelerator: Accelerator, acc, epoch: int, window: list, loss_sum: float, windows: list | None) -> None:
    """Print the window that closed (its mean loss over its tokens) and keep its micro-batches."""
    record = acc.last_record
    accelerator.print(f"epoch {epoch} - update step {record.step}:: grad norm: {record.grad_norm:.4f} "
                      f"::train loss: {loss_sum / record.items:.4f} ({record.micro_batches} micro-batches, "
                      f"{record.items} tokens)")
    if windows is not None:
        windows.append(list(window))


def train_monitored(accelerator, model, optimizer, lr_scheduler, train_dataloader, eval_dataloader, cfg: Config):
    """Accelerate's loop without accumulation, measured by a Monitor (two lines)."""
    monitor = Monitor(model, optimizer)  # gradaccum, 1 of 2: the prepared optimizer is unwrapped
    for epoch in range(cfg.num_epochs):
        model.train()
        for update_step, batch in enumerate(train_dataloader):
            outputs = model(**batch, use_cache=False)
            loss = outputs.loss
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            row = monitor.rows[-1]
            accelerator.print(f"epoch {epoch} - update step {update_step}:: grad norm: {float(grad_norm):.4f} "
                              f"::train loss: {loss.item():.4f} :: noise scale {row['noise_scale']:.4g} "
                              f"(this batch), {row['noise_scale_ema']:.4g} (moving average)")
        eval_loss, ppl = perplexity(model, eval_dataloader)
        accelerator.print(f"epoch {epoch}:: eval perplexity: {ppl:.4f} eval_loss: {eval_loss:.4f}")
    accelerator.end_training()
    monitor.close()  # gradaccum, 2 of 2
    return monitor, model, None


def pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """``t`` (batch x tokens) padded on the right with ``value`` to ``length`` tokens."""
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def full_batch_reference(initial: GPT2LMHeadModel, windows: list, cfg: Config) -> GPT2LMHeadModel:
    """Each window's micro-batches padded to one length and stacked: one forward, one backward
    of the mean loss over the window's predicted tokens, clipping, AdamW, the scheduler."""
    model = copy.deepcopy(initial)
    model.train()
    optimizer = AdamW(params=model.parameters(), lr=cfg.lr)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=cfg.warmup_steps)
    for window in windows:
        length = max(b["input_ids"].shape[1] for b in window)
        input_ids = torch.cat([pad_right(b["input_ids"], length, EOT) for b in window])
        labels = torch.cat([pad_right(b["labels"], length, -100) for b in window])
        model(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return model


def main(argv: list[str] | None = None) -> None:
    hf_logging.set_verbosity_error()
    args = checked_args(parser(__doc__.splitlines()[0]), argv)
    cfg = SIZES[args.size]
    if args.check:  # one epoch: windows of 4, 4 and the epoch's last 2 micro-batches
        cfg = replace(cfg, num_epochs=1)
    windows: list | None = [] if args.check else None
    result, model, initial = training_function(cfg, args, windows)
    if args.mode == "monitor":
        report_monitor(result.rows)
    elif args.mode == "planned":
        report_planned(result.history, result.planner.decay)
    if args.check:
        reference = full_batch_reference(initial, windows, cfg)
        report_check(max_difference(model.parameters(), reference.parameters()), HF_TOLERANCE, len(windows))


if __name__ == "__main__":
    main()
