"""Faults inside real trials of a real sweep: the sweep goes on, and the leaderboard says why."""

import pandas as pd
import pytest
import ray

from sweep.config import load_config
from sweep.pipeline import run
from test_crash_resume import trial_histories

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
    for steps in trial_histories(outcome.sweep_dir).values():
        assert steps == [3, 6]  # resumed after step 3's checkpoint, not started over
