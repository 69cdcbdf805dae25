"""Multi-objective sweeps: a metric and a cost searched together, the Pareto front, and the promotion rule."""

import json
import math

import optuna
import pandas as pd
import ray
import pytest

from lora_sweep.config import load_config
from lora_sweep.pipeline import run
from lora_sweep.report import write_report
from lora_sweep.results import TrialRecord, promote

pytestmark = pytest.mark.integration


def test_two_objective_sweep_promotes_from_its_pareto_front(raw_config, write_config, peft_trainable_parameters):
    raw_config["search"].update(num_trials=4, space=None, also_minimize="adapter_params",
                                parameters={"lora.rank": {"type": "choice", "values": [1, 8]},
                                            "training.learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2}})
    config = load_config(write_config(raw_config))
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

