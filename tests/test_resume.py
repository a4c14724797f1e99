"""Save mid-window, rebuild everything in a new process, load, continue: bitwise identical.

Transformers #22143 lost the partial window on resume; the Accumulator's state_dict holds it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "tests._resume_worker", mode, str(out)], cwd=ROOT, check=True,
                   timeout=300)


def test_resume_mid_window_in_fresh_process_is_bitwise_identical(tmp_path: Path) -> None:
    run("full", tmp_path)
    run("first", tmp_path)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["acc"]["micro_batches"] == 2 and ckpt["acc"]["items"] > 0
    run("second", tmp_path)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    history = torch.load(tmp_path / "history.pt", weights_only=True)
    assert [r["step"] for r in history] == list(range(6))
    assert history[-1]["reason"] == "flush" and history[-1]["micro_batches"] == 3

    # control: resuming without the partial window (Transformers #22143) is detected
    ckpt["acc"]["sums"] = [None for _ in ckpt["acc"]["sums"]]
    ckpt["acc"]["items"] = 0
    torch.save(ckpt, tmp_path / "ckpt.pt")
    run("second", tmp_path)
    lost = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert any(not torch.equal(full[k], lost[k]) for k in full)
