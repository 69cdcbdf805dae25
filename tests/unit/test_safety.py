"""The engine never endangers the user's files: --overwrite deletes only folders it made, one driver per sweep
folder, Ray Tune's pickles are unpickled only when the user alone can write them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_refused, listing
from lora_sweep.cli import app
from lora_sweep.config import ConfigError, load_config
from lora_sweep.folder import LOCK_FILE, MARKER_FILE
from lora_sweep.pipeline import check_sweep_dir_free, prepare_sweep_dir
from lora_sweep.safety import check_state_files_are_ours, driver_lock, is_sweep_folder, lock_holder


def _someone_elses_folder(root: Path) -> Path:
    folder = root / "results" / "tiny"
    (folder / "thesis").mkdir(parents=True)
    (folder / "thesis" / "chapter1.tex").write_text("years of work")
    (folder / "notes.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_lora_sweep_did_not_make_is_never_replaced(flags, raw_config, write_config, tmp_path):
    folder = _someone_elses_folder(tmp_path)
    before = listing(tmp_path / "results")
    config_path = write_config(raw_config)
    result = CliRunner().invoke(app, ["run", str(config_path), *flags])
    # (--resume: a folder without config.yaml is no sweep to resume, so it would start one there: refused too)
    assert_refused(result, f"`name`: {folder} exists and was not created by lora-sweep (no {MARKER_FILE} in it): "
                           "it is never replaced or deleted")
    assert listing(tmp_path / "results") == before
    assert (folder / "thesis" / "chapter1.tex").read_text() == "years of work"


def test_output_dir_root_and_name_etc_is_refused_and_plan_says_so(raw_config, write_config):
    raw_config.update(output_dir="/", name="etc")
    config = load_config(write_config(raw_config))
    assert config.sweep_dir == Path("/etc")
    for overwrite in (False, True):  # checked without deleting anything: prepare_sweep_dir is never reached
        with pytest.raises(ConfigError, match="/etc exists and was not created by lora-sweep"):
            check_sweep_dir_free(config, overwrite)
    text = CliRunner().invoke(app, ["plan", str(write_config(raw_config))]).output
    assert "/etc exists and was not made by lora-sweep: `sweep run` refuses to write there, --overwrite included" in text


def test_overwrite_replaces_a_folder_the_engine_made_and_only_that(raw_config, write_config):
    config = load_config(write_config(raw_config))
    with driver_lock(config.sweep_dir):
        folder = prepare_sweep_dir(config, overwrite=False)
    assert is_sweep_folder(folder)
    (folder / "leaderboard.csv").write_text("an earlier sweep")
    with pytest.raises(ConfigError, match="already exists; continue it with `sweep resume"):
        check_sweep_dir_free(config, overwrite=False)
    with driver_lock(config.sweep_dir):
        prepare_sweep_dir(config, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER_FILE, LOCK_FILE])
    # A forged or damaged marker is not the engine's.
    (folder / MARKER_FILE).write_text('{"created_by": "me"}')
    (folder / "leaderboard.csv").write_text("x")
    with pytest.raises(ConfigError, match="was not created by lora-sweep"):
        check_sweep_dir_free(config, overwrite=True)


def test_credentials_are_never_printed_or_saved(raw_config, write_config, tmp_path):
    raw_config["storage"] = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix?region=us-east-1"
    for command in ("plan", "run"):
        result = CliRunner().invoke(app, [command, str(write_config(raw_config))])
        assert result.exit_code == 2 and "wJalrXUtnFEMI" not in result.output and "AKIAEXAMPLE" not in result.output
    assert not (tmp_path / "results").exists()


HOLD_LOCK = """
import sys, time
from lora_sweep.safety import driver_lock
with driver_lock(sys.argv[1], "a test driver"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_driver_on_a_live_sweep_is_refused_and_a_dead_ones_lock_is_taken_over(raw_config, write_config,
                                                                                          tmp_path):
    config = load_config(write_config(raw_config))
    with driver_lock(config.sweep_dir):
        prepare_sweep_dir(config, overwrite=False)
    (config.sweep_dir / "config.yaml").write_text(write_config(raw_config).read_text())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(config.sweep_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(config.sweep_dir)["pid"] == holder.pid
        refusal = f"another driver is running this sweep (pid {holder.pid} on host {socket.gethostname()}"
        for command in (["resume", str(config.sweep_dir)], ["run", str(write_config(raw_config)), "--resume"],
                        ["run", str(write_config(raw_config)), "--overwrite"]):
            before = listing(config.sweep_dir)
            assert_refused(CliRunner().invoke(app, command), refusal, before, config.sweep_dir)
        with pytest.raises(ConfigError, match="another driver is running this sweep"):
            with driver_lock(config.sweep_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead driver's lock: the next driver takes it over.
    assert lock_holder(config.sweep_dir) is None
    with driver_lock(config.sweep_dir, "sweep resume"):
        assert lock_holder(config.sweep_dir)["pid"] == os.getpid()
    assert (config.sweep_dir / LOCK_FILE).read_text() == ""  # released: free for a driver on any host


def test_a_lock_left_by_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "started_at": time.time()}))
    with pytest.raises(ConfigError, match=r"locked by a driver on another host \(pid 4242 on host node-7.*delete "):
        with driver_lock(tmp_path):
            pass


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_resume_refuses_ray_state_files_another_user_owns(tmp_path, raw_config, write_config):
    state = tmp_path / "tune" / "searcher-state-2026.pkl"
    state.parent.mkdir()
    state.write_bytes(b"not really a pickle")
    check_state_files_are_ours(tmp_path)  # ours: fine
    os.chown(state, 12345, 12345)
    with pytest.raises(ConfigError, match=r"searcher-state-2026.pkl is owned by uid 12345, not by you .*unpickles"):
        check_state_files_are_ours(tmp_path)
    os.chown(state, 0, 0)
    state.chmod(0o666)
    with pytest.raises(ConfigError, match="can be written by any user"):
        check_state_files_are_ours(tmp_path)
    (tmp_path / "config.yaml").write_text(write_config(raw_config).read_text())
    assert_refused(CliRunner().invoke(app, ["resume", str(tmp_path)]), "can be written by any user")


