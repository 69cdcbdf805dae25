"""The Ray Tune driver: OptunaSearch (seeded, study in SQLite) + ASHA, per-trial resources.

Ray Tune is driven directly (not through `Trainer.hyperparameter_search`, which
writes every checkpoint twice and fails to pickle a second Trainer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import optuna
import ray
import torch
from sqlalchemy.exc import SQLAlchemyError
from ray import tune
from ray._common.utils import get_default_ray_temp_dir
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from lora_sweep.folder import BUDGET_FILE, CONFIG_FILE, CONFIRM_DIR_NAME, STUDY_FILE, TENSORBOARD_DIR, TUNE_DIR_NAME
from lora_sweep.schedulers import KeepResultsAcrossPauses, PausingConcurrencyLimiter, PromotionASHA
from lora_sweep.safety import (check_state_files_are_ours, fill_in_deleted_checkpoints, recover_truncated_tune_snapshot,
                               sweep_id)
from lora_sweep.signals import SweepInterrupted, ctrl_c_handler_kept, sigterm_stops_like_ctrl_c
from lora_sweep.config import ConfigError, SweepConfig, cut, read_yaml, shown
from lora_sweep.metrics import metric_names
from lora_sweep.progress import ProgressCallback
from lora_sweep.results import read_json
from lora_sweep.storage import SweepFolder
from lora_sweep.tensorboard_logs import TensorBoardCallback
from lora_sweep.testing import faults
from lora_sweep.trackers import tracker_callbacks
from lora_sweep.trial_report import DIVERGED, STEP
from lora_sweep.distributed import data_parallel_trainable
from lora_sweep.recipe import confirm_trainable, tune_trainable

log = logging.getLogger(__name__)


CLUSTER_ANSWER_SECONDS = 10.0  # a cluster's head that does not accept a connection in this time is taken as down


def config_address_hint(address: str) -> str:
    return repr(address) if address else "auto (resolved through RAY_ADDRESS or Ray's temp folder)"


def cluster_head(address: str) -> tuple[str, int]:
    """(host, port) of a cluster address as `ray.init` would resolve it: `auto` reads the address that the
    last `ray start` on this machine recorded (or RAY_ADDRESS), HOST:PORT and ray://HOST:PORT are given."""
    from ray._private.services import canonicalize_bootstrap_address

    if address == "auto":
        try:
            resolved = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as error:
            raise ConfigError([f"`ray.address`: auto finds no Ray cluster on this machine ({error}); start one "
                               "with `ray start --head`, or give HOST:PORT of its head"], "ray") from None
        address = resolved or ""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError([f"`ray.address`: {config_address_hint(address)} does not name a cluster's head as HOST:PORT; "
                           "give HOST:PORT of its head"], "ray")
    return host.strip("[]"), int(port)


def check_cluster_address(config: SweepConfig) -> None:
    """Before anything is written: the cluster's head answers (a dead or mistyped address would otherwise
    make `ray.init` retry for minutes). Without `ray.address` nothing is checked: the sweep starts its own Ray."""
    if not config.ray.address:
        return
    host, port = cluster_head(config.ray.address)
    try:
        with socket.create_connection((host, port), timeout=CLUSTER_ANSWER_SECONDS):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError([f"`ray.address`: nothing answers at {host}:{port} ({reason}); is the cluster's head "
                           f"running (`ray status --address {host}:{port}`)?"], "ray") from None


def start_ray(config: SweepConfig) -> None:
    if ray.is_initialized():
        return
    # ray.init makes SIGTERM exit the driver at once (sys.exit(15)), from its start: such an exit is turned into
    # the same stop as a Ctrl-C, and the engine's own handler is put back afterwards.
    with sigterm_stops_like_ctrl_c():
        if config.ray.address:
            ray.init(address=config.ray.address)
        else:
            # address="local" always starts a new local Ray: with no address, ray.init would join the cluster
            # named in RAY_ADDRESS or in Ray's temp folder, also a dead one left by a `ray start` that was never
            # stopped, and retry it for minutes. The trainable's own modules must be importable in workers.
            ray.init(
                address="local",
                num_cpus=config.ray.num_cpus,
                num_gpus=config.ray.num_gpus,  # type: ignore[arg-type]  # Ray's stub says int; it takes fractions
                include_dashboard=False,
                runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            )


