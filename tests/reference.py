"""Slow, obviously-correct references and small seeded problems shared by the tests.

The reference gradient is computed in one call on the whole window, in float64:
the quantity every accumulation path must reproduce (docs/design.md, "Window mean").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IGNORE = -100


def mlp(d_in: int = 6, hidden: int = 16, d_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out)).double()


class TinySeqModel(nn.Module):
    """Embedding -> GRU -> per-token logits: a small sequence model with a per-token loss."""

    def __init__(self, vocab: int = 11, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.embed(tokens))
        return self.head(h)


@dataclass
class Classification:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Tokens:
    tokens: torch.Tensor
    labels: torch.Tensor  # IGNORE where the position does not count

    def __len__(self) -> int:
        return len(self.labels)


def classification(n: int, d_in: int = 6, classes: int = 3, seed: int = 1) -> Classification:
    g = torch.Generator().manual_seed(seed)
    return Classification(torch.randn(n, d_in, generator=g, dtype=torch.float64),
                           torch.randint(0, classes, (n,), generator=g))


def tokens(n: int, length: int = 7, vocab: int = 11, seed: int = 2) -> Tokens:
    """Sequences whose labels are ignored at random, so token counts differ per sample."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n, length), generator=g)
    labels = torch.randint(0, vocab, (n, length), generator=g)
    ignore = torch.rand(n, length, generator=g) < 0.4
    ignore[:, 0] = False  # every sequence keeps at least one counted token
    labels[ignore] = IGNORE
    return Tokens(toks, labels)


def ce_mean(model: nn.Module, data: Classification | Tokens) -> tuple[torch.Tensor, int]:
    """Mean loss over the items of ``data`` and the item count (samples or counted tokens)."""
    if isinstance(data, Classification):
        return nn.functional.cross_entropy(model(data.x), data.y), len(data)
    logits = model(data.tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.labels.reshape(-1),
                                       ignore_index=IGNORE)
    return loss, int((data.labels != IGNORE).sum())


def take(data: Classification | Tokens, idx: slice | torch.Tensor) -> Classification | Tokens:
    if isinstance(data, Classification):
        return Classification(data.x[idx], data.y[idx])
    return Tokens(data.tokens[idx], data.labels[idx])


def full_batch_grad(model: nn.Module, data: Classification | Tokens) -> list[torch.Tensor]:
    """The gradient of the mean loss over every item of ``data``, in one call."""
    loss, _ = ce_mean(model, data)
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach().clone() for g in torch.autograd.grad(loss, params)]


def split(n: int, sizes: list[int]) -> list[slice]:
    """Consecutive slices of the given sizes covering range(n)."""
    assert sum(sizes) == n
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


class GradCapture(torch.optim.SGD):
    """SGD that also records the gradient each step saw (None where a parameter had none), for
    exactness checks."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.seen.append([None if p.grad is None else p.grad.detach().clone()
                          for g in self.param_groups for p in g["params"]])
        return super().step(closure)
