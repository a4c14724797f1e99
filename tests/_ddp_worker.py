"""One rank of the DDP test (tests/test_ddp.py): gloo on loopback, float64.

Usage: python -m tests._ddp_worker RANK WORLD OUT_DIR MODE

MODE is a non-finite policy ("raise", "skip_window") for FixedSteps over uneven
micro-batches, "gsnr" / "gsnr_skip" for the adaptive rule over increments of GSNR_INC
per rank, or "probe" for find_micro_batch_size with a different memory limit per rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradaccum import GSNR, BatchRamp, Decision, FixedSteps, NoiseScalePlanner, NormTest
from gradaccum.torch import Accumulator, Monitor, find_micro_batch_size

from .reference import Classification, GradCapture, ce_mean, classification, mlp, take

K = 3
# Micro-batch sizes per rank differ: DDP's plain average over ranks would be wrong here.
SIZES = {0: [2, 5, 1, 4, 3, 2, 6, 1], 1: [3, 1, 4, 4, 2, 5, 1, 2]}


GSNR_INC = 4
GSNR_SAMPLES = 96  # global samples: each rank takes its half of every increment


def gsnr_rule():
    return GSNR(1.3, increment=2 * GSNR_INC, max_samples=32, scale="mean")


def gsnr_data():
    return classification(GSNR_SAMPLES, seed=20)


def rank_data(rank: int):
    return classification(sum(SIZES[rank]), seed=10 + rank)


def main(rank: int, world: int, out: Path, mode: str) -> None:
    # gloo on loopback only; rendezvous through a file in the test's own directory, so no
    # port has to be picked in advance (and raced for)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    if mode.startswith("contract"):
        run_contract(rank, out, mode)  # ranks break the contract: no common teardown
        sys.stdout.flush()
        os._exit(0)
    if mode == "ramp":
        run_ramp(rank, out)
    elif mode == "micro_planner":
        run_micro_planner(rank, out)
    elif mode in ("norms", "norms_micro"):
        run_norms(rank, out, micro=mode == "norms_micro")
    elif mode == "norms_skip":
        run_norms_skip(rank, out)
    elif mode == "gsnr_heads":
        run_gsnr_heads(rank, out)
    elif mode in ("gsnr", "gsnr_skip", "gsnr_compiled"):
        made: list = []  # the kernels objects the run made (each statistics object holds its own)
        if mode == "gsnr_compiled":  # the per-element path's fused kernels at every size
            from gradaccum.torch._stats import _fused

            _fused.FUSED_FROM = 0
            def record(self: _fused.Kernels, make=_fused.Kernels.__init__) -> None:
                make(self)
                made.append(self)

            _fused.Kernels.__init__ = record  # type: ignore[method-assign]
        run_gsnr(rank, out, skip=mode == "gsnr_skip")
        if mode == "gsnr_compiled":
            assert made and all(k.broken is None for k in made) and any(k.checked for k in made)
    elif mode == "probe":
        run_probe(rank, out)
    elif mode == "accelerate":
        run_accelerate(rank, out)
    elif mode == "lightning":
        run_lightning(rank, out)
    elif mode.startswith("transformers"):
        run_transformers(rank, out, mode)
    elif mode == "fsdp_resume":
        run_fsdp_resume(rank, out)
    elif mode.startswith("fsdp"):
        run_fsdp(rank, out, mode)
    else:
        run_fixed(rank, out, mode)
    dist.barrier()  # both ranks done before either tears gloo down (else one can abort at exit)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: gloo's threads can abort it ("terminate called without an active exception")
    os._exit(0)


def run_accelerate(rank: int, out: Path) -> None:
    """FixedSteps(K) over this rank's uneven micro-batches through Accelerate's prepared DDP model
    and optimizer (the process group is already up: Accelerate finds it from the environment)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    from accelerate import Accelerator

    from gradaccum.integrations.accelerate import accumulator

    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    acc = accumulator(accelerator, model, optimizer, FixedSteps(K))
    data = rank_data(rank)
    start = 0
    for n in SIZES[rank]:
        loss, count = ce_mean(model, take(data, slice(start, start + n)))
        start += n
        acc.backward(loss, count)
    acc.flush()
    torch.save({"params": [p.detach() for p in model.parameters()], "type": type(model).__name__,
                "distributed": str(accelerator.distributed_type.value)}, out / f"rank{rank}.pt")


