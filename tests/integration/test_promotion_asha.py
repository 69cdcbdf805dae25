"""`scheduler.type: promotion_asha` in a real sweep: trials pause at a rung, the promoted ones resume exactly.

A paused trial's curve after it resumes must equal the curve of the same configuration trained without a
pause (the checkpoint holds the adapter, optimizer, schedule, RNG and step), the sweep must end (trials never
promoted are stopped), and the study must hold every trial once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from lora_sweep.config import SweepConfig
from lora_sweep.data import prepare_data
from lora_sweep.report import trial_histories
from lora_sweep.models import load_tokenizer
from lora_sweep.recipe import ListReporter, run_trial

pytestmark = pytest.mark.integration
QUIET = {"LORA_SWEEP_TUNE_VERBOSE": "0"}
PROMOTION = {"type": "promotion_asha", "grace_period": 3, "reduction_factor": 2}


def results_of(sweep_dir: Path) -> dict[str, list[dict]]:
    """Every trial's reports, by trial id, read by the engine's own reader of Tune's result.json files."""
    return {trial_id: history.to_dict("records") for trial_id, history in trial_histories(sweep_dir).items()}


def short_sweep(raw_config: dict, write_config, trials: int, at_once: int, scheduler: dict) -> Path:
    """The config of a sweep of 12-step trials evaluated every 3 steps."""
    raw_config["training"].update({"max_steps": 12, "eval_steps": 3})
    raw_config["search"].update({"num_trials": trials, "max_concurrent_trials": at_once})
    raw_config["scheduler"] = scheduler
    return write_config(raw_config)


def sweep_to_its_end(config_path: Path, tmp_path: Path) -> Path:
    """`sweep run` to its end; the sweep folder."""
    done = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "run", str(config_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **QUIET})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / "results" / "tiny"


def test_paused_trials_resume_exactly_and_the_sweep_ends(raw_config, write_config, tmp_path):
    sweep_dir = sweep_to_its_end(short_sweep(raw_config, write_config, trials=5, at_once=2, scheduler=PROMOTION),
                                 tmp_path)
    results = results_of(sweep_dir)
    assert len(results) == 5
    for rows in results.values():  # never a step redone or skipped, paused or not
        steps = [row["step"] for row in rows]
        assert steps == list(range(3, steps[-1] + 1, 3)), steps
    finished = [rows for rows in results.values() if rows[-1]["step"] == 12]
    stopped = [rows for rows in results.values() if rows[-1]["step"] < 12]
    assert finished and stopped  # some promoted to the end, some left at a rung
    # Every trial that went past a rung was paused there unless it was in the rung's top half at once; the
    # first one to reach step 3 had nothing to be compared with, so it paused: its curve went on from the
    # checkpoint. Each promoted curve must equal an uninterrupted run of the same configuration.
    config = SweepConfig.model_validate({**raw_config, "output_dir": str(tmp_path / "results")})
    prepared = prepare_data(config.data, load_tokenizer(config), config.seed, tmp_path / "data")
    resumed_somewhere = False
    for rows in finished:
        params = rows[0]["config"]
        reporter = ListReporter()
        run_trial(params, config.model_dump(mode="json"), str(prepared.path), reporter)
        assert [r["step"] for r in reporter.reports] == [3, 6, 9, 12]
        for swept, alone in zip(rows, reporter.reports, strict=True):
            assert swept["eval_loss"] == pytest.approx(alone["eval_loss"], abs=1e-5), (swept["step"], params)
        resumed_somewhere |= any(row["iterations_since_restore"] < row["training_iteration"] for row in rows)
    assert resumed_somewhere, "no promoted trial was ever paused and resumed"
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert len(board) == 5 and board["trial_id"].is_unique
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'optuna_study.db'}")
    states = sorted(trial.state.name for trial in study.trials)
    assert len(states) == 5 and set(states) <= {"COMPLETE", "PRUNED"}, states  # none lost, none duplicated
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()


def test_the_replay_takes_the_decisions_a_real_sweep_took(raw_config, write_config, tmp_path):
    """A real sweep (trials one at a time, so the order of results is known), then the replay's own code path
    fed the recorded results: the same configurations suggested, the same trials stopped at the same steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import replay

    asha = {"type": "asha", "grace_period": 3, "reduction_factor": 2}
    sweep_dir = sweep_to_its_end(short_sweep(raw_config, write_config, trials=6, at_once=1, scheduler=asha), tmp_path)
    # Tune numbers its trials in the order it made them: tune_trainable_<id>_<number>_<params>_<date>
    files = sorted((sweep_dir / "tune").glob("*/result.json"), key=lambda path: int(path.parent.name.split("_")[3]))
    results = results_of(sweep_dir)
    ordered = [results[json.loads(path.read_text().splitlines()[0])["trial_id"]] for path in files]
    real = [(rows[0]["config"], rows[-1]["step"]) for rows in ordered]
    assert any(step < 12 for _, step in real), "ASHA stopped no trial: the test shows nothing"
    config = SweepConfig.model_validate(raw_config)
    from lora_sweep.search_space import build_search_space

    replayed = replay.follow(config, build_search_space(config),
                             [[(row["step"], row["eval_loss"]) for row in rows] for rows in ordered])
    assert [params for params, _ in replayed] == [params for params, _ in real]
    assert [step for _, step in replayed] == [step for _, step in real]


def test_a_sweep_killed_with_paused_trials_resumes_losing_nothing(raw_config, write_config, tmp_path):
    """SIGKILL while trials wait at a rung, then `sweep resume`: every trial is kept once, the ones that had
    reported keep their reports, no trial starts over, and the sweep ends."""
    from sweep_process import assert_never_started_over, kill, resume, start_sweep, trial_histories, wait_for

    sweep_dir = tmp_path / "results" / "tiny"
    process = start_sweep(short_sweep(raw_config, write_config, trials=5, at_once=2, scheduler=PROMOTION), tmp_path)
    # three trials have reported: the first ones reached the first rung alone and were paused there
    wait_for(lambda: len(trial_histories(sweep_dir)) >= 3, process, timeout=300)
    kill(process)
    before = trial_histories(sweep_dir)
    finished = resume(sweep_dir, tmp_path)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    after = trial_histories(sweep_dir)
    assert len(after) == 5
    for trial_id, steps in before.items():
        assert after[trial_id][: len(steps)] == steps
    for steps in after.values():
        assert_never_started_over(steps, 3)
    board = pd.read_csv(sweep_dir / "leaderboard.csv")
    assert len(board) == 5 and board["trial_id"].is_unique
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{sweep_dir / 'optuna_study.db'}")
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5  # each trial Tune ran ended in the study once: none lost, none finished twice
    # None left behind: a suggestion the study took after Tune's last snapshot is handed out again on resume
    # (ResumableOptunaSearch.restore; tests/test_search_space.py shows it without the race).
    assert len(study.trials) == 5, [t.state.name for t in study.trials]
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
