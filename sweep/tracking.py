"""One per-trial tracker for the driver's Tune callbacks: a trial's step, last and best metric, and how it ended.

Every callback that follows trials (the live view's status.json, TensorBoard, and later trackers) derives from
`TrialTracker`, as Ray Tune's loggers derive from its `LoggerCallback`: the base keeps one `TrialProgress` per
trial from Tune's events, so a tracker only writes what the record says (`log_trial_start / result / end`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

from ray.tune.logger import LoggerCallback

from lora_sweep.direction import Direction
from lora_sweep.results import ended_status
from lora_sweep.trial_report import DIVERGED, STEP

TrialState = Literal["pending", "running", "completed", "stopped early", "errored"]


@dataclass
class TrialProgress:
    """Where one trial stands, as the driver saw it from Tune's events (status.json keeps these)."""

    trial_id: str
    status: TrialState
    params: dict[str, Any]
    step: int = 0
    last_metric: Optional[float] = None
    best_metric: Optional[float] = None  # never a diverged report's: that one carries the worst value on purpose
    best_step: Optional[int] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    diverged: bool = False


def metric_value(result: dict[str, Any], metric: str) -> Optional[float]:
    """The sweep metric of a report, or None when it has none that counts: missing, not finite, or diverged."""
    value = result.get(metric)
    if isinstance(value, (int, float)) and math.isfinite(value) and not result.get(DIVERGED):
        return float(value)
    return None


class TrialTracker(LoggerCallback):
    """Keeps `self.trials` (trial id -> TrialProgress) current, then calls the `log_trial_*` hooks.

    The record is updated before the hook runs, so a hook reads the trial's state after the event: in
    `log_trial_end`, `self.trials[trial.trial_id].status` is how the trial ended. Tune pickles its callbacks
    with the experiment before the first trial, so a tracker holds settings and this record only.
    """

    def __init__(self, metric: str, mode: str, max_steps: int):
        self.metric = metric
        self.direction = Direction(mode)
        self.max_steps = max_steps
        self.trials: dict[str, TrialProgress] = {}

    def tracked(self, trial: Any) -> TrialProgress:
        """The trial's record, created pending at its first event."""
        progress = self.trials.get(trial.trial_id)
        if progress is None:
            progress = self.trials[trial.trial_id] = TrialProgress(trial.trial_id, "pending", dict(trial.config))
        return progress

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        progress = self.tracked(trial)
        progress.status = "running"
        progress.started_at = progress.started_at or time.time()
        progress.ended_at = None
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        progress = self.tracked(trial)
        progress.step = int(result.get(STEP, progress.step))
        progress.diverged = progress.diverged or bool(result.get(DIVERGED))
        value = metric_value(result, self.metric)
        if value is not None:
            progress.last_metric = value
            if self.direction.is_better(value, progress.best_metric):
                progress.best_metric, progress.best_step = value, progress.step
        super().on_trial_result(iteration, trials, trial, result, **info)

    def _end(self, trial: Any, status: TrialState) -> None:
        progress = self.tracked(trial)
        progress.status, progress.ended_at = status, time.time()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        progress = self.tracked(trial)
        self._end(trial, ended_status(progress.diverged, progress.step, self.max_steps))
        super().on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._end(trial, "errored")
        super().on_trial_error(iteration, trials, trial, **info)
