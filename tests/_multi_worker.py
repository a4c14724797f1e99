"""One rank running several modes of tests/_ddp_worker.py and tests/_fsdp_worker.py in turn, in one
process group: the ranks pay Python's, torch's and gloo's start-up once for all of them.

Usage: python -m tests._multi_worker RANK WORLD OUT_DIR MODE[,MODE...]

Each mode runs as it does alone, on fresh models, and writes its files to ``OUT_DIR/MODE``; the
ranks meet at a barrier between modes. A mode that raises writes its traceback to
``OUT_DIR/MODE/error{RANK}.txt`` and ends the process at once with exit code 1 (the other rank
then fails at its next collective instead of waiting for the group's timeout); after both ranks
finished a mode, rank 0 writes ``OUT_DIR/MODE/done``. The modes whose ranks disagree on what they
call (``contract_flush``, ``contract_gsnr``) or on what the step applies (``contract_schedule``,
``contract_clip``) raise on both ranks at the same collective, so the group goes on to the next
mode; a rank that stops calling (``contract_late``) or whose process ends (``backward_raises``),
and modes with a launcher of their own, are not for this worker.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from . import _ddp_worker as ddp
from . import _fsdp_worker as fsdp


def gsnr_compiled(rank: int, out: Path) -> None:
    """The per-element path's fused kernels at every size, as ``_ddp_worker``'s "gsnr_compiled";
    the fused-size threshold and the kernels' constructor are put back afterwards."""
    from gradaccum.torch._stats import _fused

    made: list = []
    threshold, make = _fused.FUSED_FROM, _fused.Kernels.__init__

    def record(self: _fused.Kernels) -> None:
        make(self)
        made.append(self)

    _fused.FUSED_FROM = 0
    _fused.Kernels.__init__ = record  # type: ignore[method-assign]
    try:
        ddp.run_gsnr(rank, out)
    finally:
        _fused.FUSED_FROM, _fused.Kernels.__init__ = threshold, make  # type: ignore[method-assign]
    assert made and all(k.broken is None for k in made) and any(k.checked for k in made)


def by_name(run: Callable[[int, Path, str], None], *modes: str) -> dict[str, Callable[[int, Path], None]]:
    """Modes one worker function tells apart by their name: each calls ``run(rank, out, mode)``."""
    return {mode: (lambda rank, out, mode=mode: run(rank, out, mode)) for mode in modes}


MODES: dict[str, Callable[[int, Path], None]] = {
    "raise": lambda rank, out: ddp.run_fixed(rank, out, "raise"),
    "skip_window": lambda rank, out: ddp.run_fixed(rank, out, "skip_window"),
    "gsnr": ddp.run_gsnr,
    "gsnr_skip": lambda rank, out: ddp.run_gsnr(rank, out, skip=True),
    "gsnr_compiled": gsnr_compiled,
    "gsnr_heads": ddp.run_gsnr_heads,
    "probe": ddp.run_probe,
    "ramp": ddp.run_ramp,
    "norms": ddp.run_norms,
    "norms_micro": lambda rank, out: ddp.run_norms(rank, out, micro=True),
    "norms_skip": ddp.run_norms_skip,
    "micro_planner": ddp.run_micro_planner,
    "monitor": ddp.run_monitor,
    **by_name(ddp.run_fsdp, "fsdp_raise", "fsdp_skip_window", "fsdp_nan", "fsdp_refusals", "fsdp_norms"),
    "fsdp_resume": ddp.run_fsdp_resume,
    "float32": fsdp.run_float32,
    "micro_batch": fsdp.run_micro_batch,
    **by_name(ddp.run_contract, "contract_flush", "contract_gsnr", "contract_schedule", "contract_clip"),
    **by_name(ddp.run_transformers, "transformers", "transformers_noise"),
}


def main(rank: int, world: int, out: Path, modes: list[str]) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; this worker runs {sorted(MODES)}")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))  # a broken build fails in minutes, not in 30
    for mode in modes:
        target = out / mode
        target.mkdir(exist_ok=True)
        try:
            MODES[mode](rank, target)
        except BaseException:  # noqa: B036 - any failure ends this rank now, its traceback kept
            (target / f"error{rank}.txt").write_text(traceback.format_exc())
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        dist.barrier()  # both ranks done with this mode before either starts the next
        if rank == 0:
            (target / "done").touch()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(","))
