"""The critical-batch section of `gradaccum reproduce` and `gradaccum critical-batch`: the
critical batch size measured by branching (``critical_batch``) beside the noise scale the
planners measure online (``critical_batch_torch``), on mnist1d and on the byte-level LM.

Per task (``PLANS``): one run at the task's smallest batch with Adam (AdamW for the LM) gives
checkpoints spread over its first part (before the validation loss stops falling); from each,
branches at every batch size of the task's range and every learning rate of a grid around the
square-root rule ``lr(B) = lr0 sqrt(B / B0)`` (Adam's; factors 1/4 to 4 on mnist1d, 1/2 to 2 on
the LM, the best per batch size taken, and a best at an end of the grid reported), over two seeds; the drop to reach is
half of what the run itself still gained on the evaluation set after the checkpoint
(``DROP_SHARE``). The evaluation set is the validation split (mnist1d) and the validation
sequences (LM): the test split is never read. Online, at the same checkpoints and at more
points of the run: ``B_simple`` by both statistics sources and Adam's preconditioned noise
scale, at the run's parameters, each from ``windows`` windows of 4 micro-batches of the
smallest batch.

Written to ``out``: ``critical_batch_<task>.json`` (settings, per checkpoint the fits, the
best learning rates, steps and samples, the online noise scales, refusals, seconds),
``critical_batch_<task>.csv`` (every branch) and ``critical_batch_<task>.png`` (the noise
scales over training and the steps-batch trade-off per checkpoint).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from .config import ExperimentConfig  # noqa: E402
from .critical_batch import Branch, CriticalBatchError, analyse_checkpoint, measure_branches  # noqa: E402
from .critical_batch_torch import (  # noqa: E402
    TorchProblem,
    checkpoint,
    online_noise_scales,
    sample_batches,
)
from .errors import SettingsError  # noqa: E402
from .files import atomic_file, write_atomic  # noqa: E402
from .workers import run_all  # noqa: E402

TASKS = ("mnist1d", "lm")
DROP_SHARE = 0.5  # the drop: this share of what the run gained on the evaluation set after the checkpoint
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
PER_WINDOW = 4  # micro-batches per window of the online measurement


@dataclass(frozen=True)
class Plan:
    """One task's settings and budget.

    Attributes:
      batch: the smallest batch (the run's batch, the online micro-batch, ``B0`` of the lr rule).
      lr: the run's learning rate (``lr0``).
      steps: the run's length in steps; ``every``: evaluations and online points every this many.
      checkpoints: the steps of the run the branches start from.
      batch_sizes, lr_factors, seeds, max_steps: the branches.
      windows: online windows per source and point.
    """

    batch: int
    lr: float
    steps: int
    every: int
    checkpoints: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    lr_factors: tuple[float, ...]
    seeds: tuple[int, ...]
    max_steps: int
    windows: int

    def lrs(self, batch_size: int) -> list[float]:
        return [self.lr * math.sqrt(batch_size / self.batch) * f for f in self.lr_factors]


PLANS: dict[tuple[str, bool], Plan] = {
    ("mnist1d", False): Plan(32, 2e-3, 800, 50, (25, 75, 150, 300), (16, 32, 64, 128, 256, 512, 1024), LR_FACTORS,
                             (0, 1), 600, 64),
    ("mnist1d", True): Plan(32, 2e-3, 300, 25, (25, 150), (16, 64, 256, 1024), (0.5, 1.0, 2.0), (0,), 300, 8),
    ("lm", False): Plan(4, 2e-3, 1200, 100, (50, 200, 600), (4, 8, 16, 32, 64, 128, 256), (0.5, 1.0, 2.0), (0, 1),
                        400, 16),
    ("lm", True): Plan(4, 2e-3, 200, 50, (50, 150), (4, 16, 64), (0.5, 1.0, 2.0), (0,), 300, 4),
}


# ------------------------------------------------------------------------------ the tasks
def classify(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """mnist1d: the mean cross-entropy of the batch ``(x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def next_byte(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """LM: the mean next-byte cross-entropy over every token of the sequences ``(seqs,)`` (uint8)."""
    seqs = batch[0].long()
    return F.cross_entropy(model(seqs[:, :-1]).reshape(-1, 256), seqs[:, 1:].reshape(-1))


@dataclass
class Task:
    """A task ready to measure: the problem (data, loss), a fresh model and optimizer, and the
    (items, samples) of a micro-batch."""

    name: str
    problem: TorchProblem
    make: Callable[[float], tuple[torch.nn.Module, torch.optim.Optimizer]]
    count_of: Callable[[Any], tuple[int, int]]
    about: dict[str, Any]


def _samples(batch: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    return len(batch[0]), len(batch[0])


def _tokens(batch: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    return batch[0][:, 1:].numel(), len(batch[0])


def make_task(name: str, cfg: ExperimentConfig) -> Task:
    """The mnist1d task (the reference MLP, Adam) or the LM task (the byte-level GPT, AdamW)."""
    if name == "mnist1d":
        from .mnist1d_data import load_mnist1d
        from .trainer_torch import mlp

        data = load_mnist1d(Path(cfg.data_dir) / "mnist1d.npz")
        problem = TorchProblem(classify, (torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)),
                               (torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)))

        def make_mlp(lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            model = mlp()
            return model, torch.optim.Adam(model.parameters(), lr=lr)

        return Task(name, problem, make_mlp, _samples, {"model": "MLP 40-256-256-10", "optimizer": "Adam",
                                                        "evaluation": "the validation split (800 samples)"})
    if name == "lm":
        from .lm_task import ByteGPT, held_out, load_corpus, sequences, shape

        corpus = load_corpus()
        size = shape(cfg)
        problem = TorchProblem(next_byte, (sequences(corpus.train, size["context"]).to(torch.uint8),),
                               (held_out(corpus.val, size["context"]).to(torch.uint8),))

        def make_gpt(lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            model = ByteGPT(size["context"], size["dim"], size["layers"])
            return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

        return Task(name, problem, make_gpt, _tokens, {"model": size, "optimizer": "AdamW (weight decay 0.01)",
                                                       "evaluation": "128 validation sequences",
                                                       "corpus": corpus.about})
    raise SettingsError(f"task must be one of {', '.join(TASKS)}, got {name!r}")


# ------------------------------------------------------------------------------ the run
def train_with_checkpoints(task: Task, plan: Plan, seed: int) -> tuple[dict[int, Any], list[tuple[int, float]],
                                                                       dict[int, dict[str, Any]]]:
    """The run at the smallest batch: its checkpoints, its evaluation-loss curve and the online
    noise scales at every ``plan.every`` steps (the checkpoints among them)."""
    torch.manual_seed(seed)
    model, optimizer = task.make(plan.lr)
    stream = task.problem.batches(plan.batch, seed)
    checkpoints: dict[int, Any] = {}
    curve: list[tuple[int, float]] = [(0, task.problem.loss((model, optimizer)))]
    online: dict[int, dict[str, Any]] = {}
    points = set(plan.checkpoints) | set(range(plan.every, plan.steps + 1, plan.every))
    for step in range(1, plan.steps + 1):
        task.problem.step((model, optimizer), next(stream), plan.lr)
        if step in points:
            curve.append((step, task.problem.loss((model, optimizer))))
            state = checkpoint(model, optimizer)
            if step in plan.checkpoints:
                checkpoints[step] = state
            online[step] = online_noise_scales(
                state, task.problem.loss_of, lambda: sample_batches(task.problem.train, plan.batch, seed + 1),
                PER_WINDOW, plan.windows, task.count_of)
    return checkpoints, curve, online


def drops(plan: Plan, curve: Sequence[tuple[int, float]]) -> list[float]:
    """Per checkpoint: ``DROP_SHARE`` of the run's best evaluation loss after it, below its own."""
    loss = dict(curve)
    out = []
    for at in plan.checkpoints:
        later = min(v for k, v in curve if k > at)
        if not later < loss[at]:
            raise SettingsError(f"checkpoint at step {at}: the run's evaluation loss never falls below its "
                                f"{loss[at]:.4g} after it; take earlier checkpoints")
        out.append(DROP_SHARE * (loss[at] - later))
    return out


def _chunk(fn: Callable[[Any], Branch], jobs: list[Any]) -> list[Branch]:
    return [fn(job) for job in jobs]


def pooled(pool: Executor, parts: int) -> Callable[[Callable[[Any], Branch], Iterable[Any]], list[Branch]]:
    """A ``map`` for ``measure_branches`` on ``pool``: the jobs in ``parts`` chunks (the problem
    and the checkpoints are sent once per chunk), the results in order."""
    def map_(fn: Callable[[Any], Branch], jobs: Iterable[Any]) -> list[Branch]:
        jobs = list(jobs)
        chunks = [jobs[i::parts] for i in range(parts)]
        done = run_all(pool, _chunk, [(fn, c) for c in chunks if c])
        out: list[Branch | None] = [None] * len(jobs)
        for i, result in enumerate(done):
            for j, branch in enumerate(result):
                out[i + j * parts] = branch
        return out  # type: ignore[return-value]
    return map_


# ------------------------------------------------------------------------------ the section
def run_critical_batch_section(task: str, cfg: ExperimentConfig, pool: Executor, out: Path,
                               quick: bool = False) -> dict[str, Any]:
    """Measure ``task``'s critical batch size beside its online noise scale; write
    ``critical_batch_<task>.json``, ``.csv`` and ``.png`` to ``out`` and return the JSON's dict."""
    plan = PLANS[(task, quick)]
    started = time.perf_counter()
    spec = make_task(task, cfg)
    checkpoints, curve, online = train_with_checkpoints(spec, plan, cfg.seed)
    trained = time.perf_counter()
    drop = drops(plan, curve)
    parts = 4 * max(1, getattr(cfg, "processes", 1))
    starts, drop, runs = measure_branches(spec.problem, [checkpoints[k] for k in plan.checkpoints],
                                          list(plan.batch_sizes), plan.lrs, drop, seeds=plan.seeds,
                                          max_steps=plan.max_steps, map=pooled(pool, parts))
    rows = []
    for k, at in enumerate(plan.checkpoints):
        entry: dict[str, Any] = {"step": at, "run_samples": at * plan.batch, "online": online[at]}
        try:
            result = analyse_checkpoint([r for r in runs if r.checkpoint == k], starts[k], drop[k],
                                        rng_seed=cfg.seed)
            entry.update(result.as_dict())
        except CriticalBatchError as error:  # said in the results, never dropped silently
            entry.update({"checkpoint": k, "start_loss": starts[k], "drop": drop[k], "refused": str(error)})
        rows.append(entry)
    results = {
        "task": task, "quick": quick, "plan": asdict(plan), "about": spec.about, "drop_share": DROP_SHARE,
        "lr_rule": "lr(B) = lr * sqrt(B / batch) * factor, factor in lr_factors; the best per batch size",
        "definitions": {"b_noise": "joint fit of S = S_min (1 + B_noise / B) and E = E_min (1 + B / B_noise), "
                                   "relative errors", "b_crit": "E_min / S_min (= b_noise)",
                        "b_zhang": "1.2 B_0 + 0.2 b_noise: E(B) = 1.2 E(B_0), B_0 the smallest batch",
                        "b_zhang_measured": "the largest measured B with E(B) <= 1.2 E(B_0)",
                        "online": "ratio of the mean tr(Sigma) and |G|^2 over the windows, at the run's parameters"},
        "curve": curve, "online": {str(k): v for k, v in sorted(online.items())}, "checkpoints": rows,
        "seconds": {"run_and_online": trained - started, "branches": time.perf_counter() - trained},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"critical_batch_{task}.json", json.dumps(results, indent=1, default=_plain) + "\n")
    write_atomic(out / f"critical_batch_{task}.csv", branches_csv(runs, plan))
    plot(results, out / f"critical_batch_{task}.png")
    return results


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def branches_csv(runs: Sequence[Branch], plan: Plan) -> str:
    """Every branch: checkpoint step, batch size, lr, seed, steps and samples to the drop (empty
    when not reached), why, steps run."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["checkpoint_step", "batch_size", "lr", "seed", "steps", "samples", "why", "ran"])
    for r in runs:
        writer.writerow([plan.checkpoints[r.checkpoint], r.batch_size, f"{r.lr:.6g}", r.seed,
                         "" if r.steps is None else f"{r.steps:.4f}", "" if r.samples is None else f"{r.samples:.2f}",
                         r.why, r.ran])
    return text.getvalue()


def plot(results: dict[str, Any], path: Path) -> None:
    """Left: the online noise scales over training and the fitted B_noise (bootstrap interval)
    at the checkpoints; right: steps to the drop against the batch size, and the fits."""
    batch = results["plan"]["batch"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    points = sorted(int(k) for k in results["online"])
    styles = {"per_sample": ("C0", "B_simple, per-sample source"),
              "micro_batch": ("C1", "B_simple, micro-batch source"), "adam": ("C2", "Adam-preconditioned noise scale")}
    for source, (colour, name) in styles.items():
        ys = [results["online"][str(k)].get(source, {}).get("b_simple", math.nan) for k in points]
        left.plot([k * batch for k in points], ys, "-o", ms=3, color=colour, label=name)
    fitted = [c for c in results["checkpoints"] if "b_noise" in c]
    if fitted:
        xs = [c["run_samples"] for c in fitted]
        ys = [c["b_noise"] for c in fitted]
        lo = [y - (c["b_noise_interval"] or [y, y])[0] for y, c in zip(ys, fitted)]
        hi = [(c["b_noise_interval"] or [y, y])[1] - y for y, c in zip(ys, fitted)]
        left.errorbar(xs, ys, yerr=[lo, hi], fmt="s", color="C3", ms=7, capsize=4, label="B_noise fitted (branches)")
        left.plot(xs, [c["b_zhang"] for c in fitted], "v", color="C4", ms=6, label="Zhang et al. critical batch")
    for c in results["checkpoints"]:
        if "refused" in c:
            left.axvline(c["run_samples"], color="0.6", ls=":", lw=1)
    left.set(xscale="log", yscale="log", xlabel="training samples (sequences for the LM) at the point",
             ylabel="batch size (samples)", title=f"{results['task']}: noise scale over training")
    left.legend(fontsize=7)
    for i, c in enumerate(fitted):
        colour = f"C{i}"
        right.plot(c["batch_sizes"], c["steps"], "o", color=colour, label=f"step {c['step']}: B_noise "
                   f"{c['b_noise']:.0f}")
        grid = [c["batch_sizes"][0] * (c["batch_sizes"][-1] / c["batch_sizes"][0]) ** (j / 50) for j in range(51)]
        right.plot(grid, [c["s_min"] * (1 + c["b_noise"] / b) for b in grid], "-", color=colour, lw=1)
    right.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="steps S to the drop",
              title="S = S_min (1 + B_noise / B) per checkpoint")
    if fitted:
        right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
