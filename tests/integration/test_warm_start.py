"""Warm start: an earlier sweep's best configs run first in a new sweep."""

import optuna
import ray
import pytest

from lora_sweep.pipeline import run

from conftest import new_sweep

pytestmark = pytest.mark.integration


def test_seeded_sweep_runs_the_earlier_best_first(raw_config, write_config, earlier_sweep):
    config, _ = new_sweep(raw_config, write_config, earlier_sweep, top=2)
    config = config.model_copy(update={"search": config.search.model_copy(update={"max_concurrent_trials": 1})})
    try:
        run(config)
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=config.name, storage=f"sqlite:///{config.sweep_dir / 'optuna_study.db'}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 4
    assert [t.params for t in trials[:2]] == [{"training.learning_rate": 3e-3, "lora.rank": 4},
                                              {"training.learning_rate": 1e-3, "lora.rank": 4}]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

