"""Suite-wide settings, set once here rather than as side effects of helper imports.

- JAX computes in float64 (``jax_enable_x64``): exactness tests compare in float64. The
  torch tests build their models and data in float64 explicitly (``.double()``), so the
  float32 experiment code under test keeps its own dtype.
- JAX keeps the programs it compiles in a compilation cache of the session's own (a
  temporary directory, removed at exit): the many tests that build the same step for the
  same model shapes compile it once. Subprocesses do not share it.
- Warnings are errors (pyproject's ``filterwarnings``), and hypothesis draws the same
  examples on every run (``derandomize``): the same seed gives the same numbers.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("gradaccum", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("gradaccum")

try:
    import jax
except ImportError:  # pragma: no cover - the JAX tests are then skipped by their own imports
    pass
else:
    jax.config.update("jax_enable_x64", True)
    _jax_cache = tempfile.mkdtemp(prefix="gradaccum-tests-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One mnist1d cache directory for the experiment tests (generated on first use)."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(params=["foreach", "compiled"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test on the per-element path's foreach kernels, then on its fused, compiled ones
    at every size (``_fused.FUSED_FROM`` 0; by default they run from 1M elements): the kernels
    objects the test made (each statistics object holds its own) must have compiled and run."""
    if request.param == "compiled":
        from gradaccum.torch._stats import _fused

        made: list[_fused.Kernels] = []
        make = _fused.Kernels.__init__

        def record(self: _fused.Kernels) -> None:
            make(self)
            made.append(self)

        monkeypatch.setattr(_fused, "FUSED_FROM", 0)
        monkeypatch.setattr(_fused.Kernels, "__init__", record)
        yield request.param
        assert made and all(k.broken is None for k in made), "the compiled kernels did not run"
        assert any(k.checked for k in made)
    else:
        yield request.param
