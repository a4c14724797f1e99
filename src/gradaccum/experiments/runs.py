"""One training run of one arm on mnist1d: the unit that tuning and the final seeds repeat."""

from __future__ import annotations

from .config import ExperimentConfig
from .errors import SettingsError
from .mnist1d_data import MNIST1D
from .run_record import RunResult


def train_run(arm: str, params: dict[str, float], seed: int, data: MNIST1D, cfg: ExperimentConfig) -> RunResult:
    """Train the reference MLP with Adam for ``cfg.budget`` samples on ``cfg.backend``."""
    if cfg.backend == "jax":
        try:
            from .trainer_jax import train_jax  # jax is an optional extra
        except ImportError as error:
            raise SettingsError(f"backend: 'jax' needs the jax extra (pip install 'gradaccum[jax]'): {error}") from None
        return RunResult.of(arm, params, seed, train_jax(arm, params, seed, data, cfg))
    from .trainer_torch import train_torch

    return RunResult.of(arm, params, seed, train_torch(arm, params, seed, data, cfg))