def run_lightning(rank: int, out: Path) -> None:
    """The Accumulating mixin under Trainer(strategy="ddp", devices=2) with the process group already
    up (Lightning sees LOCAL_RANK, treats the processes as launched for it, and keeps our group);
    run here rather than with ddp_spawn, whose children tear gloo down at interpreter exit and can
    abort there ("terminate called without an active exception")."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    import lightning as L
    from torch.utils.data import DataLoader

    from .test_integration_lightning import Classifier, data

    module = Classifier(FixedSteps(2))
    L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(data(64), batch_size=4))
    torch.save({"params": [p.detach() for p in module.net.parameters()], "global_step": module.trainer.global_step},
               out / f"rank{rank}.pt")


FSDP_THETA = 0.9  # NormTest's theta on the sharded model: windows of a few micro-batches


def sharded_mlp():
    """The reference MLP with each Linear and the root sharded by FSDP2 over the two ranks."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def holding(weight: torch.nn.Parameter) -> torch.nn.Module:
    """A plain module (not sharded itself) whose one parameter is ``weight``."""
    module = torch.nn.Module()
    module.weight = weight
    return module


def run_fsdp(rank: int, out: Path, mode: str) -> None:
    """FixedSteps(K) over this rank's uneven micro-batches on a fully_shard-ed model: "fsdp_raise"
    and "fsdp_skip_window" (sums apart from .grad, or in it); "fsdp_nan" puts a NaN in rank 1's
    micro-batch 4 under skip_micro_batch (every rank drops that increment); "fsdp_refusals" tries
    what is refused, then trains on; "fsdp_norms" decides the windows by NormTest, whose norm
    statistics are summed over the ranks."""
    from torch.distributed.tensor import DTensor

    from gradaccum import GSNR

    model = sharded_mlp()
    opt = GradCapture(model.parameters())
    policy = {"fsdp_raise": "raise", "fsdp_skip_window": "skip_window"}.get(mode, "skip_micro_batch")
    result: dict = {}
    if mode == "fsdp_refusals":
        for name, make in (
                ("rule", lambda: Accumulator(model, opt, GSNR(1.0, increment=2))),
                ("scaler", lambda: Accumulator(model, opt, FixedSteps(K), scaler=torch.amp.GradScaler("cpu"))),
                ("monitor", lambda: Monitor(model, opt, source="micro_batch")),
                ("monitor_per_sample", lambda: Monitor(model, opt)),
                ("monitor_shards", lambda: Monitor(holding(model[0].weight), opt, source="micro_batch"))):
            try:
                make()
            except ValueError as error:
                result[name] = str(error)
    rule = NormTest(FSDP_THETA, source="per_sample") if mode == "fsdp_norms" else FixedSteps(K)
    acc = Accumulator(model, opt, rule, nonfinite=policy)
    data = rank_data(rank)
    start = 0
    for i, n in enumerate(SIZES[rank]):
        part = take(data, slice(start, start + n))
        start += n
        loss, count = ce_mean(model, part)
        if mode == "fsdp_nan" and rank == 1 and i == 4:
            loss = loss * float("nan")
        if mode == "fsdp_refusals" and i == 2:
            try:  # rank 1 says it has no items: both ranks refuse, the window is unchanged
                acc.backward(loss, 0 if rank == 1 else count)
            except ValueError as error:
                result["count"] = str(error)
                result["window_after_refusal"] = acc.window_micro_batches
            loss, count = ce_mean(model, part)
        acc.backward(loss, count)
    acc.flush()
    seen = [[g.full_tensor() if isinstance(g, DTensor) else g for g in step] for step in opt.seen]
    params = [p.full_tensor().detach() for p in model.parameters()]
    torch.save({"seen": seen, "params": params, "items": [r.items for r in acc.history],
                "reasons": [r.reason for r in acc.history], "info": [r.info for r in acc.history],
                "micro_batches": [r.micro_batches for r in acc.history], **result}, out / f"rank{rank}.pt")


