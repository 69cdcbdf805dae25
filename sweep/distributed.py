"""Data-parallel trials (`resources.workers` > 1): each Tune trial runs a Ray Train `TorchTrainer` of N workers.

Ray Train places the workers (across nodes when one does not hold them all), sets up torch.distributed (gloo on
CPUs, NCCL on GPUs) and restarts the worker group from its latest checkpoint when a worker or its node is lost.
Each worker runs the config's recipe as a one-worker trial does; the Hugging Face Trainer sees the process group and
trains with DDP (each worker `training.batch_size` examples per step, gradients averaged).

Reports keep today's protocol, so promotion, pruning, export and resume read Tune's checkpoints as before:
every worker hands its part of an evaluation's checkpoint to `ray.train.report` (rank 0 the adapter and optimizer,
each rank its RNG state; Train merges them in its storage), `ForwardToTune` passes rank 0's metrics and the merged
checkpoint to the Tune trial, which reports them to Tune (Tune copies the checkpoint into the trial's folder) and
answers: go on, or stop (ASHA, a pause, the end of the sweep). Rank 0 waits for the answer and shares it with the
other ranks, so a trial stops at the evaluation where Tune decided, as a one-worker trial does.

Ray's own `ray.tune.integration.ray_train.TuneReportCallback` passes metrics only (the checkpoint stays Train's
and Tune registers none), and does not wait for Tune's answer; hence this module.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from lora_sweep.trial_report import NODE_ID, STEP, WORKER_NODE_IDS

GO_ON, STOP = "go on", "stop"
# Tune answers a report at once (the next step, or cleanup when it ends the trial); the other ranks wait for rank 0
# in a collective, which gives up after the process group's timeout (Ray Train's TorchConfig: 1800 s).
_ANSWER_TIMEOUT_S = 1800.0
_SHUTDOWN_TIMEOUT_S = 300.0  # for Train to end the workers once they are told to stop

T = TypeVar("T")


class TrialStopped(Exception):
    """Tune stopped the trial at this evaluation (on every worker): the workers end training and return."""


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a data-parallel trial."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank_zero(compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 only and its result given to every rank (generation for task metrics: every rank
    needs the numbers for its report, one rank's answers are enough)."""
    rank, size = world()
    if size == 1:
        return compute()
    import torch.distributed as dist

    shared: list[Any] = [compute() if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]  # type: ignore[no-any-return]


@dataclass
class WorkerReporter:
    """The recipe's Reporter on a Ray Train worker: each rank reports its part of the checkpoint to Train; rank 0
    then waits for Tune's answer to that evaluation and shares it; a stop raises TrialStopped on every rank."""

    answers: Any  # ray.util.queue.Queue of (step, GO_ON | STOP), filled by the Tune trial
    restored: Any = None  # the Tune checkpoint the trial resumes from (ray.tune.Checkpoint), or None
    node_ids: str = ""  # every worker's Ray node, in rank order (reported, so a trial's spread shows)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        import ray
        import ray.train
        import torch.distributed as dist

        rank, _ = world()
        part = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) \
            if checkpoint_dir is not None and checkpoint_dir.is_dir() else None
        step = int(metrics[STEP])
        extra = {NODE_ID: ray.get_runtime_context().get_node_id(), WORKER_NODE_IDS: self.node_ids}
        ray.train.report({**metrics, **extra}, checkpoint=part,
                         checkpoint_dir_name=f"checkpoint-{step}" if checkpoint_dir is not None else None)
        answer: list[Any] = [self._answer_to(step) if rank == 0 else None]
        dist.broadcast_object_list(answer, src=0)
        if answer[0] == STOP:
            raise TrialStopped(f"Tune stopped the trial at step {step}")

    def _answer_to(self, step: int) -> str:
        while True:
            answered, decision = self.answers.get(timeout=_ANSWER_TIMEOUT_S)
            # A stop holds whatever step it answered (a worker group started again may be past it); a go-on
            # to the report of a worker group lost since is skipped.
            if decision == STOP or answered == step:
                return str(decision)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        import ray.train

        # Train's latest (after it restarted a lost worker group) is newer than the one the Tune trial started from.
        checkpoint = ray.train.get_checkpoint() or self.restored
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the trial's recipe, reporting through WorkerReporter."""
    import ray
    import torch.distributed as dist

    from lora_sweep.recipe import run_trial
    from lora_sweep.storage import local_prepared_data

    base_config = loop_config["base_config"]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    reporter = WorkerReporter(loop_config["answers"], loop_config["restored"], ",".join(nodes))
    data_path = local_prepared_data(loop_config["data_path"], loop_config["data_in_storage"], base_config["storage"])
    try:
        run_trial(loop_config["params"], base_config, data_path, reporter)
    except TrialStopped:
        pass


