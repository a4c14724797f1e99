"""FSDP2: the Accumulator over a fully_shard-ed model on two gloo CPU ranks. Each micro-batch's
gradient is reduce-scattered as a plain sum over ranks and the window divides by its global item
count when it closes, so the applied gradient equals one process's over both ranks' micro-batches
(float64, uneven micro-batches; float32 too, to float32's precision); a non-finite micro-batch on
one rank drops that increment on every rank; what cannot work is refused on every rank alike; a
rank that fails leaves the others a ContractError naming it; the example script joins the group
that torchrun launched, and a group that does not span the launch is refused."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import _ddp_worker as worker
from .reference import full_batch_grad, mlp
from .test_ddp import ROOT, Ranks, run_modes, windows_of

MODES = ["fsdp_raise", "fsdp_skip_window", "fsdp_nan", "fsdp_refusals", "fsdp_norms", "fsdp_resume", "float32",
         "micro_batch"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Ranks:
    """Every two-rank mode these tests read, run once on one pair of ranks (tests/_multi_worker.py);
    each test judges its own mode's files."""
    return run_modes(tmp_path_factory.mktemp("fsdp"), MODES)


def union_micro_batches() -> list:
    """Micro-batch j of one process over both ranks: rank 0's micro-batch j, then rank 1's."""
    from .reference import take

    data = [worker.rank_data(r) for r in range(2)]
    starts, out = [0, 0], []
    for j in range(len(worker.SIZES[0])):
        parts = []
        for r in range(2):
            parts.append(take(data[r], slice(starts[r], starts[r] + worker.SIZES[r][j])))
            starts[r] += worker.SIZES[r][j]
        out.append(type(parts[0])(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])))
    return out


def reference_grads(drop: tuple[int, int] | None = None) -> list[list[torch.Tensor]]:
    """Window w's mean gradient over both ranks' micro-batches of window w, by one process;
    ``drop=(w, j)`` leaves out micro-batch j of window w on both ranks."""
    return reference_run(drop)[0]


def reference_run(drop: tuple[int, int] | None = None) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """``reference_grads`` and the weights after its three SGD steps (lr 0.1), in float64."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [worker.rank_data(r) for r in range(2)]
    starts = [[sum(worker.SIZES[r][:i]) for i in range(len(worker.SIZES[r]))] for r in range(2)]
    out = []
    for w in range(3):
        rows = [[], []]
        for r in range(2):
            micro = range(worker.K * w, min(worker.K * (w + 1), len(worker.SIZES[r])))
            for j in micro:
                if drop == (w, j - worker.K * w):
                    continue
                rows[r] += list(range(starts[r][j], starts[r][j] + worker.SIZES[r][j]))
        x = torch.cat([data[r].x[rows[r]] for r in range(2)])
        y = torch.cat([data[r].y[rows[r]] for r in range(2)])
        grads = full_batch_grad(model, type(data[0])(x, y))
        out.append(grads)
        opt.zero_grad()
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
    return out, [p.detach().clone() for p in model.parameters()]


def check(ranks: list[dict], want: list[list[torch.Tensor]]) -> None:
    for rank in ranks:
        assert len(rank["seen"]) == len(want)
        for got, expected in zip(rank["seen"], want):
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["raise", "skip_window"])  # sums apart from .grad, and in it
def test_fully_shard_windows_equal_one_process_over_both_ranks(two_ranks: Ranks, policy: str) -> None:
    ranks = two_ranks(f"fsdp_{policy}")
    assert windows_of(worker.SIZES[0], worker.K) and ranks[0]["items"] == ranks[1]["items"]
    check(ranks, reference_grads())


@pytest.mark.slow
def test_a_nan_on_one_rank_drops_that_increment_on_both(two_ranks: Ranks) -> None:
    """Rank 1's micro-batch 4 (window 1, its second) is NaN under skip_micro_batch: the
    reduce-scatter has summed it into every rank's shard, so both drop the increment."""
    ranks = two_ranks("fsdp_nan")
    check(ranks, reference_grads(drop=(1, 1)))
    window = sum(worker.SIZES[r][j] for r in range(2) for j in range(3, 6))
    assert ranks[0]["items"][1] == ranks[1]["items"][1] == window - worker.SIZES[0][4] - worker.SIZES[1][4]
    assert not torch.allclose(ranks[0]["seen"][1][0], reference_grads()[1][0])


