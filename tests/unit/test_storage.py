"""A storage URI: trials keep checkpoints there and the sweep folder is mirrored there.

S3 is served by moto's server on loopback (the S3 protocol, through pyarrow's S3 filesystem,
from the driver and from Ray's worker processes alike); nothing leaves the machine.
"""

import json

import pytest
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import ConfigError, load_config
from lora_sweep.storage import check_storage, local_prepared_data, mirror_to_storage, open_storage

from conftest import s3_uri, stored_files


def test_storage_must_be_a_uri_that_opens_and_takes_writes(raw_config, write_config, s3, tmp_path):
    raw_config["storage"] = str(tmp_path / "shared")
    with pytest.raises(ConfigError, match=r"`storage`: must be a URI such as s3://bucket/prefix"):
        load_config(write_config(raw_config))
    raw_config["storage"] = "s3://bucket/x?region=us-east-1&access_key=AKIA&secret_key=s3cret"
    with pytest.raises(ConfigError, match=r"`storage`: must not carry credentials \(access_key, secret_key\)"):
        load_config(write_config(raw_config))
    raw_config["storage"] = "nosuch://bucket/x"
    with pytest.raises(ConfigError, match=r"`storage`: must be a URI of one of the schemes s3, gs, gcs, hdfs, viewfs, abfs, abfss, but its scheme is 'nosuch'"):
        check_storage(load_config(write_config(raw_config)))
    raw_config["storage"] = s3_uri(s3, bucket="missing")
    result = CliRunner().invoke(app, ["run", str(write_config(raw_config))])
    assert result.exit_code == 2 and "`storage`: cannot write to s3://missing/team" in result.output
    assert "Bucket 'missing' not found" in result.output
    assert not (tmp_path / "results").exists()  # refused before anything was written
    raw_config["storage"] = s3_uri(s3)
    check_storage(load_config(write_config(raw_config)))  # the real bucket: no error, no probe file left
    plan = CliRunner().invoke(app, ["plan", str(write_config(raw_config))]).output
    assert ("storage: s3://sweeps/team/tiny/ (trials' checkpoints, and a copy of the sweep folder; `sweep resume "
            "s3://sweeps/team/tiny` continues it from any machine)") in plan
    storage = open_storage(load_config(write_config(raw_config)))
    assert stored_files(storage) == set()


def test_mirror_copies_the_driver_files_and_replaces_folders(raw_config, write_config, s3, tmp_path):
    raw_config["storage"] = s3_uri(s3)
    storage = open_storage(load_config(write_config(raw_config)))
    local = tmp_path / "sweep"
    for name, text in {"config.yaml": "a", "export/adapter/x.bin": "old", "tune/trial/checkpoint_000000/w": "c",
                       ".export.tmp/y": "staging", "data/h1/dataset_dict.json": "{}",
                       "data/.h2.tmp/partial": "x"}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(text)
    mirror_to_storage(local, storage)
    assert stored_files(storage) == {"config.yaml", "export/adapter/x.bin", "data/h1/dataset_dict.json"}
    (local / "export" / "adapter" / "x.bin").unlink()
    (local / "export" / "adapter" / "y.bin").write_text("new")
    mirror_to_storage(local, storage)
    assert stored_files(storage, "export") == {"adapter/y.bin"}  # a re-export leaves nothing stale


def test_a_node_without_the_data_fetches_it_from_storage_once(raw_config, write_config, s3, tmp_path, monkeypatch):
    from lora_sweep.data import prepare_data
    from lora_sweep.models import load_tokenizer

    raw_config["storage"] = s3_uri(s3)
    config = load_config(write_config(raw_config))
    storage = open_storage(config)
    prepared = prepare_data(config.data, load_tokenizer(config), config.seed, tmp_path / "driver" / "data")
    mirror_to_storage(tmp_path / "driver", storage)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node"))
    missing_here = str(tmp_path / "elsewhere" / prepared.path.name)
    fetched = local_prepared_data(missing_here, storage.path("data", prepared.path.name), config.storage)
    assert fetched == str(tmp_path / "node" / "lora-sweep-data" / prepared.path.name)
    assert json.loads((prepared.path / "prepared.json").read_text()) == json.loads(
        (tmp_path / "node" / "lora-sweep-data" / prepared.path.name / "prepared.json").read_text())
    storage.filesystem.delete_dir(storage.path("data"))
    assert local_prepared_data(missing_here, storage.path("data", prepared.path.name), config.storage) == fetched  # reused
    assert local_prepared_data(str(prepared.path), None, config.storage) == str(prepared.path)  # seen here: used as is




