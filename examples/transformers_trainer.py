"""Transformers' ``run_clm.py`` with gradaccum: the Trainer's windows of a fixed or planned length.

The structure is ``examples/pytorch/language-modeling/run_clm.py``, cut down: a causal LM built
from its config (``from_config``), the text tokenized, concatenated and cut into blocks by
``group_texts`` with ``labels`` a copy of ``input_ids`` (the model shifts them inside and
computes its own loss), ``default_data_collator``, ``Trainer(...).train()``, then ``evaluate``
and the perplexity. The model is a small GPT-2, the tokenizer the bytes themselves (the
standard library's source), nothing downloaded.

What gradaccum changes (``--mode``):

- ``fixed``: ``PlannedTrainer(..., planner=FixedSteps(k))`` (``gradaccum.integrations.
  transformers``) instead of ``Trainer(...)`` with ``gradient_accumulation_steps=k``: the same
  windows and schedule over optimizer steps, built on the Accumulator. The epoch's last window
  is short and its last micro-batch smaller: every window's step is that of the mean over its
  predicted tokens.
- ``planned``: ``planner=NoiseScalePlanner(...)``: each window is sized from the gradient noise
  scale earlier windows measured; the LR schedule then runs over the data (micro-batches).
- ``monitor``: the plain ``Trainer`` as ``run_clm.py`` builds it, with a callback that puts a
  ``gradaccum.torch.Monitor`` on its model and optimizer when training begins (the Trainer
  clips at ``max_grad_norm=1.0``: the Monitor measures the gradient before clipping).

    python examples/transformers_trainer.py [--mode fixed|planned|monitor] [--size tiny|real] [--dtype float64]
    python examples/transformers_trainer.py --check   # fixed windows against the full batch, float64
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import dataclass, replace
from itertools import chain

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_linear_schedule_with_warmup,
    set_seed,
)
from transformers.utils import logging as hf_logging

from _common import VOCAB, checked_args, documents, max_difference, parser, report_check, report_monitor, report_planned
from gradaccum import FixedSteps, NoiseScalePlanner
from gradaccum.integrations.transformers import PlannedTrainer
from gradaccum.torch import Monitor

HF_TOLERANCE = 1e-6  # transformers' loss casts the logits to float32


@dataclass(frozen=True)
class Config:
    block_size: int = 16
    train_bytes: int = 38 * 16  # 38 blocks: 10 micro-batches an epoch, the last of 2 blocks
    eval_bytes: int = 8 * 16
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    num_train_epochs: int = 2
    learning_rate: float = 1e-3
    warmup_steps: int = 1
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 16


SIZES = {
    "tiny": Config(),
    "real": Config(block_size=512, train_bytes=4_000_000, eval_bytes=400_000, per_device_train_batch_size=8,
                   gradient_accumulation_steps=8, num_train_epochs=3, learning_rate=5e-4, warmup_steps=100,
                   n_layer=12, n_head=12, n_embd=768),
}


def load_datasets(cfg: Config) -> dict[str, list[dict[str, list[int]]]]:
    """The raw text as documents, "tokenized" to bytes, as ``run_clm``'s ``raw_datasets``
    after ``tokenize_function``: a train and a validation split."""
    docs = [{"input_ids": list(doc) + [0]} for doc in documents(2 * (cfg.train_bytes + cfg.eval_bytes))]
    cut, total = 0, 0
    while cut < len(docs) and total < cfg.train_bytes:
        total += len(docs[cut]["input_ids"])
        cut += 1
    return {"train": docs[:cut], "validation": docs[cut:]}


def group_texts(examples: list[dict[str, list[int]]], block_size: int, max_bytes: int) -> list[dict]:
    """``run_clm``'s ``group_texts``: concatenate, drop the remainder, cut into blocks of
    ``block_size``; ``labels`` are the ``input_ids`` (the model shifts them)."""
    concatenated = list(chain(*(e["input_ids"] for e in examples)))[:max_bytes]
    total_length = (len(concatenated) // block_size) * block_size
    blocks = [concatenated[i:i + block_size] for i in range(0, total_length, block_size)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def make_model(cfg: Config, dtype: torch.dtype) -> GPT2LMHeadModel:
    """``AutoModelForCausalLM.from_config``: GPT-2, dropout off (per-sample statistics refuse it)."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype)


