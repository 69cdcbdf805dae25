"""Losing the driver's machine, not the sweep: a sweep with S3 storage (moto's server on loopback) whose driver
is killed with SIGKILL mid-trial and whose local folder is deleted, resumed from storage alone in a new folder;
`sweep status <uri>` reads the running sweep from storage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs as pafs
import pytest

from conftest import s3_uri
from lora_sweep.config import load_config
from lora_sweep.storage import open_storage
from sweep_process import QUIET, assert_never_started_over, kill, start_sweep, wait_for

pytestmark = pytest.mark.integration
EVAL_STEPS = 10
NUM_TRIALS = 3


def stored_histories(storage) -> dict[str, list[int]]:
    """Every trial's reported steps, from Tune's result files in storage."""
    histories = {}
    selector = pafs.FileSelector(storage.path("tune"), recursive=True, allow_not_found=True)
    for info in storage.filesystem.get_file_info(selector):
        if info.base_name == "result.json" and "/checkpoint_" not in info.path:
            with storage.filesystem.open_input_stream(info.path) as handle:
                rows = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
            if rows:
                histories[rows[0]["trial_id"]] = [row["step"] for row in rows]
    return histories


def stored(storage, name: str) -> bool:
    return storage.filesystem.get_file_info(storage.path(name)).type == pafs.FileType.File


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_sweep.cli", *args], cwd=cwd, env={**os.environ, **QUIET},
                          capture_output=True, text=True, timeout=600)


def test_a_sweep_survives_losing_its_driver_machine(raw_config, write_config, tmp_path, s3):
    raw_config["storage"] = s3_uri(s3)
    raw_config["training"].update({"max_steps": 120, "eval_steps": EVAL_STEPS})
    raw_config["scheduler"] = {"type": "none"}  # every trial runs to the end: the one cut off too
    raw_config["search"].update({"num_trials": NUM_TRIALS, "max_concurrent_trials": 1})
    config_path = write_config(raw_config)
    config = load_config(config_path)
    storage = open_storage(config)
    uri = s3_uri(s3).replace("/team?", "/team/tiny?")  # <storage>/<name>

    process = start_sweep(config_path, tmp_path)
    # The second trial has reported twice: the first is finished, the second mid-way.
    wait_for(lambda: len(stored_histories(storage)) >= 2
             and sorted(len(s) for s in stored_histories(storage).values())[0] >= 2, process, timeout=300)
    # While it runs, `sweep status <uri>` reads it from storage alone, from another folder (machine).
    elsewhere = tmp_path / "laptop"
    elsewhere.mkdir()
    status = cli("status", uri, "--json", cwd=elsewhere)
    assert status.returncode == 0, status.stdout + status.stderr
    seen = json.loads(status.stdout)
    assert seen["state"] == "running" and seen["name"] == "tiny"
    assert sum(t["status"] == "completed" for t in seen["trials"]) >= 1
    kill(process)

    before = stored_histories(storage)
    unfinished = [t for t, steps in before.items() if steps[-1] < 120]
    assert unfinished, "the kill came after every trial had finished"
    shutil.rmtree(tmp_path / "results")  # the driver's machine is gone, and its disk with it
    assert stored(storage, "optuna_study.db") and stored(storage, "status.json")

    result = cli("resume", uri, "--into", str(elsewhere / "runs" / "tiny"), cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = elsewhere / "runs" / "tiny"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert len(board) == NUM_TRIALS and board["trial_id"].is_unique
    assert set(board["status"]) == {"completed"}
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'optuna_study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * NUM_TRIALS  # none lost, none run twice
    after = stored_histories(storage)
    assert len(after) == NUM_TRIALS
    for trial_id, steps in before.items():
        assert after[trial_id][: len(steps)] == steps  # what ran before the kill is kept as it was
    for steps in after.values():
        assert_never_started_over(steps, EVAL_STEPS)
    for trial_id in unfinished:  # the trial cut off continued from its checkpoint, not from the start
        assert after[trial_id][-1] == 120 and after[trial_id][0] == EVAL_STEPS
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    final_status = json.loads((sweep_dir / "status.json").read_text())
    assert final_status["state"] == "finished"
    assert json.loads((sweep_dir / "provenance.json").read_text())["data_path"].startswith(str(sweep_dir.resolve()))
