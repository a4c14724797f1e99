"""What the per-element statistics keep between increments is theirs: no module-level cache of
tensors in the torch statistics, and two statistics never share a scratch buffer."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gradaccum.torch import PerSampleGradStats  # noqa: E402
from gradaccum.torch._stats import _blocks, _guard  # noqa: E402


def _commit_twice(stats: PerSampleGradStats, model: nn.Module) -> None:
    for seed in (0, 1):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        model(torch.randn(6, 5)).square().sum().backward()
        stats.commit()


def test_no_module_level_tensor_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """After commits through the blocks and the guard's chunks, no module of the statistics holds
    a dict or list of tensors at module level."""
    import gradaccum.torch._stats as package

    monkeypatch.setattr(_blocks, "BLOCK", 8)  # the sums of squares through the scratch buffer
    monkeypatch.setattr(_guard, "FOREACH_BELOW", 0)  # the guard's chunks through its own
    monkeypatch.setattr(_guard, "CHUNK", 4)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    stats = PerSampleGradStats(model)
    _commit_twice(stats, model)
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            held = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
            assert not any(isinstance(v, torch.Tensor) for v in held), f"{module.__name__}.{name} caches tensors"


def test_two_statistics_keep_their_own_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each statistic's buffers are its own (a second model's commit does not write into the
    first one's), and its moments equal those of a statistic that ran alone."""
    monkeypatch.setattr(_blocks, "BLOCK", 8)
    monkeypatch.setattr(_guard, "FOREACH_BELOW", 0)
    monkeypatch.setattr(_guard, "CHUNK", 4)

    def make() -> tuple[nn.Module, PerSampleGradStats]:
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        return model, PerSampleGradStats(model)

    def commit(stats: PerSampleGradStats, model: nn.Module, seed: int) -> None:
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        model(torch.randn(6, 5, dtype=torch.float64)).square().sum().backward()
        stats.commit()

    (a, stats_a), (b, stats_b), (alone, stats_alone) = make(), make(), make()
    for seed in (0, 1):
        commit(stats_a, a, seed)
        commit(stats_b, b, seed + 10)  # interleaved: a shared buffer would carry b's sums into a's
        commit(stats_alone, alone, seed)
    scratch_a, scratch_b = stats_a._statistic.scratch, stats_b._statistic.scratch
    assert scratch_a is not scratch_b and scratch_a._buffers
    shared = {t.data_ptr() for t in scratch_a._buffers.values()} & {t.data_ptr() for t in scratch_b._buffers.values()}
    assert not shared
    for m, want in zip(stats_a._statistic.moments(), stats_alone._statistic.moments()):
        assert m.n == want.n
        torch.testing.assert_close(m.mean, want.mean, rtol=0, atol=0)
        torch.testing.assert_close(m.m2, want.m2, rtol=0, atol=0)
