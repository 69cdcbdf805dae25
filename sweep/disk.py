"""Bounded disk: when a sweep ends, only the promoted checkpoint and the k best of the sweep stay.

While it runs, Ray Tune keeps each trial's `checkpoints.keep` best checkpoints
(by the sweep metric) plus its latest, the resume point; this removes the rest
once the sweep is decided.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

from pyarrow import ArrowException

from lora_sweep.config import ConfigError, SweepConfig
from lora_sweep.folder import CONFIRM_DIR_NAME, TUNE_DIR_NAME
from lora_sweep.results import TrialRecord
from lora_sweep.storage import SweepFolder, tree_bytes

log = logging.getLogger(__name__)

# A Trainer checkpoint holds the adapter weights, AdamW's two moments (3x the adapter) and about
# 20 KB of scheduler, RNG and trainer state (measured on the demo model, BENCHMARKS.md "Disk").
CHECKPOINT_STATE_BYTES = 20_000
ADAPTER_BYTES_PER_PARAMETER = 4  # peft keeps adapter weights in float32 whatever the base dtype
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def disk_needs(config: SweepConfig, adapter_parameters: int, base_parameters: int, concurrent: int) -> dict[str, int]:
    """Bytes the sweep writes: one checkpoint, the most its checkpoints take while it runs and after, the export."""
    checkpoint = adapter_parameters * ADAPTER_BYTES_PER_PARAMETER * 3 + CHECKPOINT_STATE_BYTES
    keep = config.checkpoints.keep
    return {
        "checkpoint": checkpoint,
        # While it runs, each trial keeps its k best and its latest; a running one can hold one more (and a
        # data-parallel one, in the sweep's workers/ folder, its Ray Train run's latest, a second while Train
        # registers a new one, and the one a resumed trial started from).
        "during_sweep_at_most": config.search.num_trials * (keep + 1) * checkpoint
        + concurrent * checkpoint * (4 if config.resources.workers > 1 else 1),
        "after_sweep": (keep + 1) * checkpoint,
        "export": adapter_parameters * ADAPTER_BYTES_PER_PARAMETER
        + base_parameters * DTYPE_BYTES.get(config.model.dtype, 4),
    }


def human_bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(value)


def nearest_existing(path: Path) -> Path:
    """The folder itself, or the nearest folder above it that exists (where it would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(config: SweepConfig, needs: dict[str, int], concurrent: int) -> Optional[str]:
    """Compare what the sweep writes to the output folder's free space, before anything is written.

    Refused (ConfigError) below the least the sweep needs to finish: the export, plus one checkpoint per
    running trial when checkpoints are kept locally. Returns a warning between that and the most it can
    take (every checkpoint kept until the end): an upper bound that ASHA's stops and pruning rarely reach.
    With `storage`, checkpoints go there and only the export is counted locally.
    """
    folder = nearest_existing(config.sweep_dir)
    free = shutil.disk_usage(folder).free
    local_checkpoints = config.storage is None
    least = needs["export"] + (concurrent * needs["checkpoint"] if local_checkpoints else 0)
    most = needs["export"] + (needs["during_sweep_at_most"] if local_checkpoints else 0)
    if free < least:
        raise ConfigError([f"`output_dir`: {folder} has {human_bytes(free)} free, but the sweep needs at least "
                           f"{human_bytes(least)} (the export and a checkpoint per running trial) and up to "
                           f"{human_bytes(most)}; free some space or choose another output_dir"], "output")
    if free < most:
        return (f"{folder} has {human_bytes(free)} free; the sweep may write up to {human_bytes(most)} if every "
                f"checkpoint is kept until the end (at least {human_bytes(least)})")
    return None


def prune_checkpoints(records: list[TrialRecord], best: TrialRecord, config: SweepConfig,
                      folder: SweepFolder) -> list[TrialRecord]:
    """Delete every checkpoint but the promoted one and the sweep's `checkpoints.keep` best; update bytes.

    Checkpoints are where Tune stored them: the local sweep folder, or the sweep's storage.
    """
    everything = [(c["metric"], c["path"]) for r in records for c in r.checkpoints]
    everything = config.direction.best_first(everything, key=lambda item: item[0])
    keep = {path for _, path in everything[: config.checkpoints.keep]} | {best.best_checkpoint}
    filesystem = folder.filesystem
    roots = [folder.experiment_path(name) for name in (TUNE_DIR_NAME, CONFIRM_DIR_NAME)]
    normal = os.path.normpath if folder.storage else lambda p: str(Path(p).resolve())
    pruned = []
    for record in records:
        kept = []
        for checkpoint in record.checkpoints:
            if checkpoint["path"] in keep:
                kept.append(checkpoint)
            elif any(normal(checkpoint["path"]).startswith(root + "/") for root in roots):  # never outside the sweep's folder
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
