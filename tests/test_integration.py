"""A real Ray Tune sweep end to end on a tiny model: trials, leaderboard, promotion, final metrics, export."""

import json
import math

import pandas as pd
import pytest
import ray
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sweep.cli import app
from sweep.config import load_config
from sweep.pipeline import run

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

    runs = sorted(p for p in (sweep_dir / "tensorboard").iterdir())
    assert len(runs) == 2
    for run_dir in runs:
        events = EventAccumulator(str(run_dir)).Reload()
        assert {"eval_loss", "train_loss", "hparam/best_eval_loss"} <= set(events.Tags()["scalars"])
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert "training.learning_rate" in start.session_start_info.hparams
        assert "_hparams_/experiment" in content

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

    # A failed verification fails loudly and leaves the earlier, verified export in place.
    card_before = (export / "README.md").read_text()
    monkeypatch.setattr("sweep.export.max_logit_difference", lambda *args: 1.0)
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


def test_existing_sweep_folder_needs_overwrite(raw_config, write_config, tmp_path):
    (tmp_path / "results" / "tiny").mkdir(parents=True)
    (tmp_path / "results" / "tiny" / "leaderboard.csv").write_text("finished work")
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "results" / "tiny" / "leaderboard.csv").read_text() == "finished work"
