"""TensorBoard logs written by the driver as results arrive: per-trial scalars and HParams.

Written from the driver (a Ray Tune Callback), not inside trials, so the logs
land in the sweep folder even when trials run on other nodes of a cluster.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from lora_sweep.folder import TENSORBOARD_DIR
from lora_sweep.tracking import TrialTracker
from lora_sweep.trial_report import ADAPTER_PARAMS, SCALARS


def hparam_value(value: Any) -> Any:
    """HParams accepts numbers, strings and bools only."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class TensorBoardCallback(TrialTracker):
    """Per-trial scalars at every report, and the trial's HParams (config, status, best metric) when it ends."""

    def __init__(self, log_dir: Path, metric: str, mode: str, max_steps: int, task_metrics: tuple[str, ...] = ()):
        super().__init__(metric, mode, max_steps)
        self.log_dir = Path(log_dir)
        self.scalars = (*SCALARS, *task_metrics)  # and the task metrics of trials' generated answers
        self._writers: dict[str, SummaryWriter] = {}
        self._adapter_params: dict[str, float] = {}

    def relocate(self, folder: Any) -> None:
        """The sweep resumed in another folder (`driver.follow_the_folder`): its logs go there."""
        self.log_dir = Path(folder.local) / TENSORBOARD_DIR

    def _writer(self, trial: Any) -> SummaryWriter:
        if trial.trial_id not in self._writers:
            self._writers[trial.trial_id] = SummaryWriter(str(self.log_dir / run_name(trial.trial_id, trial.config)))
        return self._writers[trial.trial_id]

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        step = self.trials[trial.trial_id].step
        writer = self._writer(trial)
        for name in self.scalars:
            value = result.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(name, value, step)
        if isinstance(result.get(ADAPTER_PARAMS), (int, float)):  # the same at every step: a cost beside the metric
            self._adapter_params[trial.trial_id] = float(result[ADAPTER_PARAMS])
        writer.flush()

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        progress = self.tracked(trial)
        writer = self._writer(trial)
        best = progress.best_metric
        metrics = {f"hparam/best_{self.metric}": math.nan if best is None else best,
                   "hparam/steps_run": float(progress.step),
                   "hparam/adapter_params": self._adapter_params.get(trial.trial_id, math.nan)}
        exp, session_start, session_end = hparams(
            {k: hparam_value(v) for k, v in trial.config.items()} | {"status": progress.status}, metrics
        )
        file_writer = writer._get_file_writer()
        for summary in (exp, session_start, session_end):
            file_writer.add_summary(summary)
        for name, value in metrics.items():
            writer.add_scalar(name, value)
        writer.close()
        self._writers.pop(trial.trial_id, None)


def run_name(trial_id: str, params: dict[str, Any]) -> str:
    """A readable run name: the trial id plus its key hyperparameters."""
    short = {"training.learning_rate": "lr", "lora.rank": "r", "training.batch_size": "bs"}
    parts = [trial_id]
    for key, label in short.items():
        if key in params:
            value = params[key]
            parts.append(f"{label}={value:.2g}" if isinstance(value, float) else f"{label}={value}")
    return "_".join(parts)