def test_free_disk_is_compared_with_the_plan_before_anything_is_written(raw_config, write_config, tmp_path,
                                                                        monkeypatch):
    import shutil as real_shutil

    from lora_sweep import disk

    config_path = write_config(raw_config)
    plan = json.loads(CliRunner().invoke(app, ["plan", str(config_path), "--json"]).output)
    needs = plan["disk_bytes"]
    least = needs["export"] + plan["max_concurrent_trials"] * needs["checkpoint"]
    most = needs["export"] + needs["during_sweep_at_most"]

    def free(amount):
        usage = real_shutil.disk_usage(tmp_path)
        return lambda path: usage._replace(free=amount)

    monkeypatch.setattr(disk.shutil, "disk_usage", free(least - 1))
    before = listing(tmp_path)
    assert_refused(CliRunner().invoke(app, ["run", str(config_path)]), "free, but the sweep needs at least", before,
                   tmp_path)
    monkeypatch.setattr(disk.shutil, "disk_usage", free(most - 1))
    result = CliRunner().invoke(app, ["plan", str(config_path)])
    assert result.exit_code == 0
    assert "warning: " in result.output and "the sweep may write up to" in result.output


def _model_with_its_own_code(folder: Path, proof: Path) -> Path:
    """A model folder whose config names its own Python code (`auto_map`): importing it writes `proof`."""
    folder.mkdir()
    (folder / "configuration_custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(proof)!r}).write_text('the model folder code ran')\n"
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom-llama", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
        "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "vocab_size": 300}))
    return folder


def test_model_code_runs_only_after_every_other_check_and_after_a_warning(raw_config, write_config, tmp_path):
    proof = tmp_path / "code-ran.txt"
    raw_config["model"].update(path=str(_model_with_its_own_code(tmp_path / "custom", proof)), trust_remote_code=True)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"instruction": "a", "response": }\n')
    raw_config["data"]["files"] = [str(bad_data)]
    for command in ("plan", "run"):
        result = CliRunner().invoke(app, [command, str(write_config(raw_config))])
        assert_refused(result, "bad.jsonl: line 1: not valid JSON")
        assert result.output.startswith("warning: model.trust_remote_code is on: the Python code in")
        assert not proof.exists()  # the data check came first: the model's code never ran
    raw_config["data"]["files"] = [str(Path(__file__).parents[1] / "assets" / "instructions.jsonl")]
    result = CliRunner().invoke(app, ["plan", str(write_config(raw_config))])
    assert result.output.startswith("warning: model.trust_remote_code is on"), result.output
    assert proof.exists()  # with every other check passed, the code the user allowed does run


def test_resume_refuses_a_corrupt_study_before_ray_starts(raw_config, write_config, tmp_path):
    import ray

    folder = tmp_path / "stopped"
    folder.mkdir()
    (folder / "config.yaml").write_text(write_config(raw_config).read_text())
    (folder / "optuna_study.db").write_bytes(b"\x00garbage" * 64)
    before = listing(folder)
    assert_refused(CliRunner().invoke(app, ["resume", str(folder)]), "optuna_study.db: not a SQLite database", before,
                   folder)
    assert not ray.is_initialized()


