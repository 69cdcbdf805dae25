"""MLflow and W&B trackers fed Tune's events as the driver feeds them, against a real local MLflow store (SQLite)
and W&B in offline mode; and the config and pre-run checks of `trackers`."""

import json
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_sweep.config import ConfigError, load_config
from lora_sweep.evaluate import EvalMetrics
from lora_sweep.results import TrialRecord
from lora_sweep.trackers import (MLflowTarget, MLflowTracker, WandbTracker, check_trackers, log_promoted_model,
                                 mlflow_tracking_uri)

mlflow = pytest.importorskip("mlflow")


def trial(trial_id: str, lr: float, rank: int = 8) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"training.learning_rate": lr, "lora.rank": rank})


def feed(tracker, events) -> None:
    """Tune's callback events, in order: ("start" | "complete" | "error", trial) or ("result", trial, report)."""
    for event, *args in events:
        getattr(tracker, f"on_trial_{event}")(0, [], *args)


@pytest.fixture
def mlflow_config(raw_config, write_config, tmp_path):
    raw_config["trackers"] = ["mlflow"]
    config = load_config(write_config(raw_config))
    config.sweep_dir.mkdir(parents=True)
    return config


def new_tracker(config, sweep_id="sweep-1"):
    target = MLflowTarget.of(config, config.sweep_dir, sweep_id)
    return MLflowTracker(target, "eval_loss", "min", max_steps=6, scalars=("eval_loss", "train_loss", "rouge_l"),
                         devices_per_trial=2.0)


