"""`promotion.confirm`: the top K configurations trained again with more seeds, promoted by the mean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from lora_sweep.config import ConfigError, SweepConfig, load_config
from lora_sweep.confirm import ConfirmRun, confirm_plan, with_seed_metrics
from lora_sweep.results import TrialRecord, promote, read_best, seed_spread, sweep_totals, write_leaderboard

QUIET = {"LORA_SWEEP_TUNE_VERBOSE": "0"}


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


@pytest.mark.integration
def test_a_sweep_confirms_its_top_configurations_and_reports_mean_and_spread(raw_config, write_config, tmp_path):
    raw_config["training"].update({"max_steps": 6, "eval_steps": 3})
    raw_config["search"].update({"num_trials": 3, "max_concurrent_trials": 2})
    raw_config["promotion"] = {"confirm": {"top": 2, "seeds": 1}}
    done = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "run", str(write_config(raw_config))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **QUIET})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "results" / "tiny"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    runs = pd.read_csv(sweep_dir / "confirm.csv")
    top_two = board.sort_values("best_eval_loss").trial_id.head(2).tolist()
    assert sorted(runs["of"]) == sorted(top_two) and set(runs["seed"]) == {raw_config.get("seed", 0) + 1}
    assert (runs["status"] == "completed").all() and (runs["steps_run"] == 6).all()
    for _, row in runs.iterrows():  # another seed is another run: not a copy of the sweep's trial
        original = board.set_index("trial_id").loc[row["of"], "best_eval_loss"]
        assert row["best_eval_loss"] != pytest.approx(original, abs=1e-7)
    means = board.dropna(subset=["mean_eval_loss"]).set_index("trial_id")
    assert sorted(means.index) == sorted(top_two) and (means["seeds"] == 2).all()
    best = read_best(sweep_dir)
    assert best.trial_id == means["mean_eval_loss"].idxmin()
    assert seed_spread(best)[0] == pytest.approx(means.loc[best.trial_id, "mean_eval_loss"])
    final = json.loads((sweep_dir / "final_metrics.json").read_text())
    assert final["trial_id"] == best.trial_id and final["confirm"]["seeds"] == 2
    assert final["confirm"]["mean"] == pytest.approx(seed_spread(best)[0])
    assert final["sweep"]["confirm_runs"] == 2 and final["sweep"]["confirm_device_seconds"] > 0
    assert sweep_totals(sweep_dir)["trials"] == 3  # the confirm runs are not trials of the sweep
    card = (sweep_dir / "export" / "README.md").read_text()
    assert "Promoted by `promotion.confirm`" in card and "over 2 seeds" in card
    assert load_config(sweep_dir / "export" / "best_config.yaml").promotion.confirm is None  # one trial: nothing to confirm


@pytest.mark.integration
def test_a_driver_killed_during_the_confirm_runs_resumes_them_from_their_checkpoints(raw_config, write_config,
                                                                                     tmp_path):
    raw_config["training"].update({"max_steps": 60, "eval_steps": 6})
    raw_config["search"].update({"num_trials": 2, "max_concurrent_trials": 2})
    raw_config["scheduler"] = {"type": "none"}
    raw_config["promotion"] = {"confirm": {"top": 2, "seeds": 1}}
    sweep_dir = tmp_path / "results" / "tiny"
    confirm_dir = sweep_dir / "confirm"
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "lora_sweep.cli", "run", str(write_config(raw_config))], cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **QUIET})

    def confirm_reports() -> dict[str, list[dict]]:
        return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                for path in confirm_dir.glob("*/result.json")} if confirm_dir.is_dir() else {}

    deadline = time.monotonic() + 300
    while not any(len(rows) >= 2 for rows in confirm_reports().values()):  # a confirm run past its first checkpoint
        assert driver.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no confirm run reported twice"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    assert not (sweep_dir / "confirm.csv").exists()  # killed before the confirm step ended
    done = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "resume", str(sweep_dir)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **QUIET})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = confirm_reports()
    assert len(after) == 2  # each run once: none started twice, none lost
    for name, rows in after.items():  # no step twice, none skipped
        assert [row["step"] for row in rows] == list(range(6, 61, 6)), name
    # The run killed mid-way went on from its checkpoint (Tune's count of reports since the restore starts again).
    assert any(row["iterations_since_restore"] < row["training_iteration"] for rows in after.values() for row in rows)
    runs = pd.read_csv(sweep_dir / "confirm.csv")
    assert len(runs) == 2 and (runs["status"] == "completed").all()
    assert read_best(sweep_dir).seed_metrics and (sweep_dir / "export" / "merged").is_dir()
