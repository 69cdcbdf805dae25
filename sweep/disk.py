"""Bounded disk: when a sweep ends, only the promoted checkpoint and the k best of the sweep stay.

While it runs, Ray Tune keeps each trial's `checkpoints.keep` best checkpoints
(by the sweep metric) plus its latest, the resume point; this removes the rest
once the sweep is decided.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import pyarrow.fs as pafs
from pyarrow import ArrowException

from sweep.config import SweepConfig
from sweep.results import TrialRecord
from sweep.storage import TUNE_DIR_NAME, open_storage, tree_bytes

log = logging.getLogger(__name__)


def prune_checkpoints(records: list[TrialRecord], best: TrialRecord, config: SweepConfig,
                      sweep_dir: Path) -> list[TrialRecord]:
    """Delete every checkpoint but the promoted one and the sweep's `checkpoints.keep` best; update bytes.

    Checkpoints are where Tune stored them: the local sweep folder, or the sweep's storage.
    """
    everything = [(c["metric"], c["path"]) for r in records for c in r.checkpoints]
    everything.sort(key=lambda item: item[0], reverse=config.search.mode == "max")
    keep = {path for _, path in everything[: config.checkpoints.keep]} | {best.best_checkpoint}
    storage = open_storage(config)
    if storage is None:
        filesystem: pafs.FileSystem = pafs.LocalFileSystem()
        tune_dir, normal = str((sweep_dir / TUNE_DIR_NAME).resolve()), lambda p: str(Path(p).resolve())
    else:
        filesystem, tune_dir, normal = storage.filesystem, storage.path(TUNE_DIR_NAME), os.path.normpath
    pruned = []
    for record in records:
        kept = []
        for checkpoint in record.checkpoints:
            if checkpoint["path"] in keep:
                kept.append(checkpoint)
            elif normal(checkpoint["path"]).startswith(tune_dir + "/"):  # never delete outside the sweep's folder
                try:
                    filesystem.delete_dir(checkpoint["path"])
                except FileNotFoundError:
                    pass
                except (OSError, ArrowException) as error:  # the export is done: a checkpoint left is no failure
                    log.warning("could not delete the checkpoint %s: %s", checkpoint["path"], error)
        pruned.append(replace(
            record, checkpoints=kept,
            best_checkpoint=record.best_checkpoint if record.best_checkpoint in keep else None,
            disk_bytes=tree_bytes(filesystem, record.trial_dir),
        ))
    return pruned
