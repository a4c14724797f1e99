"""The per-element path on a 2-layer GPT: each Linear's closed form, its per-sample gradients, and
the per-layer choice between them, against a plain backward and torch.func vmap, in one process.

Model: nanoGPT-style, 2 blocks, d 128, 4 heads, T 64, 16 samples per increment; the project's
byte-level LM (head tied to the token embedding) and the same model with an untied head.
Competitors, each on windows of two increments (forward and backward of the summed loss):
  plain       the ordinary backward, no statistics;
  per_sample  PerSampleGradStats(statistics="elements") with every Linear over positions forced to
              per-sample gradients made whole (the path before the choice);
  closed      the same with every Linear over positions forced to its closed form (the products of a
              block of rows for a few samples at a time, never a whole per-sample gradient);
  chosen      the same with each layer's path chosen by its cost estimate (``_stats._choice``);
  vmap        torch.func vmap(grad) per-sample gradients of every parameter, then their sum and sum
              of squares (statistics only: no moments kept, no check against the real gradient).
Each element-path competitor commits both increments (the merge into the running moments) and
resets; no rule decides. Time: interleaved rounds (``_rounds.interleaved_seconds``), each
competitor's time over plain's in the same round; the table gives the median ratio and its
min-max. Peak memory: each competitor runs in a fresh child process that built only the model
and the data; the child resets its peak resident size (/proc/self/clear_refs) after a warm-up
window and reports how far two windows raised it (torch's CPU allocations are resident memory).

Where "chosen" spends its time beyond plain's (tied head, ms per window of two increments, one
thread, on a shared machine where plain took about 100 ms: its forward 39 and backward 61):
  forward and backward with the hooks     +9 and +7 (recording the calls, keeping every output
                                          gradient until the commit, so the allocator reuses none)
  the closed form's per-sample products   35  (RowSquares of the six closed-form Linears: the
                                          same 2 B T d_in d_out flops as the weight gradient
                                          autograd already made, a second time, as batched
                                          GEMMs over T that run at about 40 % of its speed)
  per-sample gradients and their squares  16  (attention projections and tied head made whole,
                                          LayerNorm, embeddings)
  the closed form's other passes          12  (the check's two GEMVs, column norms, bias sums)
  the precision guard                     11  (about 1300 elements per increment flagged in
                                          float32 and made again from per-sample values)
  the check, the tied sums, the merge      4
Since that profile the guard gathers a Linear's values with index_select and reads a LayerNorm's
from its call, and the sums of squares over samples go through a small buffer (the 2 MiB
temporaries' fresh pages cost about 1 ms each: about 7 ms of the figures above).
vmap makes each Linear's weight-sized products once (its per-sample gradients replace the weight
gradient); the hooks cannot stop autograd's own weight gradient, so the products are made twice.
A per-layer ``torch.func.vmap`` of ``nn.Linear`` measured 2-3.5x slower than the batched
per-sample GEMM at these shapes (and the closed form), so the choice has no vmap path for it.

    python benchmarks/element_path.py [--rounds 9] [--json benchmarks/results/element_path.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from _rounds import interleaved_seconds  # benchmarks/ is on sys.path when run as a script
from gradaccum.experiments.lm_task import ByteGPT
from gradaccum.torch import PerSampleGradStats
from gradaccum.torch._stats import _choice

SAMPLES, CONTEXT, DIM, LAYERS = 16, 64, 128, 2
COMPETITORS = ("plain", "per_sample", "closed", "chosen", "vmap")
INCREMENTS = 2  # per window


def gpt(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ByteGPT(CONTEXT, DIM, LAYERS)
    if not tied:
        model.head.weight = nn.Parameter(model.wte.weight.detach().clone())
    return model


def loss_of(model: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The summed next-token loss (targets: the tokens shifted)."""
    out = model(tokens)
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1), reduction="sum")


def force(path: str | None) -> None:
    """Every Linear's estimate favours ``path`` ("closed", "per_sample"), or the real estimate (None)."""
    if path is None:
        _choice.ESTIMATES["linear"] = ESTIMATE
        return
    cheap, dear = 0.0, math.inf

    def forced(args: tuple, d: torch.Tensor) -> _choice.Costs:
        return _choice.Costs(cheap, dear, 0) if path == "closed" else _choice.Costs(dear, cheap, 0)

    _choice.ESTIMATES["linear"] = forced


