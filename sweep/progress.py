"""Where a sweep stands: trials running / done / stopped early / errored, the best so far, elapsed and ETA.

The driver's `ProgressCallback` (a Ray Tune Callback) keeps `status.json` in the
sweep folder up to date, so `sweep status` in another terminal reads the same
numbers that `sweep run` draws live. One table renderer serves both.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from lora_sweep.direction import Direction
from lora_sweep.folder import LOG_FILE, STATUS_FILE
from lora_sweep.results import parse_shape, read_json, require_sweep_folder, sweep_folder, write_atomically
from lora_sweep.tracking import TrialProgress, TrialTracker

log = logging.getLogger(__name__)
# "exporting": every trial has ended; the best checkpoint is being evaluated on the test split and exported.
SweepState = Literal["running", "exporting", "finished", "stopped", "failed"]
ACTIVE_STATES = ("running", "exporting")


@dataclass
class SweepStatus:
    name: str
    state: SweepState
    metric: str
    mode: str
    num_trials: int
    max_concurrent: Optional[int]  # None: as many as the resources fit
    max_steps: int
    started_at: float
    updated_at: float
    driver_pid: int
    trials: list[TrialProgress] = field(default_factory=list)
    driver_host: str = ""  # a driver on another host (a shared results folder) cannot be checked from here

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    @property
    def ended(self) -> int:
        return sum(t.status in ("completed", "stopped early", "errored") for t in self.trials)

    @property
    def best(self) -> Optional[TrialProgress]:
        scored = [t for t in self.trials if t.best_metric is not None]
        if not scored:
            return None
        return Direction(self.mode).best(scored, key=lambda t: t.best_metric)

    @property
    def elapsed_seconds(self) -> float:
        end = time.time() if self.state in ACTIVE_STATES else self.updated_at  # the file is rewritten only on events
        return max(0.0, end - self.started_at)

    def eta_seconds(self) -> Optional[float]:
        """A rough estimate of the time left, from the trials that ended so far (None until one has).

        Trials not started yet are taken to last as long as the ended ones did on average; a running
        trial, for the rest of its steps, as long as the trials that ran to max_steps (ASHA lets a trial
        run on only when it is among the best, so running trials tend to be the long ones). ASHA's
        future stops cannot be known, so early in a sweep the estimate is often low.
        """
        if self.state != "running":
            return 0.0
        ended = [(t.ended_at - t.started_at, t.status) for t in self.trials if t.ended_at and t.started_at]
        if not ended:
            return None
        mean = sum(seconds for seconds, _ in ended) / len(ended)
        full = [seconds for seconds, status in ended if status == "completed"]
        full_length = sum(full) / len(full) if full else mean
        running_left = sum(
            full_length * (1 - min(t.step / max(self.max_steps, 1), 1.0)) for t in self.trials if t.status == "running"
        )
        not_started = self.num_trials - self.ended - self.count("running")
        # No concurrency limit (None: all that fit): as many slots as trials are running now.
        slots = self.max_concurrent or max(1, self.count("running"))
        return (running_left + max(not_started, 0) * mean) / slots

    def driver_alive(self) -> bool:
        if self.driver_pid <= 0:  # 0 and -N would ask about a whole process group, not the driver
            return False
        try:
            os.kill(self.driver_pid, 0)
        except (ProcessLookupError, OverflowError):
            return False
        except PermissionError:  # alive, owned by another user
            return True
        return True

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        best, eta = self.best, self.eta_seconds()
        data.update({
            "counts": {s: self.count(s) for s in ("running", "completed", "stopped early", "errored")},
            "ended": self.ended,
            "best": asdict(best) if best else None,
            "elapsed_seconds": round(self.elapsed_seconds, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
        })
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = STATUS_FILE) -> "SweepStatus":
        """The status in `data` (status.json's object); a missing field or one of the wrong type is a
        ConfigError naming `source` and the field. Keys it does not know (to_json's summaries) are ignored."""
        return parse_shape(cls, data, Path(source), STATUS_REMEDY)


# What to do about a damaged status.json: a running driver rewrites all of it at its next trial event.
STATUS_REMEDY = "a running sweep rewrites it at its next trial event; an ended sweep's trials are in leaderboard.csv"


def read_status(sweep_dir: Path) -> SweepStatus:
    folder = sweep_folder(sweep_dir, missing="no sweep has started there (start one with `sweep run`, or check the path)")
    path = folder / STATUS_FILE
    if not path.exists():
        require_sweep_folder(folder)
        raise FileNotFoundError(f"{path} not found: no sweep has started in {sweep_dir} (start one with `sweep run`)")
    status = SweepStatus.from_json(read_json(path, STATUS_REMEDY), str(path))
    same_host = status.driver_host in ("", socket.gethostname())
    if status.state in ACTIVE_STATES and same_host and not status.driver_alive():
        status.state = "stopped"  # killed without a chance to say so; `sweep resume` continues it
    return status


STALE_IN_STORAGE_SECONDS = 180.0  # a live driver copies status.json to storage at least every minute


def read_stored_status(uri: str) -> tuple[SweepStatus, float]:
    """The status a sweep's driver last copied to its storage (`sweep status s3://bucket/prefix/NAME`, from any
    machine), and how many seconds ago. A running sweep whose copy is older than three minutes shows as stopped:
    its driver no longer copies it (its machine may be gone), and `sweep resume <uri>` continues it."""
    import tempfile

    import pyarrow.fs as pafs

    from lora_sweep.storage import storage_of_uri

    storage = storage_of_uri(uri)
    info = storage.filesystem.get_file_info(storage.path(STATUS_FILE))
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{storage.uri} has no {STATUS_FILE}: no sweep has started there (give "
                                "<storage>/<name> as the sweep's config says)")
    age = max(0.0, time.time() - info.mtime.timestamp()) if info.mtime is not None else 0.0
    with tempfile.TemporaryDirectory(prefix="lora-sweep-status-") as scratch:
        local = Path(scratch) / STATUS_FILE
        pafs.copy_files(storage.path(STATUS_FILE), str(local), source_filesystem=storage.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        status = SweepStatus.from_json(read_json(local, STATUS_REMEDY), f"{storage.uri}/{STATUS_FILE}")
    if status.state in ACTIVE_STATES and age > STALE_IN_STORAGE_SECONDS:
        status.state = "stopped"
    return status, age


def _duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def summary_line(status: SweepStatus) -> str:
    """One line: state, counts, best so far, elapsed and ETA (what a log or a narrow terminal shows)."""
    best = status.best
    eta = status.eta_seconds()
    return (
        f"sweep {status.name}: {status.state} | {status.count('running')} running, {status.count('completed')} done, "
        f"{status.count('stopped early')} stopped early, {status.count('errored')} errored of {status.num_trials} | "
        f"best {status.metric} {_number(best.best_metric) if best else '-'}"
        f"{f' ({best.trial_id})' if best else ''} | elapsed {_duration(status.elapsed_seconds)}"
        + (f", ETA {'~' + _duration(eta) if eta is not None else 'after the first trial'}" if status.state == "running" else "")
    )


SHORT_NAMES = {"learning_rate": "lr", "rank": "r", "alpha_multiple": "alpha_x", "dropout": "drop",
               "target_modules": "targets", "warmup_ratio": "warmup", "weight_decay": "wd", "batch_size": "bs",
               "gradient_accumulation_steps": "accum", "lr_scheduler": "sched", "max_grad_norm": "clip"}


def short_params(params: dict[str, Any]) -> str:
    """`lr=0.0027 r=64 bs=16`: one line per trial even with many parameters."""
    parts = []
    for key, value in params.items():
        name = key.split(".")[-1]
        parts.append(f"{SHORT_NAMES.get(name, name)}={f'{value:.2g}' if isinstance(value, float) else value}")
    return " ".join(parts)


def render(status: SweepStatus, max_rows: int = 12, width: int = 120) -> Text:
    """The summary line, then the running trials and the best ended ones, one line each, cut to `width`.

    Plain fixed-width text rather than a table widget: a table squeezes or drops columns on a
    narrow terminal, and here only the params may give way.
    """
    ended = Direction(status.mode).best_first(
        (t for t in status.trials if t.status != "running" and t.best_metric is not None), key=lambda t: t.best_metric)
    shown = [t for t in status.trials if t.status == "running"] + ended
    listed = {t.trial_id for t in shown}
    shown += [t for t in status.trials if t.trial_id not in listed]
    lines = [summary_line(status), "",
             f"{'trial':<10}{'status':<15}{'step':>11}{'last':>10}{'best':>10}  params"]
    for trial in shown[:max_rows]:
        line = (f"{trial.trial_id:<10}{trial.status:<15}{f'{trial.step}/{status.max_steps}':>11}"
                f"{_number(trial.last_metric):>10}{_number(trial.best_metric):>10}  {short_params(trial.params)}")
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    if len(shown) > max_rows:
        lines.append(f"... and {len(shown) - max_rows} more trials (all of them: sweep status, leaderboard.csv)")
    return Text("\n".join(lines))


def mark_state(sweep_dir: Path, state: SweepState) -> None:
    """Record how the sweep ended (the driver calls this; a killed driver shows as stopped in `read_status`)."""
    path = Path(sweep_dir) / STATUS_FILE
    if path.is_file():
        status = SweepStatus.from_json(json.loads(path.read_text(encoding="utf-8")))
        status.state, status.updated_at = state, time.time()
        write_atomically(path, json.dumps(status.to_json(), indent=1, default=str))


class ProgressCallback(TrialTracker):
    """Keeps `status.json` current from Tune's events (the live view and `sweep status` read it).

    Writes are atomic: at every trial end, and otherwise at most every `min_interval` seconds.
    Tune pickles its callbacks with the experiment, so this holds only plain settings; the status
    itself is loaded in `setup`, which also runs when a stopped sweep is resumed.
    """

    def __init__(self, sweep_dir: Path, name: str, metric: str, mode: str, num_trials: int, max_concurrent: Optional[int],
                 max_steps: int, min_interval: float = 1.0):
        super().__init__(metric, mode, max_steps)
        self.sweep_dir = Path(sweep_dir)
        self.sweep_name, self.num_trials, self.max_concurrent = name, num_trials, max_concurrent
        self.min_interval = min_interval
        self.status: Optional[SweepStatus] = None
        self._written = 0.0
        self._dirty = True

    @staticmethod
    def _previous_status(path: Path) -> Optional[SweepStatus]:
        """The status a stopped sweep left, or None: none yet, or damaged (it is rebuilt from Tune's events,
        which the view only needs; the trials themselves are in Tune's state)."""
        if not path.is_file():
            return None
        try:
            return SweepStatus.from_json(read_json(path, STATUS_REMEDY), str(path))
        except ValueError as error:  # a ConfigError from the reader: damaged
            log.warning("status.json was damaged (%s): it starts again from this run's events", str(error)[:200])
            return None

    def setup(self, stop: Any = None, num_samples: Optional[int] = None, total_num_samples: Optional[int] = None,
              **info: Any) -> None:
        now = time.time()
        path = self.sweep_dir / STATUS_FILE
        previous = self._previous_status(path)
        if previous is not None:  # a resumed sweep: ended trials keep their rows, elapsed time counts on
            self.status = previous
            for trial in self.status.trials:
                if trial.status == "running":
                    # Until Tune restarts it; its clock restarts too, so the time the driver was
                    # down does not count in its duration (the ETA's averages).
                    trial.status, trial.started_at = "pending", None
        else:
            self.status = SweepStatus(state="running", started_at=now, updated_at=now, driver_pid=os.getpid(),
                                      name=self.sweep_name, metric=self.metric, mode=self.direction.value,
                                      num_trials=self.num_trials, max_concurrent=self.max_concurrent,
                                      max_steps=self.max_steps)
        self.trials = {trial.trial_id: trial for trial in self.status.trials}  # the tracker's records are the rows
        self.status.state, self.status.driver_pid, self.status.driver_host = "running", os.getpid(), socket.gethostname()
        self.publish(force=True)

    def publish(self, force: bool = False) -> None:
        now = time.time()
        if self.status is None or (not force and (not self._dirty or now - self._written < self.min_interval)):
            return
        self.status.trials = list(self.trials.values())
        self.status.updated_at = now
        # Compact: with 1,000 trials the file is rewritten 1,000+ times (BENCHMARKS.md, driver scale).
        write_atomically(self.sweep_dir / STATUS_FILE, json.dumps(self.status.to_json(), default=str))
        self._written, self._dirty = now, False

    def log_trial_start(self, trial: Any) -> None:
        self._dirty = True  # written within min_interval; an end is written at once, so none is lost to a kill
        self.publish()

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        self._dirty = True

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._dirty = True
        self.publish(force=True)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.publish()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.publish(force=True)


@contextlib.contextmanager
def live_progress(sweep_dir: Path, refresh_seconds: float = 1.0) -> Iterator[None]:
    """While the block runs, the terminal shows the progress table and everything else goes to logs/ray.log.

    The redirect is at the file-descriptor level, so it also takes Ray's worker output (which its
    driver prints), Tune's reporter and C++ core logs. On a terminal the table is redrawn in place;
    elsewhere (CI, a pipe) a summary line is printed when the counts change, at most every 10 s.
    """
    sweep_dir = Path(sweep_dir)
    (sweep_dir / LOG_FILE).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # the terminal as it is now, before fd 1 goes to the log
        terminal: TextIO = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        owned = True
    except (AttributeError, OSError, io.UnsupportedOperation):  # stdout is not a file (a test runner's buffer)
        terminal, owned = sys.stdout, False
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = open(sweep_dir / LOG_FILE, "ab", buffering=0)
    stop = threading.Event()
    watcher: Optional[threading.Thread] = None
    try:
        for fd in saved:
            os.dup2(log.fileno(), fd)
        console = Console(file=terminal)
        console.print(f"sweep progress: {sweep_dir / STATUS_FILE}; Ray and Tune output: {sweep_dir / LOG_FILE}",
                      soft_wrap=True)
        watcher = threading.Thread(target=_watch, args=(sweep_dir, console, stop, refresh_seconds), daemon=True)
        watcher.start()
        yield
    finally:
        stop.set()
        try:
            if watcher is not None:
                watcher.join(timeout=10)  # its last frame shows how the sweep ended
        finally:  # runs even if a second Ctrl-C lands in the join: the terminal always gets its fds back
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            log.close()
            if owned and (watcher is None or not watcher.is_alive()):
                terminal.close()


def _watch(sweep_dir: Path, console: Console, stop: threading.Event, refresh_seconds: float) -> None:
    def current() -> Optional[SweepStatus]:
        try:
            return read_status(sweep_dir)
        except Exception:  # not started yet, or unreadable: the view waits; it must never die mid-sweep
            return None

    if console.is_terminal:
        # Rows that fit the terminal (a taller table would be cut); other output is already in the log,
        # so Live must not redirect sys.stdout/sys.stderr to the terminal itself.
        rows = max(3, min(12, console.height - 8))
        with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                status = current()
                if status is not None:
                    live.update(render(status, rows, console.width), refresh=True)
                if stop.wait(refresh_seconds):
                    break
            status = current()
            if status is not None:
                live.update(render(status, rows, console.width), refresh=True)
        return
    last_key, last_time = None, 0.0
    while True:
        stopping = stop.wait(refresh_seconds)
        status = current()
        if status is not None:
            line = summary_line(status)
            key = line.split("|")[:2]  # state and counts: a new line only when these change
            if key != last_key and (stopping or time.time() - last_time >= 10):
                console.print(line, soft_wrap=True)
                last_key, last_time = key, time.time()
        if stopping:
            return
