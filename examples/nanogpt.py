"""nanoGPT's ``train.py`` with gradaccum: the same loop, exact windows.

The structure is nanoGPT's: ``get_batch`` draws random blocks from a memory-mapped token
array, the model returns ``(logits, loss)``, AdamW with weight decay on the matrices only, a
cosine learning rate with linear warmup, gradient clipping, ``estimate_loss`` every
``eval_interval`` iterations, and the next batch fetched right after the forward (so that it
loads while the backward runs). The data is the standard library's source as bytes; the
targets after a document boundary within a block are ``-1`` (not predicted across
documents), so micro-batches hold different numbers of targets: the count matters.

What gradaccum changes (``--mode``):

- ``fixed``: ``Accumulator(model, optimizer, FixedSteps(gradient_accumulation_steps),
  clip_grad_norm=grad_clip)``; ``acc.backward(loss, count)`` replaces ``loss /
  gradient_accumulation_steps``, ``backward``, clipping, ``step`` and ``zero_grad``. Every
  window's step sees the mean gradient over the window's targets (nanoGPT's own loop averages
  the micro-batches' means, which weights a target by 1 / its micro-batch's count).
- ``planned``: ``NoiseScalePlanner`` sizes each window from the gradient noise scale earlier
  windows measured; the number of steps is then unknown in advance, so the cosine schedule
  runs over tokens (``lr_schedule=``), ending after the fixed run's token budget.
- ``monitor``: nanoGPT's loop unchanged (one micro-batch per iteration) with a
  ``gradaccum.torch.Monitor``, which measures the noise scale of every step.

    python examples/nanogpt.py [--mode fixed|planned|monitor] [--size tiny|real] [--dtype float64]
    python examples/nanogpt.py --check   # fixed windows against the full batch, float64
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch

import gradaccum
from _common import (
    CHECK_WINDOWS,
    EOT,
    VOCAB,
    checked_args,
    max_difference,
    parser,
    report_check,
    report_monitor,
    report_planned,
    token_stream,
)
from _models import GPT, GPTConfig
from gradaccum import FixedSteps, NoiseScalePlanner
from gradaccum.torch import Accumulator, Monitor


@dataclass(frozen=True)
class Config:
    """nanoGPT's configuration variables (``config/train_shakespeare_char.py`` for ``real``)."""

    batch_size: int = 4
    block_size: int = 32
    gradient_accumulation_steps: int = 4
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0  # per-sample statistics refuse active dropout (planned and monitor modes)
    bias: bool = True
    learning_rate: float = 1e-3
    max_iters: int = 8
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    decay_lr: bool = True
    warmup_iters: int = 2
    lr_decay_iters: int = 8
    min_lr: float = 1e-4
    eval_interval: int = 4
    eval_iters: int = 2
    log_interval: int = 1
    corpus_bytes: int | None = 200_000
    device: str = "cpu"


SIZES = {
    "tiny": Config(),
    # shakespeare_char's model and schedule; batch 64 as 16 x 4 micro-batches
    "real": Config(batch_size=16, block_size=256, gradient_accumulation_steps=4, n_layer=6, n_head=6, n_embd=384,
                   max_iters=5000, warmup_iters=100, lr_decay_iters=5000, eval_interval=250, eval_iters=200,
                   log_interval=10, corpus_bytes=None),
}


