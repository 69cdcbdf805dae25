"""A sweep logged to a real MLflow server on loopback (SQLite backend, started and stopped here) and to W&B in
offline mode: a parent run per sweep, a nested run per trial with its metrics by step, the promoted model logged
and registered; a re-export registers a new version."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from conftest import free_port, wait_until_answering
from lora_sweep.config import load_config
from lora_sweep.folder import MARKER_FILE
from lora_sweep.pipeline import export, run

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on loopback with a SQLite store; yields its URI."""
    port = free_port()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(store / "server.log", "w"), cwd=store)
    uri = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_answering(f"{uri}/health", "mlflow server", given_up=lambda: server.poll() is not None)
        except RuntimeError as error:
            raise RuntimeError(f"{error}: {(store / 'server.log').read_text()[-2000:]}") from None
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_sweep_is_tracked_in_mlflow_and_wandb_and_its_model_registered(raw_config, write_config, mlflow_server,
                                                                          monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw_config["trackers"] = ["mlflow", "wandb"]
    raw_config["mlflow"] = {"tracking_uri": mlflow_server}
    raw_config["search"].update(num_trials=2, max_concurrent_trials=1)
    config = load_config(write_config(raw_config))
    try:
        outcome = run(config)
    finally:
        ray.shutdown()
    sweep_dir = outcome.sweep_dir
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(config.name)
    runs = {r.data.tags["lora_sweep.trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    board = {r.trial_id: r for r in outcome.records}
    assert set(runs) == {"sweep", *board}
    parent = runs.pop("sweep")
    sweep_id = json.loads((sweep_dir / MARKER_FILE).read_text())["sweep_id"]
    assert parent.data.tags["lora_sweep.sweep_id"] == sweep_id
    for trial_id, trial_run in runs.items():
        record = board[trial_id]
        assert trial_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial_run.info.status == "FINISHED" and trial_run.data.tags["lora_sweep.status"] == record.status
        steps = [m.step for m in client.get_metric_history(trial_run.info.run_id, "eval_loss")]
        assert steps == [3, 6]
        assert trial_run.data.metrics["best_eval_loss"] == pytest.approx(record.best_metric)
        assert trial_run.data.metrics["device_seconds"] == pytest.approx(record.device_seconds, rel=0.05)
        assert float(trial_run.data.params["training.learning_rate"]) == pytest.approx(
            record.params["training.learning_rate"])

    # The promoted model: logged on the sweep's run, registered under the sweep's name with its test metrics.
    final = json.loads((sweep_dir / "final_metrics.json").read_text())
    version = client.get_model_version(config.name, "1")
    assert version.run_id == parent.info.run_id and version.tags["trial_id"] == final["trial_id"]
    assert float(version.tags["test_loss_tuned"]) == pytest.approx(final["test"]["tuned"]["loss"], rel=1e-5)
    assert version.tags["sweep_folder"] == str(sweep_dir.resolve())
    downloaded = Path(mlflow.artifacts.download_artifacts(version.source, tracking_uri=mlflow_server,
                                                          dst_path=str(sweep_dir.parent / "from-registry")))
    assert (downloaded / "model.safetensors").read_bytes() == (sweep_dir / "export" / "merged" /
                                                               "model.safetensors").read_bytes()
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"adapter", "merged", "README.md"}

    # `sweep export` again: the same parent run, a second version.
    export(sweep_dir)
    assert client.get_model_version(config.name, "2").run_id == parent.info.run_id
    assert len(client.search_runs([experiment.experiment_id])) == 3

    # W&B: one offline run per trial in the sweep folder, named by sweep and trial, for `wandb sync` later.
    offline = sorted((sweep_dir / "wandb").glob("offline-run-*"))
    assert sorted(p.name.split("-", 3)[-1] for p in offline) == sorted(f"{config.name}-{t}" for t in board)
    assert all(list(p.glob("*.wandb")) for p in offline)
