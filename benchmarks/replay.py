"""Replay: sweeps against a learning-curve table, in simulated time, with the engine's own searcher and scheduler.

    python benchmarks/replay.py TABLE [--workers 2] [--trials 64] [--seeds 200] [--methods a,b] [--json]
                                      [--plot OUT.png] [--jobs 2]

A discrete-event loop with `--workers` workers runs each method's sweep: the searcher and the scheduler are
the objects `sweep run` builds (`sweep.driver.make_search` / `make_scheduler`) from a config with the
method's settings. A suggested configuration runs as the table's nearest configuration (each parameter
scaled to [0, 1] over its range, the learning rate on a log scale; a categorical counts 0 when equal, 1
when not), with one of that configuration's recorded seeds drawn at random; its evaluations arrive at the
table's device-seconds; a paused and resumed trial continues its curve. Every start and every resume pays
the run's recorded start-up seconds. Compute is device-seconds summed over workers while they run a trial.

For each target (the top 12.5%, 5% and 2% of the table's final values: a trial reaches it when any of its
evaluations is at least that good), each seed's compute-to-target is the compute spent when an evaluation
first reached it. A sweep that never reaches it is a failure, counted in the success rate. The ratio is
random's compute over the method's, paired by seed (higher is better), and a failure never flatters the
method that failed: where only random failed, random's whole compute stands for its cost (at most its true
cost, so the ratio is a lower bound); where only the method failed, the ratio is 0 (a loss); where both
failed, 1 (a tie). Reported: the median ratio over seeds, a bootstrap 95% interval of that median,
P(ratio > 1), the success rate, and the median compute-to-target (a failure's censored at its whole compute).

Bounds from the same table: `oracle` trains only the configuration with the best mean final value;
`perfect_asha` is the engine's default ASHA and sampler ranking every trial at every rung by its final value.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import logging
import math
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import optuna  # noqa: E402
import optuna.distributions as od  # noqa: E402

from curves import CurveTable, PARAM_PREFIX, read_table  # noqa: E402

TARGETS = {"top12.5%": 0.125, "top5%": 0.05, "top2%": 0.02}

# Each method is a set of config settings: the replay builds the engine's searcher and scheduler from them.
# `default` sets nothing, so it is whatever the engine's defaults are at the time.
METHODS: dict[str, dict[str, Any]] = {
    "random": {"search.sampler": "random", "scheduler.type": "none"},
    # Ray's stock ASHA (grace period 1 report, reduction factor 4) with random search.
    "ray_asha_random": {"search.sampler": "random", "scheduler.type": "asha", "scheduler.grace_period": "EVAL",
                        "scheduler.reduction_factor": 4},
    # The engine's defaults before this benchmark existed: TPE (10 start-up trials) + ASHA (grace 40 steps, factor 3).
    "tpe_asha": {"search.sampler": "tpe", "search.startup_trials": 10, "scheduler.type": "asha",
                 "scheduler.grace_period": 40, "scheduler.reduction_factor": 3},
    "default": {},
    # Candidates: each is tpe_asha with the changes its name says.
    "tpe_asha_pruned": {"scheduler.type": "asha", "search.startup_trials": 10, "scheduler.grace_period": 40, "scheduler.reduction_factor": 3,
                        "search.stopped_trials": "pruned"},
    "tpe_mv_liar_asha": {"scheduler.type": "asha", "search.startup_trials": 10, "scheduler.grace_period": 40, "scheduler.reduction_factor": 3,
                         "search.multivariate": True, "search.constant_liar": True},
    "tpe_hyperband": {"scheduler.type": "asha", "search.startup_trials": 10, "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 3,
                      "scheduler.brackets": 3},
    "tpe_asha_grace1": {"scheduler.type": "asha", "search.startup_trials": 10, "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 3},
    "tpe_promotion_grace40": {"search.startup_trials": 10, "scheduler.type": "promotion_asha",
                              "scheduler.grace_period": 40, "scheduler.reduction_factor": 3},
    "tpe_promotion_rf2": {"search.startup_trials": 10, "scheduler.type": "promotion_asha",
                          "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 2},
    "tpe_promotion": {"search.startup_trials": 10, "scheduler.type": "promotion_asha",
                      "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 3},
    "tpe_promotion_rf4": {"search.startup_trials": 10, "scheduler.type": "promotion_asha",
                          "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 4},
    "tpe_promotion_startup5": {"search.startup_trials": 5, "scheduler.type": "promotion_asha",
                               "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 3},
    "tpe_promotion_startup20": {"search.startup_trials": 20, "scheduler.type": "promotion_asha",
                                "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 3},
    "random_promotion": {"search.sampler": "random", "scheduler.type": "promotion_asha",
                         "scheduler.grace_period": "EVAL", "scheduler.reduction_factor": 3},
}


# --- the table as replay sees it ----------------------------------------------------------------------------

@dataclass
class Curve:
    steps: np.ndarray
    values: np.ndarray
    seconds: np.ndarray  # device-seconds from the run's first step to each evaluation
    startup: float = 0.0  # seconds from the trial's start to its first step (paid again on every resume)


@dataclass
class Task:
    name: str
    space: dict[str, od.BaseDistribution]
    metric: str
    mode: str
    max_steps: int
    eval_steps: int
    config_ids: list[int]
    points: np.ndarray  # configurations scaled to [0, 1] per parameter (categoricals as indices)
    curves: dict[int, list[Curve]]  # config id -> one curve per recorded seed

    def sign(self) -> float:
        return 1.0 if self.mode == "min" else -1.0

    def finals(self) -> np.ndarray:
        return np.array([curve.values[-1] for runs in self.curves.values() for curve in runs])

    def target(self, fraction: float) -> float:
        """The value a top-`fraction` run's final evaluation reaches (the better end of the distribution)."""
        finals = self.finals()
        return float(np.quantile(finals, fraction) if self.mode == "min" else np.quantile(finals, 1 - fraction))

    def reaches(self, value: Any, target: float) -> Any:
        """Whether `value` (a number or an array of them) is at least as good as `target`."""
        return value <= target if self.mode == "min" else value >= target

    def mean_finals(self) -> dict[int, float]:
        """Each configuration's final value, averaged over its seeds."""
        return {config_id: float(np.mean([c.values[-1] for c in runs])) for config_id, runs in self.curves.items()}

    def best_config(self) -> int:
        finals = self.mean_finals()
        return (min if self.mode == "min" else max)(finals, key=finals.__getitem__)


