"""mnist1d is generated offline with the package's defaults, split as docs/design.md, "Reference experiment" says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradaccum.experiments import mnist1d_data


@pytest.mark.slow
def test_generated_offline_with_reference_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mnist1d.data

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset may download: it must never be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    cache = tmp_path / "data" / "mnist1d.npz"
    data = mnist1d_data.load_mnist1d(cache)
    assert data.x_train.shape == (3200, 40) and data.x_val.shape == (800, 40) and data.x_test.shape == (1000, 40)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert set(np.unique(data.y_train)) == set(range(10))
    assert cache.exists() and not list(cache.parent.glob("*.tmp.npz"))
    again = mnist1d_data.load_mnist1d()  # regenerated, not read from the cache: same numbers (seed 42)
    cached = mnist1d_data.load_mnist1d(cache)
    for a, b, c in zip(data, again, cached):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
