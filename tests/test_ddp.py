"""DDP with 2 gloo processes on loopback equals one process over the union of the data.

The ranks see different micro-batch sizes, so DDP's plain average over ranks would
not be the mean over items; gradients are reduced once per window, never on the
other micro-steps (DeepSpeed #2252, Transformers PR #34645).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradaccum.torch import Accumulator

from . import _ddp_worker as worker
from .reference import ce_mean, classification, full_batch_grad, mlp, take
from .test_monitor_micro_batch import flat_grad, loop_terms

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test runs two gloo ranks in processes of their own


def windows_of(sizes: list[int], k: int) -> list[slice]:
    out, start = [], 0
    for w in range(0, len(sizes), k):
        n = sum(sizes[w:w + k])
        out.append(slice(start, start + n))
        start += n
    return out


def run_two_ranks(tmp_path: Path, mode: str) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-m", "tests._ddp_worker", str(r), "2", str(tmp_path), mode],
                              cwd=ROOT) for r in range(2)]
    codes = [p.wait(timeout=300) for p in procs]  # wait for both before judging: no orphan left behind
    assert codes == [0, 0]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


class Ranks:
    """Each mode's results from one run of tests/_multi_worker.py on two ranks."""

    def __init__(self, out: Path, codes: list[int]) -> None:
        self.out, self.codes = out, codes

    def directory(self, mode: str) -> Path:
        """``mode``'s files, once both ranks finished it; a mode that failed raises here, with the
        ranks' tracebacks (a failure in another mode leaves this one's results standing)."""
        errors = sorted((self.out / mode).glob("error*.txt"))
        assert not errors, "\n".join(e.read_text() for e in errors)
        assert (self.out / mode / "done").exists(), f"{mode!r} did not finish; the ranks ended with {self.codes}"
        return self.out / mode

    def __call__(self, mode: str) -> list[dict]:
        """Both ranks' saved results of ``mode``."""
        return [torch.load(self.directory(mode) / f"rank{r}.pt", weights_only=True) for r in range(2)]


def run_modes(out: Path, modes: list[str], timeout: float = 300) -> Ranks:
    """Run ``modes`` of tests/_multi_worker.py in turn on two gloo ranks (one start-up for all);
    kill both ranks if either overruns."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests._multi_worker", str(r), "2", str(out), ",".join(modes)],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=timeout)  # wait for both before judging: no orphan left behind
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return Ranks(out, [p.returncode for p in procs])


MODES = ["raise", "skip_window", "gsnr", "gsnr_skip", "gsnr_heads", "probe", "ramp", "norms", "norms_micro",
         "norms_skip", "micro_planner", "monitor", "gsnr_compiled", "contract_flush", "contract_gsnr",
         "contract_schedule", "contract_clip"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Ranks:
    """Every mode these tests read, run once on one pair of ranks; each test judges its own mode's files."""
    return run_modes(tmp_path_factory.mktemp("ddp"), MODES)


@pytest.mark.parametrize("nonfinite", ["raise", "skip_window"])  # buffered and in-place window sums
def test_two_gloo_ranks_equal_one_process(two_ranks: Ranks, nonfinite: str) -> None:
    ranks = two_ranks(nonfinite)

    # single-process reference: window w = rank 0's window w + rank 1's window w
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [worker.rank_data(r) for r in range(2)]
    wins = [windows_of(worker.SIZES[r], worker.K) for r in range(2)]
    assert len(wins[0]) == len(wins[1]) == 3
    for w in range(3):
        x = torch.cat([data[r].x[wins[r][w]] for r in range(2)])
        y = torch.cat([data[r].y[wins[r][w]] for r in range(2)])
        window = type(data[0])(x, y)
        want = full_batch_grad(model, window)
        for r in range(2):
            for got, g in zip(ranks[r]["seen"][w], want):
                torch.testing.assert_close(got, g, rtol=1e-10, atol=1e-10)
        assert ranks[0]["items"][w] == len(y)
        opt.zero_grad()
        for p, g in zip(model.parameters(), want):
            p.grad = g
        opt.step()
    for r in range(2):
        for got, p in zip(ranks[r]["params"], model.parameters()):
            torch.testing.assert_close(got, p.detach(), rtol=1e-10, atol=1e-10)
        # all-reduces only when a window closes (micro 2, 5, and the flush), none from DDP's reducer
        assert sorted(set(ranks[r]["calls"])) == [2, 5, 8]
        assert ranks[r]["ddp_hook_calls"] == 0


