"""Budgets: a sweep stops at a wall-time or device-hour budget, then promotes and exports from what ran."""

import json

import pandas as pd
import ray
import pytest

from lora_sweep.config import load_config
from lora_sweep.pipeline import run

pytestmark = pytest.mark.integration


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

