"""The language-model task of the front: a byte-level GPT on the running Python's own sources.

The corpus is real text already on every machine that runs this: fixed files of the Python
standard library (``sysconfig``'s ``stdlib`` path), split by file into train, validation
(tuning) and test (targets and verdicts only), read as bytes (a 256-symbol vocabulary, no
tokenizer, no download). The report states the files, their sizes and a SHA-256 of each
split, since a different Python version has slightly different sources.

The model is nanoGPT's pattern at a small size: token and position embeddings (positions
given per sample), pre-LayerNorm blocks of causal self-attention and an MLP, a head tied to
the token embedding. A sample is a sequence of ``context`` bytes and its next-byte targets;
a micro-batch's ``count`` is its tokens, its ``samples`` its sequences. ``--lm-scale k``
multiplies width, context and depth for a larger machine (a GPU is used when there is one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import sysconfig
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import BatchRamp
from ..torch import Accumulator
from .arms import ARM_TABLE
from .config import ExperimentConfig
from .errors import SettingsError
from .run_record import RunResult, Trained, increments, train_loop, window

TRAIN_FILES = ("argparse.py", "ast.py", "calendar.py", "configparser.py", "contextlib.py", "csv.py", "dataclasses.py",
               "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py",
               "ipaddress.py", "locale.py", "logging/__init__.py", "pickle.py", "pprint.py", "random.py", "shutil.py",
               "statistics.py", "string.py", "subprocess.py", "tarfile.py", "textwrap.py", "threading.py",
               "tokenize.py", "typing.py")
VALIDATION_FILES = ("optparse.py", "sched.py", "json/encoder.py")
TEST_FILES = ("smtplib.py", "trace.py", "plistlib.py")
LM_CONTEXT = 12
"""Bytes per sequence at scale 1: short enough that the gradient noise scale, counted in sequences,
passes 8 times the smallest batch (4) in most of the run (``lm_regime``: 3 of its 4 quarters at the
stated run's lr and at 0.7x and 1.5x it; at 16 bytes, 2 of 4), and cheap on two cores."""
EVAL_SEQUENCES = 128  # sequences of each held-out split the loss is measured on (fixed, evenly spaced)


class Corpus(NamedTuple):
    """The three splits as uint8 arrays, and what the report says of them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    about: dict[str, Any]


def load_corpus(root: str | None = None) -> Corpus:
    """The fixed files of the standard library at ``root`` (default: this Python's), by split."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    splits: list[np.ndarray] = []
    about: dict[str, Any] = {"python": sys.version.split()[0], "root": str(base)}
    for name, files in (("train", TRAIN_FILES), ("val", VALIDATION_FILES), ("test", TEST_FILES)):
        parts = []
        for file in files:
            try:
                parts.append((base / file).read_bytes())
            except OSError as error:
                raise SettingsError(f"lm corpus: cannot read {base / file} ({error}); the LM task reads fixed "
                                    "files of the Python standard library") from None
        data = b"\n".join(parts)
        splits.append(np.frombuffer(data, dtype=np.uint8).copy())
        about[name] = {"files": list(files), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    train, val, test = splits
    return Corpus(train, val, test, about)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class ByteGPT(nn.Module):
    """A nanoGPT-style byte-level LM with a head tied to the token embedding."""

    positions: torch.Tensor  # a buffer: 0, 1, ..., context - 1

    def __init__(self, context: int, dim: int, layers: int, heads: int = 4) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(256, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)
        self.head.weight = self.wte.weight
        self.register_buffer("positions", torch.arange(context), persistent=False)
        for module in self.modules():  # nanoGPT's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.wte(tokens) + self.wpe(self.positions[:t].expand(b, -1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def shape(cfg: ExperimentConfig) -> dict[str, int]:
    """The model and sequence sizes at ``cfg.lm_scale``."""
    k = cfg.lm_scale
    return {"context": LM_CONTEXT * k, "dim": 64 * k, "layers": 2 * k}


def sequences(split: np.ndarray, context: int) -> torch.Tensor:
    """The split cut into non-overlapping sequences of ``context + 1`` bytes (inputs and targets)."""
    n = (len(split) - 1) // context
    return torch.from_numpy(split[:n * context + 1].astype(np.int64)).unfold(0, context + 1, context)


def held_out(split: np.ndarray, context: int) -> torch.Tensor:
    """EVAL_SEQUENCES sequences evenly spaced over a held-out split (the same ones every time)."""
    all_ = sequences(split, context)
    pick = torch.linspace(0, len(all_) - 1, min(EVAL_SEQUENCES, len(all_))).round().long()
    return all_[pick]


def loss_on(model: nn.Module, batch: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) over every token of ``batch``."""
    with torch.no_grad():
        logits = model(batch[:, :-1])
        return float(F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_lm(arm: str, params: dict[str, float], seed: int, corpus: Corpus, cfg: ExperimentConfig) -> Trained:
    """Train the byte-level GPT with AdamW for ``cfg.budget`` sequences of the training split,
    evaluating the validation and test loss every ``cfg.eval_every`` sequences."""
    size = shape(cfg)
    dev = device()
    train = sequences(corpus.train, size["context"]).to(dev)
    val, test = held_out(corpus.val, size["context"]).to(dev), held_out(corpus.test, size["context"]).to(dev)
    torch.manual_seed(seed)
    model = ByteGPT(size["context"], size["dim"], size["layers"]).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params["lr"], weight_decay=0.01)
    rule = ARM_TABLE[arm].rule(params, cfg)
    if isinstance(rule, BatchRamp):  # a ramp's progress is counted in items, here tokens: its length too
        rule = dataclasses.replace(rule, over=rule.over * size["context"])
    acc = Accumulator(model, optimizer, rule)

    def backward(idx: torch.Tensor) -> bool:
        batch = train[idx.to(dev)]
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        return acc.backward(loss, batch[:, 1:].numel(), samples=len(idx))

    evaluations, wall, diverged, caught = train_loop(
        increments(len(train), cfg.increment, cfg.budget, torch.Generator().manual_seed(seed)), backward,
        lambda: loss_on(model, val), cfg.eval_every, acc.flush)
    val_loss, test_loss = loss_on(model, val), loss_on(model, test)
    if not (math.isfinite(val_loss) and math.isfinite(test_loss)):
        diverged, val_loss, test_loss = True, math.log(256), math.log(256)  # recorded as a uniform guess
    windows = [window(r) for r in acc.history]
    return Trained(windows, [(e.samples, e.val) for e in evaluations], val_loss, test_loss, wall, diverged, caught,
                   evaluations)


def train_lm_run(arm: str, params: dict[str, float], seed: int, corpus: Corpus, cfg: ExperimentConfig) -> RunResult:
    """One run of the LM task (what the workers run): the metric is the loss, in the record's
    ``final_val_accuracy`` and ``test_accuracy`` fields; ``batch_sizes`` count sequences."""
    result = RunResult.of(arm, params, seed, train_lm(arm, params, seed, corpus, cfg))
    result.batch_sizes = [b // shape(cfg)["context"] for b in result.batch_sizes]  # tokens -> sequences
    result.flushed_items //= shape(cfg)["context"]
    return result
