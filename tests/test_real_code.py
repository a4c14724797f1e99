"""Training code as people write it: a float64 default dtype, nanoGPT's and GPT-2's models with
their own loss and a position embedding broadcast over the batch.

The per-sample statistics of those models are held against a float64 loop over the samples'
own gradients (the gradient of each sample's summed loss).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradaccum import GSNR, Decision, FixedSteps, WindowView
from gradaccum._core.moments import Moments
from gradaccum._core.noise_scale import NormStatistics, noise_terms
from gradaccum.torch import Accumulator

from .real_models import GPTConfig, TinyGPT


class Record:
    """FixedSteps(k) on a statistics path that keeps what it was shown at every decision."""

    needs_statistics = True

    def __init__(self, k: int, statistics: str) -> None:
        self.k, self.statistics = k, statistics
        self.seen: list = []

    def decide(self, window: WindowView) -> Decision:
        stats = window.statistics
        if not isinstance(stats, NormStatistics):  # the moments' buffers are reused once the window closes
            stats = [Moments(m.n, m.mean.clone(), m.m2.clone()) for m in stats]
        self.seen.append(stats)
        return Decision(window.micro_batches >= self.k, {})


def _default_dtype(dtype: torch.dtype):
    class Scope:
        def __enter__(self) -> None:
            self.before = torch.get_default_dtype()
            torch.set_default_dtype(dtype)

        def __exit__(self, *exc: object) -> None:
            torch.set_default_dtype(self.before)

    return Scope()


@pytest.mark.parametrize("rule", [FixedSteps(2), GSNR(1.0, increment=4, max_samples=8),
                                  Record(2, "norms")], ids=["fixed", "gsnr", "norms"])
def test_a_float64_default_dtype_does_not_break_the_accumulator(rule) -> None:
    """Under ``torch.set_default_dtype(torch.float64)`` (Lightning's "64-true") the finiteness
    check's operands stay float32, and an Accumulator built afterwards on a float32 model
    still works."""
    with _default_dtype(torch.float64):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        assert next(model.parameters()).dtype == torch.float64
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule)
        for _ in range(2):
            acc.backward(model(torch.randn(4, 3)).square().mean(), 4)
        assert acc.steps >= 1
    model32 = nn.Linear(3, 2)
    acc32 = Accumulator(model32, torch.optim.SGD(model32.parameters(), lr=0.1), FixedSteps(1))
    assert acc32.backward(model32(torch.randn(4, 3)).square().mean(), 4)


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double()


def nanogpt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig()).double()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The model's own mean loss and the number of positions it is over."""
    if isinstance(model, TinyGPT):
        return model(x, y)[1], int((y != -1).sum())
    return model(input_ids=x, labels=y).loss, int((y[:, 1:] != -100).sum())


def _batch(model: nn.Module, n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 32, (n, t), generator=g)
    y = torch.randint(0, 32, (n, t), generator=g)
    y[torch.rand(n, t, generator=g) < 0.3] = -1 if isinstance(model, TinyGPT) else -100
    y[:, -1] = 3  # every sample has a counted position (HF shifts: the last label is predicted)
    return x, y


def _loop_terms(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, int]:
    """``tr(Sigma)`` and ``|G|^2`` from each sample's own gradient of its summed loss, one by one."""
    params = list(model.parameters())
    rows = []
    for x, y in batches:
        for i in range(len(x)):
            loss, count = _loss(model, x[i:i + 1], y[i:i + 1])
            grads = torch.autograd.grad(loss * count, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    per_sample = torch.stack(rows)
    mean = per_sample.mean(0)
    trace, squared = noise_terms(len(rows), [mean], [((per_sample - mean) ** 2).sum(0)])
    return float(trace), float(squared), len(rows)


@pytest.mark.parametrize("statistics", ["norms", "elements"])
@pytest.mark.parametrize("sizes", [(4, 3), (8, 8)], ids=["B!=T", "B==T"])
@pytest.mark.parametrize("build", [nanogpt, gpt2], ids=["nanogpt", "gpt2"])
def test_lm_with_its_own_loss_and_broadcast_positions_equals_the_per_sample_loop(build, sizes, statistics) -> None:
    """nanoGPT's ``GPT.forward(idx, targets) -> (logits, loss)`` and HF's GPT-2 with ``labels``:
    the position embedding of ``arange(T)`` is added over the batch and the loss is a 0-dim
    mean beside the logits. The window's noise terms equal the loop's to 1e-9 (two uneven
    micro-batches; ``B == T`` takes the single-sample probe first)."""
    model = build()
    rule = Record(2, statistics)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    t = 8
    batches = [_batch(model, n, t, seed=10 + k) for k, n in enumerate(sizes)]
    for x, y in batches:
        loss, count = _loss(model, x, y)
        acc.backward(loss, count, samples=len(x))
    seen = rule.seen[-1]
    trace, squared, n = _loop_terms(model, batches)
    if statistics == "norms":
        assert isinstance(seen, NormStatistics)
        got = (seen.trace, seen.squared_norm, seen.samples)
    else:
        got_trace, got_squared = noise_terms(seen[0].n, [m.mean for m in seen], [m.m2 for m in seen])
        got = (float(got_trace), float(got_squared), seen[0].n)
    assert got[2] == n
    assert got[0] == pytest.approx(trace, rel=1e-9)
    assert got[1] == pytest.approx(squared, rel=1e-8, abs=1e-10 * trace)
    assert acc.stats.paths["transformer.wpe"].startswith("embedding:")  # the addition's gradient, no replay
    assert "transformer.wpe.weight" not in acc.stats.paths


class PositionsTwice(nn.Module):
    """A position embedding added over the batch twice, or scaled into it: its output meets the
    batch other than through one addition, so its per-sample gradients come from the model run
    again per sample (still exact)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.wte, self.wpe = nn.Embedding(32, 8), nn.Embedding(16, 8)
        self.mix, self.head = nn.Linear(8, 8), nn.Linear(8, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pe = self.wpe(torch.arange(idx.shape[1]))
        h = self.wte(idx) * pe.sigmoid() if self.mode == "scaled" else self.wte(idx) + pe
        h = self.mix(torch.tanh(h))
        return self.head(h + pe if self.mode == "twice" else h)


@pytest.mark.parametrize("mode", ["twice", "scaled"])
def test_a_broadcast_output_used_other_than_once_added_still_equals_the_loop(mode: str) -> None:
    torch.manual_seed(0)
    model = PositionsTwice(mode).double()
    rule = Record(1, "norms")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 32, (5, 6), generator=g), torch.randint(0, 32, (5, 6), generator=g)

    def summed(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(xs).reshape(-1, 32), ys.reshape(-1), reduction="sum")

    acc.backward(summed(x, y), x.numel(), reduction="sum", samples=5)
    params = list(model.parameters())
    rows = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(summed(x[i:i + 1], y[i:i + 1]), params)])
                        for i in range(5)])
    mean = rows.mean(0)
    trace, squared = noise_terms(5, [mean], [((rows - mean) ** 2).sum(0)])
    assert rule.seen[-1].trace == pytest.approx(float(trace), rel=1e-9)
    assert rule.seen[-1].squared_norm == pytest.approx(float(squared), rel=1e-8, abs=1e-10 * float(trace))
    assert acc.stats.paths["wpe.weight"].startswith("model:")


@pytest.mark.parametrize("build", [nanogpt, gpt2], ids=["nanogpt", "gpt2"])
def test_token_count_makes_padded_lm_windows_equal_the_full_batch(build) -> None:
    """Rows padded to different lengths, split unevenly into micro-batches: with
    ``token_count`` (HF shifts inside, nanoGPT does not) the step's gradient equals the full
    batch's (to 1e-12 in float64 for nanoGPT; HF's loss casts the logits to float32, so GPT-2's
    own loss is held to 1e-6); counting every label that is not ignored (each row's first label
    too, which a shifting model never predicts) is off by far more."""
    from gradaccum import token_count

    from .reference import GradCapture

    model = build()
    shift, ignore = (False, -1) if isinstance(model, TinyGPT) else (True, -100)
    x, y = _batch(model, 6, 8, seed=5)
    y[y == -1] = ignore
    y[:4, 5:] = ignore  # padded rows
    loss, _ = _loss(model, x, y)
    want = torch.autograd.grad(loss, list(model.parameters()))

    def step(count) -> list[torch.Tensor]:
        opt = GradCapture(model.parameters(), lr=0.0)
        acc = Accumulator(model, opt, FixedSteps(3))
        for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
            mb_loss, _ = _loss(model, x[part], y[part])
            acc.backward(mb_loss, count(y[part]))
        return opt.seen[0]

    rtol = 1e-6 if shift else 1e-12
    exact = step(lambda labels: token_count(labels, shift=shift, ignore_index=ignore))
    for got, ref in zip(exact, want):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))
    if shift:
        naive = step(lambda labels: (labels != ignore).sum())
        assert max(float(((g - r).abs() / r.abs().max()).max()) for g, r in zip(naive, want)) > 1e-3


def test_token_count_refuses_what_is_not_labels() -> None:
    from gradaccum import token_count

    with pytest.raises(TypeError, match="integer token ids"):
        token_count(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sequence dimension"):
        token_count(torch.tensor(3))
    with pytest.raises(TypeError, match="ignore_index"):
        token_count(torch.zeros(2, 3, dtype=torch.long), ignore_index=-1.0)


@pytest.mark.parametrize("build", [nanogpt, gpt2], ids=["nanogpt", "gpt2"])
def test_monitor_on_an_lm_with_its_own_loss_and_clipping_equals_the_per_sample_loop(build) -> None:
    """The Monitor on the unchanged loop (the model's own mean loss, clipping on, AdamW): each
    row's terms equal the per-sample loop's, in the Monitor's per-sample-mean units (the loop's
    terms of each sample's summed loss over the batch's counted labels, squared)."""
    from gradaccum.torch import Monitor

    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, optimizer)
    batches = [_batch(model, 4, 8, seed=20 + k) for k in range(2)]
    want = []
    for x, y in batches:
        twin = copy.deepcopy(model)  # the loop runs on a copy: the Monitor sees only the training loop
        trace, squared, _ = _loop_terms(twin, [(x, y)])
        count = _loss(twin, x, y)[1]
        want.append((trace / count**2 * len(x) ** 2, squared / count**2 * len(x) ** 2))
        loss, _ = _loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # clipped hard: measured before the clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    monitor.close()
    assert len(monitor.rows) == 2
    for row, (trace, squared) in zip(monitor.rows, want):
        assert row["trace"] == pytest.approx(trace, rel=1e-8)
        assert row["squared_norm"] == pytest.approx(squared, rel=1e-6, abs=1e-9 * trace)


@pytest.mark.parametrize("source", ["per_sample", "micro_batch"])
@pytest.mark.parametrize("build", [nanogpt, gpt2], ids=["nanogpt", "gpt2"])
def test_noise_scale_planner_on_an_lm_with_its_own_loss(build, source: str) -> None:
    """``NoiseScalePlanner`` on nanoGPT's and GPT-2's models as written (their own loss, the
    broadcast position embedding, AdamW, clipping): windows follow the plans and every window
    records finite noise terms; the per-sample source's equal the loop's."""
    from gradaccum import NoiseScalePlanner

    model = build()
    planner = NoiseScalePlanner(1.0, min_batch=8, max_batch=16, micro_batch=4, source=source)
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=0.0), planner, clip_grad_norm=1.0)
    batches = [_batch(model, 4, 8, seed=30 + k) for k in range(6)]
    seen = []
    for x, y in batches:
        seen.append((x, y))
        loss, count = _loss(model, x, y)
        if acc.backward(loss, count, samples=len(x)):
            record = acc.history[-1]
            assert record.micro_batches == record.info["planned"] >= 2
            assert record.info["trace"] > 0
            if source == "per_sample":
                trace, _, n = _loop_terms(model, seen)
                assert record.info["samples"] == n
                assert record.info["trace"] == pytest.approx(trace, rel=1e-9)
            seen = []
    assert acc.steps >= 2
