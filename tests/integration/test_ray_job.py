"""A sweep submitted as a Ray job, as docs/cluster.md shows it: `ray job submit --working-dir . -- sweep run
sweep.yaml --address auto` to a local head whose dashboard listens on loopback, with `sweep status` read while
the job runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import free_port, wait_until_answering

pytestmark = pytest.mark.integration
pytest.importorskip("ray.dashboard")
pytest.importorskip("aiohttp_cors", reason="ray job submission needs ray[default] (the dashboard)")


@pytest.fixture
def head_with_dashboard(monkeypatch):
    """A local Ray head with its dashboard (the job server) on loopback; yields the dashboard's address."""
    from ray.cluster_utils import Cluster

    # The job's entrypoint runs in the head's environment: `sweep` is found on its PATH, as on a real cluster.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # Token authentication on, as `ray.init` turns it on for a new local cluster (and for this whole process, once
    # any test has started one): `ray job` and the job's own driver authenticate with the token in ~/.ray/auth_token.
    # Ray's own switch, which also refreshes the config this process has cached.
    from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default

    enable_token_auth_by_default()
    port = free_port()
    # The job agent on a port of its own: on Ray's default (52365) a leftover process of an earlier test (CI runs
    # many) keeps the agent from listening, and the head answers 'No available agent to submit job' for ever.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
        "dashboard_agent_listen_port": free_port()})
    address = f"http://127.0.0.1:{port}"
    try:
        # 401: up, and asking for the token this test does not send
        wait_until_answering(f"{address}/api/version", "the Ray dashboard", up=(200, 401))
        yield address
    finally:
        cluster.shutdown()


def test_a_sweep_runs_as_a_ray_job_and_its_status_is_readable_while_it_runs(raw_config, tmp_path, head_with_dashboard):
    from ray.job_submission import JobStatus, JobSubmissionClient

    project = tmp_path / "project"  # what a user's repository holds: the sweep's config
    project.mkdir()
    raw_config["output_dir"] = str(tmp_path / "results")  # a folder the driver's node and this test both see
    raw_config["training"].update({"max_steps": 30, "eval_steps": 5})
    raw_config["search"].update({"num_trials": 2, "max_concurrent_trials": 1})
    raw_config["scheduler"] = {"type": "none"}
    (project / "my_sweep.yaml").write_text(yaml.safe_dump(raw_config))
    sweep_dir = tmp_path / "results" / raw_config["name"]
    ray_cli = str(Path(sys.executable).parent / "ray")
    deadline = time.time() + 180
    while True:
        submitted = subprocess.run(
            [ray_cli, "job", "submit", "--address", head_with_dashboard, "--working-dir", ".", "--submission-id",
             "sweep-job", "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1"}}), "--no-wait",
             "--", "sweep", "run", "my_sweep.yaml", "--address", "auto"],
            cwd=project, capture_output=True, text=True, timeout=300)
        # The head's job agent registers a little after the dashboard answers; Ray says to try again.
        if "No available agent to submit job" not in submitted.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "sweep-job" in submitted.stdout

    client = JobSubmissionClient(head_with_dashboard)
    seen_running = None
    deadline = time.time() + 900
    while (state := client.get_job_status("sweep-job")) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                 JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs("sweep-job")[-3000:]
        if state == JobStatus.RUNNING and seen_running is None and (sweep_dir / "status.json").is_file():
            status = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "status", str(sweep_dir), "--json"],
                                    capture_output=True, text=True, timeout=120)
            if status.returncode == 0 and json.loads(status.stdout)["state"] == "running":
                seen_running = json.loads(status.stdout)
        time.sleep(1)
    logs = client.get_job_logs("sweep-job")
    assert state == JobStatus.SUCCEEDED, logs[-3000:]
    assert seen_running is not None, "sweep status never saw the job's sweep running"
    assert seen_running["num_trials"] == 2
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert len(board) == 2 and set(board["status"]) == {"completed"}
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    assert "sweep finished: 2 trials" in logs
