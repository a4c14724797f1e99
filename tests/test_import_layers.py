"""What each layer imports: the core and the top level need neither YAML nor a framework, and the
JAX experiment runs without torch. Each check runs in a fresh interpreter (``sys.modules``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _modules_after(code: str) -> set[str]:
    """The top-level names in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    script = textwrap.dedent(code) + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.slow
@pytest.mark.parametrize("module", ["gradaccum", "gradaccum._core"])
def test_the_core_imports_no_yaml_and_no_framework(module: str) -> None:
    loaded = _modules_after(f"import {module}")
    assert "gradaccum" in loaded
    assert not {"yaml", "torch", "jax"} & loaded


@pytest.mark.slow
def test_accumulation_config_reads_yaml_on_demand() -> None:
    """``AccumulationConfig.from_yaml`` still reads YAML (1.2 floats), importing it only then."""
    loaded = _modules_after("""
        import sys
        from gradaccum import AccumulationConfig
        assert "yaml" not in sys.modules
        config = AccumulationConfig.from_yaml("batch_size: 8\\nrule: {name: gsnr, tau: 1e-3}\\n")
        assert config.rule == {"name": "gsnr", "tau": 0.001}, config.rule
    """)
    assert "yaml" in loaded


@pytest.mark.slow
def test_the_jax_experiment_trains_without_torch() -> None:
    """The JAX trainer draws its data order with NumPy: a short run imports no torch."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    loaded = _modules_after("""
        import numpy as np
        from gradaccum.experiments.config import ExperimentConfig
        from gradaccum.experiments.mnist1d_data import MNIST1D
        from gradaccum.experiments.trainer_jax import train_jax

        rng = np.random.default_rng(0)
        split = lambda n: (rng.normal(size=(n, 40)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64))
        data = MNIST1D(*split(256), *split(64), *split(64))
        cfg = ExperimentConfig(budget=96, eval_every=64, increment=32, max_samples=64)
        trained = train_jax("baseline512", {"lr": 0.01}, 0, data, cfg)
        assert sum(w.items for w in trained.windows) == 96, trained.windows
    """)
    assert "jax" in loaded and "torch" not in loaded


def test_the_data_order_is_seeded_and_covers_each_epoch() -> None:
    """``increments`` with a NumPy generator: the same seed gives the same order, each epoch a
    permutation, and exactly ``budget`` samples."""
    np = pytest.importorskip("numpy")
    from gradaccum.experiments.run_record import increments

    first = [b.tolist() for b in increments(10, 3, 25, np.random.default_rng(4))]
    again = [b.tolist() for b in increments(10, 3, 25, np.random.default_rng(4))]
    assert first == again and sum(map(len, first)) == 25
    assert [len(b) for b in first] == [3, 3, 3, 3, 3, 3, 3, 3, 1]
    epoch = sum(first[:3], [])
    assert len(set(epoch)) == 9 and set(epoch) <= set(range(10))