def scaled(space: dict[str, od.BaseDistribution], params: dict[str, Any]) -> np.ndarray:
    out = []
    for name, distribution in space.items():
        value = params[name]
        if isinstance(distribution, od.CategoricalDistribution):
            out.append(float(distribution.choices.index(value)))
        elif getattr(distribution, "log", False):
            out.append((math.log(value) - math.log(distribution.low)) / (math.log(distribution.high) - math.log(distribution.low)))
        elif distribution.high > distribution.low:
            out.append((value - distribution.low) / (distribution.high - distribution.low))
        else:
            out.append(0.0)
    return np.array(out)


def load_task(path: str | Path) -> Task:
    table: CurveTable = read_table(path)
    frame = table.frame.sort_values(["config_id", "seed", "step"])
    space = table.space
    curves: dict[int, list[Curve]] = {}
    points = {}
    for (config_id, _seed), runs in frame.groupby(["config_id", "seed"], sort=True):
        curves.setdefault(int(config_id), []).append(Curve(runs["step"].to_numpy(), runs["value"].to_numpy(dtype=float),
                                                           runs["device_seconds"].to_numpy(dtype=float),
                                                           float(runs["startup_seconds"].iloc[0])))
        first = runs.iloc[0]
        points[int(config_id)] = scaled(space, {name: _plain(first[PARAM_PREFIX + name]) for name in space})
    ids = sorted(curves)
    return Task(Path(path).stem, space, table.metric, table.mode, int(table.metadata["max_steps"]),
                int(table.metadata["eval_steps"]), ids, np.array([points[i] for i in ids]), curves)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def nearest(task: Task, params: dict[str, Any]) -> int:
    point = scaled(task.space, params)
    categorical = np.array([isinstance(d, od.CategoricalDistribution) for d in task.space.values()])
    difference = np.abs(task.points - point)
    difference[:, categorical] = (difference[:, categorical] > 0).astype(float)
    return task.config_ids[int(np.argmin((difference ** 2).sum(axis=1)))]