def test_tunes_ctrl_c_handler_is_not_left_behind_and_ray_inits_sigterm_exit_becomes_a_stop():
    import signal

    from lora_sweep import signals

    def tunes_handler(signum, frame):  # what Tune installs during fit() and leaves after a normal end
        pass

    before = signal.getsignal(signal.SIGINT)
    with signals.ctrl_c_handler_kept() as stop:
        signal.signal(signal.SIGINT, tunes_handler)  # fit() ends normally: Tune's handler is left in place
    assert not stop.interrupted
    assert signal.getsignal(signal.SIGINT) is before  # a stop during export reaches KeyboardInterrupt again
    with signals.ctrl_c_handler_kept() as stop:
        signal.signal(signal.SIGINT, tunes_handler)
        signal.signal(signal.SIGINT, before)  # what Tune's handler does on a Ctrl-C: it puts the previous one back
    assert stop.interrupted  # fit() returned, but it was a stop, not the sweep's end
    with pytest.raises(KeyboardInterrupt):
        with signals.sigterm_stops_like_ctrl_c():
            raise SystemExit(signal.SIGTERM)  # ray.init's own SIGTERM handler
    assert signals.stop_exit_code() == 143
    assert signal.getsignal(signal.SIGTERM) is signals._forward_to_ctrl_c_handler
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signals._received.clear()


def test_a_tune_snapshot_left_empty_by_a_kill_is_recovered_from_rays_staging_copy_or_the_resume_refused(tmp_path):
    from lora_sweep.safety import recover_truncated_tune_snapshot

    tune_dir = tmp_path / "sweep" / "tune"
    tune_dir.mkdir(parents=True)
    (tune_dir / "search_gen_state-2026-01-01_10-00-00.json").write_bytes(b"")  # cut by the kill
    (tune_dir / "searcher-state-2026-01-01_10-00-00.pkl").write_bytes(b"complete")
    ray_temp = tmp_path / "ray"
    with pytest.raises(ConfigError, match=r"search_gen_state-2026-01-01_10-00-00.json is empty: .* a resume would "
                                          r"start every trial over, so it is refused"):
        recover_truncated_tune_snapshot(tune_dir, ray_temp)
    staging = ray_temp / "session_1" / "artifacts" / "2026-01-01_10-00-00" / "tune" / "driver_artifacts"
    staging.mkdir(parents=True)
    (staging / "search_gen_state-2026-01-01_10-00-00.json").write_bytes(b"the searcher's state")
    staging.chmod(0o777)  # anyone could have planted it: not trusted
    with pytest.raises(ConfigError, match="is empty"):
        recover_truncated_tune_snapshot(tune_dir, ray_temp)
    staging.chmod(0o755)
    assert recover_truncated_tune_snapshot(tune_dir, ray_temp) == ["search_gen_state-2026-01-01_10-00-00.json"]
    assert (tune_dir / "search_gen_state-2026-01-01_10-00-00.json").read_bytes() == b"the searcher's state"
    assert recover_truncated_tune_snapshot(tune_dir, ray_temp) == []  # nothing empty: nothing touched


def test_a_checkpoint_deleted_after_tunes_last_saved_state_is_filled_in_from_the_newer_one(tmp_path):
    from lora_sweep.safety import fill_in_deleted_checkpoints

    def trial(name: str, status: str, checkpoint: str) -> list[str]:
        return [json.dumps({"status": status, "relative_logdir": name}),
                json.dumps({"last_result": {"step": 6, "checkpoint_dir_name": checkpoint}})]

    experiment = tmp_path / "tune"
    for name, kept in (("cut", ["checkpoint_000002"]), ("ended", ["checkpoint_000003"]), ("current", ["checkpoint_000001"])):
        for checkpoint in kept:
            (experiment / name / checkpoint).mkdir(parents=True)
            (experiment / name / checkpoint / "adapter_model.safetensors").write_text(f"{name} {checkpoint}")
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": [
        trial("cut", "RUNNING", "checkpoint_000000"),  # the state lagged: 000000 was deleted after 000002 came
        trial("ended", "TERMINATED", "checkpoint_000001"),  # ended: never resumed, left alone
        trial("current", "PAUSED", "checkpoint_000001"),  # the state names what is there
    ]}))
    filled = fill_in_deleted_checkpoints(None, str(experiment))
    assert filled == [str(experiment / "cut" / "checkpoint_000000")]
    assert (experiment / "cut" / "checkpoint_000000" / "adapter_model.safetensors").read_text() == "cut checkpoint_000002"
    assert not (experiment / "ended" / "checkpoint_000001").exists()
    assert fill_in_deleted_checkpoints(None, str(tmp_path / "nothing")) == []
