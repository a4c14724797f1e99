"""Data parallel over 2 forced CPU devices (``jax.sharding``) gives the 1-device result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_jax_sharding_worker.py")


@pytest.mark.slow
def test_two_devices_equal_one_device() -> None:
    done = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, run in result.items():
        assert run["batch_devices"] == [2], name  # every micro-batch really was split over 2 devices
        assert run["param_devices"] == 2, name  # the state stayed replicated
        assert run["steps"] >= 5 and run["moved"] > 1e-3, name
        assert [w[0] for w in run["windows_2"]] == [w[0] for w in run["windows_1"]], name
        for (_, g2), (_, g1) in zip(run["windows_2"], run["windows_1"]):
            assert g2 == pytest.approx(g1, rel=1e-9), name
        assert run["max_diff"] < 1e-10, name
    assert len({w[0] for w in result["gsnr"]["windows_1"]}) > 1  # the adaptive windows really vary
