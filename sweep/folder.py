"""The names of a sweep folder's files and folders, defined once (`results/<name>/`, mirrored to `storage`).

README's "The results folder" describes each. Every module that reads or writes one names it from here.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"  # the resolved config the sweep runs
PROVENANCE_FILE = "provenance.json"
STUDY_FILE = "optuna_study.db"
TUNE_DIR_NAME = "tune"  # Ray Tune's experiment: state, per-trial results, checkpoints
CONFIRM_DIR_NAME = "confirm"  # promotion.confirm's runs: a Tune experiment beside the sweep's
WORKERS_DIR = "workers"  # Ray Train's run of each running data-parallel trial (resources.workers), removed at its end
STATUS_FILE = "status.json"
DATA_DIR = "data"  # prepared data, one folder per content hash
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = Path("logs") / "ray.log"
LEADERBOARD_FILE = "leaderboard.csv"
CONFIRM_FILE = "confirm.csv"  # promotion.confirm's runs, one row each
BUDGET_FILE = "budget_spent.json"
BEST_FILE = "best.json"
FINAL_METRICS_FILE = "final_metrics.json"
EXPORT_DIR = "export"
MERGED_DIR = "merged"  # in EXPORT_DIR: the adapter merged into the base model
REPORT_DIR = "report"
LOCK_FILE = ".driver.lock"
MARKER_FILE = ".lora-sweep"  # marks a folder the engine made, locally and in storage (lora_sweep.safety writes it)
