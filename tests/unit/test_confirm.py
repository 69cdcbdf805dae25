"""`promotion.confirm`: the top K configurations trained again with more seeds, promoted by the mean."""

from __future__ import annotations


import pandas as pd
import pytest

from lora_sweep.config import ConfigError, SweepConfig, load_config
from lora_sweep.confirm import ConfirmRun, confirm_plan, with_seed_metrics
from lora_sweep.results import TrialRecord, promote, seed_spread, write_leaderboard



def record(trial_id: str, metric: float, params: dict | None = None) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, status="completed", params=params or {"training.learning_rate": 1e-3},
                       best_metric=metric, best_step=10, steps_run=10, wall_seconds=1.0,
                       best_checkpoint=f"/ckpt/{trial_id}")


def run(of: str, seed: int, metric: float | None) -> ConfirmRun:
    r = record(f"{of}-s{seed}", metric if metric is not None else 0.0)
    if metric is None:
        r.best_metric, r.status, r.error = None, "errored", "RuntimeError: boom"
    return ConfirmRun(of=of, seed=seed, record=r)


def config_with(raw_config: dict, **promotion) -> SweepConfig:
    return SweepConfig.model_validate({**raw_config, "promotion": promotion})


def test_the_plan_is_the_top_k_trials_with_each_extra_seed(raw_config):
    raw_config["seed"] = 7
    config = config_with(raw_config, confirm={"top": 2, "seeds": 2})
    records = [record("a", 2.0, {"training.learning_rate": 1e-4}), record("b", 1.0, {"training.learning_rate": 2e-4}),
               record("c", 1.5, {"training.learning_rate": 3e-4}), record("d", 0.5)]
    records[3].best_checkpoint = None  # nothing to promote: never confirmed either
    plan = confirm_plan(records, config)
    assert [(p["of"], p["seed"]) for p in plan] == [("b", 8), ("b", 9), ("c", 8), ("c", 9)]
    assert plan[0]["params"] == {"training.learning_rate": 2e-4}
    assert confirm_plan(records, config_with(raw_config)) == []  # off by default


def test_promotion_goes_to_the_best_mean_not_the_best_single_run(raw_config, tmp_path):
    config = config_with(raw_config, confirm={"top": 2, "seeds": 2})
    records = [record("lucky", 1.0), record("steady", 1.1), record("third", 1.3)]
    runs = [run("lucky", 1, 1.4), run("lucky", 2, 1.3), run("steady", 1, 1.05), run("steady", 2, None)]
    confirmed = with_seed_metrics(records, runs, config)
    assert confirmed[0].seed_metrics == {"0": 1.0, "1": 1.4, "2": 1.3}
    assert confirmed[1].seed_metrics == {"0": 1.1, "1": 1.05}  # the errored run adds nothing
    assert confirmed[2].seed_metrics == {}
    assert promote(records, config).trial_id == "lucky"  # without the runs: the best single run
    best = promote(confirmed, config)
    assert best.trial_id == "steady"
    mean, std, count = seed_spread(best)
    assert (mean, count) == (pytest.approx(1.075), 2) and std == pytest.approx(0.0353553, abs=1e-6)
    write_leaderboard(confirmed, tmp_path, config)
    board = pd.read_csv(tmp_path / "leaderboard.csv").set_index("trial_id")
    assert board.loc["steady", "mean_eval_loss"] == pytest.approx(1.075) and board.loc["steady", "seeds"] == 2
    assert pd.isna(board.loc["third", "mean_eval_loss"])


def test_the_mean_is_maximised_for_a_metric_to_maximise(raw_config):
    raw_config["search"].update({"metric": "eval_perplexity", "mode": "max"})
    config = config_with(raw_config, confirm={"top": 2, "seeds": 1})
    records = [record("high", 9.0), record("steady", 8.0)]
    confirmed = with_seed_metrics(records, [run("high", 1, 5.0), run("steady", 1, 8.5)], config)
    assert promote(confirmed, config).trial_id == "steady"


@pytest.mark.parametrize("promotion, expected", [
    ({"confirm": {"top": 9, "seeds": 1}}, "promotion.confirm.top must be <= search.num_trials (4), but got 9"),
    ({"confirm": {"top": 0}}, "promotion.confirm.top"),
    ({"confirm": {"top": 2, "seeds": 0}}, "promotion.confirm.seeds"),
    ({"confirm": {"top": 2, "sedes": 1}}, "promotion.confirm.sedes"),
])
def test_bad_confirm_settings_are_refused_naming_the_field(raw_config, write_config, promotion, expected):
    raw_config["search"]["num_trials"] = 4
    raw_config["promotion"] = promotion
    with pytest.raises(ConfigError) as error:
        load_config(write_config(raw_config))
    assert expected in str(error.value)


def test_confirm_with_two_objectives_is_refused(raw_config, write_config):
    raw_config["search"]["also_minimize"] = "adapter_params"
    raw_config["promotion"] = {"confirm": {"top": 1, "seeds": 1}}
    with pytest.raises(ConfigError, match="promotion.confirm averages `eval_loss` over seeds"):
        load_config(write_config(raw_config))




