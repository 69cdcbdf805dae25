"""`sweep plan`: every check, then counts; it starts no Ray and writes nothing."""

import json

import pytest
import ray
from ray.tune.schedulers import ASHAScheduler
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.safety import mark_sweep_folder
from lora_sweep.config import load_config
from lora_sweep.plan import asha_rungs, expected_steps


def test_plan_prints_space_trials_steps_disk_and_resources(raw_config, write_config, tmp_path, peft_trainable_parameters):
    raw_config["search"]["parameters"] = {"lora.rank": {"type": "choice", "values": [2, 4]}}
    raw_config["training"].update(max_steps=90, eval_steps=10)
    raw_config["scheduler"] = {"type": "asha", "grace_period": 10, "reduction_factor": 3}
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config)), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["search_space"]["lora.rank"] == "choice of [2, 4]"
    assert plan["search_space"]["training.learning_rate"].startswith("log-uniform in [")
    assert plan["num_trials"] == 2 and plan["most_training_steps"] == 180
    assert plan["asha_rungs"] == [10, 30, 90]
    # 10 each, then a third of the trials go on to 30 and a ninth to 90.
    assert plan["expected_training_steps"] == round(2 * (10 + 20 / 3 + 60 / 9))
    assert plan["examples"]["train"] > 0 and plan["resources_per_trial"] == {"cpu": 1.0, "gpu": 0.0, "workers": 1}
    assert plan["largest_adapter_parameters"] == peft_trainable_parameters(raw_config["model"]["path"], rank=4)
    assert plan["disk_bytes"]["checkpoint"] > plan["largest_adapter_parameters"] * 4
    assert not ray.is_initialized()
    assert not (tmp_path / "results").exists() and plan["sweep_dir_exists"] is False

    text = CliRunner().invoke(app, ["plan", str(write_config(raw_config))]).output
    for expected in ("lora.rank: choice of [2, 4]", "trials: 2, 2 at a time", "at most 180", "1 CPU and 0 GPU", "disk:"):
        assert expected in text
    (tmp_path / "results" / "tiny").mkdir(parents=True)
    (tmp_path / "results" / "tiny" / "leaderboard.csv").write_text("someone's own work")
    text = CliRunner().invoke(app, ["plan", str(write_config(raw_config))]).output
    assert "was not made by lora-sweep: `sweep run` refuses to write there, --overwrite included" in text
    mark_sweep_folder(tmp_path / "results" / "tiny", "tiny")  # as `sweep run` marks the folders it makes
    text = CliRunner().invoke(app, ["plan", str(write_config(raw_config))]).output
    assert "exists: `sweep run` needs --resume (continue it) or --overwrite" in text


@pytest.mark.parametrize("max_steps,grace,factor", [(480, 80, 2), (240, 40, 3), (100, 1, 4), (90, 10, 3), (50, 50, 3)])
def test_rungs_are_the_ones_ray_uses(raw_config, write_config, max_steps, grace, factor):
    raw_config["training"].update(max_steps=max_steps, eval_steps=min(10, max_steps))
    raw_config["scheduler"] = {"type": "asha", "grace_period": grace, "reduction_factor": factor}
    config = load_config(write_config(raw_config))
    ray_asha = ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=grace, reduction_factor=factor)
    assert asha_rungs(config) == sorted(int(milestone) for milestone, _ in ray_asha._brackets[0]._rungs)


def test_without_asha_every_trial_runs_to_the_end(raw_config, write_config):
    raw_config["scheduler"] = {"type": "none"}
    config = load_config(write_config(raw_config))
    assert asha_rungs(config) == [] and expected_steps(config, []) == 2 * 6


def test_plan_refuses_bad_input_like_run(raw_config, write_config):
    raw_config["model"]["path"] = "/nowhere/model"
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.exit_code == 2 and "`model.path`: folder not found: /nowhere/model" in result.output


def test_without_a_limit_plan_counts_the_trials_that_fit(raw_config, write_config):
    raw_config["search"]["num_trials"] = 10
    raw_config["search"].pop("max_concurrent_trials")
    raw_config["resources"] = {"cpu": 0.25, "gpu": 0.5}
    raw_config["ray"] = {"num_cpus": 2, "num_gpus": 3}
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config)), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["max_concurrent_trials"] == 6  # 3 GPUs / 0.5 (CPUs would fit 8)


def test_plan_shows_a_data_parallel_trials_workers_and_counts_them_all(raw_config, write_config):
    raw_config["search"]["num_trials"] = 10
    raw_config["search"].pop("max_concurrent_trials")
    raw_config["resources"] = {"cpu": 1, "workers": 2}
    raw_config["ray"] = {"num_cpus": 5}
    plan = json.loads(CliRunner().invoke(app, ["plan", str(write_config(raw_config)), "--json"]).output)
    assert plan["resources_per_trial"] == {"cpu": 1.0, "gpu": 0.0, "workers": 2}
    assert plan["max_concurrent_trials"] == 2  # 5 CPUs hold two trials of two 1-CPU workers
    text = CliRunner().invoke(app, ["plan", str(write_config(raw_config))]).output
    assert ("each trial: 2 data-parallel workers (Ray Train, DDP) of 1 CPU and 0 GPU each, 2 CPU and 0 GPU in all; "
            "the global batch is 2 x batch_size") in text


def test_plan_says_where_the_trackers_log(raw_config, write_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw_config["trackers"] = ["mlflow", "wandb"]
    raw_config["mlflow"] = {"model_name": "support-bot"}
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.exit_code == 0, result.output
    sweep_dir = (tmp_path / "results" / "tiny").resolve()
    line = next(line for line in result.output.splitlines() if line.startswith("trackers: "))
    assert line == (f"trackers: mlflow: sqlite:///{sweep_dir}/mlflow.db, experiment 'tiny', promoted model registered "
                    f"as 'support-bot'; wandb: project 'tiny', group 'tiny', offline in {sweep_dir}/wandb")
    assert json.loads(CliRunner().invoke(app, ["plan", str(write_config(raw_config)), "--json"]).output)["trackers"][1] \
        .startswith("wandb: project 'tiny'")
