"""Faults inside real trials of a real sweep: the sweep goes on, and the leaderboard says why."""

import json

import pandas as pd
import pytest
import ray

from lora_sweep.config import load_config
from lora_sweep.pipeline import run

pytestmark = pytest.mark.integration


@pytest.fixture
def fault_config(raw_config, write_config):
    raw_config["scheduler"] = {"type": "none"}
    raw_config["search"]["parameters"] = {"training.learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}
    raw_config["ray"] = {"num_cpus": 2}
    return raw_config, write_config


@pytest.fixture(autouse=True)
def fresh_ray():
    ray.shutdown()  # workers inherit the environment the test sets, so each test starts its own Ray
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("exception@4", "injected failure at step 4"),
        ("oom@4", "out of memory (injected at step 4)"),
        ("nan@4", "training loss became nan at step 6"),
    ],
)
def test_a_failing_trial_is_marked_errored_with_its_reason_and_the_sweep_goes_on(fault_config, monkeypatch, fault, reason):
    raw, write = fault_config
    monkeypatch.setenv("LORA_SWEEP_TEST_HOOKS", "armed")
    monkeypatch.setenv("LORA_SWEEP_INJECT_FAULT", fault)
    outcome = run(load_config(write(raw)))
    board = pd.read_csv(outcome.sweep_dir / "leaderboard.csv")
    assert len(board) == 2
    assert list(board["status"]) == ["errored", "errored"]
    assert all(reason in error for error in board["error"]), list(board["error"])
    # Each trial's evaluation before the fault is kept, so the sweep still promotes and exports one.
    assert (board["best_step"] == 3).all()
    assert (outcome.sweep_dir / "export" / "merged" / "model.safetensors").is_file()


def test_a_transient_failure_is_retried_from_the_last_checkpoint(fault_config, monkeypatch, tmp_path):
    raw, write = fault_config
    raw["failure_retries"] = 1
    monkeypatch.setenv("LORA_SWEEP_TEST_HOOKS", "armed")
    monkeypatch.setenv("LORA_SWEEP_INJECT_FAULT", "exception@4")
    monkeypatch.setenv("LORA_SWEEP_FAULT_ONCE_DIR", str(tmp_path / "failed-once"))
    outcome = run(load_config(write(raw)))
    board = pd.read_csv(outcome.sweep_dir / "leaderboard.csv")
    assert list(board["status"]) == ["completed", "completed"]
    assert len(list((tmp_path / "failed-once").iterdir())) == 2  # both trials did fail once
    for result_file in (outcome.sweep_dir / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        # Resumed after step 3's checkpoint, not started over: step 6 is the first report since the restore.
        # (Tune re-copies the trial's result.json from storage when it restarts the trial; under load that copy
        # can predate step 3's line, so the history is [3, 6] or [6], never one that starts again at 3.)
        assert [row["step"] for row in rows] in ([3, 6], [6]), rows
        assert rows[-1]["iterations_since_restore"] == 1
