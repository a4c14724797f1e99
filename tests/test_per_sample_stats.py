"""PerSampleGradStats against a slow loop over samples, in float64, on every layer path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaccum.torch import PerSampleGradStats
from gradaccum.torch._stats import _blocks

from .reference import IGNORE, TinySeqModel, classification, tokens


class ConvNet(nn.Module):
    """Conv1d (zeros, reflect padding, groups, stride), GroupNorm, Conv2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, stride=2, groups=2, padding=1, padding_mode="reflect")
        self.norm = nn.GroupNorm(2, 4)
        self.c3 = nn.Conv2d(1, 2, 3, padding="same", dilation=(1, 2))
        self.head = nn.Linear(2 * 4 * 6, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.c2(torch.relu(self.c1(x)))))  # (B, 4, 6)
        h = torch.tanh(self.c3(h.unsqueeze(1)))  # (B, 2, 4, 6)
        return self.head(h.flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(t)))


class AttentionVariants(nn.Module):
    """Masked causal self-attention (registered path) and a sequence-first cross-attention (fallback)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.self_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 2)  # batch on dim 1: not the registered path
        self.head = nn.Linear(dim, vocab)
        self.double()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.embed(t)
        pad = t == 0
        pad[:, 0] = False  # every query keeps a key it may attend to
        causal = torch.ones(t.shape[1], t.shape[1], dtype=torch.bool).triu(1)
        h, _ = self.self_attn(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)
        c, _ = self.cross(h.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)
        return self.head(c.transpose(0, 1) + h)


class TiedLM(nn.Module):
    """Output projection tied to the embedding, and one Linear applied twice."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight
        self.double()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(torch.tanh(self.mix(self.embed(t))))))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).double()


def sample_losses(model: nn.Module, batch) -> torch.Tensor:
    """Per-sample losses: the sum over a sample's counted tokens (or its one label)."""
    if isinstance(batch, tuple):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")
    logits = model(batch.tokens)
    per_token = nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE,
                                            reduction="none")
    return per_token.sum(1)


def slice_batch(batch, sl: slice):
    if isinstance(batch, tuple):
        return batch[0][sl], batch[1][sl]
    return type(batch)(batch.tokens[sl], batch.labels[sl])


def reference_moments(model: nn.Module, batch, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample gradients by a loop over samples; two-pass mean and M2."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = [[] for _ in params]
    for i in range(n):
        loss = sample_losses(model, slice_batch(batch, slice(i, i + 1))).sum()
        for store, g in zip(per_sample, torch.autograd.grad(loss, params, allow_unused=True)):
            store.append(torch.zeros_like(params[0]) if g is None else g)
    out = []
    for p, gs in zip(params, per_sample):
        g = torch.stack([x if x.shape == p.shape else torch.zeros_like(p) for x in gs])
        mean = g.mean(0)
        out.append((mean, ((g - mean) ** 2).sum(0)))
    return out


def conv_batch(n: int):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 2, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def mlp_batch(n: int):
    data = classification(n, d_in=40, classes=10)
    return data.x, data.y


CASES = {
    "reference_mlp": (mlp, mlp_batch, {"0": "linear:sum_squares", "4": "linear:sum_squares"}),
    "conv1d_net": (ConvNet, conv_batch, {"c1": "conv", "c2": "conv", "norm": "group_norm", "c3": "conv"}),
    "gru": (TinySeqModel, lambda n: tokens(n), {"gru": "loop", "embed": "embedding:sum_squares",
                                                 "head": "linear:per_sample"}),
    "transformer": (TinyTransformer, lambda n: tokens(n), {"encoder.self_attn": "attention",
                                                           "encoder.linear1": "linear:per_sample",
                                                           "encoder.norm1": "layer_norm"}),
    "attention_variants": (AttentionVariants, lambda n: tokens(n), {"self_attn": "attention", "cross": "vmap"}),
    "tied_weights": (TiedLM, lambda n: tokens(n), {"embed": "embedding:per_sample", "out": "linear:per_sample",
                                                   "mix": "linear:per_sample"}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_elements", [1 << 24, 50])
@pytest.mark.parametrize("block", [_blocks.BLOCK, 37], ids=["one_block", "blocks_of_37"])
def test_moments_match_loop_over_samples(case: str, chunk_elements: int, block: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer path, in one block and cut into blocks of 37 elements (rows of the larger
    parameters, several small ones together, and rows wider than a block in fresh buffers)."""
    monkeypatch.setattr(_blocks, "BLOCK", block)
    make_model, make_batch, paths = CASES[case]
    model = make_model()
    n = 10
    batch = make_batch(n)
    want = reference_moments(model, batch, n)
    stats = PerSampleGradStats(model, chunk_elements=chunk_elements)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 10)):  # increments of 3, 1 and 6 samples
        model.zero_grad(set_to_none=True)
        sample_losses(model, slice_batch(batch, sl)).sum().backward()
        stats.commit()
    assert stats.count == n
    for (mean, m2), got in zip(want, stats.moments()):
        torch.testing.assert_close(got.mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.m2, m2, rtol=1e-9, atol=1e-10)
    for module, path in paths.items():
        assert stats.paths[module].startswith(path), (module, stats.paths[module])


def test_batchnorm_in_train_mode_is_refused_and_eval_mode_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double()
    stats = PerSampleGradStats(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        model(x)
    model.eval()
    want = reference_moments(model, (x, y), 6)
    stats.discard()  # the reference's own backward passes went through the hooks too
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    stats.commit()
    for (mean, m2), got in zip(want, stats.moments()):
        torch.testing.assert_close(got.mean, mean)
        torch.testing.assert_close(got.m2, m2)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        PerSampleGradStats("mlp")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        PerSampleGradStats(frozen)
    with pytest.raises(ValueError, match="chunk_elements must be a positive int"):
        PerSampleGradStats(nn.Linear(2, 2), chunk_elements=0)
    stats = PerSampleGradStats(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no layer saw a backward"):
        stats.commit()
    with pytest.raises(ValueError, match="no increment has been committed"):
        stats.moments()


def test_layer_that_folds_positions_into_the_batch_takes_the_model_fallback() -> None:
    """A layer that sees (B*T, .) has no per-sample rows of its own: rather than refusing it
    ("layers saw different batch sizes"), the whole model runs per sample for it."""

    class Folding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

        def forward(self, x):  # x: (B, T, 3); b sees (B*T, 3)
            return self.b(self.a(x).reshape(-1, 3)).reshape(x.shape[0], -1).sum(1)

    torch.manual_seed(0)
    model = Folding().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    params = list(model.parameters())
    per_sample = [torch.stack(g) for g in zip(*(torch.autograd.grad(model(x[i:i + 1]).sum(), params)
                                                for i in range(4)))]
    stats = PerSampleGradStats(model)
    model(x).sum().backward()
    stats.commit()
    assert stats.paths["b"] == "broadcast -> model"
    for g, got in zip(per_sample, stats.moments()):
        mean = g.mean(0)
        torch.testing.assert_close(got.mean, mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.m2, ((g - mean) ** 2).sum(0), rtol=1e-10, atol=1e-14)


def test_a_second_commit_for_one_backward_says_so() -> None:
    """Committing twice after one backward is refused as what it is (not as a missing input)."""
    model = nn.Linear(3, 2).double()
    stats = PerSampleGradStats(model)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    assert stats.commit() == 4
    with pytest.raises(ValueError, match="second commit for one backward"):
        stats.commit()
