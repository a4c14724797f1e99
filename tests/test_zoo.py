"""Per-sample statistics on real model patterns (tests/zoo.py) against a loop over samples.

Each defect found on real training code has its test here: optimizer groups in
another order than ``model.parameters()``, a weight used outside its module, a layer
broadcast over the batch (B != T and B == T), autocast, a GradScaler, activation
checkpointing, ``torch.compile``. Float64 unless the test is about a low precision.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradaccum import GSNR, Decision, FixedSteps
from gradaccum._core.statistics import mean_gsnr
from gradaccum.torch import Accumulator, PerSampleGradStats

from . import zoo


class Record:
    """FixedSteps(k) that asks for statistics and keeps a copy of them at every decision."""

    needs_statistics = True

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = []
        self.gsnr: list[float] = []

    def decide(self, window) -> Decision:
        self.seen.append([(m.n, m.mean.clone(), m.m2.clone()) for m in window.statistics])
        self.gsnr.append(mean_gsnr(window.statistics, "mean").value if window.statistics[0].n > 1 else math.nan)
        return Decision(window.micro_batches >= self.k, {})


def reference(model: nn.Module, pattern: zoo.Pattern, increments: list, params: list[nn.Parameter],
              before=lambda k: None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Moments of the per-sample gradients of every sample of ``increments``, by a loop."""
    grads = []
    trainable = [p for p in params if p.requires_grad]
    for k, batch in enumerate(increments):
        before(k)
        for i in range(len(batch)):
            loss = pattern.losses(model, zoo.take(batch, slice(i, i + 1))).sum()
            got = dict(zip(map(id, trainable), torch.autograd.grad(loss, trainable, allow_unused=True)))
            grads.append([torch.zeros_like(p) if got.get(id(p)) is None else got[id(p)] for p in params])
    out = []
    for j in range(len(params)):
        g = torch.stack([sample[j] for sample in grads])
        mean = g.mean(0)
        out.append((mean, ((g - mean) ** 2).sum(0)))
    return out


def assert_moments(got, want, n: int, rtol: float = 1e-9) -> None:
    for (count, mean, m2), (w_mean, w_m2) in zip(got, want):
        assert count == n
        scale = float(w_mean.abs().max()) + 1e-300
        assert float((mean - w_mean).abs().max()) <= rtol * scale + 1e-15
        scale = float(w_m2.abs().max()) + 1e-300
        assert float((m2 - w_m2).abs().max()) <= rtol * scale + 1e-15


def branch_switch(model: nn.Module):
    """PartlyFrozen's branch runs in the first increment only (no gradient in the second)."""
    return lambda k: setattr(model, "use_branch", k == 0) if hasattr(model, "use_branch") else None


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_statistics_equal_the_per_sample_loop(name: str, kernels: str) -> None:
    """Two increments (4 and 3 samples) through the Accumulator, with nanoGPT's decay /
    no-decay groups: the window's moments after each equal the loop's, parameter by
    parameter in the optimizer's order."""
    pattern = zoo.ZOO[name]
    model = zoo.build(name)
    optimizer = torch.optim.SGD(zoo.decay_groups(model), lr=0.0)  # lr 0: the reference sees the same weights
    rule = Record(2)
    acc = Accumulator(model, optimizer, rule)
    increments = [pattern.batch(4, 1), pattern.batch(3, 2)]
    switch = branch_switch(model)
    for k, batch in enumerate(increments):
        switch(k)
        acc.backward(pattern.losses(model, batch).sum(), pattern.items(batch), reduction="sum")
    params = acc._params
    assert [id(p) for p in params] != [id(p) for p in model.parameters() if p.requires_grad] or name == "lstm"
    assert_moments(rule.seen[0], reference(model, pattern, increments[:1], params, switch), 4)
    want = reference(model, pattern, increments, params, switch)
    assert_moments(rule.seen[1], want, 7)
    assert rule.gsnr[1] == pytest.approx(zoo.mean_gsnr(want, 7), rel=1e-9)


def test_optimizer_groups_in_another_order_give_the_gsnr_of_model_order() -> None:
    """Defect 1: with AdamW's decay / no-decay groups the Accumulator crashed (shapes) or
    paired statistics with the wrong gradients (GSNR 1.61 instead of 3.14)."""
    pattern = zoo.ZOO["mlp"]
    values = []
    for groups in (lambda m: m.parameters(), zoo.decay_groups, lambda m: list(reversed(list(m.parameters())))):
        model = zoo.build("mlp")
        rule = Record(3)
        acc = Accumulator(model, torch.optim.AdamW(groups(model), lr=0.0), rule)
        for k in range(3):
            batch = pattern.batch(5, k)
            acc.backward(pattern.losses(model, batch).mean(), len(batch))
        values.append(rule.gsnr)
    assert values[1] == pytest.approx(values[0], rel=1e-12)
    assert values[2] == pytest.approx(values[0], rel=1e-12)


