"""A sweep driven as a user drives it, in a process of its own: started, killed at a point, resumed; and what
its trials' own result files say (the crash, lost-worker and promotion tests share these)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

QUIET = {"LORA_SWEEP_TEST_HOOKS": "armed", "LORA_SWEEP_TUNE_VERBOSE": "0"}  # test hooks act only when armed


def start_sweep(config_path: Path, tmp_path: Path, stall_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, **QUIET}
    if stall_at:
        env["LORA_SWEEP_STALL_AT"] = stall_at
    log = (tmp_path / "run.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "lora_sweep.cli", "run", str(config_path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {process.returncode}) before the kill point")
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the kill point was never reached")


def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    process.send_signal(sig)
    return process.wait(timeout=120)


def resume(sweep_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_sweep.cli", "resume", str(sweep_dir)], cwd=tmp_path,
                          env={**os.environ, **QUIET}, capture_output=True, text=True, timeout=600)


def trial_histories(sweep_dir: Path) -> dict[str, list[int]]:
    """Every trial's reported steps, from Ray Tune's own per-trial result files."""
    histories = {}
    for result_file in (sweep_dir / "tune").glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if rows:
            histories[rows[0]["trial_id"]] = [row["step"] for row in rows]
    return histories


def assert_never_started_over(steps: list[int], eval_steps: int) -> None:
    """A resumed trial continues from its last checkpoint, so its reported steps never go back by more than
    one evaluation interval. One interval can repeat: a kill can land after Tune logged a result but before
    it registered that result's checkpoint, and the trial then redoes the steps since the one before."""
    assert steps[-1] == max(steps)
    for earlier, later in zip(steps, steps[1:], strict=False):
        assert later > earlier - eval_steps, steps


def drive_in_a_thread(config, checkpoints: int = 2, timeout: float = 120.0):
    """`run(config)` in a thread beside the test, which plays the failing cluster (Ray's node tools need the main
    thread); returns (thread, outcome, errors) once the sweep folder holds `checkpoints` checkpoints (on a cluster,
    results reach it when a trial ends; checkpoints at once)."""
    import threading

    from lora_sweep.pipeline import run

    outcome, errors = [], []

    def drive():
        try:
            outcome.append(run(config))
        except Exception as error:
            errors.append(error)

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    deadline = time.monotonic() + timeout
    while len(list(config.sweep_dir.glob("tune/*/checkpoint_*"))) < checkpoints:
        assert time.monotonic() < deadline and driver.is_alive(), errors
        time.sleep(0.05)
    return driver, outcome, errors
