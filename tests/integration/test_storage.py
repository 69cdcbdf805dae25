"""A storage URI: trials keep checkpoints there and the sweep folder is mirrored there.

S3 is served by moto's server on loopback (the S3 protocol, through pyarrow's S3 filesystem,
from the driver and from Ray's worker processes alike); nothing leaves the machine.
"""

import json

import ray
import pytest

from lora_sweep.config import load_config
from lora_sweep.storage import open_storage

from conftest import s3_uri, stored_files

pytestmark = pytest.mark.integration


def test_a_sweep_with_s3_storage_keeps_checkpoints_there_and_mirrors_its_folder(raw_config, write_config, s3):
    from lora_sweep.pipeline import run
    from lora_sweep.report import write_report

    raw_config["storage"] = s3_uri(s3)
    raw_config["search"].update(num_trials=3)
    raw_config["checkpoints"] = {"keep": 1}
    config = load_config(write_config(raw_config))
    try:
        outcome = run(config)
    finally:
        ray.shutdown()
    storage = open_storage(config)
    stored = stored_files(storage)
    for name in ("config.yaml", "provenance.json", "leaderboard.csv", "best.json", "final_metrics.json",
                 "status.json", "optuna_study.db", "export/merged/model.safetensors", "export/adapter/adapter_config.json",
                 "export/README.md"):
        assert name in stored, name
    assert any(name.startswith("tensorboard/") for name in stored)
    # Checkpoints live in storage only; what survives pruning: the promoted one (keep: 1 is the best).
    checkpoints = {name.rsplit("/", 1)[0] for name in stored if "/checkpoint_" in name}
    best = json.loads((outcome.sweep_dir / "best.json").read_text())
    assert best["best_checkpoint"].startswith(storage.path("tune"))
    assert {storage.path(c) for c in checkpoints} == {best["best_checkpoint"]}
    local_tune = outcome.sweep_dir / "tune"
    assert not list(local_tune.rglob("checkpoint_*")) and len(list(local_tune.glob("*/result.json"))) == 3
    assert json.loads((outcome.sweep_dir / "status.json").read_text())["state"] == "finished"
    report = write_report(outcome.sweep_dir)
    assert "Learning curves" in {f.title for f in report.figures}

    # `sweep resume` restores Tune's experiment from storage: nothing left to run, promotion and export again.
    from lora_sweep.pipeline import resume

    try:
        again = resume(outcome.sweep_dir)
    finally:
        ray.shutdown()
    assert again.final.best.trial_id == best["trial_id"] and len(again.records) == 3

