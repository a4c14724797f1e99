"""The per-element path's choice per layer between the closed form and per-sample gradients:
each path equal to a slow loop over samples in float64, the choice reported in ``paths``, and a
tiny memory budget keeping the closed form."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradaccum.torch import PerSampleGradStats
from gradaccum.torch._stats import _blocks, _choice
from gradaccum.torch._stats._choice import Costs, linear_costs, per_sample_is_cheaper


class SeqNet(nn.Module):
    """Token and position embeddings, LayerNorm, Linear layers over positions (one wide, one
    narrow), a Conv1d over positions, a head tied to the token embedding and an untied one."""

    def __init__(self, vocab: int = 13, dim: int = 12, context: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.tied = nn.Linear(dim, vocab, bias=False)
        self.tied.weight = self.wte.weight
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.wte(tokens) + self.wpe(torch.arange(t).expand(b, -1))
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.tied(x) + self.head(x)


def summed_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")


def loop_moments(model: nn.Module, tokens: torch.Tensor,
                 loss: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample gradients one sample at a time; two-pass mean and M2 (the slow reference).
    ``loss``: a sample's summed loss (default: the next-token loss)."""
    loss = loss or summed_loss
    params = list(model.parameters())
    grads = [torch.autograd.grad(loss(model, tokens[i:i + 1]), params) for i in range(len(tokens))]
    out = []
    for j in range(len(params)):
        g = torch.stack([row[j] for row in grads])
        out.append((g.mean(0), ((g - g.mean(0)) ** 2).sum(0)))
    return out


def tokens_of(n: int, t: int = 7, vocab: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(3))


def committed(model: nn.Module, tokens: torch.Tensor, parts: tuple[slice, ...]) -> PerSampleGradStats:
    stats = PerSampleGradStats(model)
    for part in parts:
        model.zero_grad(set_to_none=True)
        summed_loss(model, tokens[part]).backward()
        stats.commit()
    return stats


