"""Faults and bad input: no silent wrong result, no bricked state, no hang.

Each test pins one failure mode: the window, the
counters and the parameters are as they were after a failed call, and the next correct
call works.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradaccum import GSNR, FixedSteps
from gradaccum.torch import Accumulator, NonFiniteError, find_micro_batch_size, is_out_of_memory

from .reference import GradCapture, ce_mean, classification, full_batch_grad, mlp, take


def window_of(acc: Accumulator) -> tuple:
    sums = [None if s is None else s.clone() for s in acc._window.sums]
    return sums, acc.window_items, acc.window_micro_batches, acc.steps


def same_window(acc: Accumulator, before: tuple) -> bool:
    sums, items, micro, steps = before
    now = acc._window.sums
    return (items, micro, steps) == (acc.window_items, acc.window_micro_batches, acc.steps) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in zip(sums, now))


def test_statistics_rule_with_skip_window_is_not_bricked_by_one_nan() -> None:
    """After one non-finite micro-batch every later backward raised "a parameter has a .grad
    that the Accumulator did not put there" (the skip path returned before clearing .grad)."""
    data = classification(24)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      GSNR(1e9, increment=4, max_samples=8), nonfinite="skip_window")
    bad = take(data, slice(0, 4))
    bad.x = bad.x.clone()
    bad.x[0, 0] = math.nan
    acc.backward(*ce_mean(model, bad))  # the window's statistics go on from its good micro-batches
    acc.backward(*ce_mean(model, take(data, slice(4, 8))))
    assert acc.backward(*ce_mean(model, take(data, slice(8, 12)))) is False  # closes at the cap, skipped
    assert acc.last_record.skipped and acc.last_record.reason == "nonfinite"
    before = [p.detach().clone() for p in model.parameters()]
    acc.backward(*ce_mean(model, take(data, slice(12, 16))))
    assert acc.backward(*ce_mean(model, take(data, slice(16, 20)))) is True
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class FailOnce(torch.autograd.Function):
    """Identity whose backward raises once (out of memory half-way, a failing custom Function)."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if FailOnce.armed:
            FailOnce.armed = False
            raise RuntimeError("CUDA out of memory (simulated, inside backward)")
        return grad


class Flaky(nn.Module):
    """The reference MLP with a FailOnce after its first layer: part of the gradient (the
    last layers') is already accumulated when the backward raises."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        h = FailOnce.apply(self.net[0](x))
        return self.net[4](self.net[3](self.net[2](self.net[1](h))))


@pytest.mark.parametrize("rule", [FixedSteps(2), GSNR(1e9, increment=4, max_samples=8)], ids=["fixed", "gsnr"])
def test_exception_inside_backward_leaves_the_window_unchanged(rule) -> None:
    """A backward that raised left the micro-batch counted and a partial .grad: the next call
    got the misleading "stray backward" error. Now the window is exactly as before and a
    retry gives the run without the failure, bitwise."""
    data = classification(8)
    runs = []
    for fail in (False, True):
        torch.manual_seed(0)
        model = Flaky().double()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, rule)
        acc.backward(*ce_mean(model, take(data, slice(0, 4))))
        before = window_of(acc)
        if fail:
            FailOnce.armed = True
            with pytest.raises(RuntimeError, match="simulated"):
                acc.backward(*ce_mean(model, take(data, slice(4, 8))))
            assert same_window(acc, before) and all(p.grad is None for p in model.parameters())
        assert acc.backward(*ce_mean(model, take(data, slice(4, 8)))) is True  # the retry
        runs.append(opt.seen[0])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_exception_inside_in_place_backward_drops_the_window() -> None:
    """Where autograd adds into .grad itself (skip_window, no statistics), a partial add cannot
    be undone: the window is dropped (reason "failed"), never applied (it was applied)."""
    data = classification(12)
    torch.manual_seed(0)
    model = Flaky().double()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2), nonfinite="skip_window")
    start = [p.detach().clone() for p in model.parameters()]
    acc.backward(*ce_mean(model, take(data, slice(0, 4))))
    FailOnce.armed = True
    with pytest.raises(RuntimeError, match="simulated"):
        acc.backward(*ce_mean(model, take(data, slice(4, 8))))
    assert acc.window_micro_batches == 1
    assert acc.backward(*ce_mean(model, take(data, slice(8, 12)))) is False
    assert acc.last_record.skipped and acc.last_record.reason == "failed"
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))


