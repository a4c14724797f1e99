"""Run in a fresh process with 2 forced CPU devices: the same windows on 1 device and on 2.

Prints one JSON line: the largest parameter difference, the window sizes and GSNR values
of each run, and how many devices held the batch and the updated parameters.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # a subprocess: conftest.py does not run here

import optax  # noqa: E402

from gradaccum import GSNR, FixedSteps  # noqa: E402
from gradaccum.jax import AccumulatingTrainState, data_mesh, make_train_step, replicate, shard_batch  # noqa: E402
from tests.jax_reference import MODEL, data, init_params, loss_fn, max_abs_diff, take  # noqa: E402


def run(rule, mesh=None):
    step = make_train_step(loss_fn)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=optax.adam(0.01), rule=rule)
    if mesh is not None:
        state = replicate(state, mesh)
    batch, windows, placed = data(256, seed=21), [], set()
    for a in range(0, 256, 8):
        part = take(batch, slice(a, a + 8))
        if mesh is not None:
            part = shard_batch(part, mesh)
            placed.add(len(part["x"].sharding.device_set))
        state, metrics = step(state, part)
        if bool(metrics["stop"]):
            windows.append((int(metrics["items"]), float(metrics.get("gsnr", 0.0))))
    return state, windows, placed


def main() -> None:
    assert len(jax.devices()) == 2, jax.devices()
    mesh = data_mesh()
    out = {}
    for name, rule in (("fixed", FixedSteps(3)), ("gsnr", GSNR(1.5, increment=8, max_samples=64, scale="mean"))):
        one, one_windows, _ = run(rule)
        two, two_windows, placed = run(rule, mesh)
        out[name] = {"max_diff": max_abs_diff(one.params, two.params), "windows_1": one_windows,
                     "windows_2": two_windows, "batch_devices": sorted(placed),
                     "param_devices": len(jax.tree.leaves(two.params)[0].sharding.device_set),
                     "steps": int(two.step), "moved": max_abs_diff(one.params, init_params())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
