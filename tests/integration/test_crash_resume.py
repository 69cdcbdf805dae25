"""A sweep process really killed (SIGKILL) or interrupted (SIGINT) at several points, then `sweep resume`.

Each case checks what must survive: finished trials are kept and not re-run, a
trial killed mid-way resumes from its checkpoint (its step history never goes
back), the Optuna study holds exactly the configured trials, all complete.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from lora_sweep.progress import read_status
from sweep_process import assert_never_started_over, kill, resume, start_sweep, trial_histories, wait_for

pytestmark = pytest.mark.integration
EVAL_STEPS = 10
NUM_TRIALS = 3
def study_states(sweep_dir: Path) -> list[str]:
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'optuna_study.db'}")
    return [trial.state.name for trial in study.trials]


def check_finished(sweep_dir: Path, before: dict[str, list[int]], result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert len(board) == NUM_TRIALS and board["trial_id"].is_unique
    assert set(board["status"]) <= {"completed", "stopped early"}
    assert study_states(sweep_dir) == ["COMPLETE"] * NUM_TRIALS  # none lost, none duplicated
    after = trial_histories(sweep_dir)
    assert len(after) == NUM_TRIALS
    for trial_id, steps in before.items():
        assert after[trial_id][: len(steps)] == steps  # what was done before the kill is kept as it was
    for steps in after.values():
        assert_never_started_over(steps, EVAL_STEPS)
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    assert json.loads((sweep_dir / "final_metrics.json").read_text())["test"]["tuned"]["examples"] > 0


@pytest.fixture
def crash_config(raw_config, write_config):
    raw_config["training"].update({"max_steps": 120, "eval_steps": EVAL_STEPS})
    raw_config["scheduler"] = {"type": "none"}  # every trial runs to the end: the resumed one too
    raw_config["search"].update({"num_trials": NUM_TRIALS, "max_concurrent_trials": 1})
    return write_config(raw_config)


def sweep_dir_of(tmp_path: Path) -> Path:
    return tmp_path / "results" / "tiny"


def test_kill_during_data_preparation(crash_config, tmp_path):
    sweep_dir = sweep_dir_of(tmp_path)
    process = start_sweep(crash_config, tmp_path, stall_at="data_preparation")
    wait_for(lambda: (sweep_dir / ".stalled-at-data_preparation").exists(), process)
    kill(process)
    assert (sweep_dir / "config.yaml").is_file() and not (sweep_dir / "provenance.json").exists()
    check_finished(sweep_dir, {}, resume(sweep_dir, tmp_path))


def test_kill_mid_trial_resumes_the_trial_from_its_checkpoint(crash_config, tmp_path):
    sweep_dir = sweep_dir_of(tmp_path)
    process = start_sweep(crash_config, tmp_path)
    # The second trial has reported at least twice: the first trial is finished, the second is mid-way.
    wait_for(lambda: sorted(len(s) for s in trial_histories(sweep_dir).values())[:1] >= [2]
             and len(trial_histories(sweep_dir)) >= 2, process)
    kill(process)
    before = trial_histories(sweep_dir)
    unfinished = [t for t, steps in before.items() if steps[-1] < 120]
    assert unfinished, "the kill came after every trial had finished"
    check_finished(sweep_dir, before, resume(sweep_dir, tmp_path))
    after = trial_histories(sweep_dir)
    for trial_id in unfinished:
        assert after[trial_id][-1] == 120 and after[trial_id][0] == 10


def test_kill_between_trials(crash_config, tmp_path):
    sweep_dir = sweep_dir_of(tmp_path)
    process = start_sweep(crash_config, tmp_path, stall_at="between_trials")
    wait_for(lambda: (sweep_dir / ".stalled-at-between_trials").exists(), process)
    # `sweep status` from another process sees the running sweep ...
    seen = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "status", str(sweep_dir), "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert seen.returncode == 0, seen.stderr
    status = json.loads(seen.stdout)
    assert status["state"] == "running" and status["counts"]["completed"] == 1 and status["num_trials"] == NUM_TRIALS
    kill(process)
    assert read_status(sweep_dir).state == "stopped"  # ... and a killed one as stopped
    before = trial_histories(sweep_dir)
    assert [steps[-1] for steps in before.values()] == [120]  # one trial done, none started after it
    check_finished(sweep_dir, before, resume(sweep_dir, tmp_path))
    after = read_status(sweep_dir)
    assert after.state == "finished" and after.ended == NUM_TRIALS and after.count("completed") == NUM_TRIALS


def test_kill_during_export_leaves_no_export_that_looks_complete(crash_config, tmp_path):
    sweep_dir = sweep_dir_of(tmp_path)
    process = start_sweep(crash_config, tmp_path, stall_at="export")
    wait_for(lambda: (sweep_dir / ".stalled-at-export").exists(), process, timeout=240)
    kill(process)
    assert not (sweep_dir / "export").exists()
    before = trial_histories(sweep_dir)
    assert len(before) == NUM_TRIALS
    check_finished(sweep_dir, before, resume(sweep_dir, tmp_path))


def test_ctrl_c_stops_with_state_saved_and_resume_finishes(crash_config, tmp_path):
    sweep_dir = sweep_dir_of(tmp_path)
    process = start_sweep(crash_config, tmp_path)
    wait_for(lambda: len(trial_histories(sweep_dir)) >= 2, process)
    code = kill(process, signal.SIGINT)
    output = (tmp_path / "run.log").read_text()
    assert code == 130, output[-2000:]
    assert f"sweep resume {sweep_dir}" in output
    assert read_status(sweep_dir).state == "stopped"
    check_finished(sweep_dir, trial_histories(sweep_dir), resume(sweep_dir, tmp_path))


def test_sigterm_stops_like_ctrl_c_a_second_driver_is_refused_and_resume_loses_nothing(raw_config, write_config,
                                                                                          tmp_path):
    # Trials long enough that a second driver's start-up (about 10 s) fits inside the sweep.
    raw_config["training"].update({"max_steps": 600, "eval_steps": EVAL_STEPS})
    raw_config["scheduler"] = {"type": "none"}
    raw_config["search"].update({"num_trials": NUM_TRIALS, "max_concurrent_trials": 1})
    sweep_dir = sweep_dir_of(tmp_path)
    process = start_sweep(write_config(raw_config), tmp_path)
    wait_for(lambda: len(trial_histories(sweep_dir)) >= 1, process)
    # While the driver lives, a second one on the same folder is refused, and `sweep status` still reads it.
    second = resume(sweep_dir, tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"another driver is running this sweep (pid {process.pid} on host" in second.stderr
    assert read_status(sweep_dir).state == "running"
    # SIGTERM during the last trial: Tune then ends every trial it has, which must not pass for the sweep's end.
    wait_for(lambda: len(trial_histories(sweep_dir)) == NUM_TRIALS, process)
    code = kill(process, signal.SIGTERM)  # what Slurm, Kubernetes and `timeout` send first
    output = (tmp_path / "run.log").read_text()
    assert code == 143, output[-2000:]
    assert f"sweep resume {sweep_dir}" in output and "Traceback" not in output
    assert read_status(sweep_dir).state == "stopped"
    assert not (sweep_dir / "export").exists()
    before = trial_histories(sweep_dir)
    unfinished = [trial for trial, steps in before.items() if steps[-1] < 600]
    assert len(before) == NUM_TRIALS and len(unfinished) == 1, before
    check_finished(sweep_dir, before, resume(sweep_dir, tmp_path))
    assert trial_histories(sweep_dir)[unfinished[0]][-1] == 600  # the stopped trial went on to its end
