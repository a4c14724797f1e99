"""A zoo of real model patterns for the statistics tests, each with a per-sample loss.

Every statistics path and rule is tested on these against a loop over samples in
float64 (tests/test_zoo.py). Widths are tiny so the loop stays fast. Each entry gives
a model, a batch maker, the per-sample losses (a sample's summed item losses), the
item count of a batch, and optimizer parameter groups as real code builds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .reference import IGNORE, Tokens


# ---------------------------------------------------------------- nanoGPT-style LM
class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's pattern: wpe(arange(T)) broadcast onto the batch, a functional tied head."""

    def __init__(self, vocab: int = 13, block: int = 8, dim: int = 8, heads: int = 2, layers: int = 1,
                 checkpoint: bool | None = None, functional: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.h = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.checkpoint = checkpoint  # None: no activation checkpointing; else use_reentrant
        self.functional = functional  # nanoGPT's own code; False: the layer-hook-friendly form
        if not functional:
            self.lm_head = nn.Linear(dim, vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # tied as a module, so the Linear's hook sees the use

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        if not self.functional:
            pos = pos.expand(idx.shape[0], -1)  # positions per sample: the embedding sees the batch
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            if self.checkpoint is None:
                x = block(x)
            else:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.checkpoint)
        if not self.functional:
            return self.lm_head(self.ln_f(x))
        return F.linear(self.ln_f(x), self.wte.weight)  # weight tying outside the embedding's forward


def decay_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """nanoGPT's AdamW groups: matrices decay, vectors don't (not model.parameters() order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lm_batch(n: int, seed: int, length: int = 8, vocab: int = 13) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (n, length), generator=g)
    labels = torch.randint(0, vocab, (n, length), generator=g)
    labels[torch.rand(n, length, generator=g) < 0.3] = IGNORE  # padding: token counts differ per sample
    labels[:, 0] = idx[:, 0]
    return Tokens(idx, labels)  # tests.reference.Tokens: token ids and labels (IGNORE where not counted)


def lm_losses(model: nn.Module, batch: Tokens) -> torch.Tensor:
    logits = model(batch.tokens)
    per_token = F.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE, reduction="none")
    return per_token.sum(1)


def lm_items(batch: Tokens) -> int:
    return int((batch.labels != IGNORE).sum())


# ---------------------------------------------------------------- ResNet-like CNN with GroupNorm
class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gn1(self.conv1(x)))
        return F.relu(x + self.gn2(self.conv2(h)))


class ResNetLike(nn.Module):
    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(ResBlock(channels), ResBlock(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


@dataclass
class Labeled:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def image_batch(n: int, seed: int) -> Labeled:
    g = torch.Generator().manual_seed(seed)
    return Labeled(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def ce_losses(model: nn.Module, batch: Labeled) -> torch.Tensor:
    return F.cross_entropy(model(batch.x), batch.y, reduction="none")


# ---------------------------------------------------------------- LSTM
class LSTMTagger(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(idx))
        return self.head(h)


def tagger_losses(model: nn.Module, batch: Tokens) -> torch.Tensor:
    return lm_losses(model, batch)


# ---------------------------------------------------------------- MultiheadAttention
class AttentionModel(nn.Module):
    """nn.MultiheadAttention with padding and causal masks (the registered path)."""

    def __init__(self, vocab: int = 13, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        pad = idx == 0
        pad[:, 0] = False
        causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool).triu(1)
        h, _ = self.attn(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        return self.head(self.norm(x + h))


# ---------------------------------------------------------------- frozen part, conditional parameter
class PartlyFrozen(nn.Module):
    """A frozen feature layer, and a branch whose parameters get a gradient only while
    ``use_branch`` is set (no gradient at all in other micro-batches)."""

    def __init__(self, d_in: int = 5, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Linear(d_in, hidden)
        self.features.requires_grad_(False)
        self.body = nn.Linear(hidden, hidden)
        self.branch = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.use_branch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(torch.relu(self.features(x))))
        if self.use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def vector_batch(n: int, seed: int, d_in: int = 5) -> Labeled:
    g = torch.Generator().manual_seed(seed)
    return Labeled(torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


# ---------------------------------------------------------------- reference MLP
def reference_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@dataclass(frozen=True)
class Pattern:
    """One zoo entry."""

    make: Callable[[], nn.Module]
    batch: Callable[[int, int], Any]
    losses: Callable[[nn.Module, Any], torch.Tensor]
    items: Callable[[Any], int] = len


ZOO: dict[str, Pattern] = {
    "nanogpt": Pattern(NanoGPT, lm_batch, lm_losses, lm_items),
    "nanogpt_square": Pattern(lambda: NanoGPT(block=6), lambda n, s: lm_batch(n, s, length=6), lm_losses, lm_items),
    "nanogpt_modules": Pattern(lambda: NanoGPT(functional=False), lm_batch, lm_losses, lm_items),
    "resnet_groupnorm": Pattern(ResNetLike, image_batch, ce_losses),
    "lstm": Pattern(LSTMTagger, lm_batch, tagger_losses, lm_items),
    "multihead_attention": Pattern(AttentionModel, lm_batch, lm_losses, lm_items),
    "partly_frozen": Pattern(PartlyFrozen, vector_batch, ce_losses),
    "mlp": Pattern(reference_mlp, vector_batch, ce_losses),
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name].make().to(dtype)


def take(batch: Any, sl: slice) -> Any:
    return type(batch)(*(getattr(batch, f)[sl] for f in batch.__dataclass_fields__))


def mean_gsnr(moments: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> float:
    """The reference mean GSNR on the mean-gradient scale, element by element, over the
    elements the design calls live (a measurable variance: docs/design.md, "Edge cases")."""
    from gradaccum._core.statistics import largest_second_moment, live_elements

    total, count = 0.0, 0
    largest = largest_second_moment([m for m, _ in moments], [m2 for _, m2 in moments], n)
    for mean, m2 in moments:
        live = live_elements(mean, m2, n, largest)
        for mu, var in zip(mean[live].tolist(), (m2[live] / (n - 1)).tolist()):
            total += mu * mu / var
            count += 1
    return n * total / count if count else math.nan