def load_data(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """nanoGPT memory-maps ``train.bin`` and ``val.bin``; here the same kind of uint8 array, 90/10."""
    data = token_stream(cfg.corpus_bytes)
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def get_batch(split: str, data: dict[str, np.ndarray], cfg: Config, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random blocks and their next tokens; a target past a document boundary
    in its block is -1 (the model's loss skips it)."""
    source = data[split]
    ix = torch.randint(len(source) - cfg.block_size, (cfg.batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(source[i:i + cfg.block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(source[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
    crossed = torch.cumsum(x == EOT, dim=1) > 0  # the block's context reaches into another document
    y = y.masked_fill(crossed, -1)
    return x.to(cfg.device), y.to(cfg.device)


def get_lr(it: float, cfg: Config) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to ``min_lr``, then ``min_lr``."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    decay_ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model: GPT, data: dict[str, np.ndarray], cfg: Config) -> dict[str, float]:
    """The mean loss over ``eval_iters`` batches of each split (its own generator: evaluating
    does not change the training batches)."""
    out = {}
    model.eval()
    generator = torch.Generator().manual_seed(1)
    for split in ("train", "val"):
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            X, Y = get_batch(split, data, cfg, generator)
            _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def make_model(cfg: Config, dtype: torch.dtype) -> GPT:
    torch.manual_seed(1337)
    config = GPTConfig(block_size=cfg.block_size, vocab_size=VOCAB, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    return GPT(config).to(device=cfg.device, dtype=dtype)


def train_accumulated(model: GPT, data: dict[str, np.ndarray], cfg: Config, mode: str,
                      windows: list | None = None) -> Accumulator:
    """nanoGPT's training loop, its windows closed by the Accumulator. ``windows``, if given,
    receives each window's micro-batches (for the check)."""
    device_type = "cuda" if "cuda" in cfg.device else "cpu"
    ctx = nullcontext()  # nanoGPT autocasts on the GPU only
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if mode == "fixed":
        acc = Accumulator(model, optimizer, FixedSteps(cfg.gradient_accumulation_steps), clip_grad_norm=cfg.grad_clip)
    else:
        # windows of 1 to 8 nominal windows' worth of blocks, c * B_simple blocks (McCandlish et al.'s
        # critical batch is about B_simple); the cosine schedule over tokens, in iterations' worth of tokens
        planner = NoiseScalePlanner(1.0, min_batch=cfg.batch_size, micro_batch=cfg.batch_size,
                                    max_batch=8 * cfg.gradient_accumulation_steps * cfg.batch_size)
        acc = Accumulator(model, optimizer, planner, clip_grad_norm=cfg.grad_clip,
                          lr_schedule=lambda tokens: get_lr(tokens / tokens_per_iter, cfg) / cfg.learning_rate)
    max_tokens = cfg.max_iters * tokens_per_iter  # the planned run's budget: the fixed run's nominal tokens
    generator = torch.Generator().manual_seed(1337)
    X, Y = get_batch("train", data, cfg, generator)  # fetch the very first batch
    t0 = time.time()
    iter_num = tokens_seen = 0
    while True:
        if mode == "fixed":  # the learning rate of this iteration (nanoGPT sets it on every group)
            lr = get_lr(iter_num, cfg) if cfg.decay_lr else cfg.learning_rate
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
        if iter_num % cfg.eval_interval == 0:
            losses = estimate_loss(model, data, cfg)
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        done = iter_num >= cfg.max_iters if mode == "fixed" else tokens_seen >= max_tokens
        if done:
            break
        micro_steps = cfg.gradient_accumulation_steps if mode == "fixed" else acc.planned_micro_batches
        loss_sum = 0.0
        window = []
        for micro_step in range(micro_steps):  # noqa: B007 (nanoGPT's loop, as nanoGPT writes it)
            with ctx:
                logits, loss = model(X, Y)
            # the number of targets the mean loss is over: read it BEFORE the prefetch below
            # rebinds Y to the next batch (counting that batch's targets would weight this
            # micro-batch's gradient by another batch's count, a silent error)
            count = gradaccum.token_count(Y, shift=False, ignore_index=-1)
            window.append((X, Y))
            # immediately async prefetch next batch while model is doing the forward pass on the GPU
            X, Y = get_batch("train", data, cfg, generator)
            acc.backward(loss, count)  # was: loss / k, scaler.scale(loss).backward(); clip, step, zero_grad
            loss_sum += loss.item() * int(count)
        record = acc.last_record
        assert record is not None and record.step == iter_num, "the window closed with the iteration"
        if windows is not None:
            windows.append(window)
        tokens_seen += record.items
        if iter_num % cfg.log_interval == 0:
            dt, t0 = time.time() - t0, time.time()
            print(f"iter {iter_num}: loss {loss_sum / record.items:.4f}, {record.micro_batches} micro-batches, "
                  f"{record.items} targets, lr {record.lr[0]:.2e}, time {dt * 1000:.2f}ms")
        iter_num += 1
    return acc


def train_monitored(model: GPT, data: dict[str, np.ndarray], cfg: Config) -> Monitor:
    """nanoGPT's loop as it is, with one micro-batch per iteration (a Monitor measures one
    backward per step) of all the blocks of a window, and a Monitor: two lines."""
    cfg = replace(cfg, batch_size=cfg.batch_size * cfg.gradient_accumulation_steps, gradient_accumulation_steps=1)
    device_type = "cuda" if "cuda" in cfg.device else "cpu"
    ctx = nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=False)  # float16 autocast only on the GPU
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    monitor = Monitor(model, optimizer, scaler=scaler)  # gradaccum, 1 of 2
    generator = torch.Generator().manual_seed(1337)
    X, Y = get_batch("train", data, cfg, generator)
    for iter_num in range(cfg.max_iters + 1):
        lr = get_lr(iter_num, cfg) if cfg.decay_lr else cfg.learning_rate
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        if iter_num % cfg.eval_interval == 0:
            losses = estimate_loss(model, data, cfg)
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if iter_num == cfg.max_iters:
            break
        for micro_step in range(cfg.gradient_accumulation_steps):  # noqa: B007 (nanoGPT's loop, as nanoGPT writes it)
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / cfg.gradient_accumulation_steps
            X, Y = get_batch("train", data, cfg, generator)
            scaler.scale(loss).backward()
        if cfg.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % cfg.log_interval == 0:
            row = monitor.rows[-1]
            print(f"iter {iter_num}: loss {loss.item() * cfg.gradient_accumulation_steps:.4f}, "
                  f"noise scale {row['noise_scale']:.4g} (this batch), {row['noise_scale_ema']:.4g} (moving average)")
    monitor.close()  # gradaccum, 2 of 2
    return monitor


def full_batch_reference(initial: dict[str, torch.Tensor], windows: list, cfg: Config, dtype: torch.dtype) -> GPT:
    """Each window's micro-batches as one batch: one forward, one backward of the mean loss
    over all its targets, clipping, AdamW at the window's learning rate."""
    model = make_model(cfg, dtype)
    model.load_state_dict(initial)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    for it, window in enumerate(windows):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, cfg)
        X = torch.cat([x for x, _ in window])
        Y = torch.cat([y for _, y in window])
        _, loss = model(X, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def main(argv: list[str] | None = None) -> None:
    args = checked_args(parser(__doc__.splitlines()[0]), argv)
    cfg = SIZES[args.size]
    if args.check:
        cfg = replace(cfg, max_iters=CHECK_WINDOWS, eval_interval=CHECK_WINDOWS + 1)
    dtype = getattr(torch, args.dtype)
    data = dict(zip(("train", "val"), load_data(cfg)))
    model = make_model(cfg, dtype)
    print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M, mode {args.mode}, {args.dtype}")
    if args.mode == "monitor":
        monitor = train_monitored(model, data, cfg)
        report_monitor(monitor.rows)
        return
    initial = copy.deepcopy(model.state_dict())
    windows: list | None = [] if args.check else None
    acc = train_accumulated(model, data, cfg, args.mode, windows)
    if args.mode == "planned":
        report_planned(acc.history, acc.planner.decay)
    if args.check:
        reference = full_batch_reference(initial, windows, cfg, dtype)
        report_check(max_difference(model.parameters(), reference.parameters()), 1e-10, len(windows))


if __name__ == "__main__":
    main()