def run_fsdp_resume(rank: int, out: Path) -> None:
    """A checkpoint of the sharded model and the Accumulator taken mid-window (micro-batch 4 of
    windows of K = 3), loaded into a fresh sharded model and Accumulator: the rest of the run
    ends at bitwise the weights of the uninterrupted one."""
    data = rank_data(rank)
    parts, start = [], 0
    for n in SIZES[rank]:
        parts.append(take(data, slice(start, start + n)))
        start += n

    def feed(model, acc, chunk):
        for part in chunk:
            acc.backward(*ce_mean(model, part))

    model = sharded_mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), FixedSteps(K))
    feed(model, acc, parts[:4])
    saved = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "acc": acc.state_dict()}
    torch.save(saved, out / f"checkpoint{rank}.pt")
    feed(model, acc, parts[4:])
    acc.flush()
    whole = [p.full_tensor().detach() for p in model.parameters()]

    loaded = torch.load(out / f"checkpoint{rank}.pt", weights_only=False)
    fresh = sharded_mlp()
    fresh.load_state_dict(loaded["model"])
    resumed = Accumulator(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), FixedSteps(K))
    resumed.load_state_dict(loaded["acc"])
    feed(fresh, resumed, parts[4:])
    resumed.flush()
    torch.save({"whole": whole, "resumed": [p.full_tensor().detach() for p in fresh.parameters()],
                "window_at_save": loaded["acc"]["micro_batches"]}, out / f"rank{rank}.pt")


def run_transformers(rank: int, out: Path, mode: str) -> None:
    """PlannedTrainer under DDP (the Trainer finds the process group from LOCAL_RANK): a ramp
    ("transformers") or a noise-scale planner ("transformers_noise") over in-order data."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    from gradaccum import NoiseScalePlanner

    from .test_integration_transformers import DDP_SAMPLES, InOrder, arguments, dataset, ddp_ramp, model, token_loss

    net = model()
    noise = mode == "transformers_noise"
    planner = NoiseScalePlanner(1.0, min_batch=8, max_batch=16, micro_batch=4, source="per_sample") if noise \
        else ddp_ramp()
    trainer = InOrder(model=net, args=arguments(out, max_grad_norm=0.0 if noise else 0.5),
                      train_dataset=dataset(DDP_SAMPLES), compute_loss_func=token_loss, planner=planner)
    trainer.train()
    torch.save({"params": [p.detach() for p in net.parameters()], "history": [r.as_dict() for r in trainer.history],
                "global_step": trainer.state.global_step}, out / f"rank{rank}.pt")


def run_gsnr(rank: int, out: Path, skip: bool = False) -> None:
    """With ``skip``, rank 1's third micro-batch has a NaN loss and is skipped."""
    model = DistributedDataParallel(mlp())
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), gsnr_rule(),
                      nonfinite="skip_micro_batch")
    data = gsnr_data()
    size = sum(p.numel() for p in model.parameters())
    large: list[int] = []  # for each parameter-sized all-reduce: the micro-batches of the open window
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if tensor.numel() >= size:
            large.append(acc.window_micro_batches)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    for k, start in enumerate(range(0, GSNR_SAMPLES, 2 * GSNR_INC)):
        part = take(data, slice(start + rank * GSNR_INC, start + (rank + 1) * GSNR_INC))
        loss, count = ce_mean(model, part)
        if skip and rank == 1 and k == 2:
            loss = loss * float("nan")
        acc.backward(loss, count)
    acc.flush()
    dist.all_reduce = original
    torch.save({"history": [(r.items, r.info.get("gsnr"), r.info.get("samples")) for r in acc.history],
                "params": [p.detach() for p in model.module.parameters()], "large": large,
                "micro_batches": [r.micro_batches for r in acc.history]}, out / f"rank{rank}.pt")


class Routed(torch.nn.Module):
    """A trunk and two heads: ``head`` picks one for the whole batch, or ``route`` per sample
    (True: head 1), which lets one process stand for ranks that each use their own head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.trunk = torch.nn.Linear(6, 8).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 3).double(), torch.nn.Linear(8, 3).double()])
        self.spare = torch.nn.Linear(8, 3).double()  # used by no one: no gradient anywhere
        self.head = 0

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if route is None:
            return self.heads[self.head](h)
        return torch.where(route[:, None], self.heads[1](h), self.heads[0](h))


def run_gsnr_heads(rank: int, out: Path) -> None:
    """Each rank trains through its own head (a per-element rule, windows of the cap): the head
    one rank never reached still gets the window's gradient on both, the spare layer none."""
    model = Routed()
    model.head = rank
    wrapped = DistributedDataParallel(model)
    opt = GradCapture(model.parameters())
    acc = Accumulator(wrapped, opt, GSNR(1e9, increment=2 * GSNR_INC, max_samples=4 * GSNR_INC))
    data = classification(8 * GSNR_INC, seed=30)
    for start in range(0, 8 * GSNR_INC, 2 * GSNR_INC):
        loss, count = ce_mean(wrapped, take(data, slice(start + rank * GSNR_INC, start + (rank + 1) * GSNR_INC)))
        acc.backward(loss, count)
    acc.flush()
    torch.save({"seen": opt.seen}, out / f"rank{rank}.pt")


