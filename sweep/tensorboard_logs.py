"""TensorBoard logs written by the driver as results arrive: per-trial scalars and HParams.

Written from the driver (a Ray Tune Callback), not inside trials, so the logs
land in the sweep folder even when trials run on other nodes of a cluster.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray.tune import Callback
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from lora_sweep.direction import Direction
from lora_sweep.results import ended_status
from lora_sweep.trial_report import ADAPTER_PARAMS, DIVERGED, SCALARS, STEP


def hparam_value(value: Any) -> Any:
    """HParams accepts numbers, strings and bools only."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class TensorBoardCallback(Callback):
    def __init__(self, log_dir: Path, metric: str, mode: str, max_steps: int):
        self.log_dir = Path(log_dir)
        self.metric = metric
        self.mode = mode
        self.max_steps = max_steps
        self._diverged: set[str] = set()
        self._writers: dict[str, SummaryWriter] = {}
        self._best: dict[str, float] = {}
        self._steps: dict[str, int] = {}
        self._adapter_params: dict[str, float] = {}

    def _writer(self, trial: Any) -> SummaryWriter:
        if trial.trial_id not in self._writers:
            self._writers[trial.trial_id] = SummaryWriter(str(self.log_dir / run_name(trial.trial_id, trial.config)))
        return self._writers[trial.trial_id]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        step = int(result.get(STEP, 0))
        writer = self._writer(trial)
        for name in SCALARS:
            value = result.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(name, value, step)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and not result.get(DIVERGED):
            best = self._best.get(trial.trial_id)
            if Direction(self.mode).is_better(float(value), best):
                self._best[trial.trial_id] = float(value)
        self._steps[trial.trial_id] = step
        if isinstance(result.get(ADAPTER_PARAMS), (int, float)):  # the same at every step: a cost beside the metric
            self._adapter_params[trial.trial_id] = float(result[ADAPTER_PARAMS])
        if result.get(DIVERGED):
            self._diverged.add(trial.trial_id)
        writer.flush()

    def _close(self, trial: Any, status: str) -> None:
        writer = self._writer(trial)
        metrics = {f"hparam/best_{self.metric}": self._best.get(trial.trial_id, math.nan),
                   "hparam/steps_run": float(self._steps.get(trial.trial_id, 0)),
                   "hparam/adapter_params": self._adapter_params.get(trial.trial_id, math.nan)}
        exp, session_start, session_end = hparams(
            {k: hparam_value(v) for k, v in trial.config.items()} | {"status": status}, metrics
        )
        file_writer = writer._get_file_writer()
        for summary in (exp, session_start, session_end):
            file_writer.add_summary(summary)
        for name, value in metrics.items():
            writer.add_scalar(name, value)
        writer.close()
        self._writers.pop(trial.trial_id, None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        steps = self._steps.get(trial.trial_id, 0)
        self._close(trial, ended_status(trial.trial_id in self._diverged, steps, self.max_steps))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "errored")


def run_name(trial_id: str, params: dict[str, Any]) -> str:
    """A readable run name: the trial id plus its key hyperparameters."""
    short = {"training.learning_rate": "lr", "lora.rank": "r", "training.batch_size": "bs"}
    parts = [trial_id]
    for key, label in short.items():
        if key in params:
            value = params[key]
            parts.append(f"{label}={value:.2g}" if isinstance(value, float) else f"{label}={value}")
    return "_".join(parts)