def saved_mid_window(rule=None):
    data = classification(8)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule or FixedSteps(3))
    acc.backward(*ce_mean(model, take(data, slice(0, 4))))
    return model, acc, acc.state_dict()


def corrupt(state: dict, key: str, value) -> dict:
    bad = dict(state)
    if value is KeyError:
        del bad[key]
    else:
        bad[key] = value
    return bad


@pytest.mark.parametrize(("key", "value", "match"), [
    ("monitor", KeyError, "missing monitor"),
    ("history", [{"step": 0, "nonsense": 1}], "bad step record"),
    ("items", -100, "items'] must be a non-negative int"),
    ("micro_batches", 1.5, "micro_batches'] must be a non-negative int"),
    ("poisoned", "no", "poisoned'] must be a bool"),
    ("statistics", {"moments": None}, "holds statistics"),
])
def test_load_state_dict_validates_everything_before_assigning(key, value, match) -> None:
    """A state failing late raised after the sums were overwritten; items=-100 divided the
    gradient by -84. Every value is checked first; the window is untouched on error."""
    model, acc, state = saved_mid_window()
    other_model, other, _ = saved_mid_window()
    other.backward(*ce_mean(other_model, take(classification(8, seed=3), slice(0, 2))))
    before = window_of(other)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(corrupt(state, key, value))
    assert same_window(other, before)
    other.load_state_dict(state)  # a good state still loads
    assert other.window_items == 4


def test_non_finite_sums_are_refused_unless_the_window_is_poisoned() -> None:
    _, acc, state = saved_mid_window()
    bad = dict(state, sums=[s.clone() for s in state["sums"]])
    bad["sums"][0][0, 0] = math.nan
    with pytest.raises(ValueError, match=r"sums'\]\[0\] is not finite"):
        acc.load_state_dict(bad)
    acc.load_state_dict(dict(bad, poisoned=True))  # a poisoned window may hold them: it will be dropped


def test_state_of_another_rule_is_refused() -> None:
    """A FixedSteps state loaded into a GSNR accumulator, and the other way round."""
    _, fixed, fixed_state = saved_mid_window()
    _, gsnr, gsnr_state = saved_mid_window(GSNR(1e9, increment=4, max_samples=16))
    with pytest.raises(ValueError, match="holds no statistics"):
        gsnr.load_state_dict(fixed_state)
    with pytest.raises(ValueError, match="holds statistics"):
        fixed.load_state_dict(gsnr_state)
    bad = dict(gsnr_state, statistics={"moments": [(4, m, -v) for _, m, v in gsnr_state["statistics"]["moments"]]})
    with pytest.raises(ValueError, match="negative"):
        gsnr.load_state_dict(bad)


def test_parameter_frozen_at_construction_and_unfrozen_later_is_averaged() -> None:
    """Its .grad was neither cleared nor averaged (0.31 off the correct run after 3 windows)."""
    data = classification(24)
    model = mlp()
    model[0].weight.requires_grad_(False)
    opt = GradCapture(model.parameters())  # the optimizer holds it, frozen or not
    acc = Accumulator(model, opt, FixedSteps(2))
    model[0].weight.requires_grad_(True)
    for start in range(0, 24, 4):
        acc.backward(*ce_mean(model, take(data, slice(start, start + 4))))
    assert len(opt.seen) == 3
    # replay: the same steps by the full-batch gradient of each window
    replay = mlp()
    for k, seen in enumerate(opt.seen):
        want = full_batch_grad(replay, take(data, slice(8 * k, 8 * k + 8)))
        for g, w in zip(seen, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
        with torch.no_grad():
            for p, w in zip(replay.parameters(), want):
                p -= 0.1 * w


def test_parameter_the_optimizer_does_not_hold_is_refused_when_it_gets_a_gradient() -> None:
    data = classification(8)
    model = mlp()
    model[0].weight.requires_grad_(False)
    acc = Accumulator(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                      FixedSteps(2))
    acc.backward(*ce_mean(model, take(data, slice(0, 4))))
    before = window_of(acc)
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"optimizer does not hold got gradients \(0.weight\)"):
        acc.backward(*ce_mean(model, take(data, slice(4, 8))))
    assert same_window(acc, before) and model[0].weight.grad is None