def run_contract(rank: int, out: Path, mode: str) -> None:
    """``contract_flush``: rank 0 flushes after one micro-batch while rank 1 completes its
    window of 3. ``contract_late``: rank 1 stops after 2 micro-batches (and lingers), so
    rank 0 waits at the close; the Accumulator's timeout is 3 s."""
    import time

    model = DistributedDataParallel(mlp())
    rule = GSNR(1e9, increment=2, max_samples=64) if mode == "contract_gsnr" else FixedSteps(3)
    # contract_schedule / contract_clip: every rank calls alike, but one setting the step applies differs
    settings = {"contract_schedule": dict(lr_schedule=lambda seen: 1.0 if rank == 0 else 0.5),
                "contract_clip": dict(clip_grad_norm=1.0 + rank)}.get(mode, {})
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), rule, collective_timeout=3, **settings)
    data = rank_data(rank)
    calls = {("contract_flush", 0): 1, ("contract_flush", 1): 3, ("contract_late", 0): 3, ("contract_late", 1): 2,
             ("contract_gsnr", 0): 1, ("contract_gsnr", 1): 3, ("contract_schedule", 0): 3,
             ("contract_schedule", 1): 3, ("contract_clip", 0): 3, ("contract_clip", 1): 3}
    start = [p.detach().clone() for p in model.parameters()]
    started = time.monotonic()
    outcome = "ok"
    try:
        for i in range(calls[(mode, rank)]):
            acc.backward(*ce_mean(model, take(data, slice(i, i + 1))))
        if mode in ("contract_flush", "contract_gsnr") and rank == 0:
            acc.flush()
    except Exception as error:  # noqa: BLE001 - the outcome is what the test reads
        outcome = f"{type(error).__name__}: {error}"
    if mode in ("contract_schedule", "contract_clip"):  # the window and the weights as they were
        same = all(torch.equal(a, b) for a, b in zip(start, model.parameters()))
        outcome += f" | window {acc.window_micro_batches} micro-batches, {acc.steps} steps, weights unchanged: {same}"
    (out / f"rank{rank}.txt").write_text(f"{time.monotonic() - started:.1f}\n{outcome}")
    if mode == "contract_late" and rank == 1:
        time.sleep(8)  # linger: the peer must time out, not see a closed connection


def ramp_rule() -> BatchRamp:
    return BatchRamp(start=8, end=32, over=96, micro_batch=4)  # global samples: each rank feeds 2


def run_ramp(rank: int, out: Path) -> None:
    """A planned window under DDP: every rank plans the same window from the same (global)
    history; the gradient is reduced once per window, on its last micro-batch."""
    model = DistributedDataParallel(mlp())
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), ramp_rule())
    large: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if tensor.numel() > 16:  # parameter-sized, not the item counts
            large.append(acc.window_micro_batches)
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    data = gsnr_data()
    for start in range(0, GSNR_SAMPLES, 4):
        acc.backward(*ce_mean(model, take(data, slice(start + 2 * rank, start + 2 * rank + 2))))
    acc.flush()
    dist.all_reduce = original
    torch.save({"windows": [(r.items, r.micro_batches) for r in acc.history], "large": large,
                "params": [p.detach() for p in model.module.parameters()]}, out / f"rank{rank}.pt")


def micro_planner() -> NoiseScalePlanner:
    return NoiseScalePlanner(1.0, min_batch=8, max_batch=32, micro_batch=4, source="micro_batch")  # global samples


def run_micro_planner(rank: int, out: Path) -> None:
    """NoiseScalePlanner on the micro-batch source under DDP: each rank feeds 2 of every 4
    samples; every window's record is kept."""
    model = DistributedDataParallel(mlp())
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05), micro_planner())
    data = gsnr_data()
    for start in range(0, GSNR_SAMPLES, 4):
        acc.backward(*ce_mean(model, take(data, slice(start + 2 * rank, start + 2 * rank + 2))))
    acc.flush()
    torch.save({"history": [r.as_dict() for r in acc.history],
                "params": [p.detach() for p in model.module.parameters()]}, out / f"rank{rank}.pt")