STUDY_BUSY_TIMEOUT_SECONDS = 60


def study_storage(sweep_dir: Path, create_tables: bool = True) -> optuna.storages.RDBStorage:
    """The sweep's Optuna study database. A connection that finds it locked by another (the driver while
    `sweep report` reads, a second reader) waits up to a minute for it rather than failing at once.
    `create_tables=False`: open a database that already holds Optuna's tables, without writing to it."""
    return optuna.storages.RDBStorage(
        f"sqlite:///{(Path(sweep_dir) / STUDY_FILE).resolve()}",
        engine_kwargs={"connect_args": {"timeout": STUDY_BUSY_TIMEOUT_SECONDS}},
        skip_table_creation=not create_tables,
    )


def check_study(sweep_dir: Path, study_name: str | None = None) -> None:
    """Refuse a study database Optuna cannot use as this sweep's study, before anything opens it for writing
    (Optuna would add its tables to any SQLite file): a ConfigError naming optuna_study.db.

    No database yet is fine (the sweep makes one); so is one with no study yet (the sweep adds it). With
    `study_name` (else the name in the folder's config.yaml, when it has one), a database holding other
    studies but not this one is refused too: it belongs to another sweep.
    """
    path = Path(sweep_dir) / STUDY_FILE
    if not path.exists():
        return
    remedy = "restore it from a copy (without it, `sweep report` leaves out the study's figures)"

    def refuse(what: str) -> NoReturn:
        raise ConfigError([f"{what}; {remedy}"], str(path))

    if not path.is_file():
        refuse("not a file")
    if path.stat().st_size == 0:
        refuse("an empty file, not an Optuna study (a SQLite database)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=STUDY_BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error as error:
        refuse(f"cannot open it ({error})")
    with contextlib.closing(db):
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:  # "file is not a database", "database disk image is malformed"
            refuse(f"not a SQLite database ({error})")
        missing = [table for table in ("studies", "trials", "version_info", "alembic_version") if table not in tables]
        if missing:
            refuse(f"a SQLite database without Optuna's tables {missing} (it has {shown(sorted(tables))})")
        try:
            versioned = all(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
                            for table in ("version_info", "alembic_version"))
            names = [row[0] for row in db.execute("SELECT study_name FROM studies")]
        except sqlite3.DatabaseError as error:
            refuse(f"not an Optuna study database ({error})")
    if not versioned:
        refuse("an Optuna study database without its schema version")
    if study_name is None:  # the sweep's own name, when its config.yaml is readable (load_config names a bad one)
        with contextlib.suppress(ValueError):  # ConfigError: read_yaml names a bad file; load_config does too
            raw = read_yaml(Path(sweep_dir) / CONFIG_FILE)
            study_name = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else None
    if study_name and names and study_name not in names:
        refuse(f"holds no study named {shown(study_name)} (it holds {shown(names)}): it is another sweep's study")
    try:  # Optuna's own check that its version can use this schema; writes nothing to a database that has one
        storage = study_storage(Path(sweep_dir), create_tables=False)
    except (RuntimeError, SQLAlchemyError) as error:
        refuse(f"Optuna {optuna.__version__} cannot use it ({cut(' '.join(str(error).split()), 160)})")
    storage.engine.dispose()


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that survives a driver killed between Tune's state snapshots.

    The study (SQLite) is written at once, the searcher's pickled state only at
    snapshots. After such a kill a restored trial can be one the study already
    closed: the study is the record, and such a trial is treated as finished. And
    a suggestion asked after the snapshot belongs to a trial Tune never recorded:
    its study trial is handed out again for the next trial Tune starts, so that the
    study holds each trial once, with the configuration the sampler chose then.
    """

    # The sweep folder's study in this driver (set by `_experiment`): a sweep resumed in another folder (moved, or
    # on another machine from storage) finds its study there, not where the pickled searcher last saw it.
    study_file_now: Path | None = None
    # Called after the searcher's state is saved in a Tune snapshot, before Tune copies that snapshot to storage
    # (set by `run_sweep` for a sweep with storage): the study reaches storage first, so the study there is never
    # older than the Tune state there, the order `restore` expects.
    before_state_sync: Callable[[], None] | None = None

    def __init__(self, *args: Any, stopped_as_pruned_before: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # `search.stopped_trials: pruned`: a trial whose last result is before this step was stopped by the
        # scheduler, and enters the study as pruned rather than complete with an early value.
        self.stopped_as_pruned_before = stopped_as_pruned_before

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (OptunaSearch types it optional: it is set once Tune sets the searcher up)."""
        if self._ot_study is None:
            raise RuntimeError("the searcher is used before Tune set it up")
        return self._ot_study

    @property
    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """The search space as Optuna distributions (this engine always gives OptunaSearch a dict of them)."""
        if not isinstance(self._space, dict):
            raise TypeError("the sweep's search space is a dict of Optuna distributions")
        return self._space

    def __getstate__(self) -> dict[str, Any]:
        """The searcher without its open database: the study by its file, its trials by their ids. Unpickling
        a SQLite storage reconnects at once to the path it had, which after a move or on another machine is
        gone; `__setstate__` opens the study in the sweep folder this driver works in."""
        state = self.__dict__.copy()
        if isinstance(self._storage, optuna.storages.RDBStorage) and self._ot_study is not None:
            state.update(_storage=None, _ot_study=None, _study_url=self._storage.url,
                         _study_sampler=self.study.sampler,
                         _ot_trials={key: trial._trial_id for key, trial in self._ot_trials.items()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        url = self.__dict__.pop("_study_url", None)
        if url is None:
            return
        now = type(self).study_file_now
        storage = (study_storage(now.parent, create_tables=False) if now is not None
                   else optuna.storages.RDBStorage(url, skip_table_creation=True))
        sampler = self.__dict__.pop("_study_sampler")
        study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=sampler)
        self._storage, self._ot_study = storage, study  # type: ignore[assignment]  # OptunaSearch types them None
        self._ot_trials = {key: optuna.trial.Trial(study, trial_id) for key, trial_id in self._ot_trials.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:  # as OptunaSearch.save, without the open database
            pickle.dump(self.__getstate__(), handle)
        hook = type(self).before_state_sync
        if hook is not None:
            hook()

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        if not isinstance(state, dict):  # an older searcher's tuple: OptunaSearch reads those
            super().restore(checkpoint_path)
        else:
            self.__setstate__(state)
        owned = {ot_trial._trial_id for ot_trial in self._ot_trials.values()}
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        unclaimed = [t for t in running if t._trial_id not in owned]
        if not callable(self._space):
            for trial in unclaimed:
                self._draw_again(trial)
        self._unclaimed = [t._trial_id for t in unclaimed]

    def _draw_again(self, trial: optuna.trial.FrozenTrial) -> None:
        """Draw the unclaimed trial's values again and drop them: the sampler's random state comes from the
        snapshot, from before it drew them, and the next new trial would otherwise get the same configuration."""
        study = self.study
        sampler = study.sampler
        relative = sampler.sample_relative(study, trial, sampler.infer_relative_search_space(study, trial))
        for name, distribution in self.distributions.items():
            if name not in relative:
                sampler.sample_independent(study, trial, name, distribution)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        unclaimed = getattr(self, "_unclaimed", [])  # set by restore only
        if trial_id not in self._ot_trials and unclaimed and not callable(self._space):
            self._ot_trials[trial_id] = optuna.trial.Trial(self.study, unclaimed.pop(0))
        return super().suggest(trial_id)

    def _stopped_early(self, result: dict[str, Any] | None) -> bool:
        limit = getattr(self, "stopped_as_pruned_before", None)  # a searcher pickled before the option lacks it
        return (limit is not None and result is not None and self._reports_steps and STEP in result
                and int(result[STEP]) < limit and not result.get(DIVERGED))

    def _closed_in_study(self, trial_id: str) -> bool:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return trial_id in self._completed_trials
        ot_trial = self._ot_trials[trial_id]
        if self.study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def _report_step(self, trial_id: str, result: dict[str, Any]) -> None:
        # Intermediate values by training step (what optuna-dashboard plots), not by Tune's report count.
        step = int(result[STEP])
        if not hasattr(self, "_reported_steps"):  # set lazily: a searcher restored from an older pickle lacks it
            self._reported_steps: dict[str, set[int]] = {}
        reported = self._reported_steps.setdefault(trial_id, set())
        if step not in reported:  # Optuna warns on a step reported twice (a trial's last result comes twice)
            self._ot_trials[trial_id].report(result[self.metric], step)
            reported.add(step)

    @property
    def _reports_steps(self) -> bool:
        # Optuna keeps intermediate values (and prunes) for one objective only.
        return not isinstance(self.metric, list)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._closed_in_study(trial_id) or not self._reports_steps:
            return
        if STEP in result and self.metric in result:
            self._report_step(trial_id, result)
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._closed_in_study(trial_id):
            return
        # Tune hands the result that ended a trial (ASHA's stop, max_steps) only to this method: record
        # it as an intermediate value too, so the trial's curve in the study reaches its last step.
        if result and self._reports_steps and STEP in result and self.metric in result:
            self._report_step(trial_id, result)
        if not error and self._stopped_early(result):
            # Optuna's TPE ranks pruned trials below finished ones, by the last step they reached and their value
            # there: an early stop's value is not compared as if it were a finished trial's.
            self.study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def make_search(config: SweepConfig, space: dict[str, Any], sweep_dir: Path | None,
                seeds: list[dict[str, Any]] | None = None,
                storage: optuna.storages.BaseStorage | None = None) -> ResumableOptunaSearch | None:
    """The searcher; `seeds` (a warm start's configs) are enqueued in the study and run first.

    The study lives in the sweep folder's SQLite database, or in `storage` when given (the replay
    benchmark drives the same searcher with an in-memory study)."""
    if not space:
        return None  # nothing to sample: every trial runs the fixed config
    search = config.search
    sampler = (
        optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=search.startup_trials,
                                   multivariate=search.multivariate, group=search.multivariate,
                                   constant_liar=search.constant_liar)
        if search.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=config.seed)
    )
    if storage is None:
        if sweep_dir is None:
            raise ValueError("make_search needs the sweep folder (for its study) or a study storage")
        storage = study_storage(sweep_dir)
    metrics, modes = zip(*config.objectives, strict=True)
    return ResumableOptunaSearch(
        stopped_as_pruned_before=config.training.max_steps if search.stopped_trials == "pruned" else None,
        space=space,
        points_to_evaluate=seeds or None,
        # With a cost to minimise too, a two-objective study (TPE handles both): its trials' values are
        # each trial's last metric and cost, and the study's best trials are their Pareto front.
        metric=list(metrics) if len(metrics) > 1 else metrics[0],
        mode=list(modes) if len(modes) > 1 else modes[0],
        sampler=sampler,
        study_name=config.name,
        storage=storage,
    )


def make_scheduler(config: SweepConfig, at_once: int | None = None) -> TrialScheduler:
    """The config's scheduler; `at_once`: the trials that fit, which promotion ASHA keeps to when it resumes paused
    data-parallel trials (Tune's resource accounting does it for one-worker trials, which ask Tune for theirs)."""
    if config.scheduler.type == "none":
        return FIFOScheduler()
    if config.scheduler.type == "promotion_asha":
        return PromotionASHA(time_attr=STEP, max_t=config.training.max_steps,
                             grace_period=config.grace_steps,
                             reduction_factor=config.scheduler.reduction_factor,
                             max_running=at_once if config.resources.workers > 1 else None)
    return ASHAScheduler(
        time_attr=STEP,
        max_t=config.training.max_steps,
        grace_period=config.grace_steps,
        reduction_factor=config.scheduler.reduction_factor,
        brackets=config.scheduler.brackets,
    )


class MirrorToStorage(Callback):
    """Keeps a running sweep's records in storage, so that losing the driver's machine does not strand it: the
    driver's files (status, the Optuna study, config, provenance) at every trial's start and end and with every
    Tune snapshot (`ResumableOptunaSearch.before_state_sync`: the study reaches storage before the snapshot that
    refers to it), and the whole folder (TensorBoard logs too) at least every `every_seconds`. Tune keeps its own
    experiment state there. A copy that fails is a warning: the sweep goes on."""

    def __init__(self, folder: SweepFolder, every_seconds: float = 60.0):
        self.folder = folder
        self.every_seconds = every_seconds
        self._last_full = time.monotonic()
        self._warned = False

    def records(self) -> None:
        """The driver's records to storage now (ResumableOptunaSearch calls it before Tune syncs a snapshot)."""
        self._copy(records_only=True)

    def _copy(self, records_only: bool) -> None:
        try:
            self.folder.mirror(records_only=records_only)
        except Exception as error:  # noqa: BLE001 - a storage hiccup must not end the sweep; the next copy retries
            if not self._warned:
                self._warned = True
                log.warning("could not copy the sweep's records to %s (%s); retrying at the next trial event",
                            self.folder.storage.uri if self.folder.storage else "storage", cut(str(error), 200))
            return
        self._warned = False

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._copy(records_only=True)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._copy(records_only=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._copy(records_only=True)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if time.monotonic() - self._last_full >= self.every_seconds:
            self._last_full = time.monotonic()
            self._copy(records_only=False)

    def relocate(self, folder: SweepFolder) -> None:
        self.folder = folder

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last_full": 0.0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._last_full = time.monotonic()


class BudgetStopper(tune.Stopper):
    """Ends the tuning once its wall-time or device-hour budget is spent, and records which one in the sweep folder.

    Device-seconds are each trial's running time (Tune's `time_total_s`) times the devices it holds.
    Tune pickles its stopper with the experiment, so a resumed sweep goes on counting from its first start.
    """

    def __init__(self, sweep_dir: Path, wall_hours: float | None, device_hours: float | None, devices_per_trial: float):
        self.sweep_dir = Path(sweep_dir)
        self.wall_seconds = wall_hours * 3600 if wall_hours else None
        self.device_seconds = device_hours * 3600 if device_hours else None
        self.devices_per_trial = devices_per_trial
        self.started: float | None = None
        self.used: dict[str, float] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.used[trial_id] = float(result.get("time_total_s", 0.0)) * self.devices_per_trial
        return False  # no single trial is stopped for the budget: stop_all ends them together

    def spent(self) -> str | None:
        now = time.time()
        self.started = self.started or now
        if self.wall_seconds is not None and now - self.started >= self.wall_seconds:
            return f"wall-time budget of {self.wall_seconds / 3600:g} hours spent"
        if self.device_seconds is not None and sum(self.used.values()) >= self.device_seconds:
            return f"device budget of {self.device_seconds / 3600:g} device-hours spent"
        return None

    def stop_all(self) -> bool:
        reason = self.spent()
        if reason and not (self.sweep_dir / BUDGET_FILE).exists():
            (self.sweep_dir / BUDGET_FILE).write_text(json.dumps(
                {"reason": reason, "device_seconds": round(sum(self.used.values()), 1), "at": time.time()}))
        return reason is not None


def budget_spent(sweep_dir: Path) -> str | None:
    """Why a budget ended the tuning, if one did."""
    path = Path(sweep_dir) / BUDGET_FILE
    if not path.exists():
        return None
    reason = read_json(path, "delete it if no budget ended this sweep").get("reason")
    if not isinstance(reason, str):
        raise ConfigError([f"`reason`: must be text, but got {reason!r}; delete it if no budget ended this sweep"],
                          str(path))
    return reason


def trials_that_fit(config: SweepConfig, cpus: float, gpus: float) -> int:
    """Trials at once: the configured limit, else as many as `cpus` and `gpus` hold (at most all of them)."""
    workers = config.resources.workers  # a data-parallel trial holds every worker's resources
    fits = int(cpus // (config.resources.cpu * workers))
    if config.resources.gpu > 0:
        fits = min(fits, int(gpus // (config.resources.gpu * workers)))
    fits = max(1, min(fits, config.search.num_trials))
    if config.search.max_concurrent_trials:
        # Tune holds back a one-worker trial that does not fit; a data-parallel trial asks Tune for nothing (its
        # workers ask Ray Train), so more of them than fit would only wait for each other's resources.
        limit = min(config.search.max_concurrent_trials, config.search.num_trials)
        return min(limit, fits) if workers > 1 else limit
    return fits


def trials_that_fit_the_cluster(config: SweepConfig) -> int:
    """`trials_that_fit` in the resources of the Ray cluster this driver is connected to."""
    resources = ray.cluster_resources()
    return trials_that_fit(config, resources.get("CPU", 0.0), resources.get("GPU", 0.0))


def local_ray_resources(config: SweepConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the local Ray that `sweep run` starts will have: the config's, else this machine's."""
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    gpus = config.ray.num_gpus if config.ray.num_gpus is not None else torch.cuda.device_count()
    return cpus, gpus


def concurrent_trials(config: SweepConfig) -> int:
    """Trials at once, as `sweep run` will count them on a local Ray (a cluster's size is unknown before
    connecting: then at most all of them)."""
    if config.ray.address and not config.search.max_concurrent_trials:
        return config.search.num_trials
    return trials_that_fit(config, *local_ray_resources(config))


def check_cluster_resources(config: SweepConfig) -> None:
    """On an existing cluster, the largest node must fit one trial, or one worker of a data-parallel trial, whose
    workers Ray Train may place on several nodes (checked once connected, before any trial)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [
        n for n in nodes
        if n["Resources"].get("CPU", 0) >= config.resources.cpu and n["Resources"].get("GPU", 0) >= config.resources.gpu
    ]
    if not fits:
        largest = max((n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes) if nodes else (0, 0)
        raise ConfigError(
            [f"`resources`: a {'worker' if config.resources.workers > 1 else 'trial'} asks for {config.resources.cpu} "
             f"CPU and {config.resources.gpu} GPU, but the largest "
             f"node of the cluster at {config.ray.address} has {largest[0]:g} CPU and {largest[1]:g} GPU"],
            "resources",
        )
    total = ray.cluster_resources()
    workers = config.resources.workers
    if total.get("CPU", 0) < config.resources.cpu * workers or total.get("GPU", 0) < config.resources.gpu * workers:
        raise ConfigError(
            [f"`resources.workers`: a trial's {workers} workers ask for {config.resources.cpu * workers:g} CPU and "
             f"{config.resources.gpu * workers:g} GPU in all, but the cluster at {config.ray.address} has "
             f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU"], "resources")


def run_sweep(config: SweepConfig, space: dict[str, Any], data_path: Path, folder: SweepFolder, resume: bool = False,
              trial_function: Callable[..., None] = tune_trainable, seeds: list[dict[str, Any]] | None = None) -> Any:
    """Run every trial (or continue a stopped sweep); returns Ray Tune's ResultGrid.

    `trial_function` is the trainable's entry point; benchmarks pass one that trains nothing
    to measure the driver alone.
    """
    sweep_dir = folder.local
    trainable, storage_path, filesystem, restored = _experiment(config, data_path, folder, TUNE_DIR_NAME,
                                                                trial_function, resume)
    if restored is not None:
        # Finished trials stay finished; unfinished ones restart from their last checkpoint; the
        # searcher (and through it the Optuna study) continues from its saved state.
        return _fit(restored, folder)
    task_metrics = tuple(metric_names(config.evaluation.metrics)) if config.generated_val_examples else ()
    callbacks: list[Callback] = [
        TensorBoardCallback(sweep_dir / TENSORBOARD_DIR, config.search.metric, config.search.mode,
                            config.training.max_steps, task_metrics),
        ProgressCallback(sweep_dir, config.name, config.search.metric, config.search.mode, config.search.num_trials,
                         config.search.max_concurrent_trials, config.training.max_steps),
        *tracker_callbacks(config, sweep_dir, sweep_id(sweep_dir) or config.name, task_metrics),
    ]
    if config.scheduler.type == "promotion_asha":
        callbacks.append(KeepResultsAcrossPauses())
    if folder.storage is not None:
        callbacks.append(MirrorToStorage(folder))
    callbacks += faults.tune_callbacks(sweep_dir)  # test hooks: none unless armed
    # Always a number: with a searcher and no limit, Tune starts one trial at a time and waits for it to be
    # running before the next (its pending-trials default), so trials that fit side by side would start one by one.
    fits = trials_that_fit_the_cluster(config)
    search: Searcher | None = make_search(config, space, sweep_dir, seeds)
    at_once: int | None = fits
    if search is not None and config.scheduler.type == "promotion_asha":
        # Tune's own limiter would count paused trials as running, and no new trial could start beside them.
        search, at_once = PausingConcurrencyLimiter(search, max_concurrent=fits), None
    tuner = tune.Tuner(
        trainable,
        param_space={},
        tune_config=tune.TuneConfig(
            metric=config.search.metric,
            mode=config.search.mode,
            search_alg=search,
            scheduler=make_scheduler(config, fits),
            num_samples=config.search.num_trials,
            max_concurrent_trials=at_once,
            # Reusing a worker skips its start-up and imports for every trial after the first.
            reuse_actors=reuses_trial_actors(config),
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR_NAME,
            stop=(BudgetStopper(sweep_dir, config.budget.wall_hours, config.budget.device_hours, config.devices_per_trial)
                  if config.budget.wall_hours or config.budget.device_hours else None),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=config.checkpoints.keep,
                checkpoint_score_attribute=config.search.metric,
                checkpoint_score_order=config.search.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=config.failure_retries),
            callbacks=callbacks,
            verbose=faults.tune_verbosity(),
        ),
    )
    return _fit(tuner, folder)


def run_confirmation(config: SweepConfig, runs: list[dict[str, Any]], data_path: Path, folder: SweepFolder,
                     resume: bool = False) -> Any:
    """Train `promotion.confirm`'s runs ({"of", "seed", "params"} each) to the end, side by side as trials fit,
    as the Tune experiment `confirm` beside the sweep's own; returns its ResultGrid. A stopped one continues."""
    trainable, storage_path, filesystem, restored = _experiment(config, data_path, folder, CONFIRM_DIR_NAME,
                                                                confirm_trainable, resume)
    if restored is not None:
        return _fit(restored, folder)
    at_once = trials_that_fit_the_cluster(config)
    tuner = tune.Tuner(
        trainable,
        param_space={"run": tune.grid_search(runs)},
        tune_config=tune.TuneConfig(metric=config.search.metric, mode=config.search.mode,
                                    max_concurrent_trials=at_once, reuse_actors=reuses_trial_actors(config),
                                    trial_dirname_creator=_confirm_run_folder),
        run_config=tune.RunConfig(
            name=CONFIRM_DIR_NAME, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=config.search.metric,
                                                    checkpoint_score_order=config.search.mode),
            failure_config=tune.FailureConfig(max_failures=config.failure_retries),
            verbose=faults.tune_verbosity(),
        ),
    )
    return _fit(tuner, folder)


def reuses_trial_actors(config: SweepConfig) -> bool:
    """Whether Tune reuses a trial's actor for the next trial. Not for data-parallel trials: Tune reuses an actor
    only when the stopped trial's thread ends within 2 s, and Ray Train's shutdown of the workers takes longer
    (their processes are new for every trial anyway)."""
    return config.resources.workers == 1


def _confirm_run_folder(trial: Any) -> str:
    """A confirm run's folder: the trial it trains again and its seed (Tune's default spells out every param)."""
    run = trial.config["run"]
    return f"{run['of']}_seed{run['seed']}_{trial.trial_id}"


def _experiment(config: SweepConfig, data_path: Path, folder: SweepFolder, name: str,
                trial_function: Callable[..., None], resume: bool) -> tuple[Any, str, Any, tune.Tuner | None]:
    """Ray started and the cluster checked, then the Tune experiment `name` of the sweep: its bound trainable, where
    it is stored (path, filesystem), and when resuming one that had started, its Tuner ready to continue."""
    start_ray(config)
    check_cluster_resources(config)
    trainable = _bound_trainable(config, data_path, folder, trial_function)
    storage_path, filesystem = folder.experiment_root()
    ResumableOptunaSearch.study_file_now = folder.local / STUDY_FILE
    restored = _restored(storage_path, filesystem, name, trainable, folder.local) if resume else None
    if restored is not None:
        follow_the_folder(restored, folder)
    return trainable, storage_path, filesystem, restored


def follow_the_folder(tuner: tune.Tuner, folder: SweepFolder) -> None:
    """A restored experiment's callbacks and stopper come pickled with the folder the sweep had when it started;
    a sweep resumed in another folder (moved, or on another machine from storage) has them write to this one.
    Each says how (`relocate`), or holds the folder as `sweep_dir`."""
    local = tuner._local_tuner  # Tune restores the RunConfig it pickled and offers no public setter
    if local is None:  # a Tuner driven through Ray Client: nothing pickled here to follow
        return
    run_config = local.get_run_config()
    hooks: list[Any] = [*(run_config.callbacks or []), run_config.stop]
    for hook in hooks:
        if callable(getattr(hook, "relocate", None)):
            hook.relocate(folder)
        elif hasattr(hook, "sweep_dir"):
            hook.sweep_dir = folder.local


def _bound_trainable(config: SweepConfig, data_path: Path, folder: SweepFolder,
                     trial_function: Callable[..., None]) -> Any:
    """The trial function with the sweep's config, its prepared data and each trial's resources (a data-parallel
    trial's Tune trainable, when the sweep's trials have workers)."""
    parameters: dict[str, Any] = {"base_config": config.model_dump(mode="json"), "data_path": str(data_path)}
    data_in_storage = folder.prepared_data_in_storage(data_path)
    if data_in_storage is not None:  # nodes that do not see the driver's disk fetch the prepared data from storage
        parameters["data_in_storage"] = data_in_storage
    resources = {"cpu": config.resources.cpu, "gpu": config.resources.gpu}
    trainable: Any = trial_function
    if config.resources.workers > 1 and trial_function in (tune_trainable, confirm_trainable):
        trainable = data_parallel_trainable(confirm=trial_function is confirm_trainable)
        # The Tune trial only passes reports on; Ray Train asks for its workers' resources itself. Tune refuses a
        # trial that asks for nothing: a token of memory, so no CPU a worker needs is held by the trial. It runs on
        # the head node (Ray's own head resource): a lost worker node then never takes a trial's coordinator with
        # it (and with it the placement group of its Train run, which nothing would free while the sweep runs).
        parameters["workers_storage"] = folder.workers_runs()
        resources = {"cpu": 0, "gpu": 0, "memory": 2**20, "node:__internal_head__": 0.001}
    return tune.with_resources(tune.with_parameters(trainable, **parameters), resources)


def _restored(storage_path: str, filesystem: Any, name: str, trainable: Any, sweep_dir: Path) -> tune.Tuner | None:
    """The Tune experiment `name` under `storage_path` (`SweepFolder.experiment_root`), ready to continue; None when it never
    started."""
    experiment = f"{storage_path}/{name}"
    if not tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        return None
    if filesystem is None:  # again, right before Tune unpickles them (the first check ran before preflight)
        check_state_files_are_ours(sweep_dir)
        for file in recover_truncated_tune_snapshot(Path(experiment), Path(get_default_ray_temp_dir())):
            log.warning("%s was empty (the driver was killed while Ray Tune copied it); its complete copy from "
                        "Ray's temp folder was put back", file)
    for path in fill_in_deleted_checkpoints(filesystem, experiment):
        log.warning("%s was deleted after Ray Tune last saved its state (the driver was killed before the state "
                    "caught up); the trial's newer checkpoint was copied there and the trial goes on from it", path)
    return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                              storage_filesystem=filesystem)


def _fit(tuner: tune.Tuner, folder: SweepFolder) -> Any:
    """Tune's fit; a Ctrl-C or SIGTERM during it is a stop (SweepInterrupted), never a sweep that ended.
    Data-parallel trials' Ray Train runs left by an earlier stop go before, and any this one leaves after."""
    sweep_dir = folder.local
    local = tuner._local_tuner
    mirrors = [hook for hook in (local.get_run_config().callbacks or []) if isinstance(hook, MirrorToStorage)] \
        if local is not None else []
    ResumableOptunaSearch.before_state_sync = mirrors[0].records if mirrors else None
    folder.remove_workers_runs()
    try:
        with ctrl_c_handler_kept() as stop:
            result_grid = tuner.fit()
    finally:
        # set by `_experiment` (and `_fit` below) for this experiment only
        ResumableOptunaSearch.study_file_now = ResumableOptunaSearch.before_state_sync = None
        folder.remove_workers_runs()
    if stop.interrupted:
        raise SweepInterrupted(f"its state is saved: continue with `sweep resume {sweep_dir}`")
    return result_grid