# --- the engine's objects ------------------------------------------------------------------------------------

def method_config(task: Task, settings: dict[str, Any], trials: int, workers: int, seed: int):
    from lora_sweep.config import SweepConfig

    raw: dict[str, Any] = {
        "name": f"replay-{task.name}", "seed": seed,
        "model": {"path": "unused"}, "data": {"files": ["unused.jsonl"]},
        "training": {"max_steps": task.max_steps, "eval_steps": task.eval_steps},
        "search": {"space": None, "num_trials": trials, "max_concurrent_trials": workers,
                   "metric": task.metric, "mode": task.mode},
        "scheduler": {},
    }
    for dotted, value in settings.items():
        section, key = dotted.split(".", 1)
        raw[section][key] = task.eval_steps if value == "EVAL" else value
    return SweepConfig.model_validate(raw)


@dataclass
class ReplayTrial:
    """What Tune's schedulers read of a trial."""

    trial_id: str
    config_id: int
    curve: Curve
    status: str = "PENDING"
    position: int = 0  # the next evaluation's index in the curve
    config: dict = field(default_factory=dict)


class ReplayController:
    """The part of Tune's controller a scheduler may ask about or act on."""

    def __init__(self, scheduler: Any, searcher: Any, trials: int) -> None:
        self.trials: list[ReplayTrial] = []
        self.scheduler, self.searcher, self.planned = scheduler, searcher, trials
        self.search_alg = self  # Tune's SearchGenerator: is_finished() and its `searcher`

    def is_finished(self) -> bool:
        return len(self.trials) >= self.planned

    def stop_trial(self, trial: ReplayTrial) -> None:
        """As Tune stops a paused or pending trial: the scheduler removes it, the searcher hears it ended."""
        if trial.status in ("PAUSED", "PENDING"):
            self.scheduler.on_trial_remove(self, trial)
            with quiet():
                self.searcher.on_trial_complete(trial.trial_id)
        trial.status = "TERMINATED"

    def get_trials(self) -> list[ReplayTrial]:
        return self.trials


@dataclass
class Trace:
    compute: np.ndarray  # compute spent (device-seconds over all workers) at each evaluation, in time order
    values: np.ndarray
    total: float
    trials: int


@contextlib.contextmanager
def quiet():
    """Optuna's and Ray's per-trial logging, and their warnings, would drown the benchmark's output."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(previous)


def simulate(task: Task, settings: dict[str, Any], workers: int, trials: int, seed: int,
             perfect_ranking: bool = False) -> Trace:
    from ray.tune.schedulers import TrialScheduler

    from lora_sweep.driver import make_scheduler, make_search

    config = method_config(task, settings, trials, workers, seed)
    np.random.seed(seed)  # Ray's ASHA draws a bracket per trial from numpy's global generator
    rng = np.random.default_rng(seed + 1_000_003)
    with quiet():
        searcher = make_search(config, task.space, None, storage=optuna.storages.InMemoryStorage())
        scheduler = make_scheduler(config)
        scheduler.set_search_properties(config.search.metric, config.search.mode)
    controller = ReplayController(scheduler, searcher, trials)
    events: list[tuple[float, int, ReplayTrial]] = []
    sequence = 0
    now, compute, running = 0.0, 0.0, 0
    reported_compute, reported_values = [], []
    started = 0

    def segment(trial: ReplayTrial, starting: bool = False) -> float:
        """Device-seconds to the trial's next evaluation; a trial that starts or resumes pays its start-up too."""
        i = trial.position
        seconds = float(trial.curve.seconds[i] - (trial.curve.seconds[i - 1] if i > 0 else 0.0))
        return seconds + (trial.curve.startup if starting else 0.0)

    def launch() -> bool:
        nonlocal sequence, started, running
        trial = None
        chosen = scheduler.choose_trial_to_run(controller)
        if chosen is not None and chosen.status == "PAUSED":
            trial = chosen
            if hasattr(searcher, "on_unpause"):
                searcher.on_unpause(trial.trial_id)
        elif started < trials:
            trial_id = f"{started:05d}"
            with quiet():
                params = searcher.suggest(trial_id)
            if params is None:
                return False
            config_id = nearest(task, params)
            runs = task.curves[config_id]
            trial = ReplayTrial(trial_id, config_id, runs[int(rng.integers(len(runs)))], config=params)
            controller.trials.append(trial)
            scheduler.on_trial_add(controller, trial)
            started += 1
        if trial is None:
            return False
        trial.status = "RUNNING"
        running += 1
        heapq.heappush(events, (now + segment(trial, starting=True), sequence, trial))
        sequence += 1
        return True

    while True:
        while running < workers and launch():
            pass
        if not events:
            break
        at, _, trial = heapq.heappop(events)
        compute += running * (at - now)
        now = at
        i = trial.position
        value = float(trial.curve.values[i])
        reported_compute.append(compute)
        reported_values.append(value)
        ranked = float(trial.curve.values[-1]) if perfect_ranking else value
        result = {"step": int(trial.curve.steps[i]), task.metric: ranked, "training_iteration": i + 1,
                  "time_total_s": float(trial.curve.seconds[i])}
        trial.position += 1
        last = trial.position >= len(trial.curve.steps)
        decision = deliver(searcher, scheduler, controller, trial, result, last)
        if decision in (TrialScheduler.STOP, TrialScheduler.PAUSE):
            running -= 1
        else:
            heapq.heappush(events, (now + segment(trial), sequence, trial))
            sequence += 1
    return Trace(np.array(reported_compute), np.array(reported_values), compute, started)