@pytest.mark.parametrize("policy", ["raise", "skip_micro_batch", "skip_window"])
def test_float16_loss_with_a_large_token_count_does_not_overflow(policy: str) -> None:
    """``loss * count`` in float16 overflowed at count 70000: under skip_micro_batch every
    micro-batch was dropped silently, under raise a finite loss was called non-finite."""
    data = classification(16)
    grads = []
    for half in (False, True):
        model = mlp().float()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, FixedSteps(2), nonfinite=policy)
        for part, count in ((slice(0, 8), 70000), (slice(8, 16), 50000)):
            batch = take(data, part)
            loss = nn.functional.cross_entropy(model(batch.x.float()), batch.y)
            acc.backward(loss.half() if half else loss, count)
        assert not acc.last_record.skipped and acc.last_record.items == 120000
        grads.append(opt.seen[0])
    for a, b in zip(*grads):  # float16 rounds the loss's seed (2**-11): compare against the gradient's scale
        assert float((a - b).abs().max()) <= 2e-3 * float(b.abs().max())


def test_count_shift_is_bitwise_the_plain_arithmetic() -> None:
    """The power-of-two count shift changes no bit: the window gradient equals the
    full-batch reference as before, for counts that are and are not powers of two."""
    data = classification(20)
    model = mlp()
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(3))
    for part in (slice(0, 7), slice(7, 8), slice(8, 20)):
        acc.backward(*ce_mean(model, take(data, part)))
    want = full_batch_grad(mlp(), data)
    for g, w in zip(opt.seen[0], want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-15)


def test_unsupported_inputs_are_refused_by_name() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="got the class FixedSteps: write FixedSteps"):
        Accumulator(model, opt, FixedSteps)
    sparse = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"^0: sparse=True gives sparse gradients"):
        Accumulator(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1), FixedSteps(2))
    meta = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        Accumulator(meta, torch.optim.SGD(meta.parameters(), lr=0.1), FixedSteps(2))


@pytest.mark.slow
def test_memory_probe_stops_and_knows_cpu_out_of_memory() -> None:
    """A step that never fails doubled without bound; the CPU's "can't allocate memory" and
    MemoryError were not treated as out of memory."""
    with pytest.raises(ValueError, match="without running out of memory: .* pass max_size"):
        find_micro_batch_size(lambda m: None)
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 123 bytes"))

    def step(m: int) -> None:
        if m > 12:
            raise MemoryError
    assert find_micro_batch_size(step, 1) == 12


def test_jax_float16_losses_are_summed_without_overflow() -> None:
    """JAX dropped a micro-batch of 76,800 examples as non-finite: the float16 loss sum overflowed."""
    import jax.numpy as jnp
    import optax

    from gradaccum.jax import AccumulatingTrainState, make_train_step

    def losses(params, batch):
        return (batch["x"] @ params["w"]).astype(jnp.float16) ** 2

    params = {"w": jnp.ones((2,), jnp.float32)}
    state = AccumulatingTrainState.create(apply_fn=None, params=params, tx=optax.sgd(1e-12), rule=FixedSteps(1))
    x = np.full((8, 2), 40.0, np.float32)  # each loss 6400; weights 16 -> 819,200 > float16's 65,504
    state, metrics = make_train_step(losses)(state, {"x": x}, np.full(8, 16))
    assert bool(metrics["finite"]) and int(state.step) == 1


def test_nonfinite_raise_policy_message_names_the_window() -> None:
    data = classification(4)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(2))
    bad = take(data, slice(0, 4))
    bad.x = bad.x.clone()
    bad.x[1, 1] = math.inf
    with pytest.raises(NonFiniteError, match="window 0, micro-batch 1"):
        acc.backward(*ce_mean(model, bad))
    assert acc.window_micro_batches == 0


@pytest.mark.parametrize("policy", ["skip_micro_batch", "skip_window"])
def test_optax_accumulate_never_passes_a_non_finite_gradient(policy: str) -> None:
    """optax ``accumulate`` had no non-finite handling: one NaN micro-batch reached Adam."""
    import jax.numpy as jnp
    import optax

    from gradaccum.jax import accumulate

    tx = accumulate(optax.sgd(1.0), every_k=2, nonfinite=policy)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params, items=3)
    updates, state = tx.update({"w": jnp.array([2.0, 4.0])}, state, params, items=1)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))
    if policy == "skip_micro_batch":  # the bad micro-batch's items are dropped: the mean of the good one
        np.testing.assert_allclose(np.asarray(updates["w"]), [-2.0, -4.0])
        assert int(state.gradient_step) == 1
    else:  # the whole window goes, without a step
        np.testing.assert_array_equal(np.asarray(updates["w"]), [0.0, 0.0])
        assert int(state.gradient_step) == 0
    updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, params, items=1)
    updates, state = tx.update({"w": jnp.array([3.0, 3.0])}, state, params, items=1, last=True)
    np.testing.assert_allclose(np.asarray(updates["w"]), [-2.0, -2.0])  # the next window is fine


