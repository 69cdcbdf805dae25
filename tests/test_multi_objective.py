"""Multi-objective sweeps: a metric and a cost searched together, the Pareto front, and the promotion rule."""

import json
import math

import optuna
import pandas as pd
import pytest
import ray

from lora_sweep.config import load_config
from lora_sweep.pipeline import run
from lora_sweep.report import write_report
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


@pytest.mark.integration
def test_two_objective_sweep_promotes_from_its_pareto_front(raw_config, write_config, peft_trainable_parameters):
    config = config_with(raw_config, write_config, num_trials=4, space=None, also_minimize="adapter_params",
                         parameters={"lora.rank": {"type": "choice", "values": [1, 8]},
                                     "training.learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2}})
    try:
        outcome = run(config)
    finally:
        ray.shutdown()
    sweep_dir = outcome.sweep_dir
    study = optuna.load_study(study_name=config.name, storage=f"sqlite:///{sweep_dir / 'optuna_study.db'}")
    assert len(study.directions) == 2
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert finished and all(len(t.values) == 2 and t.values[1] > 0 for t in finished)

    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    # The cost is peft's own count of trainable parameters at the trial's rank.
    assert set(board["adapter_params"]) <= {peft_trainable_parameters(config.model.path, rank) for rank in (1, 8)}
    assert (board["best_step_adapter_params"] == board["adapter_params"]).all()
    front = board[board["pareto"]]
    assert len(front) >= 1
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial_id"] in set(front["trial_id"])
    records = [TrialRecord(**{**best, "trial_id": r.trial_id, "best_metric": r.best_eval_loss,
                              "best_metrics": {"adapter_params": r.adapter_params}})
               for r in board.itertuples() if isinstance(r.best_eval_loss, float) and math.isfinite(r.best_eval_loss)]
    assert promote(records, config).trial_id == best["trial_id"]  # the rule, re-applied to the leaderboard

    final = json.loads((sweep_dir / "final_metrics.json").read_text())
    assert "Pareto front of `eval_loss` (min) and `adapter_params`" in final["promotion"]
    assert "Pareto front" in (sweep_dir / "export" / "README.md").read_text()
    report = write_report(sweep_dir)
    assert "Pareto front" in {f.title for f in report.figures}, report.skipped
    assert "Optimisation history" in {f.title for f in report.figures}, report.skipped