def test_functional_tied_head_is_covered_by_the_model_fallback() -> None:
    """Defect 2: ``F.linear(h, self.wte.weight)``: the hooks see only the embedding's part
    of the gradient (M2 27.4 instead of 419.9); the check moves the weight to the model."""
    pattern = zoo.ZOO["nanogpt"]
    model = zoo.build("nanogpt")
    stats = PerSampleGradStats(model)
    batch = pattern.batch(5, 3)
    pattern.losses(model, batch).sum().backward()
    stats.commit()
    assert stats.paths["wte.weight"].startswith("model:")
    assert stats.paths["wte"] == "embedding:sum_squares"  # the path ran, and its sum did not add up
    params = stats.params
    assert_moments([(m.n, m.mean, m.m2) for m in stats.moments()], reference(model, pattern, [batch], params), 5)


@pytest.mark.parametrize("n, length", [(5, 8), (6, 6)], ids=["B!=T", "B==T"])
def test_position_embedding_broadcast_over_the_batch(n: int, length: int) -> None:
    """Defect 3: ``wpe(arange(T))`` added to (B, T, C) was refused for B != T ("layers saw
    different batch sizes") and silently wrong for B == T."""
    pattern = zoo.Pattern(lambda: zoo.NanoGPT(block=length), lambda k, s: zoo.lm_batch(k, s, length=length),
                          zoo.lm_losses, zoo.lm_items)
    torch.manual_seed(0)
    model = pattern.make().double()
    stats = PerSampleGradStats(model)
    batch = pattern.batch(n, 4)
    pattern.losses(model, batch).sum().backward()
    stats.commit()
    if n != length:  # the sizes say broadcast: the gradient of the addition over the batch gives it
        assert stats.paths["wpe"].startswith("embedding:") and "wpe.weight" not in stats.paths
    else:  # B == T: the first increment's single-sample probe says broadcast; the model is replayed
        assert stats.paths["wpe"] == "broadcast -> model"
        assert stats.paths["wpe.weight"].startswith("model:")
    want = reference(model, pattern, [batch], stats.params)
    assert_moments([(m.n, m.mean, m.m2) for m in stats.moments()], want, n)