@pytest.mark.parametrize("rule", [FixedSteps(3), GSNR(1e9, increment=4, max_samples=8)], ids=["fixed", "gsnr"])
def test_a_micro_batch_with_no_items_adds_nothing(rule) -> None:
    """``count=0`` (every token ignored) was refused; only what is impossible is refused now:
    it takes its place in the window and adds no gradient, items or samples."""
    data = classification(8)
    runs = []
    for empty in (False, True):
        model = mlp()
        opt = GradCapture(model.parameters())
        acc = Accumulator(model, opt, rule)
        acc.backward(*ce_mean(model, take(data, slice(0, 4))))
        if empty:
            loss = nn.functional.cross_entropy(model(data.x[:2]), torch.full((2,), -100), ignore_index=-100)
            assert math.isnan(float(loss.detach()))  # the mean over no items
            acc.backward(loss, 0)
            assert acc.window_items == 4 and acc.window_micro_batches == 2
        acc.backward(*ce_mean(model, take(data, slice(4, 8))))
        acc.flush()
        runs.append((opt.seen[0], acc.history[0].info.get("gsnr")))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert runs[0][1] == runs[1][1]  # the statistics saw the same samples


@pytest.mark.parametrize("large", [False, True], ids=["flagging_kernel", "sums_above_2^20"])
def test_the_finiteness_check_is_exact_when_its_quick_reduction_overflows(large: bool, monkeypatch) -> None:
    """Above 2^20 elements the check reduces every gradient to one number; where that
    overflows or cancels (huge finite values, opposite infinities) the exact per-element check
    decides. Below, the flagging kernel is exact by construction: the same cases hold."""
    from gradaccum.torch import _nonfinite

    if large:
        monkeypatch.setattr(_nonfinite, "_FLAGGED_UP_TO", 0)
    huge = [torch.full((3, 2), 3e38), torch.full((4,), 3e38), None]
    assert _nonfinite.all_finite(huge)  # norms and sums overflow; every element is finite
    assert _nonfinite.all_finite([torch.tensor([3e38, -3e38]), torch.ones(2)])
    for bad in (math.inf, -math.inf, math.nan):
        grads = [torch.ones(3), torch.tensor([1.0, bad]), torch.tensor([-math.inf if bad == math.inf else 1.0])]
        assert not _nonfinite.all_finite(grads)
    assert _nonfinite.all_finite([None, None])


def test_the_flagging_check_leaves_gradients_bitwise_and_takes_complex_and_mixed_dtypes() -> None:
    """The small-model check is the GradScaler's kernel with a factor of 1: it writes every
    element back, so the values must come back bitwise (-0.0, subnormals, the largest
    float); complex gradients (which the kernel does not take) are checked as real views,
    and one call takes several dtypes."""
    from gradaccum.torch import _nonfinite

    def edge(dtype: torch.dtype) -> torch.Tensor:  # -0.0, the smallest subnormal, the largest finite, an odd value
        info = torch.finfo(dtype)
        return torch.tensor([-0.0, info.smallest_normal * info.eps, info.max, -1.0 - info.eps, 7.0], dtype=dtype)

    wants = [edge(torch.float32), edge(torch.float64), edge(torch.float16), edge(torch.bfloat16),
             torch.complex(edge(torch.float32), -edge(torch.float32))]
    grads = [w.clone() for w in wants]
    assert _nonfinite.all_finite(grads)
    for got, want in zip(grads, wants):
        assert got.dtype == want.dtype
        bits = (lambda t: torch.view_as_real(t).view(torch.int32)) if want.is_complex() else \
            (lambda t: t.view({4: torch.int32, 8: torch.int64, 2: torch.int16}[t.element_size()]))
        assert torch.equal(bits(got), bits(want))  # bitwise: -0.0 keeps its sign, subnormals stay
    for bad in (math.inf, math.nan):
        assert not _nonfinite.all_finite([torch.ones(2), torch.complex(torch.ones(2), torch.tensor([1.0, bad]))])
        assert not _nonfinite.all_finite([torch.ones(2, dtype=torch.bfloat16),
                                          torch.tensor([bad], dtype=torch.float64)])
    assert _nonfinite.finite_loss(torch.tensor(2.0, requires_grad=True))
    assert not _nonfinite.finite_loss(torch.tensor(math.nan, dtype=torch.float16))