def test_mlflow_nests_a_run_per_trial_with_params_metrics_by_step_status_and_device_seconds(mlflow_config):
    config = mlflow_config
    tracker = pickle.loads(pickle.dumps(new_tracker(config)))  # Tune pickles its callbacks before the first trial
    a, b = trial("a_00000", 1e-3), trial("b_00001", 1e-1, rank=16)
    feed(tracker, [("start", a), ("start", b),
                   ("result", a, {"step": 3, "eval_loss": 2.5, "train_loss": 2.7, "rouge_l": 0.1, "time_total_s": 10.0,
                                  "tokens_seen": 900, "adapter_params": 4096}),
                   ("result", b, {"step": 3, "eval_loss": float("inf"), "train_loss": 9.0, "diverged": True,
                                  "time_total_s": 4.0}),
                   ("error", b),
                   ("result", a, {"step": 6, "eval_loss": 2.1, "train_loss": 2.2, "rouge_l": 0.3, "time_total_s": 20.0}),
                   ("complete", a)])
    client = mlflow.MlflowClient(mlflow_tracking_uri(config, config.sweep_dir))
    assert mlflow_tracking_uri(config, config.sweep_dir).startswith("sqlite:///")
    experiment = client.get_experiment_by_name(config.name)
    runs = {r.data.tags["lora_sweep.trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"sweep", "a_00000", "b_00001"}
    parent = runs["sweep"]
    assert parent.data.tags["sweep_folder"] == str(config.sweep_dir.resolve())
    a_run, b_run = runs["a_00000"], runs["b_00001"]
    assert a_run.data.tags["mlflow.parentRunId"] == b_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert a_run.data.params == {"training.learning_rate": "0.001", "lora.rank": "8"}
    history = [(m.step, m.value) for m in client.get_metric_history(a_run.info.run_id, "eval_loss")]
    assert history == [(3, 2.5), (6, 2.1)]
    assert [m.value for m in client.get_metric_history(a_run.info.run_id, "rouge_l")] == [0.1, 0.3]
    assert a_run.info.status == "FINISHED" and a_run.data.tags["lora_sweep.status"] == "completed"
    assert a_run.data.metrics["device_seconds"] == 40.0 and a_run.data.metrics["best_eval_loss"] == 2.1
    assert a_run.data.metrics["tokens_seen"] == 900 and a_run.data.metrics["steps_run"] == 6
    # The diverged trial's infinite loss is not logged (MLflow would store it as a number); it ended failed.
    assert [m.value for m in client.get_metric_history(b_run.info.run_id, "eval_loss")] == []
    assert b_run.info.status == "FAILED" and b_run.data.tags["lora_sweep.status"] == "errored"
    assert b_run.data.metrics["device_seconds"] == 8.0

    # A resumed sweep (a fresh tracker, as Tune unpickles it) goes on in the same runs.
    again = new_tracker(config)
    feed(again, [("start", a), ("result", a, {"step": 9, "eval_loss": 2.0, "time_total_s": 30.0}), ("complete", a)])
    runs_after = client.search_runs([experiment.experiment_id])
    assert len(runs_after) == 3
    history = [(m.step, m.value) for m in client.get_metric_history(a_run.info.run_id, "eval_loss")]
    assert history == [(3, 2.5), (6, 2.1), (9, 2.0)]


def test_an_mlflow_failure_is_a_warning_and_never_ends_the_sweep(mlflow_config, caplog, monkeypatch):
    tracker = new_tracker(mlflow_config)
    monkeypatch.setattr(MLflowTarget, "client", lambda self: (_ for _ in ()).throw(ConnectionError("server gone")))
    a = trial("a_00000", 1e-3)
    feed(tracker, [("start", a), ("result", a, {"step": 3, "eval_loss": 2.5}), ("complete", a)])
    assert tracker.trials["a_00000"].status == "stopped early"  # (step 3 of 6) the record is kept regardless
    warnings = [r.getMessage() for r in caplog.records if "MLflowTracker" in r.getMessage()]
    assert warnings == ["MLflowTracker: log_trial_start failed (server gone); the sweep goes on without it for this "
                        "event"]  # once per kind of failure, not at every event


def test_the_promoted_model_is_logged_and_registered_under_the_sweeps_name(mlflow_config, tmp_path):
    config = mlflow_config
    export_dir = config.sweep_dir / "export"
    for part, name in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        (export_dir / part).mkdir(parents=True)
        (export_dir / part / name).write_bytes(b"weights")
    (export_dir / "README.md").write_text("# card")
    scores = dict(perplexity=1.0, exact_match=0.5, examples=4, response_tokens=20)
    final = SimpleNamespace(
        best=TrialRecord(trial_id="a_00000", status="completed", params={}, best_metric=2.1, best_step=6, steps_run=6,
                         wall_seconds=1.0),
        base=EvalMetrics(loss=3.0, metrics={"rouge_l": 0.1}, **scores),
        tuned=EvalMetrics(loss=2.0, metrics={"rouge_l": 0.4}, **scores), export_dir=export_dir)
    assert log_promoted_model(config, config.sweep_dir, "sweep-1", final) == "1"
    assert log_promoted_model(config, config.sweep_dir, "sweep-1", final) == "2"  # a re-export: a new version
    client = mlflow.MlflowClient(mlflow_tracking_uri(config, config.sweep_dir))
    version = client.get_model_version(config.name, "2")
    assert version.tags["test_loss_tuned"] == "2" and version.tags["test_rouge_l_tuned"] == "0.4"
    assert version.tags["sweep_folder"] == str(config.sweep_dir.resolve()) and version.tags["trial_id"] == "a_00000"
    parent = client.get_run(version.run_id)
    assert parent.data.tags["lora_sweep.trial_id"] == "sweep" and parent.data.tags["promoted_trial"] == "a_00000"
    assert parent.data.metrics["test_loss_base"] == 3.0 and parent.data.metrics["test_rouge_l_tuned"] == 0.4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"adapter", "merged", "README.md"} <= artifacts
    merged = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "got")))
    assert (merged / "model.safetensors").read_bytes() == b"weights"


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (what `wandb sync` uploads). wandb 0.31 reads these files in its Go
    core only; the format is LevelDB's log (32 KiB blocks of chunks: CRC, length, type) after a 7-byte header,
    each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little left in the block for a chunk header: padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_writes_an_offline_run_per_trial_grouped_by_the_sweep(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = WandbTracker("proj", "my-sweep", "offline", str(tmp_path / "wb"), "eval_loss", "min", max_steps=6,
                           scalars=("eval_loss",), devices_per_trial=1.0)
    tracker = pickle.loads(pickle.dumps(tracker))
    a, b = trial("a_00000", 1e-3), trial("b_00001", 1e-2)
    feed(tracker, [("start", a), ("start", b), ("result", a, {"step": 3, "eval_loss": 2.5, "time_total_s": 5.0}),
                   ("result", b, {"step": 3, "eval_loss": 2.9, "time_total_s": 5.0}),
                   ("result", a, {"step": 6, "eval_loss": 2.2, "time_total_s": 9.0}), ("complete", a), ("error", b)])
    wandb.teardown()  # the service writes run files in the background: wait until it has flushed them (a process
    # that ends does the same at exit)
    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, list((tmp_path / "wb").rglob("*"))
    # What each offline run holds, as `wandb sync` would upload it: the config, the group, the history, the summary.
    api_runs = {path.stem.removeprefix("run-"): path for folder in runs for path in folder.glob("*.wandb")}
    assert set(api_runs) == {"my-sweep-a_00000", "my-sweep-b_00001"}  # the run ids: sweep and trial
    seen: dict[str, dict] = {}
    for name, path in api_runs.items():
        history, summary, group = [], {}, None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                group = record.run.run_group
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            elif kind == "summary":
                summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
        seen[name[-7:]] = {"group": group, "history": history, "summary": summary}
    assert seen["a_00000"]["group"] == seen["b_00001"]["group"] == "my-sweep"
    assert [(h["_step"], h["eval_loss"]) for h in seen["a_00000"]["history"]] == [(3, 2.5), (6, 2.2)]
    assert seen["a_00000"]["summary"]["status"] == "completed" and seen["b_00001"]["summary"]["status"] == "errored"
    assert seen["a_00000"]["summary"]["device_seconds"] == 9.0


def test_tracker_settings_are_checked(raw_config, write_config, monkeypatch):
    raw_config["trackers"] = ["mlflow", "mlflow"]
    with pytest.raises(ConfigError, match=r"`trackers`: \['mlflow', 'mlflow'\] names a tracker twice"):
        load_config(write_config(raw_config))
    raw_config["trackers"] = ["neptune"]
    with pytest.raises(ConfigError, match="trackers"):
        load_config(write_config(raw_config))
    raw_config["trackers"] = ["mlflow"]
    raw_config["mlflow"] = {"tracking_uri": "https://bob:hunter2@mlflow.example.com"}
    with pytest.raises(ConfigError, match=r"`mlflow.tracking_uri`: must not carry credentials") as error:
        load_config(write_config(raw_config))
    assert "hunter2" not in str(error.value)
    del raw_config["mlflow"]
    raw_config["trackers"] = []
    raw_config["wandb"] = {"project": "p"}
    with pytest.raises(ConfigError, match=r"`wandb`: settings for a tracker that `trackers` does not list \(\[\]\); "
                                          "add wandb there"):
        load_config(write_config(raw_config))

    raw_config["trackers"] = ["wandb", "mlflow"]
    config = load_config(write_config(raw_config))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"`trackers`: wandb is configured but its package is not installed; "
                                          r"pip install 'lora-sweep\[wandb\]'"):
        check_trackers(config)


def test_an_mlflow_server_that_does_not_answer_is_refused_before_anything_runs(raw_config, write_config, tmp_path):
    from conftest import refused_case, free_port

    def change(raw, tmp):
        raw["trackers"] = ["mlflow"]
        raw["mlflow"] = {"tracking_uri": f"http://127.0.0.1:{free_port()}"}

    refused_case("run", change, "`mlflow.tracking_uri`: the MLflow server at http://127.0.0.1:", raw_config,
                 write_config, tmp_path)
