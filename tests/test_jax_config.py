"""AccumulationConfig (YAML) and the JAX backend's answers to bad input."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradaccum import GSNR, AccumulationConfig, Decision, FixedSteps, NormTest
from gradaccum.jax import AccumulatingTrainState, accumulate, make_train_step

from .jax_reference import MODEL, data, init_params, loss_fn, max_abs_diff, take

STEP = make_train_step(loss_fn)
SGD = optax.sgd(0.1)


def test_yaml_config_builds_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "accumulation.yaml"
    path.write_text("batch_size: 32\ngradient_accumulation_steps: 16\nrule: {name: gsnr, tau: 1.5, scale: mean}\n")
    config = AccumulationConfig.from_yaml(path)
    assert config.effective_batch == 512
    assert config.make_rule() == GSNR(1.5, increment=32, max_samples=512, scale="mean")
    assert AccumulationConfig.from_yaml("batch_size: 8\ngradient_accumulation_steps: 4\n").make_rule() == FixedSteps(4)
    text = "batch_size: 4\ngradient_accumulation_steps: 3\nrule: {name: norm_test, theta: 0.5, min_samples: 8}\n"
    assert AccumulationConfig.from_yaml(text).make_rule() == NormTest(0.5, increment=4, max_samples=12, min_samples=8)


def test_train_state_takes_a_config() -> None:
    config = AccumulationConfig(batch_size=4, gradient_accumulation_steps=2)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=config)
    batch = data(8)
    for a in (0, 4):
        state, metrics = STEP(state, take(batch, slice(a, a + 4)))
    assert state.rule == FixedSteps(2) and bool(metrics["stop"]) and int(state.step) == 1


@pytest.mark.parametrize(("settings", "error", "names"), [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 4.5}, TypeError, "batch_size"),
    ({"batch_size": 4, "gradient_accumulation_steps": "4"}, TypeError, "gradient_accumulation_steps"),
    ({"batch_size": 4, "gradient_accumulation_steps": -1}, ValueError, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 4}, ValueError, "batch_size is required"),
    ({"batch_size": 4, "steps": 4}, ValueError, "unknown keys steps"),
    ({"batch_size": 4, "rule": "gaga"}, ValueError, "rule.name"),
    ({"batch_size": 4, "rule": {"tau": 1.0}}, ValueError, "'name'"),
    ({"batch_size": 4, "rule": {"name": "gsnr"}}, ValueError, "tau"),
    ({"batch_size": 4, "rule": {"name": "gsnr", "tau": -1.0}}, ValueError, "tau"),
    ({"batch_size": 4, "rule": {"name": "gsnr", "tau": 1.0, "scale": "log"}}, ValueError, "scale"),
    ({"batch_size": 4, "rule": {"name": "gsnr", "tau": 1.0, "theta": 1.0}}, ValueError, "unknown: theta"),
    ({"batch_size": 4, "rule": {"name": "fixed", "k": 3}}, ValueError, "no settings"),
    ({"batch_size": 4, "gradient_accumulation_steps": 2, "rule": {"name": "gsnr", "tau": 1.0, "min_samples": 9}},
     ValueError, "min_samples"),
])
def test_bad_config_values_name_the_setting(settings: dict, error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        AccumulationConfig.from_mapping(settings)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        AccumulationConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(TypeError, match="must be a mapping"):
        AccumulationConfig.from_yaml("- 1\n- 2\n")
    with pytest.raises(ValueError, match="cannot read"):
        AccumulationConfig.from_yaml("batch_size: [1\n")


class UnregisteredRule:
    needs_statistics = False

    def decide(self, window) -> Decision:
        return Decision(True, {})


@pytest.mark.parametrize(("kwargs", "error", "names"), [
    ({}, TypeError, "rule is required"),
    ({"rule": "fixed"}, TypeError, "stopping rule"),
    ({"rule": UnregisteredRule()}, TypeError, "register_decision"),
    ({"rule": FixedSteps(2), "nonfinite": "raise"}, ValueError, "nonfinite"),
    ({"rule": FixedSteps(2), "params": {"w": jnp.arange(3)}}, TypeError, "floating-point"),
    ({"rule": FixedSteps(2), "params": {}}, ValueError, "at least one array"),
])
def test_bad_train_state_arguments(kwargs: dict, error: type, names: str) -> None:
    kwargs = {"apply_fn": MODEL.apply, "params": init_params(), "tx": SGD, **kwargs}
    with pytest.raises(error, match=names):
        AccumulatingTrainState.create(**kwargs)


def test_bad_batches_raise_and_leave_the_window_as_it_was() -> None:
    batch = data(8)
    state = AccumulatingTrainState.create(apply_fn=MODEL.apply, params=init_params(), tx=SGD, rule=FixedSteps(3))
    state, _ = STEP(state, take(batch, slice(0, 4)))
    before = state
    bad = [
        (({"x": batch["x"][:4], "y": batch["y"][:3]},), "leading sizes"),
        ((take(batch, slice(0, 0)),), "empty micro-batch"),
        ((take(batch, slice(0, 4)), np.ones(3)), r"must have shape \(4,\)"),
        (({},), "at least one array"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            STEP(state, *args)
    mean_loss = make_train_step(lambda p, b: loss_fn(p, b).mean())
    with pytest.raises(ValueError, match="per-example losses"):
        mean_loss(state, take(batch, slice(0, 4)))
    assert state is before and int(state.window.items) == 4
    state, metrics = STEP(state, take(batch, slice(4, 8)))  # goes on as if nothing happened
    assert int(metrics["items"]) == 8


@pytest.mark.parametrize(("every_k", "error"), [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_accumulate_rejects_bad_every_k(every_k, error: type) -> None:
    with pytest.raises(error, match="every_k"):
        accumulate(optax.sgd(0.1), every_k)


@pytest.mark.parametrize(("items", "error"), [(-1, ValueError), (float("nan"), ValueError), ([1, 2], TypeError),
                                              ("4", TypeError)])
def test_accumulate_rejects_bad_items_and_keeps_its_state(items, error: type) -> None:
    params = init_params()
    tx = accumulate(optax.sgd(0.1), 3)
    grads = optax.tree.zeros_like(params)
    _, state = tx.update(grads, tx.init(params), params, items=2)
    with pytest.raises(error, match="items"):
        tx.update(grads, state, params, items=items)
    assert int(state.mini_step) == 1 and float(state.items) == 2
    assert max_abs_diff(state.grad_sum, grads) == 0


def test_the_same_config_drives_accumulate_and_the_torch_accumulator() -> None:
    import torch

    from gradaccum.torch import Accumulator

    from .reference import mlp

    config = AccumulationConfig.from_yaml("batch_size: 4\ngradient_accumulation_steps: 3\n")
    params = init_params()
    tx = accumulate(optax.sgd(0.1), config)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(optax.tree.zeros_like(params), state, params, items=4)
    assert int(state.gradient_step) == 1
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    assert acc.rule == FixedSteps(3)
    adaptive = AccumulationConfig.from_mapping({"batch_size": 4, "rule": {"name": "gsnr", "tau": 1.0}})
    with pytest.raises(ValueError, match="every_k: accumulate closes windows by count only"):
        accumulate(optax.sgd(0.1), adaptive)


@pytest.mark.slow
def test_missing_jax_extra_is_named(tmp_path: Path) -> None:
    """Without the extra, importing gradaccum.jax and ``--backend jax`` say what to install."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['optax'] = None\n"
            "from gradaccum.cli import main\n"
            f"code = main(['train', '--arm', 'baseline', '--lr', '0.01', '--backend', 'jax', '--budget', '64', "
            f"'--eval-every', '64', '--out', {str(tmp_path)!r}, '--data-dir', {str(tmp_path / 'data')!r}])\n"
            "assert code == 2, code\n"
            "import gradaccum.jax\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "backend: 'jax' needs the jax extra" in done.stderr
    assert "gradaccum.jax needs jax, flax and optax: pip install 'gradaccum[jax]'" in done.stderr


def test_yaml_reads_scientific_notation_as_numbers(tmp_path: Path) -> None:
    """``tau: 1e-3`` is a string to PyYAML (YAML 1.1 wants a dot); it was refused."""
    config = AccumulationConfig.from_yaml("batch_size: 8\ngradient_accumulation_steps: 4\n"
                                          "rule: {name: gsnr, tau: 1e-3, scale: mean}\n")
    assert config.make_rule().tau == 0.001
    from gradaccum.experiments.config import ExperimentConfig

    path = tmp_path / "c.yaml"
    path.write_text("lr_low: 3e-5\ntau_high: 2E+1\n")
    loaded = ExperimentConfig.from_yaml(path)
    assert (loaded.lr_low, loaded.tau_high) == (3e-5, 20.0)