ESTIMATE = _choice.ESTIMATES["linear"]


def make(tied: bool, which: tuple[str, ...] = COMPETITORS) -> dict[str, Callable[[], None]]:
    """One window of each competitor. The element-path competitors each hold their own copy of the
    model with its hooks, and set the Linear estimate they run under before each window."""
    model = gpt(tied)
    tokens = torch.randint(0, 256, (SAMPLES, CONTEXT), generator=torch.Generator().manual_seed(1))
    runners: dict[str, Callable[[], None]] = {}
    if "plain" in which:
        def plain() -> None:
            for _ in range(INCREMENTS):
                model.zero_grad(set_to_none=True)
                loss_of(model, tokens).backward()

        runners["plain"] = plain
    for name, path in (("per_sample", "per_sample"), ("closed", "closed"), ("chosen", None)):
        if name in which:
            runners[name] = _element_window(copy.deepcopy(model), tokens, path)
    if "vmap" in which:
        params = {k: p.detach() for k, p in model.named_parameters()}
        per_sample = vmap(grad(lambda p, t: loss_of(lambda z: functional_call(model, p, (z,)), t.unsqueeze(0))),
                          in_dims=(None, 0))

        def vmapped() -> None:
            for _ in range(INCREMENTS):
                for g in per_sample(params, tokens).values():
                    g.sum(0), (g * g).sum(0)

        runners["vmap"] = vmapped
    return runners


def _element_window(hooked: nn.Module, tokens: torch.Tensor, path: str | None) -> Callable[[], None]:
    stats = PerSampleGradStats(hooked, statistics="elements")

    def window() -> None:
        force(path)
        for _ in range(INCREMENTS):
            hooked.zero_grad(set_to_none=True)
            loss_of(hooked, tokens).backward()
            stats.commit()
        stats.reset()
        window.paths = dict(stats.paths)  # type: ignore[attr-defined]

    return window


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(tied: bool, name: str) -> None:
    run = make(tied, (name,))[name]
    run()  # warm-up: one-time allocations and the fused kernels' compilation
    rss = _rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    run()
    run()
    print(json.dumps({"extra_mib": (_vm_hwm_kib() - rss) / 1024}))


def peak_mib(tied: bool, name: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", "tied" if tied else "untied", name],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def ratio(times: list[list[float]], a: int, b: int) -> str:
    rs = [x / y for x, y in zip(times[a], times[b])]
    return f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, help="write the table as a result file (benchmarks/results/*.json)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0] == "tied", args.child[1])
        return
    columns = ["model", "plain ms/window", "per-sample / plain", "closed / plain", "chosen / plain",
               "vmap / plain", "chosen / vmap", "peak +MiB plain", "per-sample", "closed", "chosen", "vmap",
               "paths chosen"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    rows = []
    for tied in (True, False):
        runners = make(tied)
        times = interleaved_seconds([runners[c] for c in COMPETITORS], args.rounds, 1)
        index = {c: i for i, c in enumerate(COMPETITORS)}
        mem = {c: peak_mib(tied, c) for c in COMPETITORS}
        chosen = runners["chosen"].paths  # type: ignore[attr-defined]
        linear = sorted({p for p in chosen.values() if p.startswith("linear:")})
        counts = ", ".join(f"{sum(v == p for v in chosen.values())} {p}" for p in linear)
        row = [f"GPT 2x{DIM}, T {CONTEXT}, {SAMPLES} samples, {'tied' if tied else 'untied'} head",
               f"{statistics.median(times[0]) * 1e3:.1f}",
               *(ratio(times, index[c], 0) for c in ("per_sample", "closed", "chosen", "vmap")),
               ratio(times, index["chosen"], index["vmap"]), *(f"{mem[c]:.0f}" for c in COMPETITORS), counts]
        rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
    if args.json:
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        command = f"{threads}.venv/bin/python benchmarks/element_path.py --rounds {args.rounds}"
        args.json.write_text(json.dumps({"command": command, "columns": columns, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
