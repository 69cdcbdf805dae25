"""Promotion-based ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning", Algorithm 2).

Ray Tune's ASHAScheduler decides when a trial reaches a rung, against the trials that reached it before:
the first trials of a sweep have nothing to be compared with and run to their end. Here a trial pauses at
each rung (its checkpoint is that evaluation's) unless it is already in the top 1/`reduction_factor` of the
rung; a free worker resumes the best paused trial that has become promotable, highest rung first, and only
otherwise starts a new trial. So no trial goes past a rung before `reduction_factor` trials were compared
there.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter

from lora_sweep.direction import Direction


class PromotionASHA(FIFOScheduler):
    """Ray Tune scheduler: pause at every rung, promote the top 1/`reduction_factor` of each rung.

    A paused trial frees its slot for a new one (the searcher is told, as Ray's BOHB scheduler tells it, and
    `PausingConcurrencyLimiter` no longer counts it). When no trial runs or waits to start and the searcher
    has no more, the paused trials that were never promoted are stopped through the controller, as Ray's
    HyperBandScheduler stops trials: their rung's result is their last, and the sweep ends.
    """

    def __init__(self, time_attr: str, max_t: int, grace_period: int, reduction_factor: float,
                 metric: Optional[str] = None, mode: Optional[str] = None, max_running: Optional[int] = None):
        super().__init__()  # type: ignore[no-untyped-call]
        self.max_running = max_running  # trials at once, when Tune's resource accounting does not hold them back
        self._time_attr = time_attr
        self._max_t = max_t
        self._metric = metric
        self._mode = mode
        self._reduction_factor = reduction_factor
        self.milestones: list[float] = []
        milestone = float(grace_period)
        while milestone < max_t:
            self.milestones.append(milestone)
            milestone *= reduction_factor
        self.scores: list[dict[str, float]] = [{} for _ in self.milestones]  # per rung: trial id -> score (higher better)
        self.promoted: list[set[str]] = [set() for _ in self.milestones]
        self.paused_at: dict[str, int] = {}  # trial id -> the rung it waits at

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec: Any) -> bool:
        if self._metric and metric or self._mode and mode:
            return False
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def _score(self, value: float) -> float:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return -math.inf
        return -Direction(self._mode).sign * float(value)

    def _top(self, rung: int) -> list[str]:
        """The trials of `rung` that may go on: its best floor(n / reduction_factor)."""
        scores = self.scores[rung]
        count = int(len(scores) / self._reduction_factor)
        return sorted(scores, key=lambda trial_id: scores[trial_id], reverse=True)[:count]

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        trial_id = trial.trial_id
        waited = self.paused_at.pop(trial_id, None)
        if waited is not None:  # resumed: it was promoted from the rung it waited at
            self.promoted[waited].add(trial_id)
        elapsed = result[self._time_attr]
        if elapsed >= self._max_t:
            return TrialScheduler.STOP
        rung = next((k for k in reversed(range(len(self.milestones)))
                     if elapsed >= self.milestones[k] and trial_id not in self.scores[k]), None)
        if rung is None:
            return TrialScheduler.CONTINUE
        self.scores[rung][trial_id] = self._score(result[self._metric])
        if trial_id in self._top(rung):
            self.promoted[rung].add(trial_id)
            return TrialScheduler.CONTINUE
        self.paused_at[trial_id] = rung
        _tell_searcher(tune_controller, "on_pause", trial_id)
        return TrialScheduler.PAUSE

    def promotable(self) -> list[str]:
        """Paused trials that may go on, best first from the highest rung."""
        out = []
        for rung in reversed(range(len(self.milestones))):
            out += [trial_id for trial_id in self._top(rung)
                    if self.paused_at.get(trial_id) == rung and trial_id not in self.promoted[rung]]
        return out

    def choose_trial_to_run(self, tune_controller: Any) -> Optional[Trial]:
        trials: list[Trial] = tune_controller.get_trials()
        limit = getattr(self, "max_running", None)  # a scheduler pickled before the limit existed has none
        if limit is not None and sum(t.status == Trial.RUNNING for t in trials) >= limit:
            return None
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        for trial_id in self.promotable():
            if trial_id in paused:
                _tell_searcher(tune_controller, "on_unpause", trial_id)
                return paused[trial_id]
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if paused and _nothing_more_to_come(tune_controller, trials):
            for trial in paused.values():  # never promoted, and nothing left that could promote them
                tune_controller.stop_trial(trial)
        return None

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self.paused_at.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.paused_at.pop(trial.trial_id, None)

    def debug_string(self) -> str:
        rungs = ", ".join(f"step {m:g}: {len(s)} ({len(p)} promoted)"
                          for m, s, p in zip(self.milestones, self.scores, self.promoted, strict=True))
        return f"PromotionASHA: {rungs}; {len(self.paused_at)} paused"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


def _tell_searcher(tune_controller: Any, event: str, trial_id: str) -> None:
    """`on_pause` / `on_unpause` to the sweep's searcher (Tune's controller holds it in a SearchGenerator)."""
    searcher = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
    if searcher is not None and hasattr(searcher, event):
        getattr(searcher, event)(trial_id)


def _nothing_more_to_come(tune_controller: Any, trials: list[Trial]) -> bool:
    if any(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials):
        return False
    search = getattr(tune_controller, "search_alg", None)
    return search is None or search.is_finished()


class PausingConcurrencyLimiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter, where a paused trial does not count: it holds no resources, and counting it
    would stop new trials from starting while the paused ones wait to be compared with them."""

    def __init__(self, searcher: Any, max_concurrent: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.paused: set[str] = set()

    def on_pause(self, trial_id: str) -> None:
        if trial_id in self.live_trials:
            self.live_trials.discard(trial_id)
            self.num_unfinished_live_trials -= 1
            self.paused.add(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        if trial_id in self.paused:
            self.paused.discard(trial_id)
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1

    def on_trial_complete(self, trial_id: str, result: Optional[dict[str, Any]] = None, error: bool = False) -> None:
        if trial_id in self.paused:  # stopped while paused: the searcher still hears how it ended
            self.paused.discard(trial_id)
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


class KeepResultsAcrossPauses(Callback):
    """Keeps the result a trial reported when it was paused in its result.json and progress.csv.

    When a trial starts again, Tune's result loggers copy these files back from the sweep's storage, where
    they were last synced at a checkpoint; a result that came with a PAUSE is not synced first, so it would be
    lost. This callback runs before the loggers (Tune adds them after the sweep's callbacks) and pushes the
    driver's fuller copy to storage first.
    """

    FILES = ("result.json", "progress.csv")

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        storage = trial.storage
        if storage is None or trial.local_path is None:  # Tune gives every started trial both
            return
        filesystem = storage.storage_filesystem
        for name in self.FILES:
            local = Path(trial.local_path) / name
            remote = f"{storage.trial_fs_path}/{name}"
            if not local.is_file():
                continue  # a new driver after a crash: storage holds the only copy
            stored = filesystem.get_file_info(remote)
            if stored.type == pafs.FileType.File and stored.size >= local.stat().st_size:
                continue
            pafs.copy_files(str(local), remote, destination_filesystem=filesystem)