@pytest.mark.slow
def test_what_cannot_work_under_fully_shard_is_refused_on_every_rank(two_ranks: Ranks) -> None:
    ranks = two_ranks("fsdp_refusals")
    for rank in ranks:
        assert "rule: GSNR needs per-element statistics" in rank["rule"]
        assert "scaler" in rank["scaler"]
        for monitor in ("monitor", "monitor_per_sample"):  # refused before any hook: the run goes on unmeasured
            assert "Monitor: the model is sharded by FSDP2 (fully_shard on the model)" in rank[monitor]
            assert "Accumulator" in rank[monitor]
        assert "parameter weight is a DTensor shard" in rank["monitor_shards"]  # a module of the sharded model
        assert "count: rank(s) [1] have no items" in rank["count"]
        assert rank["window_after_refusal"] == 2  # micro-batches 0 and 1: the refused call left it as it was
    check(ranks, reference_grads())


@pytest.mark.slow
def test_norm_test_on_shards_decides_as_one_process_over_both_ranks(two_ranks: Ranks) -> None:
    """NormTest under fully_shard: each rank's per-sample norms and its shard of the summed
    gradient, added up over the ranks, are the window's terms over both ranks' samples, so the
    windows, the statistic and the steps are one process's over the union of the micro-batches."""
    from gradaccum import NormTest
    from gradaccum.torch import Accumulator

    from .reference import GradCapture, ce_mean

    ranks = two_ranks("fsdp_norms")
    model = mlp()
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, NormTest(worker.FSDP_THETA, source="per_sample"))
    for union in union_micro_batches():
        acc.backward(*ce_mean(model, union))
    acc.flush()
    assert [r.micro_batches for r in acc.history] == ranks[0]["micro_batches"] == ranks[1]["micro_batches"]
    assert len(acc.history) >= 2  # the rule closed windows of its own, not only the flush
    for rank in ranks:
        for ours, theirs in zip(rank["info"], acc.history):
            assert set(ours) == set(theirs.info), (ours, theirs.info)
            for key in [k for k, v in theirs.info.items() if isinstance(v, (int, float))]:
                assert ours[key] == pytest.approx(theirs.info[key], rel=1e-9), key
        for got, want in zip(rank["seen"], opt.seen):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_a_mid_window_checkpoint_of_the_sharded_run_resumes_bitwise(two_ranks: Ranks) -> None:
    ranks = two_ranks("fsdp_resume")
    for rank in ranks:
        assert rank["window_at_save"] == 1  # saved with one micro-batch of the second window in it
        for whole, resumed in zip(rank["whole"], rank["resumed"]):
            assert torch.equal(whole, resumed)


def run_fsdp_worker(tmp_path: Path, mode: str, world: int = 2, env: dict[str, str] | None = None,
                    timeout: float = 120) -> list[dict]:
    """Run tests/_fsdp_worker.py's ``mode`` on ``world`` ranks; kill them all if one overruns."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests._fsdp_worker", str(r), str(world), str(tmp_path), mode],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
             for r in range(world)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * world
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
def test_float32_on_gloo_equals_one_float64_process_to_float32_precision(two_ranks: Ranks) -> None:
    """float32 gradients go through FSDP's reduce-scatter as a plain sum on gloo too (FSDP would
    fold the divide factor into a PREMUL_SUM, which gloo refuses at the first backward): the
    applied gradients and the weights are one float64 process's over both ranks' micro-batches,
    to float32 rounding (the gradients are 1e-2 to 0.3; a rank weighted wrong is off by 1e-2)."""
    ranks = two_ranks("float32")
    want, params = reference_run()
    items = [sum(sum(worker.SIZES[r][w * worker.K:(w + 1) * worker.K]) for r in range(2)) for w in range(3)]
    for rank in ranks:
        assert rank["items"] == items
        assert len(rank["seen"]) == len(want)
        for got, expected in zip(rank["seen"], want):
            for g, e in zip(got, expected):
                assert g.dtype == torch.float32
                torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
        for got, expected in zip(rank["params"], params):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_a_rank_whose_backward_raises_leaves_the_other_a_contract_error_naming_it(tmp_path: Path) -> None:
    """Rank 1's backward raises half-way (after the last layer's reduce-scatter) and its process
    ends; rank 0, waiting in FSDP's collectives of the middle layer, gets a ContractError that
    names rank 1 and where the ranks last agreed, not the backend's bare connection error."""
    ranks = run_fsdp_worker(tmp_path, "backward_raises")
    assert ranks[1] == {"type": "RuntimeError", "message": "a failure inside rank 1's backward"}
    assert ranks[0]["type"] == "ContractError", ranks[0]
    message = ranks[0]["message"]
    assert message.startswith("rank 0: FSDP's "), message
    assert "over ranks [0, 1] did not complete" in message
    assert "the other rank, rank 1, raised in its forward or backward, or stopped" in message
    assert "window 1, micro-batch 1" in message  # micro-batch 4 is window 1's second (K = 3)


