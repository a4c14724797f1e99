"""A tuning trial is ranked by its value; one without a value is refused by name."""

from __future__ import annotations

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState, create_trial  # noqa: E402

from gradaccum.experiments.errors import SettingsError  # noqa: E402
from gradaccum.experiments.tuning import best_params, best_value, trial_value  # noqa: E402


def test_trial_value_refuses_a_trial_without_a_value() -> None:
    trial = create_trial(state=TrialState.FAIL)
    with pytest.raises(SettingsError, match=r"trial .* has no objective value \(state FAIL\)"):
        trial_value(trial)


def test_best_of_complete_trials_is_the_highest_value() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0)}
    for lr, value in ((0.1, 0.5), (0.2, 0.9), (0.3, 0.7), (0.4, 0.95)):
        study.add_trial(create_trial(params={"lr": lr}, distributions=dist, value=value))
    # the first three complete trials count: the fourth (better) is beyond the target
    assert best_value(study, 3) == 0.9
    assert best_params(study, 3) == {"lr": 0.2}
    assert trial_value(study.trials[3]) == 0.95
