"""Bounded disk: a trial holds its `checkpoints.keep` best checkpoints plus its latest, and only the best survive.

The latest is kept because it is where a crashed trial resumes; a new checkpoint is
written before the one it evicts is deleted, so a crash never loses the best one.
Together that bounds a trial at keep + 2 checkpoints at any moment.
"""

import threading
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import ray

from lora_sweep.config import load_config
from lora_sweep.pipeline import run
from lora_sweep.storage import tree_bytes

pytestmark = pytest.mark.integration
KEEP = 2


def folder_bytes(path: Path) -> int:
    return tree_bytes(pafs.LocalFileSystem(), str(path))


class CheckpointWatcher(threading.Thread):
    """Samples the sweep folder while it runs: most checkpoints any trial held at once, and their bytes."""

    def __init__(self, tune_dir: Path):
        super().__init__(daemon=True)
        self.tune_dir = tune_dir
        self.stop = threading.Event()
        self.most_per_trial = 0
        self.peak_bytes = 0
        self.samples = 0

    def run(self):
        while not self.stop.is_set():
            total = 0
            for trial_dir in self.tune_dir.glob("tune_trainable_*"):
                checkpoints = [p for p in trial_dir.glob("checkpoint_*") if p.is_dir()]
                self.most_per_trial = max(self.most_per_trial, len(checkpoints))
                total += sum(folder_bytes(p) for p in checkpoints)
            self.peak_bytes = max(self.peak_bytes, total)
            self.samples += 1
            self.stop.wait(0.05)


def test_a_20_trial_sweep_holds_a_bounded_number_of_checkpoints_per_trial(raw_config, write_config, capsys):
    raw_config["training"].update({"max_steps": 12, "eval_steps": 2})
    raw_config["search"].update({"num_trials": 20, "space": "lr_only"})
    raw_config["scheduler"] = {"type": "asha", "grace_period": 4, "reduction_factor": 2}
    raw_config["checkpoints"] = {"keep": KEEP}
    config = load_config(write_config(raw_config))
    watcher = CheckpointWatcher(config.sweep_dir / "tune")
    watcher.start()
    try:
        outcome = run(config)
    finally:
        watcher.stop.set()
        watcher.join()
        ray.shutdown()
    assert watcher.samples > 50
    assert 1 <= watcher.most_per_trial <= KEEP + 2
    survivors = sorted(p for p in (outcome.sweep_dir / "tune").glob("*/checkpoint_*") if p.is_dir())
    assert len(survivors) <= KEEP + 1
    assert outcome.final.best.best_checkpoint in {str(p) for p in survivors}
    board = pd.read_csv(outcome.sweep_dir / "leaderboard.csv")
    assert len(board) == 20 and (board["disk_bytes"] > 0).all()
    one_checkpoint = folder_bytes(survivors[0])
    with capsys.disabled():
        print(f"\n20-trial sweep: at most {watcher.most_per_trial} checkpoints per trial, peak {watcher.peak_bytes} "
              f"checkpoint bytes ({watcher.peak_bytes / one_checkpoint:.1f} checkpoints of {one_checkpoint} bytes), "
              f"{len(survivors)} left after the sweep")