def deliver(searcher: Any, scheduler: Any, controller: ReplayController, trial: ReplayTrial, result: dict,
            last: bool) -> str:
    """One reported result, handed to the searcher and the scheduler as Tune's controller hands it (a stop
    also ends the trial in both, and the last result of a trial is a stop); returns the decision."""
    from ray.tune.schedulers import TrialScheduler

    with quiet():
        decision = scheduler.on_trial_result(controller, trial, result)
        if decision != TrialScheduler.STOP:
            searcher.on_trial_result(trial.trial_id, result)
    if last or decision == TrialScheduler.STOP:
        trial.status = "TERMINATED"
        with quiet():
            searcher.on_trial_complete(trial.trial_id, result)
            scheduler.on_trial_complete(controller, trial, result)
        return TrialScheduler.STOP
    if decision == TrialScheduler.PAUSE:
        trial.status = "PAUSED"
    return decision


def follow(config: Any, space: dict[str, od.BaseDistribution],
           recorded: list[list[tuple[int, float]]]) -> list[tuple[dict[str, Any], int]]:
    """A recorded real sweep of trials run one at a time, fed to fresh engine objects through the replay's own
    `deliver`: each trial's suggested configuration, and the step at which the scheduler ended it (-1 when it
    would have gone on past the last recorded result). A real run and its replay must agree on both."""
    from lora_sweep.driver import make_scheduler, make_search

    with quiet():
        searcher = make_search(config, space, None, storage=optuna.storages.InMemoryStorage())
        scheduler = make_scheduler(config)
        scheduler.set_search_properties(config.search.metric, config.search.mode)
    controller = ReplayController(scheduler, searcher, len(recorded))
    out = []
    for index, rows in enumerate(recorded):
        trial_id = f"{index:05d}"
        with quiet():
            params = searcher.suggest(trial_id)
        trial = ReplayTrial(trial_id, -1, Curve(np.array([]), np.array([]), np.array([])), "RUNNING", config=params)
        controller.trials.append(trial)
        scheduler.on_trial_add(controller, trial)
        ended = -1
        for iteration, (step, value) in enumerate(rows, 1):
            result = {"step": step, config.search.metric: value, "training_iteration": iteration}
            if deliver(searcher, scheduler, controller, trial, result, step >= config.training.max_steps) != "CONTINUE":
                ended = step
                break
        out.append((params, ended))
    return out


def oracle_compute(task: Task, target: float) -> float:
    """Train only the configuration with the best mean final value: its mean compute to the target (inf: never)."""
    costs = []
    for curve in task.curves[task.best_config()]:
        hits = [s for v, s in zip(curve.values, curve.seconds, strict=True) if task.reaches(v, target)]
        costs.append(hits[0] if hits else math.inf)
    return float(np.mean(costs))


# --- statistics ----------------------------------------------------------------------------------------------