def test_a_new_sweep_refuses_a_name_storage_already_holds(raw_config, write_config, s3, tmp_path):
    import shutil

    from lora_sweep.pipeline import prepare_sweep_dir

    raw_config["storage"] = s3_uri(s3)
    config = load_config(write_config(raw_config))
    storage = open_storage(config)
    check_storage(config)  # leaves the (empty) folder: not an earlier sweep
    # Files that lora-sweep did not write are never replaced, --overwrite included, and survive.
    with storage.filesystem.open_output_stream(storage.path("someone-elses.csv")) as handle:
        handle.write(b"precious")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds files that lora-sweep did not write .* never replaced or deleted"):
            prepare_sweep_dir(config, overwrite=overwrite)
    assert stored_files(storage) == {"someone-elses.csv"}
    storage.filesystem.delete_file(storage.path("someone-elses.csv"))

    assert prepare_sweep_dir(config, overwrite=False) == config.sweep_dir
    assert stored_files(storage) == {".lora-sweep"}  # the marker: this folder is the engine's own
    with storage.filesystem.open_output_stream(storage.path("tune", "trial_old", "result.json")) as handle:
        handle.write(b"{}")
    shutil.rmtree(config.sweep_dir)
    with pytest.raises(ConfigError, match=r"`name`: storage already holds a sweep at sweeps/team/tiny; replace it "
                                          r"with --overwrite"):
        prepare_sweep_dir(config, overwrite=False)
    # Without the local folder that made it, --overwrite does not replace it: another machine's sweep of this
    # name (maybe running) looks just the same.
    with pytest.raises(ConfigError, match=r"holds another sweep of this name .* --overwrite replaces only the storage "
                                          r"of this folder's own sweep"):
        prepare_sweep_dir(config, overwrite=True)
    assert "tune/trial_old/result.json" in stored_files(storage)
    # The folder that made it may replace it.
    config = config.model_copy(update={"output_dir": str(tmp_path / "second")})
    (config.sweep_dir).mkdir(parents=True)
    from lora_sweep.folder import MARKER_FILE
    with storage.filesystem.open_input_stream(storage.path(MARKER_FILE)) as handle:
        (config.sweep_dir / MARKER_FILE).write_bytes(handle.read())
    prepare_sweep_dir(config, overwrite=True)
    assert stored_files(storage) == {".lora-sweep"}


def test_records_only_copies_the_driver_files_and_the_study_as_a_consistent_snapshot(raw_config, write_config, s3,
                                                                                      tmp_path):
    import sqlite3

    raw_config["storage"] = s3_uri(s3)
    storage = open_storage(load_config(write_config(raw_config)))
    local = tmp_path / "sweep"
    (local / "tensorboard" / "run").mkdir(parents=True)
    (local / "tensorboard" / "run" / "events").write_text("e")
    (local / "status.json").write_text("{}")
    database = sqlite3.connect(local / "optuna_study.db")
    database.execute("create table trials (n integer)")
    database.execute("insert into trials values (1)")
    database.commit()
    database.execute("begin")
    database.execute("insert into trials values (2)")  # an open write: not part of the snapshot
    mirror_to_storage(local, storage, records_only=True)
    database.rollback()
    database.close()
    assert stored_files(storage) == {"status.json", "optuna_study.db"}  # no folders, no journal
    with storage.filesystem.open_input_stream(storage.path("optuna_study.db")) as handle:
        (tmp_path / "copy.db").write_bytes(handle.read())
    assert sqlite3.connect(tmp_path / "copy.db").execute("select n from trials").fetchall() == [(1,)]


def test_status_and_resume_by_a_storage_uri(raw_config, write_config, s3, tmp_path, monkeypatch):
    import time

    from lora_sweep.pipeline import resume_from_storage
    from lora_sweep.progress import STALE_IN_STORAGE_SECONDS, read_stored_status

    raw_config["storage"] = s3_uri(s3)
    storage = open_storage(load_config(write_config(raw_config)))
    uri = s3_uri(s3).replace("/team?", "/team/tiny?")
    result = CliRunner().invoke(app, ["status", uri])
    assert result.exit_code == 2 and "has no status.json: no sweep has started there" in result.output
    with pytest.raises(ConfigError, match="is not a sweep's storage folder"):
        resume_from_storage(uri, tmp_path / "here")

    status = {"name": "tiny", "state": "running", "metric": "eval_loss", "mode": "min", "num_trials": 2,
              "max_concurrent": 1, "max_steps": 6, "started_at": time.time() - 30, "updated_at": time.time(),
              "driver_pid": 1, "driver_host": "a-machine-that-is-gone", "trials": []}
    local = tmp_path / "sweep"
    local.mkdir()
    (local / "status.json").write_text(json.dumps(status))
    mirror_to_storage(local, storage)
    seen, age = read_stored_status(uri)
    assert seen.state == "running" and age < STALE_IN_STORAGE_SECONDS
    monkeypatch.setattr("lora_sweep.progress.STALE_IN_STORAGE_SECONDS", -1.0)  # as if copied long ago
    seen, age = read_stored_status(uri)
    assert seen.state == "stopped"  # its driver stopped copying: `sweep resume <uri>` continues it

    from lora_sweep.safety import mark_stored_sweep_folder

    (local / "config.yaml").write_text((tmp_path / "sweep.yaml").read_text())
    mirror_to_storage(local, storage)
    mark_stored_sweep_folder(storage.filesystem, storage.root, "tiny", "id-1")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="already exists; resume that folder"):
        resume_from_storage(uri, tmp_path / "here")
    assert (tmp_path / "here" / "mine.txt").read_text() == "a user's file"
    other = s3_uri(s3).replace("/team?", "/elsewhere/tiny?")
    with pytest.raises(ConfigError, match="is not a sweep's storage folder"):
        resume_from_storage(other, tmp_path / "there")
