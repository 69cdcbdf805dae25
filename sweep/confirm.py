"""`promotion.confirm`: the sweep's best configurations trained again with more seeds, promoted by the mean.

A single run's metric carries its seed's luck (initialisation, data order): on the shipped learning-curve
tables the single-seed winner of a 64-trial sweep is not the two-seed mean winner in 43% (demo) and 7%
(pydocs) of draws (BENCHMARKS.md, Search). The top K trials' configurations run N more times to the end,
each with seed+1 ... seed+N, in a Tune experiment of their own (`confirm/`, resumable like the sweep);
every record gets its per-seed metrics, and `results.promote` picks the best mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from lora_sweep.config import SweepConfig
from lora_sweep.folder import CONFIRM_FILE
from lora_sweep.results import TrialRecord, promotable, trial_record, write_atomically

log = logging.getLogger(__name__)


@dataclass
class ConfirmRun:
    of: str  # the sweep trial whose configuration this run trains again
    seed: int
    record: TrialRecord  # its params are the configuration's, as the sweep trial's are


def confirm_plan(records: list[TrialRecord], config: SweepConfig) -> list[dict[str, Any]]:
    """The runs to train: each of the top K trials' params with each extra seed, best trial first."""
    confirm = config.promotion.confirm
    if confirm is None:
        return []
    top = promotable(records, config)[: confirm.top]
    return [{"of": r.trial_id, "seed": seed, "params": r.params} for r in top for seed in config.confirm_seeds]


def confirm_runs(result_grid: Any, config: SweepConfig) -> list[ConfirmRun]:
    """The confirm experiment's results as runs, each a TrialRecord with its configuration's params."""
    runs = []
    for result in result_grid:
        spec = (result.config or {})["run"]
        record = replace(trial_record(result, config), params=dict(spec["params"]))
        runs.append(ConfirmRun(of=str(spec["of"]), seed=int(spec["seed"]), record=record))
    return sorted(runs, key=lambda run: (run.of, run.seed))


def with_seed_metrics(records: list[TrialRecord], runs: list[ConfirmRun], config: SweepConfig) -> list[TrialRecord]:
    """The sweep's records, the confirmed ones with their best metric per seed (the sweep trial's own under
    the sweep's seed). A run that errored or never reported adds nothing: the mean is over the seeds that ran."""
    by_trial: dict[str, dict[str, float]] = {}
    for run in runs:
        if run.record.best_metric is None:
            log.warning("promotion.confirm: the run of %s with seed %d gave no `%s` (%s); its mean leaves it out",
                        run.of, run.seed, config.search.metric, run.record.error or run.record.status)
            continue
        by_trial.setdefault(run.of, {})[str(run.seed)] = run.record.best_metric
    confirmed = {run.of for run in runs}
    return [replace(r, seed_metrics={str(config.seed): r.best_metric, **by_trial.get(r.trial_id, {})})
            if r.trial_id in confirmed and r.best_metric is not None else r for r in records]


def write_confirm_runs(runs: list[ConfirmRun], sweep_dir: Path, config: SweepConfig) -> Path:
    """confirm.csv: one row per confirm run (the configuration it trains again, its seed, how it ended)."""
    rows = []
    for run in runs:
        r = run.record
        rows.append({"of": run.of, "seed": run.seed, "status": r.status, f"best_{config.search.metric}": r.best_metric,
                     "best_step": r.best_step, "steps_run": r.steps_run, "wall_seconds": r.wall_seconds,
                     "device_seconds": r.device_seconds, "tokens_seen": r.tokens_seen,
                     "best_checkpoint": r.best_checkpoint or "", "error": r.error})
    path = sweep_dir / CONFIRM_FILE
    write_atomically(path, pd.DataFrame(rows).to_csv(index=False))
    return path
