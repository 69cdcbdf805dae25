"""Live progress: status.json from Tune's callback events, the table, ETA, a killed driver, the output redirect."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.folder import STATUS_FILE
from lora_sweep.progress import ProgressCallback, mark_state, read_status, render

REPO = Path(__file__).resolve().parents[2]


def trial(trial_id: str, lr: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"training.learning_rate": lr})


@pytest.fixture
def callback(tmp_path):
    progress = ProgressCallback(tmp_path, "demo", "eval_loss", "min", num_trials=4, max_concurrent=2, max_steps=100,
                                min_interval=0.0)
    progress.setup()
    return progress


def test_callback_events_give_counts_best_and_statuses(callback, tmp_path):
    a, b, c = trial("a", 1e-3), trial("b", 1e-2), trial("c", 1e-4)
    for t in (a, b):
        callback.on_trial_start(0, [], t)
    callback.on_trial_result(0, [], a, {"step": 50, "eval_loss": 2.5})
    callback.on_trial_result(0, [], b, {"step": 50, "eval_loss": 3.0})
    callback.on_trial_result(0, [], a, {"step": 100, "eval_loss": 2.7})  # got worse: best stays 2.5 at 50
    callback.on_trial_complete(0, [], a)
    callback.on_trial_complete(0, [], b)  # ASHA stop: ended before max_steps
    callback.on_trial_start(0, [], c)
    callback.on_trial_result(0, [], c, {"step": 10, "eval_loss": float("inf"), "diverged": True})
    callback.on_trial_complete(0, [], c)
    callback.on_step_end(0, [])

    status = read_status(tmp_path)
    assert status.state == "running"
    assert [(t.trial_id, t.status) for t in status.trials] == [("a", "completed"), ("b", "stopped early"), ("c", "errored")]
    assert status.best.trial_id == "a" and status.best.best_metric == 2.5 and status.best.best_step == 50
    data = json.loads((tmp_path / STATUS_FILE).read_text())
    assert data["counts"] == {"running": 0, "completed": 1, "stopped early": 1, "errored": 1}
    assert data["best"]["trial_id"] == "a"


def test_eta_counts_running_and_unstarted_trials(callback, tmp_path):
    a = trial("a", 1e-3)
    callback.on_trial_start(0, [], a)
    assert read_status(tmp_path).eta_seconds() is None  # nothing has ended yet: no estimate
    callback.status.trials[0].started_at -= 40.0  # it took 40 s
    callback.on_trial_result(0, [], a, {"step": 100, "eval_loss": 2.0})
    callback.on_trial_complete(0, [], a)
    b = trial("b", 1e-2)
    callback.on_trial_start(0, [], b)
    callback.on_trial_result(0, [], b, {"step": 50, "eval_loss": 3.0})
    callback.publish(force=True)
    # b has half its steps left, at the 40 s of a full trial; 2 trials not started take 40 s each; 2 slots.
    assert read_status(tmp_path).eta_seconds() == pytest.approx((20 + 80) / 2, abs=0.5)
    callback.on_trial_complete(0, [], b)  # b: stopped early after ~0 s
    c = trial("c", 1e-4)
    callback.on_trial_start(0, [], c)
    callback.publish(force=True)
    # c just started: a full trial (a's 40 s); the 1 not started takes the mean of a and b (about 20 s).
    assert read_status(tmp_path).eta_seconds() == pytest.approx((40 + 20) / 2, abs=0.5)


def test_a_killed_driver_shows_as_stopped_and_a_resumed_sweep_keeps_its_trials(callback, tmp_path):
    callback.on_trial_start(0, [], trial("a", 1e-3))
    callback.on_trial_result(0, [], trial("a", 1e-3), {"step": 100, "eval_loss": 2.0})
    callback.on_trial_complete(0, [], trial("a", 1e-3))
    callback.on_trial_start(0, [], trial("b", 1e-2))
    data = json.loads((tmp_path / STATUS_FILE).read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    data["driver_pid"] = int(dead.stdout)
    (tmp_path / STATUS_FILE).write_text(json.dumps(data))
    assert read_status(tmp_path).state == "stopped"

    resumed = ProgressCallback(tmp_path, "demo", "eval_loss", "min", 4, 2, 100)
    resumed.setup()
    status = read_status(tmp_path)
    assert status.state == "running" and status.driver_pid == os.getpid()
    assert [(t.trial_id, t.status) for t in status.trials] == [("a", "completed"), ("b", "pending")]
    mark_state(tmp_path, "finished")
    assert read_status(tmp_path).state == "finished" and read_status(tmp_path).eta_seconds() == 0.0


def test_table_lists_running_trials_first_then_best(callback, tmp_path):
    for name, loss in (("a", 2.0), ("b", 1.5)):
        callback.on_trial_start(0, [], trial(name, 1e-3))
        callback.on_trial_result(0, [], trial(name, 1e-3), {"step": 100, "eval_loss": loss})
        callback.on_trial_complete(0, [], trial(name, 1e-3))
    callback.on_trial_start(0, [], trial("c", 1e-2))
    callback.publish(force=True)
    console = Console(width=200, record=True)
    console.print(render(read_status(tmp_path)))
    text = console.export_text()
    assert "2 done, 0 stopped early, 0 errored of 4" in text and "best eval_loss 1.5 (b)" in text
    assert text.index("\nc ") < text.index("\nb ") < text.index("\na ")


def test_status_command_prints_table_and_json(callback, tmp_path):
    callback.on_trial_start(0, [], trial("a", 1e-3))
    callback.on_trial_result(0, [], trial("a", 1e-3), {"step": 20, "eval_loss": 2.0})
    callback.publish(force=True)
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert result.exit_code == 0 and "1 running, 0 done" in result.output
    result = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["counts"]["running"] == 1
    result = CliRunner().invoke(app, ["status", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no sweep has started" in result.output


def test_live_progress_sends_other_output_to_the_log(tmp_path):
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from pathlib import Path
        from lora_sweep.progress import ProgressCallback, live_progress
        from types import SimpleNamespace
        sweep_dir = Path({str(tmp_path)!r})
        with live_progress(sweep_dir, refresh_seconds=0.05):
            callback = ProgressCallback(sweep_dir, "demo", "eval_loss", "min", 1, 1, 10, min_interval=0.0)
            callback.setup()
            print("noise from python")
            os.write(2, b"noise from a C library\\n")
            subprocess.run(["echo", "noise from a child process"])
            t = SimpleNamespace(trial_id="a", config={{}})
            callback.on_trial_start(0, [], t)
            callback.on_trial_result(0, [], t, {{"step": 10, "eval_loss": 1.0}})
            callback.on_trial_complete(0, [], t)
        print("after the sweep")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "noise" not in out.stdout + out.stderr
    assert "1 done" in out.stdout and out.stdout.rstrip().endswith("after the sweep")
    log = (tmp_path / "logs" / "ray.log").read_text()
    for noise in ("noise from python", "noise from a C library", "noise from a child process"):
        assert noise in log


def test_every_command_has_help_with_an_example():
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"run", "resume", "demo", "plan", "status", "best", "report", "generate", "export"} <= set(commands)
    for command in commands:
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, command


def test_max_mode_ranks_the_highest_first(tmp_path):
    callback = ProgressCallback(tmp_path, "demo", "accuracy", "max", 3, 1, 10, min_interval=0.0)
    callback.setup()
    for name, value in (("a", 0.5), ("b", 0.9), ("c", 0.7)):
        callback.on_trial_start(0, [], trial(name, 1e-3))
        callback.on_trial_result(0, [], trial(name, 1e-3), {"step": 10, "accuracy": value})
        callback.on_trial_result(0, [], trial(name, 1e-3), {"step": 10, "accuracy": value - 0.1})
        callback.on_trial_complete(0, [], trial(name, 1e-3))
    status = read_status(tmp_path)
    assert status.best.trial_id == "b" and status.best.best_metric == 0.9
    text = render(status).plain
    assert text.index("\nb ") < text.index("\nc ") < text.index("\na ")


def test_live_progress_gives_the_terminal_back_after_an_error(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from lora_sweep.progress import live_progress
        try:
            with live_progress(Path({str(tmp_path)!r}), refresh_seconds=0.05):
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        print("stdout is back")
        os.write(2, b"stderr is back\\n")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "stdout is back" in out.stdout and "stderr is back" in out.stderr
    assert "is back" not in (tmp_path / "logs" / "ray.log").read_text()


def test_ctrl_c_during_a_sweep_is_recorded_as_stopped(tmp_path, monkeypatch, raw_config, write_config):
    from lora_sweep import pipeline
    from lora_sweep.config import load_config
    from lora_sweep.storage import SweepFolder

    callback = ProgressCallback(tmp_path, "demo", "eval_loss", "min", 2, 1, 10)
    callback.setup()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_tune_and_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline._tune_and_finish(load_config(write_config(raw_config)), {}, SweepFolder(tmp_path, None), {}, resume=False,
                                  live=False)
    assert read_status(tmp_path).state == "stopped"
