"""Trackers teams already use (`trackers: [mlflow, wandb]`), fed by the driver as results arrive.

Both are `TrialTracker`s, like the TensorBoard logs: the base keeps each trial's step, best metric and how it
ended, and a tracker writes what that record says. They run in the driver, so a trial on another node of a
cluster needs no tracker credentials or network of its own.

- MLflow: one parent run per sweep, a nested run per trial (parameters, every reported metric by step, status,
  device-seconds); after the export, the promoted adapter and merged model are logged to the parent run and the
  merged model is registered in the Model Registry under the sweep's name, with its test metrics and a link to
  the sweep folder. Runs are found again by their tags (sweep id, trial id), so a resumed sweep continues them.
- Weights & Biases: one run per trial, grouped by the sweep's name; offline by default (`wandb sync` uploads it).

The packages are optional extras (`pip install 'lora-sweep[mlflow]'`, `[wandb]`): `check_trackers` refuses a
configured tracker that is not installed, or an MLflow server that does not answer, before anything runs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional

from lora_sweep.config import ConfigError, SweepConfig, cut, redact_uri
from lora_sweep.tracking import TrialTracker
from lora_sweep.trial_report import ADAPTER_PARAMS, SCALARS, STEP, TOKENS_SEEN

if TYPE_CHECKING:
    from ray.tune import Callback

    from lora_sweep.export import FinalReport

log = logging.getLogger(__name__)
SWEEP_ID_TAG = "lora_sweep.sweep_id"  # the sweep folder's marker id: a resumed sweep finds its runs by it
TRIAL_ID_TAG = "lora_sweep.trial_id"
STATUS_TAG = "lora_sweep.status"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for a nested run
INSTALL = {"mlflow": "pip install 'lora-sweep[mlflow]'", "wandb": "pip install 'lora-sweep[wandb]'"}
# How each way a trial ends reads in MLflow (a trial the scheduler stopped early ended as planned).
MLFLOW_STATUS = {"completed": "FINISHED", "stopped early": "FINISHED", "errored": "FAILED"}


def mlflow_tracking_uri(config: SweepConfig, sweep_dir: Path) -> str:
    """`mlflow.tracking_uri`, else MLFLOW_TRACKING_URI, else a SQLite store in the sweep folder (MLflow 3 keeps
    its file store in maintenance mode: SQLite is the local store it recommends)."""
    if config.mlflow.tracking_uri:
        return config.mlflow.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(sweep_dir) / 'mlflow.db').resolve()}"


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP client retries a dead server for minutes; a check before the sweep asks once, briefly."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_trackers(config: SweepConfig) -> None:
    """Every configured tracker is installed, and a remote MLflow server answers: a ConfigError naming the field."""
    problems = [f"`trackers`: {name} is configured but its package is not installed; {INSTALL[name]}"
                for name in config.trackers if importlib.util.find_spec(name) is None]
    if problems:
        raise ConfigError(problems, "config")
    uri = mlflow_tracking_uri(config, config.sweep_dir)
    if "mlflow" in config.trackers and uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            with _quick_http():
                MlflowClient(uri).search_experiments(max_results=1)
        except (MlflowException, OSError) as error:
            reason = cut((str(error).strip().splitlines() or [type(error).__name__])[0], 200)
            raise ConfigError([f"`mlflow.tracking_uri`: the MLflow server at {redact_uri(uri)} does not answer "
                               f"({reason.replace(uri, redact_uri(uri))})"],
                              "config") from None


def tracker_targets(config: SweepConfig, sweep_dir: Path) -> list[str]:
    """Where each configured tracker logs, for `sweep plan` (the store's URI with anything secret masked)."""
    targets = []
    if "mlflow" in config.trackers:
        experiment = config.mlflow.experiment or config.name
        targets.append(f"mlflow: {redact_uri(mlflow_tracking_uri(config, sweep_dir))}, experiment {experiment!r}"
                       + (f", promoted model registered as {config.mlflow.model_name or config.name!r}"
                          if config.mlflow.register_model else ""))
    if "wandb" in config.trackers:
        where = Path(config.wandb.dir or sweep_dir) / "wandb"
        targets.append(f"wandb: project {config.wandb.project or config.name!r}, group {config.name!r}, "
                       + (f"offline in {where}" if config.wandb.mode == "offline" else "online"))
    return targets


def tracker_callbacks(config: SweepConfig, sweep_dir: Path, sweep_id: str, task_metrics: tuple[str, ...]) -> list[Callback]:
    """The configured trackers as Tune callbacks for the driver."""
    callbacks: list[Callback] = []
    scalars = (*SCALARS, *task_metrics)
    if "mlflow" in config.trackers:
        callbacks.append(MLflowTracker(
            MLflowTarget.of(config, sweep_dir, sweep_id), config.search.metric, config.search.mode,
            config.training.max_steps, scalars, config.devices_per_trial))
    if "wandb" in config.trackers:
        callbacks.append(WandbTracker(
            config.wandb.project or config.name, config.name, config.wandb.mode,
            str(Path(config.wandb.dir or sweep_dir).resolve()), config.search.metric, config.search.mode,
            config.training.max_steps, scalars, config.devices_per_trial, in_sweep_folder=config.wandb.dir is None))
    return callbacks


def _numbers(result: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """The finite numbers among `names` in a report (a diverged trial's loss may be inf or NaN)."""
    return {name: float(result[name]) for name in names
            if isinstance(result.get(name), (int, float)) and not isinstance(result.get(name), bool)
            and math.isfinite(result[name])}


def _tracker_may_fail(method: Callable[..., None]) -> Callable[..., None]:
    """A tracker that fails (its server gone, a full disk) is warned about, never allowed to end the sweep."""

    @functools.wraps(method)
    def guarded(self: _CostTracker, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracker failure; the sweep's own work goes on
            if type(error).__name__ not in self.warned:
                self.warned.add(type(error).__name__)
                log.warning("%s: %s failed (%s); the sweep goes on without it for this event", type(self).__name__,
                            method.__name__, cut(str(error).strip().splitlines()[0] if str(error).strip() else
                                                 type(error).__name__, 200))

    return guarded


class _CostTracker(TrialTracker):
    """A TrialTracker that also keeps each trial's running seconds (Tune's `time_total_s`) for device-seconds."""

    def __init__(self, metric: str, mode: str, max_steps: int, scalars: tuple[str, ...], devices_per_trial: float):
        super().__init__(metric, mode, max_steps)
        self.scalars = scalars
        self.devices_per_trial = devices_per_trial
        self.warned: set[str] = set()
        self._seconds: dict[str, float] = {}
        self._last: dict[str, dict[str, Any]] = {}

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        self._seconds[trial.trial_id] = float(result.get("time_total_s", 0.0) or 0.0)
        self._last[trial.trial_id] = {**self._last.get(trial.trial_id, {}), **result}  # the latest of each key
        super().on_trial_result(iteration, trials, trial, result, **info)

    def summary(self, trial: Any) -> dict[str, float]:
        """What a trial's run keeps when it ends: its best metric, steps, device-seconds, tokens and adapter size."""
        progress = self.tracked(trial)
        last = self._last.get(trial.trial_id, {})
        values = {f"best_{self.metric}": progress.best_metric, "steps_run": float(progress.step),
                  "device_seconds": round(self._seconds.get(trial.trial_id, 0.0) * self.devices_per_trial, 2),
                  **_numbers(last, (TOKENS_SEEN, ADAPTER_PARAMS))}
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class MLflowTarget:
    """Where a sweep's runs go: a tracking server or store, an experiment, and the sweep they belong to."""

    tracking_uri: str
    experiment: str
    sweep_id: str
    sweep_name: str
    sweep_folder: str  # the folder, or its storage URI: where the run's checkpoints and export are
    artifact_location: Optional[str]  # for a store in the sweep folder, its artifacts beside it

    @classmethod
    def of(cls, config: SweepConfig, sweep_dir: Path, sweep_id: str) -> MLflowTarget:
        uri = mlflow_tracking_uri(config, sweep_dir)
        local_store = uri == f"sqlite:///{(Path(sweep_dir) / 'mlflow.db').resolve()}"
        stored = f"{config.storage.split('?')[0].rstrip('/')}/{config.name}" if config.storage else None
        return cls(uri, config.mlflow.experiment or config.name, sweep_id, config.name,
                   stored or str(Path(sweep_dir).resolve()),
                   str((Path(sweep_dir) / "mlflow-artifacts").resolve()) if local_store else None)

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def experiment_id(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        return str(client.create_experiment(self.experiment, artifact_location=self.artifact_location))

    def parent_run(self, client: Any) -> str:
        """The sweep's run: found by its sweep id (a resumed sweep, an export later), else created."""
        experiment = self.experiment_id(client)
        runs = client.search_runs([experiment], filter_string=f"tags.`{SWEEP_ID_TAG}` = '{self.sweep_id}' and "
                                  f"tags.`{TRIAL_ID_TAG}` = 'sweep'", max_results=1)
        if runs:
            return str(runs[0].info.run_id)
        run = client.create_run(experiment, run_name=self.sweep_name, tags={
            SWEEP_ID_TAG: self.sweep_id, TRIAL_ID_TAG: "sweep", "sweep_folder": self.sweep_folder})
        return str(run.info.run_id)


class MLflowTracker(_CostTracker):
    """A nested MLflow run per trial under the sweep's parent run. Tune pickles its callbacks with the
    experiment: the client and the run ids are made at the first event, not in __init__."""

    def __init__(self, target: MLflowTarget, metric: str, mode: str, max_steps: int, scalars: tuple[str, ...],
                 devices_per_trial: float):
        super().__init__(metric, mode, max_steps, scalars, devices_per_trial)
        self.target = target
        self._client: Any = None
        self._parent: Optional[str] = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_parent": None, "_runs": {}}

    def relocate(self, folder: Any) -> None:
        """The sweep resumed in another folder: a store kept in the sweep folder is the one there now."""
        if self.target.artifact_location is not None:
            local = Path(folder.local).resolve()
            self.target = replace(self.target, tracking_uri=f"sqlite:///{local / 'mlflow.db'}",
                                  artifact_location=str(local / "mlflow-artifacts"),
                                  sweep_folder=self.target.sweep_folder if folder.storage else str(local))

    def _run(self, trial: Any) -> str:
        if self._client is None:
            self._client = self.target.client()
            self._parent = self.target.parent_run(self._client)
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            client, experiment = self._client, self.target.experiment_id(self._client)
            found = client.search_runs([experiment], filter_string=f"tags.`{SWEEP_ID_TAG}` = '{self.target.sweep_id}' "
                                       f"and tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'", max_results=1)
            if found:  # a resumed sweep: the trial's run goes on
                run_id = str(found[0].info.run_id)
                client.update_run(run_id, status="RUNNING")
            else:
                from lora_sweep.tensorboard_logs import run_name

                run_id = str(client.create_run(experiment, run_name=run_name(trial.trial_id, trial.config), tags={
                    PARENT_TAG: self._parent, SWEEP_ID_TAG: self.target.sweep_id, TRIAL_ID_TAG: trial.trial_id,
                }).info.run_id)
                from mlflow.entities import Param

                client.log_batch(run_id, params=[Param(k, cut(str(v), 6000)) for k, v in trial.config.items()])
            self._runs[trial.trial_id] = run_id
        return run_id

    @_tracker_may_fail
    def log_trial_start(self, trial: Any) -> None:
        run_id = self._run(trial)
        self._client.set_tag(run_id, STATUS_TAG, "running")

    @_tracker_may_fail
    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        run_id = self._run(trial)
        step = int(result.get(STEP, 0))
        now = int(1000 * float(result.get("timestamp", 0) or 0)) or None
        metrics = [Metric(name, value, now or 0, step) for name, value in _numbers(result, self.scalars).items()]
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)

    @_tracker_may_fail
    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._run(trial)
        progress = self.tracked(trial)
        summary = [Metric(name, value, 0, progress.step) for name, value in self.summary(trial).items()]
        self._client.log_batch(run_id, metrics=summary, tags=[RunTag(STATUS_TAG, progress.status)])
        self._client.set_terminated(run_id, MLFLOW_STATUS.get(progress.status, "KILLED"))


def log_promoted_model(config: SweepConfig, sweep_dir: Path, sweep_id: str, final: FinalReport) -> Optional[str]:
    """After the export: the adapter and merged model on the sweep's MLflow run, with the test metrics, and the
    merged model registered under the sweep's name (a new version each export). Returns the version, or None
    when MLflow is not a tracker."""
    if "mlflow" not in config.trackers:
        return None
    from mlflow.entities import Metric

    target = MLflowTarget.of(config, sweep_dir, sweep_id)
    client = target.client()
    parent = target.parent_run(client)
    export_dir = Path(final.export_dir)
    for part in ("adapter", "merged"):
        client.log_artifacts(parent, str(export_dir / part), part)
    for extra in ("README.md", "best_config.yaml"):
        if (export_dir / extra).is_file():
            client.log_artifact(parent, str(export_dir / extra))
    test = {"test_loss_base": final.base.loss, "test_loss_tuned": final.tuned.loss,
            **{f"test_{name}_base": value for name, value in final.base.metrics.items()},
            **{f"test_{name}_tuned": value for name, value in final.tuned.metrics.items()}}
    test = {k: float(v) for k, v in test.items() if math.isfinite(v)}
    client.log_batch(parent, metrics=[Metric(k, v, 0, final.best.best_step or 0) for k, v in test.items()])
    client.set_tag(parent, "promoted_trial", final.best.trial_id)
    if config.mlflow.register_model:
        from mlflow.exceptions import MlflowException

        name = config.mlflow.model_name or config.name
        try:
            client.create_registered_model(name, description=f"LoRA sweep {config.name}: the promoted trial of each "
                                           "export, base and adapter merged")
        except MlflowException as error:  # it exists: a new version
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        run = client.get_run(parent)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/merged", run_id=parent,
            tags={**{k: f"{v:.6g}" for k, v in test.items()}, "trial_id": final.best.trial_id,
                  "sweep_folder": target.sweep_folder},
            description=f"Trial {final.best.trial_id} at step {final.best.best_step} of sweep {config.name} "
                        f"({target.sweep_folder}); test loss {final.base.loss:.4f} (base) -> {final.tuned.loss:.4f}.")
        return str(version.version)
    return None


class WandbTracker(_CostTracker):
    """A W&B run per trial, grouped by the sweep. Runs are made in the driver (wandb's `create_new` runs side by
    side in one process) at the first event, not in __init__: Tune pickles its callbacks."""

    def __init__(self, project: str, group: str, wandb_mode: Literal["offline", "online"], directory: str,
                 metric: str, mode: str, max_steps: int, scalars: tuple[str, ...], devices_per_trial: float,
                 in_sweep_folder: bool = False):
        super().__init__(metric, mode, max_steps, scalars, devices_per_trial)
        self.project, self.group, self.wandb_mode, self.directory = project, group, wandb_mode, directory
        self.in_sweep_folder = in_sweep_folder
        self._runs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_runs": {}}

    def relocate(self, folder: Any) -> None:
        """The sweep resumed in another folder: offline runs kept in the sweep folder go to the one there now."""
        if self.in_sweep_folder:
            self.directory = str(Path(folder.local).resolve())

    def _run(self, trial: Any) -> Any:
        run = self._runs.get(trial.trial_id)
        if run is None:
            import wandb

            from lora_sweep.tensorboard_logs import run_name

            Path(self.directory).mkdir(parents=True, exist_ok=True)
            # The trial id names the run: a resumed sweep continues the same run (resume="allow").
            run = wandb.init(project=self.project, group=self.group, name=run_name(trial.trial_id, trial.config),
                             id=f"{self.group}-{trial.trial_id}"[-64:], resume="allow", config=dict(trial.config),
                             mode=self.wandb_mode, dir=self.directory, reinit="create_new",
                             settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
            self._runs[trial.trial_id] = run
        return run

    @_tracker_may_fail
    def log_trial_start(self, trial: Any) -> None:
        self._run(trial)

    @_tracker_may_fail
    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        self._run(trial).log(_numbers(result, self.scalars), step=int(result.get(STEP, 0)))

    @_tracker_may_fail
    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        run = self._run(trial)
        progress = self.tracked(trial)
        run.summary.update({**self.summary(trial), "status": progress.status})
        run.finish(exit_code=1 if progress.status == "errored" else 0)
        self._runs.pop(trial.trial_id, None)