def compute_to_target(task: Task, trace: Trace, target: float) -> tuple[float, bool]:
    hits = np.nonzero(task.reaches(trace.values, target))[0]
    if len(hits):
        return float(trace.compute[hits[0]]), True
    return trace.total, False


def paired_ratio(random: tuple[float, bool], method: tuple[float, bool]) -> float:
    """Random's compute-to-target over the method's, for one seed, never flattering a method that failed.

    Both reached it: the plain ratio. Only the method: random's whole compute stands for its cost, which
    is at most its true cost (a lower bound of the ratio). Only random: 0, a loss. Neither: 1, a tie."""
    (random_cost, random_reached), (method_cost, method_reached) = random, method
    if method_reached:
        return random_cost / method_cost if method_cost > 0 else math.inf
    return 1.0 if not random_reached else 0.0


def median_interval(ratios: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    from scipy.stats import bootstrap

    median = float(np.median(ratios))
    if len(ratios) < 2 or np.all(ratios == ratios[0]):
        return median, median, median
    interval = bootstrap((ratios,), np.median, confidence_level=0.95, n_resamples=2000, method="percentile",
                         random_state=np.random.default_rng(seed)).confidence_interval
    return median, float(interval.low), float(interval.high)


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    from scipy.stats import trim_mean

    return trim_mean(values, 0.25, axis=axis)


def regret_curves(task: Task, traces: list[Trace], grid: np.ndarray) -> np.ndarray:
    """Anytime regret (best value so far minus the table's best mean final value), IQM over seeds, on `grid`."""
    best = task.mean_finals()[task.best_config()]
    worst = np.max(task.finals()) if task.mode == "min" else np.min(task.finals())  # before any evaluation
    rows = []
    for trace in traces:
        so_far = np.minimum.accumulate(trace.values) if task.mode == "min" else np.maximum.accumulate(trace.values)
        index = np.searchsorted(trace.compute, grid, side="right") - 1
        regret = np.where(index >= 0, so_far[np.clip(index, 0, None)], worst)
        rows.append(task.sign() * (regret - best))
    return iqm(np.array(rows), axis=0)


# --- the benchmark --------------------------------------------------------------------------------------------

def _run(job: tuple[str, str, dict, int, int, int, bool]) -> tuple[str, int, Trace]:
    path, method, settings, workers, trials, seed, perfect = job
    return method, seed, simulate(_task(path), settings, workers, trials, seed, perfect_ranking=perfect)


_TASKS: dict[str, Task] = {}


def _task(path: str) -> Task:
    if path not in _TASKS:
        _TASKS[path] = load_task(path)
    return _TASKS[path]


def replay(path: str, methods: list[str], workers: int, trials: int, seeds: int, jobs: int = 1,
           plot: Optional[Path] = None) -> dict[str, Any]:
    task = _task(path)
    runs = [(path, m, METHODS.get(m, {}), workers, trials, s, False) for m in methods for s in range(seeds)]
    runs += [(path, "perfect_asha", {}, workers, trials, s, True) for s in range(seeds)]
    if "random" not in methods:
        runs += [(path, "random", METHODS["random"], workers, trials, s, False) for s in range(seeds)]
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            done = pool.map(_run, runs, chunksize=4)
    else:
        done = [_run(job) for job in runs]
    traces: dict[str, list[Trace]] = {}
    for method, _seed, trace in sorted(done, key=lambda item: (item[0], item[1])):
        traces.setdefault(method, []).append(trace)
    results = []
    for target_name, fraction in TARGETS.items():
        target = task.target(fraction)
        reference = [compute_to_target(task, trace, target) for trace in traces["random"]]
        for method in [*methods, "perfect_asha"]:
            reached = [compute_to_target(task, trace, target) for trace in traces[method]]
            ratios = np.array([paired_ratio(r, m) for r, m in zip(reference, reached, strict=True)])
            median, low, high = median_interval(ratios)
            results.append({"method": method, "target": target_name, "target_value": round(target, 4),
                            "median_ratio": round(median, 3), "ci95_low": round(low, 3), "ci95_high": round(high, 3),
                            "p_better": round(float(np.mean(ratios > 1)), 3),
                            "success_rate": round(float(np.mean([m[1] for m in reached])), 3),
                            "median_compute": round(float(np.median([m[0] for m in reached])), 1)})
        oracle = oracle_compute(task, target)
        random_median = float(np.median([r[0] for r in reference]))
        results.append({"method": "oracle", "target": target_name, "target_value": round(target, 4),
                        "median_ratio": round(random_median / oracle, 3) if oracle > 0 else math.inf,
                        "ci95_low": None, "ci95_high": None, "p_better": None, "success_rate": float(oracle < math.inf),
                        "median_compute": round(oracle, 1)})
    summary = {"table": Path(path).name, "workers": workers, "trials": trials, "seeds": seeds, "results": results}
    grid = compute_grid(traces)
    reference = regret_curves(task, traces["random"], grid)
    # Anytime regret against random's at every budget up to random's median whole compute (a 1e-9 slack for
    # two methods that both reached the best, where the IQMs are equal up to rounding).
    summary["regret_not_worse_than_random"] = {
        method: round(float(np.mean(regret_curves(task, traces[method], grid) <= reference + 1e-9)), 3)
        for method in methods if method != "random"}
    if plot is not None:
        draw(task, traces, [m for m in PLOTTED if m in traces], plot)
    return summary


PLOTTED = ("random", "ray_asha_random", "tpe_asha", "default", "perfect_asha")


def compute_grid(traces: dict[str, list[Trace]]) -> np.ndarray:
    return np.linspace(0, float(np.median([t.total for t in traces["random"]])), 200)


def draw(task: Task, traces: dict[str, list[Trace]], methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = compute_grid(traces)
    figure, axis = plt.subplots(figsize=(7, 4.2))
    floor = 1e-4  # a regret of 0 (the best configuration found) is drawn at the floor of the log scale
    for method in methods:
        axis.plot(grid / 60, np.maximum(regret_curves(task, traces[method], grid), floor), label=method)
    axis.set_yscale("log")
    axis.set_ylim(floor * 0.8, None)
    axis.set_xlabel("compute (device-minutes, summed over workers)")
    axis.set_ylabel(f"anytime regret of {task.metric} (IQM over seeds)")
    axis.set_title(f"{task.name}: {len(traces['random'])} seeds")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def print_table(summary: dict[str, Any]) -> None:
    print(f"{summary['table']}: {summary['workers']} workers, {summary['trials']} trials, {summary['seeds']} seeds")
    print(f"{'method':<22}{'target':<10}{'median ratio':>13}{'95% interval':>18}{'P(>1)':>8}{'success':>9}"
          f"{'compute s':>11}")
    for row in summary["results"]:
        interval = f"[{row['ci95_low']}, {row['ci95_high']}]" if row["ci95_low"] is not None else ""
        p_better = "" if row["p_better"] is None else row["p_better"]
        print(f"{row['method']:<22}{row['target']:<10}{row['median_ratio']:>13}{interval:>18}{p_better!s:>8}"
              f"{row['success_rate']:>9}{row['median_compute']:>11}")


def markdown(summary: dict[str, Any]) -> str:
    """The result table as BENCHMARKS.md shows it: one row per method, the three targets side by side."""
    targets = list(TARGETS)
    rows = {}
    for row in summary["results"]:
        rows.setdefault(row["method"], {})[row["target"]] = row
    lines = ["| method | " + " | ".join(f"{t}: median ratio [95% interval], P(>1), success" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for method, by_target in rows.items():
        cells = []
        for target in targets:
            row = by_target[target]
            if row["ci95_low"] is None:
                cells.append(f"{row['median_ratio']:.2f} ({row['median_compute']:.0f} s)")
            else:
                cells.append(f"{row['median_ratio']:.2f} [{row['ci95_low']:.2f}, {row['ci95_high']:.2f}], "
                             f"{row['p_better']:.2f}, {row['success_rate']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes running seeds side by side")
    parser.add_argument("--plot", type=Path, help="write the anytime-regret curves (PNG) here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--markdown", action="store_true", help="print the table as BENCHMARKS.md shows it")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(METHODS)}")
    summary = replay(args.table, methods, args.workers, args.trials, args.seeds, args.jobs, args.plot)
    if args.json:
        print(json.dumps(summary))
    elif args.markdown:
        print(markdown(summary))
    else:
        print_table(summary)


if __name__ == "__main__":
    main()
