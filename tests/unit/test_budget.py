"""Budgets: a sweep stops at a wall-time or device-hour budget, then promotes and exports from what ran."""

import json


from lora_sweep.driver import BudgetStopper, budget_spent
from lora_sweep.folder import BUDGET_FILE


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