NORM_DIM, NORM_NOISE, NORM_OFFSET = 8, 0.5, 0.3  # linear regression: x ~ N(0, I), y = w* . x + N(0, noise^2)
NORM_WINDOWS, NORM_PER_RANK = 240, 4


def norm_truth() -> tuple[float, float]:
    """tr(Sigma) and |G|^2 of the per-sample gradient ``(w.x - y) x`` at ``w = w* + u``:
    ``G = u``, ``Sigma = (|u|^2 + noise^2) I + u u^T`` (Isserlis)."""
    u2 = NORM_DIM * NORM_OFFSET**2
    return NORM_DIM * (u2 + NORM_NOISE**2) + u2, u2


class RecordNorms:
    """``k`` increments per window on norm statistics from ``source``; keeps what each decision saw."""

    needs_statistics = True
    statistics = "norms"

    def __init__(self, k: int = 2, source: str = "per_sample") -> None:
        self.k, self.source = k, source
        self.seen: list[tuple[int, float, float]] = []

    def decide(self, window):
        s = window.statistics
        self.seen.append((s.samples, s.trace, s.squared_norm))
        return Decision(window.micro_batches >= self.k, {})


def run_norms(rank: int, out: Path, micro: bool = False) -> None:
    """Linear regression with known noise terms; lr 0, so the truth holds at every window.
    Each rank draws its own samples; the decision's terms are pooled from scalars. ``micro``:
    the micro-batch source, three micro-batches per window on each rank."""
    model = torch.nn.Linear(NORM_DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(NORM_OFFSET)  # w* = 0
    model = DistributedDataParallel(model)
    rule = RecordNorms(3, "micro_batch") if micro else RecordNorms()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.0), rule)
    counts = {"all_reduce_large": [], "all_reduce_small": 0, "all_gather": 0}
    reduce, gather = dist.all_reduce, dist.all_gather

    def counting_reduce(tensor, *args, **kwargs):
        if tensor.numel() >= NORM_DIM:
            counts["all_reduce_large"].append(acc.window_micro_batches)
        else:
            counts["all_reduce_small"] += 1
        return reduce(tensor, *args, **kwargs)

    def counting_gather(*args, **kwargs):
        counts["all_gather"] += 1
        return gather(*args, **kwargs)

    dist.all_reduce, dist.all_gather = counting_reduce, counting_gather
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(rule.k * (NORM_WINDOWS // 2 if micro else NORM_WINDOWS)):
        x = torch.randn(NORM_PER_RANK, NORM_DIM, generator=g, dtype=torch.float64)
        y = NORM_NOISE * torch.randn(NORM_PER_RANK, generator=g, dtype=torch.float64)
        loss = 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()
        acc.backward(loss, NORM_PER_RANK)
    dist.all_reduce, dist.all_gather = reduce, gather
    torch.save({"seen": rule.seen, "counts": counts, "steps": acc.steps}, out / f"rank{rank}.pt")


def run_norms_skip(rank: int, out: Path) -> None:
    """NormTest under DDP where rank 1's third micro-batch has a NaN loss and is skipped: that
    rank's norm sums stay as they were, both ranks still meet at every increment and decide alike."""
    model = DistributedDataParallel(mlp())
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.05),
                      NormTest(0.6, increment=2 * GSNR_INC, max_samples=32, source="per_sample"),
                      nonfinite="skip_micro_batch")
    data = gsnr_data()
    for k, start in enumerate(range(0, GSNR_SAMPLES, 2 * GSNR_INC)):
        part = take(data, slice(start + rank * GSNR_INC, start + (rank + 1) * GSNR_INC))
        loss, count = ce_mean(model, part)
        if rank == 1 and k == 2:
            loss = loss * float("nan")
        acc.backward(loss, count)
    acc.flush()
    torch.save({"history": [(r.items, r.micro_batches, r.info.get("norm_test"), r.info.get("samples"))
                            for r in acc.history],
                "layers": [{k: v for k, v in r.info.items() if k.startswith("noise_scale/")} for r in acc.history],
                "params": [p.detach() for p in model.module.parameters()]}, out / f"rank{rank}.pt")


