"""Budgets: a sweep stops at a wall-time or device-hour budget, then promotes and exports from what ran."""

import json

import pandas as pd
import pytest
import ray

from lora_sweep.config import load_config
from lora_sweep.driver import BudgetStopper, budget_spent
from lora_sweep.folder import BUDGET_FILE
from lora_sweep.pipeline import run


def test_device_budget_counts_each_trials_time_times_its_devices(tmp_path):
    stopper = BudgetStopper(tmp_path, wall_hours=None, device_hours=10 / 3600, devices_per_trial=0.5)
    stopper("a", {"time_total_s": 8.0})
    stopper("b", {"time_total_s": 11.0})
    assert not stopper.stop_all()  # (8 + 11) * 0.5 = 9.5 device-seconds of 10
    stopper("a", {"time_total_s": 9.0})  # a trial's latest time replaces its earlier one
    assert stopper.stop_all() and budget_spent(tmp_path) == "device budget of 0.00277778 device-hours spent"
    assert json.loads((tmp_path / BUDGET_FILE).read_text())["device_seconds"] == 10.0


def test_wall_budget_counts_from_the_first_check(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("lora_sweep.driver.time.time", lambda: now[0])
    stopper = BudgetStopper(tmp_path, wall_hours=1.0, device_hours=None, devices_per_trial=1.0)
    assert not stopper.stop_all()
    now[0] += 3599
    assert not stopper.stop_all()
    now[0] += 1
    assert stopper.stop_all() and budget_spent(tmp_path) == "wall-time budget of 1 hours spent"


def test_no_budget_no_file(tmp_path):
    assert budget_spent(tmp_path) is None


@pytest.mark.integration
def test_a_sweep_that_spends_its_budget_ends_early_and_still_exports(raw_config, write_config):
    raw_config["training"].update({"max_steps": 400, "eval_steps": 20})
    raw_config["search"].update({"num_trials": 6, "max_concurrent_trials": 2})
    raw_config["scheduler"] = {"type": "none"}
    raw_config["budget"] = {"device_hours": 6 / 3600}  # 6 device-seconds: a trial of 400 steps alone takes more
    try:
        outcome = run(load_config(write_config(raw_config)))
    finally:
        ray.shutdown()
    board = pd.read_csv(outcome.sweep_dir / "leaderboard.csv")
    assert len(board) < 6 and (board["steps_run"] < 400).any()
    assert board["device_seconds"].sum() >= 6 and (board["tokens_seen"] > 0).all()
    final = json.loads((outcome.sweep_dir / "final_metrics.json").read_text())
    assert final["sweep"]["budget_spent"].startswith("device budget of")
    assert final["sweep"]["trials"] == len(board) and final["sweep"]["tokens_seen"] == board["tokens_seen"].sum()
    card = (outcome.sweep_dir / "export" / "README.md").read_text()
    assert "The sweep ended early: device budget of" in card and "device-seconds" in card
