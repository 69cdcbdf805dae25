"""`promotion.confirm`: the top K configurations trained again with more seeds, promoted by the mean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from lora_sweep.config import load_config
from lora_sweep.results import read_best, seed_spread, sweep_totals

pytestmark = pytest.mark.integration


QUIET = {"LORA_SWEEP_TUNE_VERBOSE": "0"}


def test_a_sweep_confirms_its_top_configurations_and_reports_mean_and_spread(raw_config, write_config, tmp_path):
    raw_config["training"].update({"max_steps": 6, "eval_steps": 3})
    raw_config["search"].update({"num_trials": 3, "max_concurrent_trials": 2})
    raw_config["promotion"] = {"confirm": {"top": 2, "seeds": 1}}
    done = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "run", str(write_config(raw_config))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **QUIET})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = tmp_path / "results" / "tiny"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    runs = pd.read_csv(sweep_dir / "confirm.csv")
    top_two = board.sort_values("best_eval_loss").trial_id.head(2).tolist()
    assert sorted(runs["of"]) == sorted(top_two) and set(runs["seed"]) == {raw_config.get("seed", 0) + 1}
    assert (runs["status"] == "completed").all() and (runs["steps_run"] == 6).all()
    for _, row in runs.iterrows():  # another seed is another run: not a copy of the sweep's trial
        original = board.set_index("trial_id").loc[row["of"], "best_eval_loss"]
        assert row["best_eval_loss"] != pytest.approx(original, abs=1e-7)
    means = board.dropna(subset=["mean_eval_loss"]).set_index("trial_id")
    assert sorted(means.index) == sorted(top_two) and (means["seeds"] == 2).all()
    best = read_best(sweep_dir)
    assert best.trial_id == means["mean_eval_loss"].idxmin()
    assert seed_spread(best)[0] == pytest.approx(means.loc[best.trial_id, "mean_eval_loss"])
    final = json.loads((sweep_dir / "final_metrics.json").read_text())
    assert final["trial_id"] == best.trial_id and final["confirm"]["seeds"] == 2
    assert final["confirm"]["mean"] == pytest.approx(seed_spread(best)[0])
    assert final["sweep"]["confirm_runs"] == 2 and final["sweep"]["confirm_device_seconds"] > 0
    assert sweep_totals(sweep_dir)["trials"] == 3  # the confirm runs are not trials of the sweep
    card = (sweep_dir / "export" / "README.md").read_text()
    assert "Promoted by `promotion.confirm`" in card and "over 2 seeds" in card
    assert load_config(sweep_dir / "export" / "best_config.yaml").promotion.confirm is None  # one trial: nothing to confirm


def test_a_driver_killed_during_the_confirm_runs_resumes_them_from_their_checkpoints(raw_config, write_config,
                                                                                     tmp_path):
    raw_config["training"].update({"max_steps": 60, "eval_steps": 6})
    raw_config["search"].update({"num_trials": 2, "max_concurrent_trials": 2})
    raw_config["scheduler"] = {"type": "none"}
    raw_config["promotion"] = {"confirm": {"top": 2, "seeds": 1}}
    sweep_dir = tmp_path / "results" / "tiny"
    confirm_dir = sweep_dir / "confirm"
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "lora_sweep.cli", "run", str(write_config(raw_config))], cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **QUIET})

    def confirm_reports() -> dict[str, list[dict]]:
        return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                for path in confirm_dir.glob("*/result.json")} if confirm_dir.is_dir() else {}

    deadline = time.monotonic() + 300
    while not any(len(rows) >= 2 for rows in confirm_reports().values()):  # a confirm run past its first checkpoint
        assert driver.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no confirm run reported twice"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    assert not (sweep_dir / "confirm.csv").exists()  # killed before the confirm step ended
    done = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "resume", str(sweep_dir)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **QUIET})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = confirm_reports()
    assert len(after) == 2  # each run once: none started twice, none lost
    for name, rows in after.items():  # no step twice, none skipped
        assert [row["step"] for row in rows] == list(range(6, 61, 6)), name
    # The run killed mid-way went on from its checkpoint (Tune's count of reports since the restore starts again).
    assert any(row["iterations_since_restore"] < row["training_iteration"] for rows in after.values() for row in rows)
    runs = pd.read_csv(sweep_dir / "confirm.csv")
    assert len(runs) == 2 and (runs["status"] == "completed").all()
    assert read_best(sweep_dir).seed_metrics and (sweep_dir / "export" / "merged").is_dir()

