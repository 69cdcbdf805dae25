"""The final evaluation and export, run on a real trial's checkpoint without Ray."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_sweep import export
from lora_sweep.config import load_config
from lora_sweep.data import prepare_data
from lora_sweep.results import TrialRecord
from lora_sweep.storage import SweepFolder
from lora_sweep.models import load_tokenizer
from lora_sweep.recipe import ListReporter, run_trial


@pytest.fixture
def trained(raw_config, write_config, tmp_path):
    """A sweep folder with one trial's checkpoint at step 6, as promotion leaves it."""
    return train_one(raw_config, write_config, tmp_path)


def train_one(raw_config, write_config, tmp_path):
    config = load_config(write_config(raw_config))
    config.sweep_dir.mkdir(parents=True)
    data = prepare_data(config.data, load_tokenizer(config), config.seed, config.sweep_dir / "data")
    params = {"training.learning_rate": 1e-2}
    run_trial(params, config.model_dump(), str(data.path), ListReporter(keep_checkpoints_in=tmp_path / "checkpoints"))
    best = TrialRecord(trial_id="t0", status="completed", params=params, best_metric=1.0, best_step=6, steps_run=6,
                       wall_seconds=1.0, best_checkpoint=str(tmp_path / "checkpoints" / "step-6"))
    return config, best, data.path


def exported_logits(config) -> torch.Tensor:
    merged = AutoModelForCausalLM.from_pretrained(config.sweep_dir / "export" / "merged")
    return merged(input_ids=torch.tensor([[0, 5, 6, 7]])).logits


def test_export_on_a_machine_with_two_gpus_merges_a_fresh_cpu_copy(trained, monkeypatch):
    """Where the driver has several GPUs the evaluation base is spread over them (device_map="auto"), and the
    merge takes a fresh CPU copy instead of moving the spread model. Here the GPUs are pretended: every base
    loads on the CPU, and the export must equal the one made the plain way."""
    config, best, data_path = trained
    export.finalize(SweepFolder.of(config), config, best, data_path, {})
    plain = exported_logits(config)

    spread_requests = []
    real_load = export.load_base_model

    def load_on_the_cpu(trial_config, for_trial=False, spread_over_gpus=False):
        spread_requests.append(spread_over_gpus)
        return real_load(trial_config)

    monkeypatch.setattr(export, "visible_gpus", lambda: 2)
    monkeypatch.setattr(export, "load_base_model", load_on_the_cpu)
    final = export.finalize(SweepFolder.of(config), config, best, data_path, {})
    # The evaluation base spread over both GPUs; a fresh CPU copy for the merge; one for the verification.
    assert spread_requests == [True, False, False]
    assert final.max_logit_difference <= 1e-4
    assert torch.allclose(exported_logits(config), plain, atol=1e-5)
    assert json.loads((config.sweep_dir / "final_metrics.json").read_text())["trial_id"] == "t0"


def test_a_full_disk_during_export_leaves_the_previous_export_and_no_partial_one(trained, monkeypatch):
    import errno

    config, best, data_path = trained
    export.finalize(SweepFolder.of(config), config, best, data_path, {})
    before = {p.relative_to(config.sweep_dir): p.read_bytes() for p in (config.sweep_dir / "export").rglob("*")
              if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(config.sweep_dir / ".export.tmp" / "merged"))

    monkeypatch.setattr(export, "config_to_yaml", disk_full)  # the last file the export writes
    with pytest.raises(OSError) as caught:
        export.finalize(SweepFolder.of(config), config, best, data_path, {})
    assert caught.value.errno == errno.ENOSPC
    after = {p.relative_to(config.sweep_dir): p.read_bytes() for p in (config.sweep_dir / "export").rglob("*")
             if p.is_file()}
    assert after == before  # the previous export, byte for byte
    assert not [p for p in config.sweep_dir.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_a_full_disk_ends_in_one_line_and_exit_1(monkeypatch, raw_config, write_config):
    import errno

    from typer.testing import CliRunner

    from lora_sweep import pipeline
    from lora_sweep.cli import app

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/tiny/export")

    monkeypatch.setattr(pipeline, "run", disk_full)
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: the disk is full (No space left on device: /results/tiny/export); what was finished is kept: free "
        "some space, then `sweep resume` (or `sweep export`) the sweep folder"]


def test_the_final_evaluation_scores_every_task_metric_with_a_paired_interval(trained):
    config, best, data_path = trained
    config = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"metrics": ["exact_match", "token_f1", "rouge_l", "chrf"]})})
    final = export.finalize(SweepFolder.of(config), config, best, data_path, {})
    written = json.loads((config.sweep_dir / "final_metrics.json").read_text())
    assert list(written["task_metrics"]) == ["exact_match", "token_f1", "rouge_l", "chrf"]
    for name, d in written["task_metrics"].items():
        assert d["base"] == pytest.approx(written["test"]["base"]["metrics"][name])
        assert d["tuned"] == pytest.approx(written["test"]["tuned"]["metrics"][name])
        assert d["difference"] == pytest.approx(d["tuned"] - d["base"])
        assert d["low"] <= d["difference"] <= d["high"] and d["resamples"] == 1000
    assert written["test"]["tuned"]["metrics"]["exact_match"] == pytest.approx(final.tuned.exact_match)
    assert "completions" not in written["test"]["tuned"]  # the answers stay out of the file
    card = (config.sweep_dir / "export" / "README.md").read_text()
    assert "| task metric (test, greedy answers) | base | tuned | tuned - base [95% interval] |" in card
    assert "| rouge_l |" in card and "paired bootstrap" in card


def test_text_data_is_evaluated_on_loss_alone(raw_config, write_config, tmp_path):
    """Text data has no prompts: the final evaluation scores the loss, answers nothing and says so (n/a), where
    generating from the BOS token alone would compare a continuation of nothing with a whole document."""
    rows = [{"text": f"Line {i}: the number after {i} is {i + 1}."} for i in range(40)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw_config["data"]["files"] = [str(tmp_path / "text.jsonl")]
    raw_config["evaluation"] = {"metrics": ["exact_match", "rouge_l"]}
    config, best, data_path = train_one(raw_config, write_config, tmp_path)
    final = export.finalize(SweepFolder.of(config), config, best, data_path, {"data_format": "text"})
    assert final.tuned.exact_match is None and final.base.exact_match is None
    assert final.tuned.examples == 4 and final.tuned.response_tokens > 0 and final.tuned.loss < final.base.loss
    written = json.loads((config.sweep_dir / "final_metrics.json").read_text())
    assert written["task_metrics"] == {} and written["test"]["tuned"]["metrics"] == {}
    assert written["test"]["tuned"]["exact_match"] is None and written["test"]["tuned"]["samples"] == []
    card = (config.sweep_dir / "export" / "README.md").read_text()
    assert f"| test | tuned | {final.tuned.loss:.4f} | {final.tuned.perplexity:.3f} | n/a |" in card
    assert "task metric (test" not in card
