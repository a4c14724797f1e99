"""Save mid-window, rebuild everything in a new process, load, continue: bitwise identical.

Transformers #22143 lost the partial window on resume; the Accumulator's state_dict holds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import _resume_worker as worker

ROOT = Path(__file__).resolve().parents[1]


def start(*jobs: tuple[str, Path]) -> list[subprocess.Popen]:
    """Start the worker once per ``(mode, out)``, each in a fresh process on one thread, the jobs side
    by side (they share no file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "tests._resume_worker", mode, str(out)], cwd=ROOT, env=env)
            for mode, out in jobs]


def run_here(mode: str, out: Path) -> None:
    """The worker's ``mode`` in this process, on one thread as the workers run; this process's
    random state and thread count are left as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            worker.main(mode, out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_resume_mid_window_in_fresh_process_is_bitwise_identical(tmp_path: Path) -> None:
    run_here("first", tmp_path)  # saved here, loaded and continued in a process that never trained
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["acc"]["micro_batches"] == 2 and ckpt["acc"]["items"] > 0
    # control: resuming without the partial window (Transformers #22143), from a copy of the checkpoint
    lost_dir = tmp_path / "lost"
    lost_dir.mkdir()
    ckpt["acc"]["sums"] = [None for _ in ckpt["acc"]["sums"]]
    ckpt["acc"]["items"] = 0
    torch.save(ckpt, lost_dir / "ckpt.pt")
    procs = start(("full", tmp_path), ("second", tmp_path))
    try:
        run_here("second", lost_dir)  # meanwhile
    finally:
        codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0]
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    history = torch.load(tmp_path / "history.pt", weights_only=True)
    assert [r["step"] for r in history] == list(range(6))
    assert history[-1]["reason"] == "flush" and history[-1]["micro_batches"] == 3

    # the control is detected: its weights differ from the uninterrupted run's
    lost = torch.load(lost_dir / "resumed.pt", weights_only=True)
    assert any(not torch.equal(full[k], lost[k]) for k in full)
