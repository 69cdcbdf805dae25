"""Multi-objective sweeps: a metric and a cost searched together, the Pareto front, and the promotion rule."""


import pytest

from lora_sweep.config import load_config
from lora_sweep.results import TrialRecord, pareto_front, promote


def config_with(raw_config, write_config, **search):
    raw_config["search"].update(search)
    return load_config(write_config(raw_config))


def trial(trial_id: str, loss: float, params: int, checkpoint: bool = True) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, status="completed", params={}, best_metric=loss, best_step=3, steps_run=6,
                       wall_seconds=1.0, best_checkpoint="ckpt" if checkpoint else None,
                       best_metrics={"eval_loss": loss, "adapter_params": params}, adapter_params=params)


TRIALS = [trial("big_best", 2.00, 4000), trial("mid", 2.01, 1000), trial("small", 2.30, 250),
          trial("dominated", 2.10, 2000), trial("same_cost_worse", 2.05, 1000)]


def test_front_holds_the_trials_nothing_beats_on_both(raw_config, write_config):
    config = config_with(raw_config, write_config, also_minimize="adapter_params")
    assert [r.trial_id for r in pareto_front(TRIALS, config)] == ["big_best", "mid", "small"]


def test_promotion_takes_the_cheapest_within_tolerance_of_the_best(raw_config, write_config):
    config = config_with(raw_config, write_config, also_minimize="adapter_params", pareto_tolerance=0.01)
    assert promote(TRIALS, config).trial_id == "mid"  # 2.01 is within 1% of 2.00, at a quarter of the size
    config = config_with(raw_config, write_config, also_minimize="adapter_params", pareto_tolerance=0.0)
    assert promote(TRIALS, config).trial_id == "big_best"
    config = config_with(raw_config, write_config, also_minimize="adapter_params", pareto_tolerance=0.2)
    assert promote(TRIALS, config).trial_id == "small"
    # Only trials with a checkpoint can be promoted.
    no_checkpoint = [trial("mid", 2.01, 1000, checkpoint=False) if r.trial_id == "mid" else r for r in TRIALS]
    config = config_with(raw_config, write_config, also_minimize="adapter_params", pareto_tolerance=0.03)
    assert promote(no_checkpoint, config).trial_id == "same_cost_worse"


def test_single_objective_promotion_is_unchanged(raw_config, write_config):
    config = config_with(raw_config, write_config)
    assert promote(TRIALS, config).trial_id == "big_best"
    config = config_with(raw_config, write_config, mode="max")
    assert promote(TRIALS, config).trial_id == "small"


def test_unknown_cost_is_refused_with_the_choices(raw_config, write_config):
    with pytest.raises(Exception, match=r"search.also_minimize.*'adapter_params' or 'eval_ms_per_example'"):
        config_with(raw_config, write_config, also_minimize="latency")