PROBE_LIMITS = {0: 37, 1: 20}  # the largest micro-batch that fits, per rank


def run_probe(rank: int, out: Path) -> None:
    def step(m: int) -> None:
        if m > PROBE_LIMITS[rank]:
            raise RuntimeError("CUDA out of memory (injected)")

    torch.save({"size": find_micro_batch_size(step, 4)}, out / f"rank{rank}.pt")


def run_fixed(rank: int, out: Path, nonfinite: str) -> None:
    model = DistributedDataParallel(mlp())
    opt = GradCapture(model.parameters())
    acc = Accumulator(model, opt, FixedSteps(K), nonfinite=nonfinite)

    calls: list[int] = []
    current = {"micro": -1}
    original = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(current["micro"])
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    ddp_hook_calls = []

    def hook(state, bucket):
        ddp_hook_calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, hook)

    data = rank_data(rank)
    start = 0
    for i, n in enumerate(SIZES[rank]):
        current["micro"] = i
        part = take(data, slice(start, start + n))
        start += n
        loss, count = ce_mean(model, part)
        acc.backward(loss, count)
    current["micro"] = len(SIZES[rank])
    acc.flush()
    dist.all_reduce = original
    torch.save({"seen": opt.seen, "params": [p.detach() for p in model.module.parameters()],
                "calls": calls, "ddp_hook_calls": len(ddp_hook_calls),
                "items": [r.items for r in acc.history]}, out / f"rank{rank}.pt")


MONITOR_WINDOWS, MONITOR_MICRO, MONITOR_SIZE = 3, 3, 4


def monitor_data(rank: int) -> Classification:
    return classification(MONITOR_WINDOWS * MONITOR_MICRO * MONITOR_SIZE, seed=40 + rank)


def run_monitor(rank: int, out: Path) -> None:
    """Monitor(source="micro_batch") on a plain DDP accumulation loop. First a loop that lets
    DDP all-reduce at every backward, refused at its second backward; then, on the same model,
    the usual loop (every backward of a window but its last under ``no_sync()``, clipping, the
    step). Saves what was refused, each window's starting parameters and the rows."""
    model = DistributedDataParallel(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, opt, source="micro_batch", accumulation=MONITOR_MICRO)
    data = monitor_data(rank)

    def micro(w: int, j: int) -> torch.Tensor:
        start = (w * MONITOR_MICRO + j) * MONITOR_SIZE
        return ce_mean(model, take(data, slice(start, start + MONITOR_SIZE)))[0] / MONITOR_MICRO

    refused = ""
    micro(0, 0).backward()
    try:
        micro(0, 1).backward()  # DDP replaced .grad with the ranks' mean after the first backward
    except ValueError as error:
        refused = str(error)
    opt.zero_grad()
    starts = []
    for w in range(MONITOR_WINDOWS):
        starts.append([p.detach().clone() for p in model.module.parameters()])
        for j in range(MONITOR_MICRO - 1):
            with model.no_sync():
                micro(w, j).backward()
        micro(w, MONITOR_MICRO - 1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    monitor.close()
    per_sample = run_monitor_per_sample(data)
    try:
        Monitor(DistributedDataParallel(mlp(), gradient_as_bucket_view=True), opt)
    except ValueError as error:
        per_sample["bucket_views"] = str(error)
    torch.save({"refused": refused, "starts": starts, "rows": monitor.rows, "per_sample": per_sample,
                "params": [p.detach() for p in model.module.parameters()]}, out / f"rank{rank}.pt")


def run_monitor_per_sample(data: Classification) -> dict:
    """The per-sample Monitor on DDP, one backward per step: a second backward without
    ``zero_grad`` is refused, and the steps go on; each step's weights and row are saved."""
    model = DistributedDataParallel(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, opt)
    batches = [take(data, slice(MONITOR_SIZE * s, MONITOR_SIZE * (s + 1))) for s in range(MONITOR_WINDOWS)]
    ce_mean(model, batches[0])[0].backward()
    refused = ""
    try:
        ce_mean(model, batches[1])[0].backward()
    except ValueError as error:
        refused = str(error)
    opt.zero_grad()
    starts = []
    for batch in batches:
        starts.append([p.detach().clone() for p in model.module.parameters()])
        ce_mean(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    monitor.close()
    return {"refused": refused, "starts": starts, "rows": monitor.rows,
            "params": [p.detach() for p in model.module.parameters()]}


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