def _forward_to_tune_class() -> type:
    from ray.train.v2.api.callback import UserCallback

    class ForwardToTune(UserCallback):
        """Runs in Train's controller: each report's rank-0 metrics and merged checkpoint go to the Tune trial."""

        def __init__(self, reports: Any):
            self.reports = reports

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            self.reports.put((dict(metrics[0]), checkpoint))

    return ForwardToTune


@functools.cache  # one class each, however often asked for (Tune pickles it with the experiment)
def _trial_classes() -> tuple[type, type]:
    """The Tune trainables of data-parallel trials and confirm runs (classes made once Ray Tune is imported)."""
    import pyarrow.fs as pafs
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.result import DONE, RESULT_DUPLICATE, SHOULD_CHECKPOINT
    from ray.util.queue import Empty, Queue

    class DataParallelTrial(tune.Trainable):
        """A Tune trial whose training runs in a TorchTrainer of `resources.workers` workers.

        A class trainable, not a function: Tune calls `cleanup` and waits for it before it ends the trial's
        process (a stop, a pause), so the workers hear Tune's answer and Train shuts them down and frees their
        placement group (a function trial's thread is cut off). Each `step` is one report of the workers;
        `save_checkpoint` copies that report's checkpoint (in Train's storage) for Tune, and `load_checkpoint` puts
        the one a restarted trial resumes from where every worker can read it.
        """

        def setup(self, config: dict[str, Any], base_config: dict[str, Any], data_path: str,  # type: ignore[override]
                  data_in_storage: Optional[str] = None, workers_storage: Optional[tuple[str, Any]] = None) -> None:
            # Tune's own signature is setup(config): tune.with_parameters passes the rest as keyword arguments.
            self.params, self.base_config = self.trial_params(config, base_config)
            self.data_path, self.data_in_storage = data_path, data_in_storage
            assert workers_storage is not None  # bound by the driver for every data-parallel sweep
            self.storage_path, filesystem = workers_storage
            self.filesystem = filesystem or pafs.LocalFileSystem()
            # A fresh Train run per start: Tune's checkpoint, not an older run's, is where a resumed trial continues.
            self.run_name = f"{self.trial_id}-{uuid.uuid4().hex[:8]}"
            self.restored: Any = None
            self.latest: Any = None  # the checkpoint of the last report (Train's), for save_checkpoint
            self.last: dict[str, Any] = {}
            self.training: Optional[threading.Thread] = None
            self.ended: dict[str, BaseException] = {}
            # Unbounded: Train's controller never waits to hand a report on, and cleanup never waits to answer.
            # Rank 0 waits for the answer to each report, so neither holds more than one or two items.
            self.reports: Any = Queue(actor_options={"num_cpus": 0})
            self.answers: Any = Queue(actor_options={"num_cpus": 0})

        def trial_params(self, config: dict[str, Any], base_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            """(the trial's params, the config it trains with)."""
            return config, base_config

        def step(self) -> dict[str, Any]:
            if self.training is None:
                self._start()
            elif self.last:  # the workers wait for the answer to the last report: Tune goes on
                self.answers.put((int(self.last[STEP]), GO_ON))
            while self.training is not None and (self.training.is_alive() or not self.reports.empty()):
                try:
                    metrics, checkpoint = self.reports.get(timeout=1.0)
                except Empty:
                    continue
                self.last = metrics
                if checkpoint is not None:  # a diverged trial's last report has none: a pause keeps the one before
                    self.latest = checkpoint
                return {**metrics, SHOULD_CHECKPOINT: checkpoint is not None}
            if "error" in self.ended:
                raise self.ended["error"]
            return {RESULT_DUPLICATE: True, DONE: True}  # trained to the end: Tune ends the trial on its last result

        def _start(self) -> None:
            resources = self.base_config["resources"]
            per_worker = {"CPU": float(resources["cpu"]), **({"GPU": float(resources["gpu"])} if resources["gpu"] else {})}
            trainer = TorchTrainer(
                _worker_loop,
                train_loop_config={"params": self.params, "base_config": self.base_config, "data_path": self.data_path,
                                   "data_in_storage": self.data_in_storage, "answers": self.answers,
                                   "restored": self.restored},
                scaling_config=ray.train.ScalingConfig(num_workers=int(resources["workers"]),
                                                       use_gpu=bool(resources["gpu"]), resources_per_worker=per_worker),
                run_config=ray.train.RunConfig(
                    name=self.run_name, storage_path=self.storage_path, storage_filesystem=self.filesystem,
                    # Train keeps the latest only: it restarts a lost worker group from there; Tune keeps the best.
                    checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                    # A lost worker or node: Train starts the group again (then Tune retries the trial, as any).
                    # Waiting for room for the workers gives up after about 30 minutes (30 startups of 60 s).
                    # (mypy reads Train V1's FailureConfig; Train V2's, which runs, has controller_failure_limit)
                    failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]
                        max_failures=int(self.base_config["failure_retries"]), controller_failure_limit=30),
                    callbacks=[_forward_to_tune_class()(self.reports)]),
            )

            def fit() -> None:
                try:
                    trainer.fit()
                except BaseException as error:  # raised in the trial by the next step
                    self.ended["error"] = error

            self.training = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
            self.training.start()

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            if self.latest is not None:  # Tune saves after a report with a checkpoint, and when it pauses the trial
                pafs.copy_files(self.latest.path, checkpoint_dir, source_filesystem=self.latest.filesystem,
                                destination_filesystem=pafs.LocalFileSystem())

        def load_checkpoint(self, checkpoint_dir: Any) -> None:  # the folder save_checkpoint filled, fetched here
            # Where every worker reads it, on any node: beside the Train run, in the sweep's folder or storage.
            restored = f"{self.storage_path}/{self.run_name}-restored"
            self.filesystem.create_dir(restored, recursive=True)  # a local copy needs the folder made first
            pafs.copy_files(checkpoint_dir, restored, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.filesystem)
            self.restored = ray.train.Checkpoint(restored, self.filesystem)

        def cleanup(self) -> None:
            try:
                if self.training is not None and self.training.is_alive():
                    # Tune ended the trial (a stop, a pause, the end of the sweep) while the workers wait for the
                    # answer to the last report: they stop there, and Train shuts them down.
                    self.answers.put((int(self.last.get(STEP, -1)), STOP))  # also before the first report
                    self.training.join(timeout=_SHUTDOWN_TIMEOUT_S)
            finally:
                for folder in (self.run_name, f"{self.run_name}-restored"):
                    with contextlib.suppress(OSError):
                        self.filesystem.delete_dir(f"{self.storage_path}/{folder}")
                for queue in (self.reports, self.answers):
                    queue.shutdown(force=True)

    class DataParallelConfirmRun(DataParallelTrial):
        """`promotion.confirm`'s run of one configuration with another seed, trained by workers (as `confirm_trainable`)."""

        def trial_params(self, config: dict[str, Any], base_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            run = config["run"]
            return run["params"], {**base_config, "seed": run["seed"]}

    return DataParallelTrial, DataParallelConfirmRun


def data_parallel_trainable(confirm: bool = False) -> type:
    """The Tune trainable of a sweep's data-parallel trials (or of its confirm runs)."""
    trial, confirm_run = _trial_classes()
    return confirm_run if confirm else trial
