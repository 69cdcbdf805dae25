"""Bounded disk: when a sweep ends, only the promoted checkpoint and the k best of the sweep stay.

While it runs, Ray Tune keeps each trial's `checkpoints.keep` best checkpoints
(by the sweep metric) plus its latest, the resume point; this removes the rest
once the sweep is decided.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from sweep.config import SweepConfig
from sweep.driver import TUNE_DIR_NAME
from sweep.results import TrialRecord, folder_bytes


def prune_checkpoints(records: list[TrialRecord], best: TrialRecord, config: SweepConfig,
                      sweep_dir: Path) -> list[TrialRecord]:
    """Delete every checkpoint but the promoted one and the sweep's `checkpoints.keep` best; update bytes."""
    everything = [(c["metric"], c["path"]) for r in records for c in r.checkpoints]
    everything.sort(key=lambda item: item[0], reverse=config.search.mode == "max")
    keep = {path for _, path in everything[: config.checkpoints.keep]} | {best.best_checkpoint}
    tune_dir = (sweep_dir / TUNE_DIR_NAME).resolve()
    pruned = []
    for record in records:
        kept = []
        for checkpoint in record.checkpoints:
            path = Path(checkpoint["path"]).resolve()
            if checkpoint["path"] in keep:
                kept.append(checkpoint)
            elif tune_dir in path.parents:  # never delete anything outside the sweep's own folder
                shutil.rmtree(path, ignore_errors=True)
        pruned.append(replace(
            record, checkpoints=kept,
            best_checkpoint=record.best_checkpoint if record.best_checkpoint in keep else None,
            disk_bytes=folder_bytes(Path(record.trial_dir)),
        ))
    return pruned