def force(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make every Linear call's estimate favour ``path`` ("closed" or "per_sample")."""
    cheap, dear = 0.0, math.inf

    def estimate(args: tuple, d: torch.Tensor) -> Costs:
        return Costs(cheap, dear, 0) if path == "closed" else Costs(dear, cheap, 0)

    monkeypatch.setitem(_choice.ESTIMATES, "linear", estimate)


@pytest.mark.parametrize("path", ["closed", "per_sample"])
@pytest.mark.parametrize("blocks", ["one_block", "rows_and_sample_chunks"])
def test_each_path_equals_the_loop_over_samples(path: str, blocks: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear over positions, Embedding (tied and not), LayerNorm and Conv1d: the moments of
    three increments (3, 1 and 5 samples) equal the loop's in float64 whichever path each Linear
    takes; cut into blocks of 40 elements with products of at most 30 elements at once, the closed
    form makes a few rows for one sample at a time."""
    force(monkeypatch, path)
    if blocks != "one_block":
        monkeypatch.setattr(_blocks, "BLOCK", 40)
        monkeypatch.setattr(_choice, "PRODUCTS", 30)
    model, tokens = SeqNet(), tokens_of(9)
    want = loop_moments(model, tokens)
    stats = committed(model, tokens, (slice(0, 3), slice(3, 4), slice(4, 9)))
    linear = "linear:sum_squares" if path == "closed" else "linear:per_sample"
    assert stats.paths["up"] == stats.paths["down"] == stats.paths["head"] == linear
    assert stats.paths["tied"] == "linear:per_sample"  # used twice: summed per sample before squaring
    assert stats.paths["wpe"] == "embedding:sum_squares" and stats.paths["norm"] == "layer_norm:per_sample"
    assert stats.paths["conv"] == "conv:per_sample"
    assert stats.count == 9
    for name, (mean, m2), got in zip([n for n, _ in model.named_parameters()], want, stats.moments()):
        torch.testing.assert_close(got.mean, mean, rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(got.m2, m2, rtol=1e-12, atol=1e-14, msg=name)


def test_the_paths_agree_with_each_other_to_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The closed form and per-sample gradients give the same moments on the same increments
    (to float64 rounding: the choice reorders additions only)."""
    tokens = tokens_of(6)
    got = {}
    for path in ("closed", "per_sample"):
        force(monkeypatch, path)
        got[path] = committed(SeqNet(), tokens, (slice(0, 2), slice(2, 6))).moments()
    for a, b in zip(got["closed"], got["per_sample"]):
        torch.testing.assert_close(a.m2, b.m2, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-15)


class TwoWidths(nn.Module):
    """A Linear whose per-sample gradients over 16 samples exceed ``PRODUCTS`` and a narrow one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.wide, self.narrow = nn.Linear(128, 512), nn.Linear(512, 4)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.narrow(torch.tanh(self.wide(x))).sum(1)


def test_the_choice_per_layer_is_reported_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default estimate the wide layer (16 x 65,536 per-sample elements, above the
    products the closed form makes at once) takes the closed form, the narrow one (a tie: its
    products fit) per-sample gradients, and a 2-D head the closed form's one GEMM; the moments
    equal those of both forced paths, which test_each_path_equals_the_loop_over_samples ties to
    the loop."""
    x = torch.randn(16, 8, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def run() -> PerSampleGradStats:
        model = TwoWidths()
        stats = PerSampleGradStats(model)
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        stats.commit()
        return stats

    chosen = run()
    assert chosen.paths == {"wide": "linear:sum_squares", "narrow": "linear:per_sample"}
    for path in ("closed", "per_sample"):
        with monkeypatch.context() as patch:
            force(patch, path)
            for a, b in zip(chosen.moments(), run().moments()):
                torch.testing.assert_close(a.m2, b.m2, rtol=1e-12, atol=1e-15)


def test_a_tiny_budget_keeps_the_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample gradients above ``BUDGET`` elements are not made whole, however cheap: every
    Linear over positions takes the closed form (the tied head still needs its per-sample
    gradients summed over its two uses), and the moments stay the loop's."""
    monkeypatch.setattr(_choice, "BUDGET", 1)
    model, tokens = SeqNet(), tokens_of(5)
    want = loop_moments(model, tokens)
    stats = committed(model, tokens, (slice(0, 5),))
    assert stats.paths["up"] == stats.paths["down"] == stats.paths["head"] == "linear:sum_squares"
    assert stats.paths["tied"] == "linear:per_sample"
    for (mean, m2), got in zip(want, stats.moments()):
        torch.testing.assert_close(got.mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.m2, m2, rtol=1e-12, atol=1e-14)


def test_the_estimate() -> None:
    """At one position the closed form is cheaper; over positions a layer whose products fit in
    ``PRODUCTS`` ties (per-sample gradients), a larger one-block layer takes the closed form, and
    one of many blocks of rows over long sequences per-sample gradients where they fit the budget."""
    one = linear_costs(16, 1, 128, 512)
    assert one.closed < one.per_sample
    small = linear_costs(16, 64, 128, 128)
    assert small.per_sample == small.closed
    wide = linear_costs(16, 64, 128, 512)
    assert wide.closed < wide.per_sample
    long = linear_costs(2, 2048, 2048, 2048)  # 8 blocks of rows: X read 8 times
    assert long.per_sample < long.closed and long.per_sample_elements <= _choice.BUDGET
    meta = {"device": "meta"}
    x, d = torch.empty(2, 2048, 2048, **meta), torch.empty(2, 2048, 2048, **meta)
    assert per_sample_is_cheaper("linear", (x, d), d)
    assert not per_sample_is_cheaper("linear", (torch.empty(16, 64, 128, **meta),), torch.empty(16, 64, 512, **meta))
    assert not per_sample_is_cheaper("embedding", (x,), d)  # no estimate: its closed form wherever it gives one
    big = (torch.empty(8, 2048, 4096, **meta),), torch.empty(8, 2048, 4096, **meta)
    assert not per_sample_is_cheaper("linear", *big)  # 134M per-sample elements: over the budget


@pytest.mark.parametrize("shape", [(4, 6, 16), (4, 16, 3), (512, 1024, 1024), (1, 1, 1)])
def test_one_position_per_sample_always_takes_the_closed_form(shape: tuple[int, int, int]) -> None:
    """``(D^2)^T X^2`` is one GEMM of the per-sample products' size and moves no per-sample buffer:
    never dearer than per-sample gradients, for small layers as for large."""
    b, n_in, n_out = shape
    costs = linear_costs(b, 1, n_in, n_out)
    assert costs.closed < costs.per_sample


def test_a_linear_without_inputs_or_outputs_keeps_its_closed_form() -> None:
    """nn.Linear(0, k) or (k, 0): nothing to weigh (before, the estimate divided by zero)."""
    from gradaccum.torch._stats._choice import per_sample_is_cheaper

    assert not per_sample_is_cheaper("linear", (torch.zeros(2, 5, 0),), torch.zeros(2, 5, 4))
    assert not per_sample_is_cheaper("linear", (torch.zeros(2, 5, 3),), torch.zeros(2, 5, 0))
