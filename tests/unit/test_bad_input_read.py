"""The commands that read a sweep folder refuse a bad one cleanly: exit 2, `error: FILE: WHAT`, nothing written.

Each case builds a complete fake sweep folder on disk (no Ray, no training), breaks one thing in it and
runs one read command (`status`, `best`, `report`, `export`, `generate`) on it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from lora_sweep.cli import app
from lora_sweep.config import ConfigError, config_to_yaml, load_config
from lora_sweep.driver import check_study, study_storage
from lora_sweep.folder import STUDY_FILE
from lora_sweep.progress import SweepStatus, TrialProgress
from lora_sweep.results import TrialRecord

from conftest import assert_refused, listing

NOISE = bytes(range(256)) * 4  # not UTF-8, not JSON, not SQLite


@pytest.fixture
def sweep_folder(raw_config, write_config, tiny_model_dir) -> Path:
    """What a finished sweep leaves: config, provenance, prepared data (a stand-in), status, best trial,
    leaderboard, final metrics, the Optuna study, Tune's per-trial results and the export."""
    config = load_config(write_config(raw_config))
    sweep_dir = config.sweep_dir
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "config.yaml").write_text(config_to_yaml(config))
    data = sweep_dir / "data" / "abc123"
    data.mkdir(parents=True)
    (data / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "val", "test"]}))
    (sweep_dir / "provenance.json").write_text(json.dumps({"seed": 0, "data_hash": "abc123", "data_path": str(data)}))
    now = time.time()
    trials = [TrialProgress("t0", "completed", {"training.learning_rate": 1e-3}, 6, 2.5, 2.4, 3, now - 60, now - 30),
              TrialProgress("t1", "stopped early", {"training.learning_rate": 1e-2}, 3, 3.1, 3.1, 3, now - 60, now - 40)]
    status = SweepStatus("tiny", "finished", "eval_loss", "min", 2, 2, 6, now - 60, now, 1, trials)
    (sweep_dir / "status.json").write_text(json.dumps(status.to_json()))
    checkpoint = sweep_dir / "tune" / "trial_t0" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    best = TrialRecord("t0", "completed", {"training.learning_rate": 1e-3}, 2.4, 3, 6, 30.0,
                       best_checkpoint=str(checkpoint), best_metrics={"step": 3, "eval_loss": 2.4})
    (sweep_dir / "best.json").write_text(json.dumps(asdict(best)))
    pd.DataFrame([
        {"trial_id": "t0", "status": "completed", "param:training.learning_rate": 1e-3, "best_eval_loss": 2.4,
         "best_step": 3, "steps_run": 6, "device_seconds": 30.0, "tokens_seen": 900, "error": ""},
        {"trial_id": "t1", "status": "stopped early", "param:training.learning_rate": 1e-2, "best_eval_loss": 3.1,
         "best_step": 3, "steps_run": 3, "device_seconds": 20.0, "tokens_seen": 450, "error": ""},
    ]).to_csv(sweep_dir / "leaderboard.csv", index=False)
    scores = {"loss": 3.0, "exact_match": 0.1, "examples": 10}
    (sweep_dir / "final_metrics.json").write_text(json.dumps(
        {"trial_id": "t0", "step": 3, "params": best.params, "test": {"base": scores, "tuned": scores}}))
    study = optuna.create_study(study_name=config.name, storage=f"sqlite:///{sweep_dir / STUDY_FILE}")
    for trial_id, _lr, losses in (("t0", 1e-3, [2.6, 2.4]), ("t1", 1e-2, [3.1])):
        trial = study.ask({"training.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)})
        lines = []
        for k, loss in enumerate(losses):
            trial.report(loss, 3 * (k + 1))
            lines.append(json.dumps({"trial_id": trial_id, "step": 3 * (k + 1), "eval_loss": loss}))
        (sweep_dir / "tune" / f"trial_{trial_id}").mkdir(parents=True, exist_ok=True)
        (sweep_dir / "tune" / f"trial_{trial_id}" / "result.json").write_text("\n".join(lines) + "\n")
        study.tell(trial, losses[-1])
    shutil.copytree(tiny_model_dir, sweep_dir / "export" / "merged")
    return sweep_dir


def _write(name: str, content: str | bytes) -> Callable[[Path], Path]:
    def change(sweep_dir: Path) -> Path:
        path = sweep_dir / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return sweep_dir
    return change


def _edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def change(sweep_dir: Path) -> Path:
        data = json.loads((sweep_dir / name).read_text())
        edit(data)
        (sweep_dir / name).write_text(json.dumps(data))
        return sweep_dir
    return change


def _edit_yaml(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    def change(sweep_dir: Path) -> Path:
        config = yaml.safe_load((sweep_dir / "config.yaml").read_text())
        edit(config)
        (sweep_dir / "config.yaml").write_text(yaml.safe_dump(config))
        return sweep_dir
    return change


def _truncate(name: str) -> Callable[[Path], Path]:
    def change(sweep_dir: Path) -> Path:
        text = (sweep_dir / name).read_text()
        (sweep_dir / name).write_text(text[: len(text) // 2])
        return sweep_dir
    return change


def _remove(name: str) -> Callable[[Path], Path]:
    def change(sweep_dir: Path) -> Path:
        target = sweep_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return sweep_dir
    return change


def _missing_folder(sweep_dir: Path) -> Path:
    return sweep_dir.parent / "no-such-sweep"


def _a_file(sweep_dir: Path) -> Path:
    path = sweep_dir.parent / "notes.txt"
    path.write_text("not a sweep\n")
    return path


def _not_a_sweep(sweep_dir: Path) -> Path:
    path = sweep_dir.parent / "photos"
    path.mkdir()
    (path / "cat.jpg").write_bytes(NOISE)
    return path


def _foreign_sqlite(sweep_dir: Path) -> Path:
    (sweep_dir / STUDY_FILE).unlink()
    with sqlite3.connect(sweep_dir / STUDY_FILE) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    return sweep_dir


def _another_study(sweep_dir: Path) -> Path:
    (sweep_dir / STUDY_FILE).unlink()
    optuna.create_study(study_name="someone-else", storage=f"sqlite:///{sweep_dir / STUDY_FILE}")
    return sweep_dir


DIR = "{dir}"
GENERATE = ["generate", DIR, "Say hi."]
# name: (command line, how the folder is broken (returns the folder to give), text the refusal must contain)
CASES: dict[str, tuple[list[str], Callable[[Path], Path], str]] = {
    "status: no such folder": (["status", DIR], _missing_folder, "no-such-sweep: folder not found: no sweep has started"),
    "best: no such folder": (["best", DIR], _missing_folder, "no-such-sweep: folder not found"),
    "export: no such folder": (["export", DIR], _missing_folder, "no-such-sweep: folder not found"),
    "status: a file, not a folder": (["status", DIR], _a_file, "notes.txt: a file, not a sweep folder"),
    "report: a file, not a folder": (["report", DIR], _a_file, "notes.txt: a file, not a sweep folder"),
    "best: not a sweep folder": (["best", DIR], _not_a_sweep, "photos is not a sweep folder (no config.yaml)"),
    "report: not a sweep folder": (["report", DIR], _not_a_sweep, "photos is not a sweep folder (no config.yaml)"),
    "generate: not a sweep folder": (GENERATE, _not_a_sweep, "photos is not a sweep folder (no config.yaml)"),
    "status: status.json truncated": (["status", DIR], _truncate("status.json"), "status.json: not valid JSON"),
    "status: status.json binary": (["status", DIR], _write("status.json", NOISE), "status.json: not a text file"),
    "status: status.json empty": (["status", DIR], _write("status.json", ""), "status.json: empty file"),
    "status: status.json a list": (["status", DIR], _write("status.json", "[1, 2]"),
                                   "status.json: must be a JSON object, but got a list"),
    "status: status.json missing keys": (["status", DIR], _edit_json("status.json", lambda d: d.pop("state")),
                                         "status.json: `state`: required field is missing"),
    "status: status.json unknown state": (["status", DIR], _edit_json("status.json", lambda d: d.update(state="x" * 500)),
                                          "status.json: `state`: Input should be 'running', 'exporting'"),
    "status: status.json bad trial": (["status", DIR], _edit_json("status.json", lambda d: d.update(trials=[[1, 2]])),
                                      "status.json: `trials.0`:"),
    "best: best.json truncated": (["best", DIR], _truncate("best.json"), "best.json: not valid JSON"),
    "best: best.json missing keys": (["best", DIR], _edit_json("best.json", lambda d: d.pop("trial_id")),
                                     "best.json: `trial_id`: required field is missing"),
    "best: best.json wrong type": (["best", DIR], _edit_json("best.json", lambda d: d.update(params="lr=" + "9" * 500)),
                                   "best.json: `params`: Input should be a valid dictionary"),
    "best: best.json a list": (["best", DIR], _write("best.json", "[]"), "best.json: must be a JSON object, but got a list"),
    "export: best.json missing": (["export", DIR], _remove("best.json"), "best.json not found: the sweep has not finished promotion"),
    "export: best.json not JSON": (["export", DIR], _write("best.json", "trial t0"), "best.json: not valid JSON"),
    "report: final_metrics.json truncated": (["report", DIR], _truncate("final_metrics.json"),
                                             "final_metrics.json: not valid JSON"),
    "report: final_metrics.json missing keys": (["report", DIR], _edit_json("final_metrics.json", lambda d: d.pop("test")),
                                                "final_metrics.json: `test`: required field is missing"),
    "report: final_metrics.json wrong shape": (
        ["report", DIR], _edit_json("final_metrics.json", lambda d: d["test"]["tuned"].update(loss="low")),
        "final_metrics.json: `test.tuned.loss`: Input should be a valid number"),
    "report: provenance.json truncated": (["report", DIR], _truncate("provenance.json"), "provenance.json: not valid JSON"),
    "export: provenance.json a list": (["export", DIR], _write("provenance.json", '["data"]'),
                                       "provenance.json: must be a JSON object, but got a list"),
    "export: provenance.json without data_path": (["export", DIR], _edit_json("provenance.json", lambda d: d.pop("data_path")),
                                                  "provenance.json: `data_path`: required field is missing"),
    "export: prepared data gone": (["export", DIR], _remove("data"), "provenance.json: `data_path`: the prepared data"),
    "generate: provenance.json missing": (GENERATE, _remove("provenance.json"), "provenance.json not found"),
    "report: leaderboard.csv binary": (["report", DIR], _write("leaderboard.csv", NOISE),
                                       "leaderboard.csv: not a CSV text file"),
    "report: leaderboard.csv missing columns": (["report", DIR], _write("leaderboard.csv", "a,b\n1,2\n"),
                                                "leaderboard.csv: no column(s) ['trial_id', 'status', 'best_eval_loss']"),
    "export: leaderboard.csv missing columns": (["export", DIR], _write("leaderboard.csv", "a,b\n1,2\n"),
                                                "leaderboard.csv: no column(s) ['trial_id', 'status']"),
    "report: config.yaml bad YAML": (["report", DIR], _write("config.yaml", "name: tiny\nmodel: [unclosed\n"),
                                     "config.yaml: YAML syntax error at line 3"),
    "generate: config.yaml fails validation": (GENERATE, _edit_yaml(lambda c: c["training"].update(batch_size="eight")),
                                               "config.yaml: `training.batch_size`: Input should be a valid integer"),
    "report: config.yaml missing sections": (["report", DIR], _write("config.yaml", "name: tiny\n"),
                                             "config.yaml: `model`: required field is missing"),
    "export: config.yaml a list": (["export", DIR], _write("config.yaml", "- a\n- b\n"),
                                   "config.yaml: the top level must be a mapping of keys"),
    "status: status.json with a 10,000-digit number": (["status", DIR], _write("status.json", '{"total": ' + "9" * 10_000 + "}"),
                                                       "status.json: not valid JSON here"),
    "export: best.json params that are no tunable fields": (
        ["export", DIR], _edit_json("best.json", lambda d: d["params"].update({f"k{i}": i for i in range(10_000)})),
        "trial params: 'k0': not a tunable field (10000 such)"),
    "export: the base model is gone": (["export", DIR], _edit_yaml(lambda c: c["model"].update(path="/no/such/base")),
                                       "config.yaml: `model.path`: the base model '/no/such/base' is gone"),
    "report: study random bytes": (["report", DIR], _write(STUDY_FILE, NOISE), "optuna_study.db: not a SQLite database"),
    "report: study empty file": (["report", DIR], _write(STUDY_FILE, b""), "optuna_study.db: an empty file"),
    "report: study of another program": (["report", DIR], _foreign_sqlite, "optuna_study.db: a SQLite database without Optuna's tables"),
    "report: study of another sweep": (["report", DIR], _another_study, "optuna_study.db: holds no study named 'tiny'"),
    "report: a trial's result.json corrupt": (["report", DIR], _write("tune/trial_t0/result.json", '{"trial_id": "t0"\n{}\n'),
                                              "result.json: line 1: not valid JSON"),
    "generate: no export": (GENERATE, _remove("export"), "export/merged not found: the sweep has no export yet"),
    "generate: export config.json corrupt": (GENERATE, _write("export/merged/config.json", "{"),
                                             "export/merged: cannot load the exported model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_sweep_folder_is_refused_with_one_line_and_nothing_written(case, sweep_folder, tmp_path):
    command, change, expected = CASES[case]
    given = change(sweep_folder)
    before = listing(tmp_path)
    result = CliRunner().invoke(app, [str(given) if part == DIR else part for part in command])
    assert_refused(result, expected, before, tmp_path)


def test_the_intact_folder_is_read_by_every_command(sweep_folder):
    runner = CliRunner()
    status = runner.invoke(app, ["status", str(sweep_folder), "--json"])
    assert status.exit_code == 0 and json.loads(status.output)["counts"]["completed"] == 1, status.output
    best = runner.invoke(app, ["best", str(sweep_folder)])
    assert best.exit_code == 0 and "trial:      t0" in best.output, best.output
    for _ in range(2):  # the second report replaces the first
        report = runner.invoke(app, ["report", str(sweep_folder)])
        assert report.exit_code == 0 and "not drawn" not in report.output, report.output
    assert {p.name for p in sweep_folder.iterdir() if p.name.startswith(".")} == set()  # no staging left
    assert (sweep_folder / "report" / "index.html").is_file() and (sweep_folder / "report" / "best_vs_base.png").is_file()


def test_a_report_that_fails_part_way_leaves_the_earlier_report_as_it_was(sweep_folder, tmp_path, monkeypatch):
    assert CliRunner().invoke(app, ["report", str(sweep_folder)]).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in (sweep_folder / "report").iterdir()}

    def broken(final):
        raise KeyError("a figure that crashes after others were drawn")

    monkeypatch.setattr("lora_sweep.report.best_vs_base", broken)
    result = CliRunner().invoke(app, ["report", str(sweep_folder)])
    assert result.exit_code != 0 and isinstance(result.exception, KeyError)
    assert {p: p.stat().st_mtime_ns for p in (sweep_folder / "report").iterdir()} == before
    assert {p.name for p in sweep_folder.iterdir() if p.name.startswith(".")} == set()


def test_report_leaves_a_foreign_database_untouched(sweep_folder):
    _foreign_sqlite(sweep_folder)
    content = (sweep_folder / STUDY_FILE).read_bytes()
    assert CliRunner().invoke(app, ["report", str(sweep_folder)]).exit_code == 2
    assert (sweep_folder / STUDY_FILE).read_bytes() == content  # Optuna did not add its tables to it


def test_report_without_a_study_yet_or_with_a_trial_still_writing(sweep_folder):
    (sweep_folder / STUDY_FILE).unlink()
    study_storage(sweep_folder)  # the database with Optuna's tables: the sweep stopped before its searcher started
    result_file = sweep_folder / "tune" / "trial_t1" / "result.json"
    result_file.write_text(result_file.read_text() + '{"trial_id": "t1", "st')  # the line Tune is writing now
    result = CliRunner().invoke(app, ["report", str(sweep_folder)])
    assert result.exit_code == 0, result.output
    assert "not drawn: Optimisation history (no trial has finished)" in result.output
    assert (sweep_folder / "report" / "learning_curves.png").is_file()


@pytest.mark.parametrize("breaks, expected", [
    (_write(STUDY_FILE, NOISE), "not a SQLite database"),
    (_write(STUDY_FILE, b""), "an empty file"),
    (_foreign_sqlite, "a SQLite database without Optuna's tables"),
    (_another_study, "holds no study named 'tiny'"),
])
def test_check_study_refuses_a_database_that_is_not_this_sweeps_study(breaks, expected, sweep_folder):
    breaks(sweep_folder)
    with pytest.raises(ConfigError) as refused:
        check_study(sweep_folder)
    assert refused.value.source == str(sweep_folder / STUDY_FILE) and expected in str(refused.value)


def test_check_study_refuses_a_schema_this_optuna_cannot_use(sweep_folder):
    with sqlite3.connect(sweep_folder / STUDY_FILE) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    with pytest.raises(ConfigError, match=f"Optuna {optuna.__version__} cannot use it"):
        check_study(sweep_folder)


def test_check_study_accepts_this_sweeps_study_a_new_one_and_none(sweep_folder):
    check_study(sweep_folder)
    check_study(sweep_folder, "tiny")
    with pytest.raises(ConfigError, match="holds no study named 'other'"):
        check_study(sweep_folder, "other")
    (sweep_folder / STUDY_FILE).unlink()
    check_study(sweep_folder)  # no database yet: the sweep makes one
    study_storage(sweep_folder)
    check_study(sweep_folder)  # Optuna's tables and no study yet: the sweep adds it


def test_the_study_database_waits_for_a_lock_instead_of_failing(tmp_path):
    storage = study_storage(tmp_path)
    study = optuna.create_study(study_name="busy", storage=storage)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60_000
    holder = sqlite3.connect(tmp_path / STUDY_FILE, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    release = threading.Timer(1.0, holder.execute, args=("COMMIT",))
    release.start()
    started = time.monotonic()
    study.set_user_attr("written", True)  # waits for the lock instead of "database is locked"
    waited = time.monotonic() - started
    release.join()
    holder.close()
    assert waited >= 0.8
    assert optuna.load_study(study_name="busy", storage=study_storage(tmp_path)).user_attrs == {"written": True}