@pytest.mark.slow
def test_a_process_group_that_does_not_span_the_launch_is_refused(tmp_path: Path) -> None:
    """WORLD_SIZE=2 (a launcher's) and a process group of one process: an Accumulator over a
    sharded model or a DDP model refuses, naming WORLD_SIZE, before the model's FSDP settings
    change; with WORLD_SIZE=1 the same construction is accepted."""
    (result,) = run_fsdp_worker(tmp_path, "launch_mismatch", world=1, env={"WORLD_SIZE": "2"})
    for name in ("fsdp", "ddp"):
        assert result[name].startswith("ContractError: the launcher started WORLD_SIZE=2 processes, but this "
                                       "process's default process group has 1 rank(s)"), result[name]
        assert "dist.init_process_group(backend)" in result[name]
    assert result["fsdp_settings_unchanged"] and result["accepted_with_world_size_1"]


EXAMPLE = ROOT / "examples" / "fsdp2.py"


@pytest.mark.slow
def test_the_fsdp2_example_under_torchrun_trains_one_run_over_both_ranks(tmp_path: Path) -> None:
    """examples/fsdp2.py (the FSDP2 example of docs/integrations/fsdp2.md) launched by ``torchrun --nproc-per-node 2``
    (gloo, loopback): both processes join one group, so every window holds both ranks' items
    (64, not one process's 32), and float32 reaches the optimizer through gloo."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers
            proc.wait()
    assert proc.returncode == 0, out
    # Both ranks print to the one pipe, so their lines may interleave ("[..][..]\n\n"): each list is
    # one write, so find the lists wherever they fall.
    printed = re.findall(r"\[\d+(?:, \d+)*\]", out)
    assert printed == ["[64, 64, 64]", "[64, 64, 64]"], out


@pytest.mark.slow
def test_the_micro_batch_source_on_shards_equals_one_process_over_both_ranks(two_ranks: Ranks) -> None:
    """NormTest and NoiseScalePlanner with ``source="micro_batch"`` under fully_shard: each
    micro-batch's gradient is the sum over ranks, sharded; its squared norm is the sum of the
    shards' (one small all-reduce), so every record's noise terms, each layer's noise scale, the
    windows and the weights are one process's over the union of both ranks' micro-batches."""
    from gradaccum.torch import Accumulator

    from . import _fsdp_worker
    from .reference import ce_mean

    ranks = two_ranks("micro_batch")
    for index, rule in enumerate(_fsdp_worker.micro_batch_rules()):
        model = mlp()
        acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule)
        for union in union_micro_batches():
            acc.backward(*ce_mean(model, union))
        acc.flush()
        assert len(acc.history) >= 2 and any(math.isfinite(r.info.get("trace", math.nan)) or "norm_test" in r.info
                                             for r in acc.history)
        for rank in ranks:
            got = rank[index]
            assert got["micro_batches"] == [r.micro_batches for r in acc.history]
            for ours, theirs in zip(got["info"], acc.history):
                assert set(ours) == set(theirs.info), (ours, theirs.info)
                for key, value in theirs.info.items():
                    if isinstance(value, float) and math.isnan(value):
                        assert math.isnan(ours[key]), key
                    elif isinstance(value, (int, float)):
                        assert ours[key] == pytest.approx(value, rel=1e-9), key
            for p, q in zip(got["params"], model.parameters()):
                torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
