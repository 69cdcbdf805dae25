"""A real Ray Tune sweep end to end on a tiny model: trials, leaderboard, promotion, final metrics, export."""

import json
import math

import optuna
import pandas as pd
import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import load_config
from lora_sweep.pipeline import run

pytestmark = pytest.mark.integration


@pytest.fixture
def ray_session():
    yield
    ray.shutdown()


def test_two_trial_sweep_end_to_end(raw_config, write_config, ray_session, monkeypatch):
    raw_config["search"]["parameters"] = {"training.learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    config = load_config(write_config(raw_config))
    outcome = run(config)
    sweep_dir = outcome.sweep_dir

    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert len(board) == 2
    assert set(board["status"]) <= {"completed", "stopped early"}
    assert {"trial_id", "param:training.learning_rate", "best_eval_loss", "best_step", "steps_run", "wall_seconds"} <= set(board)
    assert board["best_eval_loss"].is_monotonic_increasing  # best first
    assert (board["steps_run"] >= 3).all()

    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial_id"] == board["trial_id"].iloc[0]
    assert best["best_metric"] == pytest.approx(board["best_eval_loss"].iloc[0])

    final = json.loads((sweep_dir / "final_metrics.json").read_text())
    for model in ("base", "tuned"):
        metrics = final["test"][model]
        assert math.isfinite(metrics["loss"]) and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["examples"] > 0
    assert final["test"]["tuned"]["loss"] != final["test"]["base"]["loss"]

    export = sweep_dir / "export"
    assert (export / "adapter" / "adapter_model.safetensors").is_file()
    assert (export / "merged" / "model.safetensors").is_file()
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pt"))
    merged = AutoModelForCausalLM.from_pretrained(export / "merged")
    assert merged(input_ids=torch.tensor([[0, 5, 6]])).logits.shape[-1] == 259
    card = (export / "README.md").read_text()
    for expected in (best["trial_id"], "data hash", "git SHA", "torch", "exact match", "logits differ by at most"):
        assert expected in card
    rerun = load_config(export / "best_config.yaml")
    assert rerun.search.num_trials == 1 and rerun.search.space is None and rerun.scheduler.type == "none"
    assert rerun.training.learning_rate == pytest.approx(best["params"]["training.learning_rate"])

    assert (sweep_dir / "optuna_study.db").is_file()
    provenance = json.loads((sweep_dir / "provenance.json").read_text())
    assert provenance["seed"] == 0 and provenance["data_hash"] and provenance["packages"]["ray"]

    # TensorBoard, read back with its own reader: one run per trial, named by trial id and key params,
    # with its scalars and an HParams session holding its params, status and best metric.
    runs = {p.name: p for p in (sweep_dir / "tensorboard").iterdir()}
    assert len(runs) == 2
    for _, row in board.iterrows():
        name = next(n for n in runs if n.startswith(row["trial_id"]))
        assert f"lr={row['param:training.learning_rate']:.2g}" in name
        events = EventAccumulator(str(runs[name])).Reload()
        assert {"eval_loss", "train_loss", "learning_rate", "eval_ms_per_example", "hparam/best_eval_loss",
                "hparam/adapter_params"} <= set(events.Tags()["scalars"])
        assert events.Scalars("hparam/adapter_params")[-1].value == row["adapter_params"]
        assert [e.step for e in events.Scalars("eval_loss")] == list(range(3, int(row["steps_run"]) + 1, 3))
        assert events.Scalars("hparam/best_eval_loss")[-1].value == pytest.approx(row["best_eval_loss"], rel=1e-6)
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["training.learning_rate"].number_value == pytest.approx(
            row["param:training.learning_rate"])
        assert start.session_start_info.hparams["status"].string_value == row["status"]
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert {m.name.tag for m in experiment.metric_infos} >= {"hparam/best_eval_loss", "hparam/steps_run"}
        assert "_hparams_/session_end_info" in content

    # The Optuna study that optuna-dashboard opens: every trial with its params, value and intermediate
    # values by training step.
    study = optuna.load_study(study_name=config.name, storage=f"sqlite:///{sweep_dir / 'optuna_study.db'}")
    assert len(study.trials) == 2
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE and math.isfinite(trial.value)
        assert set(trial.params) == {"training.learning_rate"}
        assert sorted(trial.intermediate_values)[0] == 3 and all(s % 3 == 0 for s in trial.intermediate_values)
        assert trial.value == trial.intermediate_values[max(trial.intermediate_values)]

    status = json.loads((sweep_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["ended"] == 2 and status["best"]["trial_id"] == best["trial_id"]

    result = CliRunner().invoke(app, ["best", str(sweep_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["trial_id"] == best["trial_id"]

    result = CliRunner().invoke(app, ["export", str(sweep_dir)])
    assert result.exit_code == 0, result.output
    assert (export / "merged" / "model.safetensors").is_file()

    # --resume on a finished sweep runs no trial again and re-does promotion and export.
    histories_before = sorted(p.read_text() for p in sweep_dir.glob("tune/*/result.json"))
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config)), "--resume"])
    assert result.exit_code == 0, result.output
    assert sorted(p.read_text() for p in sweep_dir.glob("tune/*/result.json")) == histories_before
    assert json.loads((sweep_dir / "best.json").read_text())["trial_id"] == best["trial_id"]
    assert "sweep tiny: finished | 0 running, " in result.output  # the live view's last line (not a terminal here)
    assert (sweep_dir / "logs" / "ray.log").is_file()  # Ray's and Tune's output went here

    # A failed verification fails loudly and leaves the earlier, verified export in place.
    card_before = (export / "README.md").read_text()
    monkeypatch.setattr("lora_sweep.export.max_logit_difference", lambda *args: 1.0)
    result = CliRunner().invoke(app, ["export", str(sweep_dir)])
    assert result.exit_code == 1 and "differ by 1.000e+00" in result.output
    assert (export / "README.md").read_text() == card_before


def test_bad_config_exits_2_before_anything_is_written(raw_config, write_config, tmp_path):
    raw_config["training"]["learning_rate"] = -1
    raw_config["search"]["parameters"] = {"training.learning_rate": {"type": "loguniform", "low": 0, "high": 1}}
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert result.exit_code == 2
    assert "`training.learning_rate`" in result.output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_export_a_plain_lora_that_applies_to_the_original_base(raw_config, write_config, ray_session,
                                                                               tiny_model_dir, init):
    import peft

    raw_config["lora"] = {"init": init, "rank": 4}
    raw_config["search"].update(num_trials=1, parameters={
        "training.learning_rate": {"type": "loguniform", "low": 1e-2, "high": 1e-2}})
    outcome = run(load_config(write_config(raw_config)))
    export = outcome.sweep_dir / "export"
    adapter_config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["init_lora_weights"] is True  # converted: rank 2r, plain init
    assert f"trained with `{init}` init and saved converted to a plain LoRA of rank 8" in (export / "README.md").read_text()

    # On the unmodified base, as a user loads it, the adapter gives the merged model's logits and the tuned
    # model's behaviour (not the base's).
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = original(input_ids=ids).logits
    tuned = peft.PeftModel.from_pretrained(original, export / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(export / "merged")
    assert torch.allclose(tuned(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    assert not torch.allclose(base_logits, merged(input_ids=ids).logits, atol=1e-3)
    final = json.loads((outcome.sweep_dir / "final_metrics.json").read_text())
    assert final["test"]["tuned"]["loss"] < final["test"]["base"]["loss"]