def test_registered_subclass_with_another_forward_is_caught_by_the_check() -> None:
    """A subclass inherits its base's registry entry; if its forward uses the weight
    differently, the per-sample sums do not add up and the model fallback takes over."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, 2 * self.weight, self.bias)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), Doubled(6, 3)).double()
    pattern = zoo.Pattern(lambda: model, zoo.vector_batch, zoo.ce_losses)
    stats = PerSampleGradStats(model)
    batch = pattern.batch(6, 0)
    pattern.losses(model, batch).sum().backward()
    stats.commit()
    assert stats.paths["2.weight"].startswith("model:") and "0.weight" not in stats.paths
    want = reference(model, pattern, [batch], stats.params)
    assert_moments([(m.n, m.mean, m.m2) for m in stats.moments()], want, 6)


def test_frozen_parameter_inside_a_fallback_module_gets_no_statistics() -> None:
    """An LSTM (the vmap/loop fallback) with one weight frozen: the fallback must not give the
    frozen weight per-sample gradients (they would count as variance of a gradient never applied)."""
    pattern = zoo.ZOO["lstm"]
    model = zoo.build("lstm")
    model.lstm.weight_hh_l0.requires_grad_(False)
    rule = Record(2)
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    increments = [pattern.batch(4, 1), pattern.batch(3, 2)]
    for batch in increments:
        acc.backward(pattern.losses(model, batch).sum(), pattern.items(batch), reduction="sum")
    want = reference(model, pattern, increments, acc._params)
    assert_moments(rule.seen[1], want, 7)
    frozen = [id(p) for p in acc._params].index(id(model.lstm.weight_hh_l0))
    assert float(rule.seen[1][frozen][2].abs().max()) == 0.0


def test_samples_argument_overrides_and_is_checked() -> None:
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), Record(5))
    batch = pattern.batch(4, 0)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        acc.backward(pattern.losses(model, batch).mean(), 4, samples=0)
    assert acc.window_micro_batches == 0
    # samples that disagree with the model's batch: every layer looks broadcast and the
    # whole model is run per "sample" of that count, which does not explain the gradient
    with pytest.raises(ValueError, match="cannot explain the gradient|model is run once more"):
        acc.backward(pattern.losses(model, batch).mean(), 4, samples=2)
    assert acc.window_micro_batches == 0 and all(p.grad is None for p in model.parameters())
    acc.backward(pattern.losses(model, batch).mean(), 4, samples=4)  # the next correct call works
    assert acc.stats.count == 4


def test_weight_penalty_in_the_loss_is_refused_by_name() -> None:
    """A gradient no per-sample split explains (an L2 term on a weight) is refused, naming it."""
    pattern = zoo.ZOO["mlp"]
    model = zoo.build("mlp")
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), GSNR(1.0, increment=4, max_samples=8))
    batch = pattern.batch(4, 0)
    loss = pattern.losses(model, batch).mean() + 0.1 * model[2].weight.square().sum()
    with pytest.raises(ValueError, match=r"cannot explain the gradient of 2\.weight.*weight penalty"):
        acc.backward(loss, 4)
    assert acc.window_micro_batches == 0 and all(p.grad is None for p in model.parameters())
    acc.backward(pattern.losses(model, batch).mean(), 4)  # the Accumulator still works
    assert acc.window_items == 4


def test_random_forward_on_the_model_fallback_is_refused() -> None:
    """Dropout in a model whose weight needs the whole-model fallback: its per-sample
    replay draws other masks, so the check refuses instead of trusting it."""

    class Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(4, 6)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return nn.functional.linear(self.drop(torch.tanh(self.emb(x))), self.emb.weight.T)

    torch.manual_seed(0)
    model = Dropped().double()
    stats = PerSampleGradStats(model)
    model(torch.randn(6, 4, dtype=torch.float64)).square().sum().backward()
    with pytest.raises(ValueError, match="cannot explain the gradient of emb.weight.*dropout"):
        stats.commit()


@pytest.mark.parametrize("name", ["mlp", "nanogpt"])
def test_bfloat16_autocast_gsnr_within_5_percent_of_float32(name: str) -> None:
    """Defect 4: statistics under autocast crashed (dtype mismatch). They are computed in
    the parameters' dtype from the bfloat16 activations and output gradients."""
    pattern = zoo.ZOO[name]
    values = {}
    for autocast in (False, True):
        model = zoo.build(name, dtype=torch.float32)
        rule = Record(4)
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
        for k in range(4):
            batch = pattern.batch(16, 10 + k)
            batch = type(batch)(*(t.float() if t.is_floating_point() else t for t in vars(batch).values()))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                losses = pattern.losses(model, batch)
            acc.backward(losses.float().sum(), pattern.items(batch), reduction="sum")
        values[autocast] = rule.gsnr[-1]
        if name == "nanogpt":  # the check still finds the tied head at bfloat16's tolerance
            assert acc.stats.paths["wte.weight"].startswith("model:")
    assert values[True] == pytest.approx(values[False], rel=0.05)