class MonitorCallback(TrainerCallback):
    """A ``Monitor`` on the Trainer's model and optimizer (Accelerate's wrapper, unwrapped by the Monitor)."""

    monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.monitor = Monitor(model, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor.close()


class Recorder:
    """The micro-batches the model trains on, in order (a forward pre-hook; the check's data)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.batches.append((kwargs["input_ids"].detach().clone(), kwargs["labels"].detach().clone()))


def full_batch_reference(initial: GPT2LMHeadModel, batches: list, history: list, training_args: TrainingArguments,
                         schedule_steps: int) -> GPT2LMHeadModel:
    """Each window's micro-batches as one batch: the model's loss (the mean over the window's
    predicted tokens), one backward, clipping at ``max_grad_norm``, AdamW with the Trainer's
    settings and the linear schedule with warmup over the windows."""
    model = copy.deepcopy(initial)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=training_args.learning_rate,
                                  betas=(training_args.adam_beta1, training_args.adam_beta2),
                                  eps=training_args.adam_epsilon, weight_decay=training_args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, training_args.warmup_steps, schedule_steps)
    start = 0
    for record in history:
        window, start = batches[start:start + record.micro_batches], start + record.micro_batches
        input_ids = torch.cat([x for x, _ in window])
        labels = torch.cat([y for _, y in window])
        model(input_ids=input_ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert start == len(batches), "every micro-batch trained on is in a window"
    return model


def main(argv: list[str] | None = None) -> None:
    hf_logging.set_verbosity_error()
    args = checked_args(parser(__doc__.splitlines()[0]), argv)
    cfg = SIZES[args.size]
    if args.check:  # one epoch: windows of 4, 4 and the epoch's last 2 micro-batches
        cfg = replace(cfg, num_train_epochs=1)
    set_seed(42)
    raw = load_datasets(cfg)
    train_dataset = group_texts(raw["train"], cfg.block_size, cfg.train_bytes)
    eval_dataset = group_texts(raw["validation"], cfg.block_size, cfg.eval_bytes)
    model = make_model(cfg, getattr(torch, args.dtype))
    initial = copy.deepcopy(model)
    recorder = Recorder(model) if args.check else None
    output_dir = tempfile.mkdtemp(prefix="run_clm-")
    batch_size = cfg.per_device_train_batch_size
    if args.mode == "monitor":  # the plain Trainer steps on whole windows' worth of blocks
        batch_size *= cfg.gradient_accumulation_steps
    training_args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        num_train_epochs=cfg.num_train_epochs, learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=42)
    common = dict(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  data_collator=default_data_collator)
    if args.mode == "monitor":
        callback = MonitorCallback()
        trainer = Trainer(**common, callbacks=[callback])
    else:
        if args.mode == "fixed":  # the Trainer's gradient_accumulation_steps=k, on the Accumulator
            planner = FixedSteps(cfg.gradient_accumulation_steps)
        else:  # c * B_simple blocks, from one micro-batch to eight nominal windows
            planner = NoiseScalePlanner(1.0, min_batch=batch_size, micro_batch=batch_size,
                                        max_batch=8 * cfg.gradient_accumulation_steps * batch_size)
        trainer = PlannedTrainer(**common, planner=planner)  # was: Trainer(**common) with gradient_accumulation_steps
    train_result = trainer.train()
    print(f"train: {train_result.metrics}")
    metrics = trainer.evaluate()
    try:
        perplexity = math.exp(metrics["eval_loss"])
    except OverflowError:
        perplexity = float("inf")
    print(f"eval: loss {metrics['eval_loss']:.4f}, perplexity {perplexity:.4f}")
    if args.mode == "monitor":
        report_monitor(callback.monitor.rows)
        return
    history = trainer.history
    if args.mode == "planned":
        report_planned(history, planner.decay)
    else:
        print(f"windows (micro-batches): {[r.micro_batches for r in history]}")
    if args.check:
        reference = full_batch_reference(initial, recorder.batches, history, training_args, len(history))
        report_check(max_difference(model.parameters(), reference.parameters()), HF_TOLERANCE, len(history))


if __name__ == "__main__":
    main()