@pytest.mark.parametrize("mode", ["gsnr", "gsnr_skip", "gsnr_compiled"],
                         ids=["all_finite", "rank1_skips_a_micro_batch", "fused_kernels"])
def test_gsnr_on_two_ranks_equals_one_process_with_the_doubled_increment(two_ranks: Ranks, mode: str) -> None:
    """Statistics are reduced over ranks at every increment: both ranks take the same
    decisions, at the same increments, as one process that sees both halves at once. A
    rank that skips a non-finite micro-batch still joins the increment (no deadlock). The
    ranks' fused kernels (the ranks' moments reduced between the guard and the merge) too."""
    skip = mode == "gsnr_skip"
    ranks = two_ranks(mode)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), worker.gsnr_rule())
    data = worker.gsnr_data()
    for k, start in enumerate(range(0, worker.GSNR_SAMPLES, 2 * worker.GSNR_INC)):
        end = start + (worker.GSNR_INC if skip and k == 2 else 2 * worker.GSNR_INC)  # rank 1's half dropped
        acc.backward(*ce_mean(model, take(data, slice(start, end))))
    acc.flush()
    history = [(r.items, r.info.get("gsnr"), r.info.get("samples")) for r in acc.history]
    assert len({items for items, _, _ in history}) > 1  # the windows really differ in size
    for r in range(2):
        got = ranks[r]["history"]
        assert [h[0] for h in got] == [h[0] for h in history]
        assert [h[2] for h in got] == [h[2] for h in history]
        for (_, a, _), (_, b, _) in zip(got, history):
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-9)
        for p, q in zip(ranks[r]["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-10)
        # two parameter-sized all-reduces per increment (the moments' sums, then M2) and none at
        # the close: the statistics' mean is the window sum, already every rank's
        increments = sum(ranks[r]["micro_batches"])
        assert len(ranks[r]["large"]) == 2 * increments


def test_a_parameter_one_rank_reached_gets_the_window_gradient_on_every_rank(two_ranks: Ranks) -> None:
    """Per-element rule, each rank through its own head: the statistics' mean (every rank's) is
    the window sum, and the ranks agree at the close on which parameters any of them reached, so
    both heads step on both ranks, equal to one process routing each rank's samples to its head;
    a layer no rank used gets no gradient."""
    ranks = two_ranks("gsnr_heads")
    model = worker.Routed()
    data = classification(8 * worker.GSNR_INC, seed=30)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inc = worker.GSNR_INC
    for w in range(2):  # windows of 4 * GSNR_INC samples: 2 micro-batches per rank
        rows = [list(range(s + r * inc, s + (r + 1) * inc)) for r in range(2)  # rank 0's samples, then rank 1's
                for s in range(4 * inc * w, 4 * inc * (w + 1), 2 * inc)]
        index = [i for block in rows for i in block]
        route = torch.tensor([False] * (len(index) // 2) + [True] * (len(index) // 2))
        x, y = data.x[index], data.y[index]
        loss = torch.nn.functional.cross_entropy(model(x, route), y)
        want = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for rank in ranks:
            for got, expected in zip(rank["seen"][w], want):
                if expected is None:
                    assert got is None
                else:
                    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        opt.zero_grad()
        for p, g in zip(model.parameters(), want):
            p.grad = g
        opt.step()
    assert all(g is None for g in ranks[0]["seen"][0][-2:])  # the spare layer


def test_ranks_agree_on_the_smallest_micro_batch_that_fits(two_ranks: Ranks) -> None:
    ranks = two_ranks("probe")
    assert [r["size"] for r in ranks] == [min(worker.PROBE_LIMITS.values())] * 2


def contract_outcomes(two_ranks: Ranks, mode: str) -> list[tuple[float, str]]:
    """Each rank's (seconds, outcome) in a contract-breaking mode."""
    lines = [(two_ranks.directory(mode) / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    return [(float(seconds), outcome) for seconds, outcome in lines]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "rank1_did"), [
    ("contract_flush", "rank 1: the window's close (the rule) at window 0, micro-batch 3"),
    ("contract_gsnr", "rank 1: a statistics increment (backward) at window 0, micro-batch 2"),
])
def test_ranks_that_break_the_contract_raise_instead_of_hanging(two_ranks: Ranks, mode: str, rank1_did: str) -> None:
    """One rank flushes while the other goes on: before, the ranks paired different
    collectives (a hang for the 30-minute timeout; with GSNR's per-increment reduce of a
    different size, a C++ abort). The header all-gathered before each collective makes both
    raise, naming what each did."""
    for _, outcome in contract_outcomes(two_ranks, mode):
        assert outcome.startswith("ContractError: data-parallel ranks disagree")
        assert "rank 0: flush() at window 0, micro-batch 1" in outcome and rank1_did in outcome


@pytest.mark.parametrize(("mode", "said"), [
    ("contract_schedule", ("rank 0: lr_schedule's factor 1.0", "rank 1: lr_schedule's factor 0.5")),
    ("contract_clip", ("rank 0: clip_grad_norm 1.0", "rank 1: clip_grad_norm 2.0")),
])
def test_ranks_that_would_step_differently_raise_instead_of_diverging(two_ranks: Ranks, mode: str,
                                                                       said: tuple) -> None:
    """Each rank applied its own lr_schedule factor (or clipping) at the step: the weights
    diverged with no error. The close's header carries what every rank's step applies, so
    both raise before the window changes, naming each rank's value."""
    for _, outcome in contract_outcomes(two_ranks, mode):
        assert outcome.startswith("ContractError: data-parallel ranks disagree on what the step applies")
        assert all(part in outcome for part in said)
        assert outcome.endswith("| window 3 micro-batches, 0 steps, weights unchanged: True")


def test_a_rank_that_never_arrives_times_out_with_the_contract_named(tmp_path: Path) -> None:
    """Rank 1 stops calling and lingers for 8 s: rank 0 raises at its 3 s timeout while rank 1 is
    still alive (a timeout, not a closed connection); rank 1 is then ended, not waited for."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests._ddp_worker", str(r), "2", str(tmp_path), "contract_late"],
                              cwd=ROOT) for r in range(2)]
    try:
        assert procs[0].wait(timeout=120) == 0
        assert procs[1].poll() is None  # the peer lingers still: rank 0 did not see it leave
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed, outcome = (tmp_path / "rank0.txt").read_text().splitlines()
    seconds = float(elapsed)
    assert outcome.startswith("ContractError: rank 0: the Accumulator's collective for the window's close")
    assert "call Accumulator.backward the same number of times per window" in outcome
    assert seconds < 7  # the 3 s timeout, not the peer's exit after 8 s


def test_planned_windows_on_two_ranks_equal_one_process_with_one_reduce_per_window(two_ranks: Ranks) -> None:
    """A planner under DDP: both ranks plan the same windows from the global history, the
    gradient is reduced once per window (on its last micro-batch), and the run equals one
    process that sees both halves of every micro-batch."""
    ranks = two_ranks("ramp")
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), worker.ramp_rule())
    data = worker.gsnr_data()
    for start in range(0, worker.GSNR_SAMPLES, 4):
        acc.backward(*ce_mean(model, take(data, slice(start, start + 4))))
    acc.flush()
    windows = [(r.items, r.micro_batches) for r in acc.history]
    assert len({items for items, _ in windows}) > 1  # the ramp really changes the window
    for r in range(2):
        assert ranks[r]["windows"] == windows
        assert ranks[r]["large"] == [m for _, m in windows]  # one parameter-sized reduce, at each window's end
        for p, q in zip(ranks[r]["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-10)


def test_norm_rules_reduce_scalars_per_increment_and_the_gradient_once_per_window(two_ranks: Ranks) -> None:
    """The norm path under DDP: each increment's decision pools every rank's norm sums from
    the contract's header (one small all-gather, no all-reduce), and the gradient is
    all-reduced once per window, at its close. The pooled ``tr(Sigma)`` and ``|G|^2`` are
    unbiased: on linear regression with Gaussian noise (known answer) their means over 240
    windows lie within 3 standard errors of the truth, and both ranks see the same values."""
    ranks = two_ranks("norms")
    assert ranks[0]["seen"] == ranks[1]["seen"]  # every rank decides on the same pooled numbers
    windows = worker.NORM_WINDOWS
    for r in ranks:
        assert r["steps"] == windows
        assert r["counts"]["all_reduce_large"] == [2] * windows  # one parameter-sized reduce, at each close
        # a header per increment; at each close, one for the gradient and one for the per-layer sums
        assert r["counts"]["all_gather"] == 2 * windows + 2 * windows
    closing = [s for s in ranks[0]["seen"] if s[0] == 4 * worker.NORM_PER_RANK]
    assert len(closing) == windows
    for column, truth in zip((1, 2), worker.norm_truth()):
        values = torch.tensor([s[column] for s in closing])
        error = float(values.std()) / len(values) ** 0.5
        assert abs(float(values.mean()) - truth) < 3 * error, (float(values.mean()), truth, error)


def test_micro_batch_source_pools_every_ranks_micro_batches_unbiased(two_ranks: Ranks) -> None:
    """The micro-batch source under DDP: each rank's micro-batches (their gradients before the
    window's all-reduce) are groups whose sums travel in the contract's header; the pooled
    ``tr(Sigma)`` and ``|G|^2`` are unbiased on linear regression (within 3 standard errors
    over 120 windows of 3 micro-batches per rank), and both ranks decide on the same numbers."""
    ranks = two_ranks("norms_micro")
    assert repr(ranks[0]["seen"]) == repr(ranks[1]["seen"])  # NaN where one micro-batch per rank: no variance
    assert all(math.isnan(s[1]) for s in ranks[0]["seen"] if s[0] == 2 * worker.NORM_PER_RANK)
    closing = [s for s in ranks[0]["seen"] if s[0] == 2 * 3 * worker.NORM_PER_RANK]
    assert len(closing) == worker.NORM_WINDOWS // 2
    for column, truth in zip((1, 2), worker.norm_truth()):
        values = torch.tensor([s[column] for s in closing])
        error = float(values.std()) / len(values) ** 0.5
        assert abs(float(values.mean()) - truth) < 3 * error, (float(values.mean()), truth, error)


def test_a_skipped_micro_batch_under_ddp_norm_rules_keeps_ranks_in_step(two_ranks: Ranks) -> None:
    """Rank 1 skips a NaN micro-batch: its norm sums are as before, both ranks still pool at
    every increment, decide the same windows and end at the same weights; the window with
    the skipped micro-batch counts 4 fewer samples."""
    ranks = two_ranks("norms_skip")
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["layers"] == ranks[1]["layers"]  # per-layer noise scales pooled over the ranks
    assert all(set(layers) == {"noise_scale/0", "noise_scale/2", "noise_scale/4"} for layers in ranks[0]["layers"][:-1])
    samples = [h[3] for h in ranks[0]["history"] if h[3] is not None]
    assert len(ranks[0]["history"]) >= 2 and any(s % 8 == 4 for s in samples)
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)


class Replay:
    """A planner on the micro-batch source that plans the given windows, in order."""

    needs_statistics = True
    statistics = "norms"
    source = "micro_batch"

    def __init__(self, windows: list[int]) -> None:
        self.windows = windows

    def plan(self, history) -> int:
        return self.windows[min(len(history), len(self.windows) - 1)]


def test_micro_batch_planner_on_two_ranks_equals_one_process(two_ranks: Ranks) -> None:
    """NoiseScalePlanner(source="micro_batch") under DDP: each rank's micro-batches are micro-
    batches of the one window, so every record's noise terms and each layer's noise scale are one
    process's over both ranks' micro-batches as micro-batches of their own (rank 0's, then rank
    1's, each of 2 samples), measured from the window sum after the close's all-reduce; the
    planner's windows follow from them, and the weights are the one process's."""
    ranks = two_ranks("micro_planner")
    history = ranks[0]["history"]
    assert ranks[1]["history"] == history
    assert len(history) >= 3 and all(r["info"]["trace"] > 0 for r in history[:-1])
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05),
                      Replay([2 * r["micro_batches"] for r in history]))
    data = worker.gsnr_data()
    for start in range(0, worker.GSNR_SAMPLES, 2):
        acc.backward(*ce_mean(model, take(data, slice(start, start + 2))))
    acc.flush()
    assert [r.items for r in acc.history] == [r["items"] for r in history]
    planner = worker.micro_planner()
    for ours, theirs in zip(acc.history, history):
        for key in ("samples", "trace", "squared_norm", "noise_scale"):
            assert theirs["info"][key] == pytest.approx(ours.info[key], rel=1e-9), key
        layers = [v for k, v in sorted(ours.info.items()) if k.startswith("noise_scale/")]
        assert len(layers) == 3  # each layer's noise scale, in the layers' order
        assert [v for k, v in sorted(theirs["info"].items()) if k.startswith("noise_scale/")] == \
            pytest.approx(layers, rel=1e-9)
    planned = [w for w in range(1, len(history)) if history[w]["reason"] == "rule"]
    assert len(planned) >= 2
    for w in planned:  # each plan is the planner's from the one process's records
        assert history[w]["info"]["planned"] == planner.plan(acc.history[:w])
    for r in range(2):
        for p, q in zip(ranks[r]["params"], model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-10)


def test_micro_batch_layer_columns_under_ddp_are_named_as_on_one_process(two_ranks: Ranks) -> None:
    history = two_ranks("micro_planner")[0]["history"]
    assert {k for k in history[0]["info"] if k.startswith("noise_scale/")} == \
        {"noise_scale/0", "noise_scale/2", "noise_scale/4"}


def mlp_at(weights: list[torch.Tensor]) -> torch.nn.Module:
    """The test MLP with the given parameters."""
    model = mlp()
    with torch.no_grad():
        for p, value in zip(model.parameters(), weights):
            p.copy_(value)
    return model


def test_monitor_on_a_ddp_loop_measures_each_ranks_micro_batches(two_ranks: Ranks) -> None:
    """Monitor(source="micro_batch") on a plain DDP loop: a loop that lets DDP all-reduce at
    every backward is refused at its second backward, naming ``no_sync()``, and the model trains
    on after it; with ``no_sync()`` on all but a window's last backward, each rank's rows are a
    float64 loop over that rank's own micro-batches at the window's weights (the rank's local
    gradients, before the all-reduce), whatever clipping does to ``.grad`` before the step."""
    ranks = two_ranks("monitor")
    for r in range(2):
        assert "no_sync()" in ranks[r]["refused"]
        for p, q in zip(ranks[r]["params"], ranks[0]["params"]):
            assert torch.equal(p, q)  # DDP's steps went on in step on both ranks
        rows = ranks[r]["rows"]
        assert len(rows) == worker.MONITOR_WINDOWS
        data = worker.monitor_data(r)
        for w, (row, weights) in enumerate(zip(rows, ranks[r]["starts"])):
            model = mlp_at(weights)
            params = list(model.parameters())
            size = worker.MONITOR_SIZE
            sums = []
            for j in range(worker.MONITOR_MICRO):
                start = (w * worker.MONITOR_MICRO + j) * size
                part = take(data, slice(start, start + size))
                loss = torch.nn.functional.cross_entropy(model(part.x), part.y, reduction="sum")
                sums.append(flat_grad(loss, params))
            trace, squared = loop_terms(sums, [size] * worker.MONITOR_MICRO)
            assert row["samples"] == size * worker.MONITOR_MICRO
            assert row["trace"] == pytest.approx(trace, rel=1e-9)
            assert row["squared_norm"] == pytest.approx(squared, rel=1e-8, abs=1e-12 * trace)


def test_the_per_sample_monitor_on_ddp_refuses_accumulation_and_trains_on(two_ranks: Ranks) -> None:
    """The per-sample Monitor under DDP (one backward per step): a second backward before the step
    is refused and DDP's model trains on; each rank's rows are the per-sample terms of its own
    batch at the step's weights (float64 loop over the samples)."""
    ranks = [r["per_sample"] for r in two_ranks("monitor")]
    for r in range(2):
        assert "gradient accumulation" in ranks[r]["refused"]
        # DDP dividing .grad in place during the backward: refused when built, naming the setting
        assert "gradient_as_bucket_view=True" in ranks[r]["bucket_views"]
        assert all(torch.equal(p, q) for p, q in zip(ranks[r]["params"], ranks[0]["params"]))
        data = worker.monitor_data(r)
        assert len(ranks[r]["rows"]) == worker.MONITOR_WINDOWS
        for s, (row, weights) in enumerate(zip(ranks[r]["rows"], ranks[r]["starts"])):
            model = mlp_at(weights)
            params = list(model.parameters())
            size = worker.MONITOR_SIZE
            part = take(data, slice(size * s, size * (s + 1)))
            grads = torch.stack([flat_grad(torch.nn.functional.cross_entropy(model(part.x[i:i + 1]), part.y[i:i + 1]),
                                           params) for i in range(size)])
            mean = grads.mean(0)
            trace = float(((grads - mean) ** 2).sum()) / (size - 1)
            assert row["samples"] == size
            assert row["trace"] == pytest.approx(trace, rel=1e-9)
            assert row["squared_norm"] == pytest.approx(float(mean @ mean) - trace / size, rel=1e-8, abs=1e-12 * trace)