def flaky_rows(monkeypatch: pytest.MonkeyPatch, fail_from_row: int) -> dict[str, bool]:
    """nn.Linear's sums of squares, made in blocks of 16 elements, raise (once, when armed)
    at the first block that starts at or past ``fail_from_row``: 0 fails before anything is
    merged, 1 after the first block went in."""
    from gradaccum.torch._stats import _blocks, _layers

    monkeypatch.setattr(_blocks, "BLOCK", 16)
    arm = {"armed": False}
    make = _layers._linear_rows

    def rows(x, d):
        write = make(x, d)

        def flaky(start, stop, out):
            if arm["armed"] and start >= fail_from_row:
                arm["armed"] = False
                raise RuntimeError("out of memory (simulated, in a block of the sums of squares)")
            write(start, stop, out)

        return flaky

    monkeypatch.setattr(_layers, "_linear_rows", rows)
    return arm


def test_a_commit_failing_in_its_first_block_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradaccum.torch import PerSampleGradStats

    arm = flaky_rows(monkeypatch, 0)
    data = classification(8)
    model = mlp()
    stats = PerSampleGradStats(model)
    for part, armed in ((slice(0, 4), False), (slice(4, 8), True)):
        model.zero_grad(set_to_none=True)
        loss, count = ce_mean(model, take(data, part))
        (loss * count).backward()
        if armed:
            before = [(m.mean.clone(), m.m2.clone()) for m in stats.moments()]
            arm["armed"] = True
            with pytest.raises(RuntimeError, match="simulated"):
                stats.commit()
            assert not stats.lost and stats.count == 4
            assert all(torch.equal(m.mean, a) and torch.equal(m.m2, b) for m, (a, b) in zip(stats.moments(), before))
        else:
            stats.commit()


def test_a_commit_failing_after_its_first_block_loses_the_moments_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks before the failure are merged and cannot be taken out: the moments are refused
    (not silently partial) until reset, and the next window is exact."""
    from gradaccum.torch import PartialCommit, PerSampleGradStats

    arm = flaky_rows(monkeypatch, 1)
    data = classification(8)
    model = mlp()
    stats = PerSampleGradStats(model)

    def increment(part: slice) -> None:
        model.zero_grad(set_to_none=True)
        loss, count = ce_mean(model, take(data, part))
        (loss * count).backward()
        stats.commit()

    increment(slice(0, 4))
    arm["armed"] = True
    with pytest.raises(PartialCommit, match="partly merged"):
        increment(slice(4, 8))
    assert stats.lost
    for refused in (stats.moments, stats.state_dict, lambda: increment(slice(4, 8))):
        with pytest.raises(ValueError, match="partly merged"):
            refused()
    stats.reset()
    increment(slice(0, 4))
    increment(slice(4, 8))
    fresh = PerSampleGradStats(twin := mlp())
    twin.load_state_dict(model.state_dict())
    for part in (slice(0, 4), slice(4, 8)):
        twin.zero_grad(set_to_none=True)
        loss, count = ce_mean(twin, take(data, part))
        (loss * count).backward()
        fresh.commit()
    assert all(torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)
               for a, b in zip(stats.moments(), fresh.moments()))


def test_a_partly_merged_micro_batch_drops_its_window_in_the_accumulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a per-element rule the window's sum lives in the statistics' mean: a commit that
    failed half-way leaves it partly merged, so the window is dropped when it closes (reason
    "failed"), never applied, and the next window steps."""
    from gradaccum.torch import PartialCommit

    arm = flaky_rows(monkeypatch, 1)
    data = classification(20)
    torch.manual_seed(0)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), GSNR(1e9, increment=4, max_samples=8))
    start = [p.detach().clone() for p in model.parameters()]
    acc.backward(*ce_mean(model, take(data, slice(0, 4))))
    arm["armed"] = True
    with pytest.raises(PartialCommit):
        acc.backward(*ce_mean(model, take(data, slice(4, 8))))
    assert acc.window_micro_batches == 1 and all(p.grad is None for p in model.parameters())
    # the statistics start again from the next micro-batch: the cap of 8 samples is two away
    assert acc.backward(*ce_mean(model, take(data, slice(4, 8)))) is False
    assert acc.last_record is None
    assert acc.backward(*ce_mean(model, take(data, slice(8, 12)))) is False  # closes at the cap, dropped
    assert acc.last_record.skipped and acc.last_record.reason == "failed"
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
    acc.backward(*ce_mean(model, take(data, slice(12, 16))))
    assert acc.backward(*ce_mean(model, take(data, slice(16, 20)))) is True
    assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
