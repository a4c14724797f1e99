"""The per-element path where the precision guard recomputes elements from their per-sample values:
a GPT-like model whose samples barely differ (every element's per-sample GSNR is high, so the
increments' M2 cancels and the guard takes the flagged elements from the layers' per-sample values:
a Linear's gathered products, a LayerNorm's per-sample gradients held from its call, a tied
weight's per-sample gradients summed over its two calls), against a float64 loop over samples.
Also the sum of a tied weight's per-sample gradients over calls, whole or in chunks of samples,
and the sums of squares made a few rows at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaccum.torch import PerSampleGradStats
from gradaccum.torch._stats import _guard, _layers
from gradaccum.torch._stats._increment import SQUARES_CHUNK, Increment, sum_of_squares
from tests.test_element_path_choice import force, loop_moments

CONTEXT, DIM = 5, 6


class FloatGPT(nn.Module):
    """Float inputs through a tied input projection, position embeddings of ``arange(T)`` broadcast
    over the batch, LayerNorm, an MLP over positions and a head tied to the input projection."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(DIM, DIM, bias=False)
        self.wpe = nn.Embedding(CONTEXT, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 3 * DIM), nn.Linear(3 * DIM, DIM)
        self.head = nn.Linear(DIM, DIM)
        self.head.weight = self.inp.weight
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.wpe(torch.arange(x.shape[1]))  # broadcast: no batch dimension
        h = h + self.down(torch.tanh(self.up(self.norm(h))))
        return self.head(h)


def summed_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) - 1.0).square().sum()


def near_copies(n: int, seed: int) -> torch.Tensor:
    """``n`` samples that differ by 1e-7 relative: per-sample GSNRs about 1e14 (one base for all the
    micro-batches, so that the window's M2 is the increments' own, not the gap between them)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, CONTEXT, DIM, generator=g, dtype=torch.float64)
    return base + 1e-7 * torch.randn(n, CONTEXT, DIM, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 40])  # 40: per-sample gradients in chunks of samples
@pytest.mark.parametrize("path", ["closed", "per_sample"])
def test_guarded_moments_equal_a_float64_loop(monkeypatch: pytest.MonkeyPatch, path: str, chunk_elements: int) -> None:
    force(monkeypatch, path)
    recomputed: list[int] = []
    two_pass = _guard.two_pass_m2
    monkeypatch.setattr(_guard, "two_pass_m2", lambda v: recomputed.append(v.shape[1]) or two_pass(v))
    model = FloatGPT()
    x = near_copies(8, 1)
    stats = PerSampleGradStats(model, chunk_elements=chunk_elements)
    for part in (slice(0, 3), slice(3, 8)):  # uneven micro-batches
        model.zero_grad(set_to_none=True)
        summed_loss(model, x[part]).backward()
        stats.commit()
    assert sum(recomputed) > 100  # the guard took most elements from their per-sample values
    assert stats.paths["up"] == ("linear:sum_squares" if path == "closed" else "linear:per_sample")
    assert stats.paths["head"] == stats.paths["inp"] == "linear:per_sample"  # tied: per-sample gradients
    assert stats.paths["norm"] == "layer_norm:per_sample"
    reference = loop_moments(model, x, summed_loss)
    for name, m, (mean, m2) in zip(dict(model.named_parameters()), stats.moments(), reference):
        assert m.n == 8
        torch.testing.assert_close(m.mean, mean, rtol=1e-9, atol=1e-12, msg=name)
        # M2 is ~1e-14 of the sum of squares: a cancelled S2 - S1^2/n would be off by far more than this
        torch.testing.assert_close(m.m2, m2, rtol=1e-5, atol=1e-5 * float(m2.abs().max()), msg=name)


def test_linear_values_equal_per_sample_gradients_at_their_indices() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(7, 5).double()
    x, d = torch.randn(4, 3, 7, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    per_sample = torch.einsum("bto,bti->boi", d, x).reshape(4, -1)
    index = torch.tensor([34, 0, 12, 7, 33, 12])
    torch.testing.assert_close(_layers._linear_values(layer, (x,), d, "weight", index), per_sample[:, index])
    torch.testing.assert_close(_layers._linear_values(layer, (x,), d, "bias", torch.tensor([4, 1])),
                               d.sum(1)[:, [4, 1]])


@pytest.mark.parametrize("order", [("whole", "whole"), ("whole", "chunks"), ("chunks", "whole"),
                                   ("chunks", "chunks")])
def test_tied_sum_over_calls_leaves_the_layers_results_as_they_were(order: tuple[str, str]) -> None:
    torch.manual_seed(0)
    calls = [torch.randn(5, 2, 3) for _ in order]
    kept = [c.clone() for c in calls]
    inc = Increment([3])
    for how, g in zip(order, calls):
        if how == "whole":
            inc.add_tied(0, g, 0, 5)
        else:
            for start in range(0, 5, 2):
                inc.add_tied(0, g[start:start + 2], start, 5)
    torch.testing.assert_close(inc.tied[0], kept[0] + kept[1], rtol=0, atol=0)
    for g, before in zip(calls, kept):
        assert torch.equal(g, before)  # the layers' results are read, never written


@pytest.mark.parametrize("shape", [(16, 256, 128), (3, SQUARES_CHUNK + 5), (SQUARES_CHUNK // 3 + 7, 3), (4, 5), (0, 3)])
def test_sum_of_squares_in_chunks_equals_the_whole_square(shape: tuple[int, ...]) -> None:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sum_of_squares(t), (t * t).sum(0), rtol=1e-13, atol=0)
    strided = t.transpose(0, -1) if t.dim() > 1 else t
    torch.testing.assert_close(sum_of_squares(strided), (strided * strided).sum(0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_squares_are_summed_whole_in_float32(dtype: torch.dtype) -> None:
    """Partial sums in a half dtype would round at every chunk (errors of 2e-2 against 4e-3)."""
    t = torch.randn(512, 4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert torch.equal(sum_of_squares(t), (t * t).sum(0))