def test_grad_scaler_with_statistics_equals_no_scaler_and_skips_overflow() -> None:
    """A GradScaler together with a statistics rule was refused; the increment's sums are
    now unscaled before merging, and an overflowing increment closes its window skipped."""
    pattern = zoo.ZOO["mlp"]
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model = zoo.build("mlp")
        rule = GSNR(1.2, increment=4, max_samples=16, scale="mean")
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule, scaler=scaler)
        for k in range(12):
            batch = pattern.batch(4, 20 + k)
            acc.backward(pattern.losses(model, batch).mean(), 4)
        runs.append(([r.items for r in acc.history], [r.info.get("gsnr") for r in acc.history],
                     [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) >= 3
    assert runs[1][1] == pytest.approx(runs[0][1], rel=1e-9)
    for a, b in zip(runs[0][2], runs[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    model = zoo.build("mlp", dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # float32 gradients overflow at this scale
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      GSNR(1.2, increment=4, max_samples=16, scale="mean"), scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    batch = pattern.batch(4, 0)
    loss = pattern.losses(model, zoo.Labeled(batch.x.float() * 100, batch.y)).mean()
    assert acc.backward(loss, 4) is False
    assert acc.last_record.skipped and acc.last_record.info == {"overflow": True}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**127 and acc.stats.count == 0


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing(reentrant: bool) -> None:
    """Defect 9: a checkpointed block runs its forward again in backward, so its hooks fire
    twice; only calls whose outputs reached the loss count."""
    pattern = zoo.ZOO["nanogpt"]
    torch.manual_seed(0)
    # the module-tied form: reentrant checkpointing cannot run under the whole-model fallback
    model = zoo.NanoGPT(layers=2, checkpoint=reentrant, functional=reentrant is False).double()
    stats = PerSampleGradStats(model)
    batch = pattern.batch(5, 7)
    pattern.losses(model, batch).sum().backward()
    stats.commit()
    assert all(not path.startswith("model") for path in stats.paths.values()) or not reentrant
    model.checkpoint = None  # the reference without checkpointing: the same function
    want = reference(model, pattern, [batch], stats.params)
    assert_moments([(m.n, m.mean, m.m2) for m in stats.moments()], want, 5)


def test_compiled_modules_are_refused_by_name() -> None:
    """Defect 9: compiled code runs no layer hooks; refused at construction, naming it."""
    model = zoo.build("mlp")
    with pytest.raises(ValueError, match="torch.compile'd module"):
        Accumulator(torch.compile(model, backend="eager"), torch.optim.SGD(model.parameters(), lr=0.1), GSNR(1.0))
    model[2] = torch.compile(model[2], backend="eager")
    with pytest.raises(ValueError, match=r"torch.compile'd module \(2\)"):
        PerSampleGradStats(model)
    plain = zoo.build("mlp")
    plain.compile(backend="eager")
    with pytest.raises(ValueError, match="torch.compile'd module"):
        PerSampleGradStats(plain)
    Accumulator(plain, torch.optim.SGD(plain.parameters(), lr=0.1), FixedSteps(2))  # no statistics: fine


def test_sparse_embedding_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Embedding(7, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).double()
    stats = PerSampleGradStats(model)
    model(torch.randint(0, 7, (4, 2))).sum().backward()
    with pytest.raises(ValueError, match=r"nn.Embedding\(sparse=True\)"):
        stats.commit()


def test_a_forward_that_does_not_reach_the_loss_does_not_set_the_sample_count() -> None:
    """A monitoring forward (gradients on, another batch size) between the real forward and
    the backward must not be taken for the increment's model call."""
    pattern = zoo.ZOO["nanogpt"]
    model = zoo.build("nanogpt")
    stats = PerSampleGradStats(model)
    batch = pattern.batch(5, 3)
    loss = pattern.losses(model, batch).sum()
    model(pattern.batch(3, 9).tokens)  # looked at, never differentiated
    loss.backward()
    stats.commit()
    want = reference(model, pattern, [batch], stats.params)
    assert_moments([(m.n, m.mean, m.m2) for m in stats.moments()], want, 5)


@pytest.mark.parametrize("statistics", ["elements", "norms"])
def test_a_conv_bias_summed_over_many_positions_is_explained_in_float32(statistics: str) -> None:
    """A float32 conv bias summed over 32x32 positions and 32 samples was refused ("cannot
    explain the gradient of blocks.1.2.bias"): the check's rounding tolerance counted the
    samples (32) but not the positions autograd adds up (32768 terms per element)."""
    torch.manual_seed(0)
    width = 32
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.Flatten(2))
    stats = PerSampleGradStats(model, statistics=statistics)
    x = torch.randn(32, 3, 32, 32)
    (model(x).mean(2) ** 2).sum().backward()
    assert stats.commit() == 32
    assert stats.paths["3"] == "conv:per_sample" and "3.bias" not in stats.paths  # no fallback


@pytest.mark.parametrize("rows_chunk", [1 << 18, 5])  # whole, and blocks of rows through one buffer
def test_the_check_s_magnitude_bound_in_blocks_equals_the_whole_computation(rows_chunk: int, monkeypatch) -> None:
    """``project(sqrt(n S2), |v|)`` taken a block of rows at a time (large parameters) equals the
    one-pass form, for matrices, higher-dimensional tensors and vectors."""
    import math

    from gradaccum.torch._stats import _explained

    monkeypatch.setattr(_explained, "ROWS_CHUNK", rows_chunk)
    project = _explained.Projector()
    g = torch.Generator().manual_seed(0)
    for shape in ((7, 3), (4, 3, 2, 5), (11,)):
        squares = torch.rand(shape, generator=g, dtype=torch.float64)
        want = squares.sqrt() * math.sqrt(6)
        if squares.dim() >= 2:
            want = want.reshape(-1, shape[-1]) @ project.vector(shape[-1], torch.float64, squares.device).abs()
        torch.testing.assert_close(_explained.scale_from_squares(squares, 6, project), want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("statistics", ["elements", "norms"])
def test_a_use_outside_the_hooks_of_1_percent_is_caught_in_float32(statistics: str) -> None:
    """The check's bound for nn.Linear comes from norms of its input and output gradient on
    both paths (no pass over the sums of squares): still tight enough in float32 at 256
    samples to catch a weight penalty whose gradient is 1 % of the weight's, and quiet without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(256, 40), torch.randint(0, 10, (256,))
    stats = PerSampleGradStats(model, statistics=statistics)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    real = model[2].weight.grad.abs().max()
    assert stats.commit() == 256 and stats.paths["2"].startswith("linear:")
    scale = float(0.01 * real / (2 * model[2].weight.detach().abs().max()))
    model.zero_grad()
    (nn.functional.cross_entropy(model(x), y, reduction="sum") + scale * model[2].weight.square().sum()).backward()
    with pytest.raises(ValueError, match=r"cannot explain the gradient of 2\.weight"):
        stats.commit()
