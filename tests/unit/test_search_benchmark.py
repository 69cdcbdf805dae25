"""The search benchmark's parts (benchmarks/curves.py, benchmarks/replay.py) and the search options they measure."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import optuna.distributions as od
import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from lora_sweep.config import SweepConfig
from lora_sweep.driver import make_scheduler, make_search
from lora_sweep.schedulers import PromotionASHA

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import curves  # noqa: E402
import replay  # noqa: E402

SPACE = {
    "training.learning_rate": od.FloatDistribution(1e-5, 1e-1, log=True),
    "lora.rank": od.CategoricalDistribution([8, 16]),
    "lora.dropout": od.FloatDistribution(0.0, 0.1),
}


def config(**sections) -> SweepConfig:
    raw = {"name": "t", "model": {"path": "unused"}, "data": {"files": ["unused.jsonl"]},
           "training": {"max_steps": 100, "eval_steps": 10}, "search": {"space": None, "num_trials": 8}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return SweepConfig.model_validate(raw)


# --- the design of a table -----------------------------------------------------------------------------------

def test_design_crosses_a_learning_rate_grid_with_the_other_parameters_then_covers_the_space():
    points = curves.design(SPACE, 32, seed=0, grid_points=4)
    assert len(points) == 32
    crossed, rest = points[:16], points[16:]
    rates = sorted({p["training.learning_rate"] for p in crossed})
    # four rates evenly spaced on a log scale from the range's low end to its high end
    assert rates == pytest.approx([1e-5, 10 ** (-5 + 4 / 3), 10 ** (-5 + 8 / 3), 1e-1], rel=1e-9)
    # every other-parameter point appears once at every grid rate
    others = {}
    for point in crossed:
        key = (point["lora.rank"], point["lora.dropout"])
        others.setdefault(key, set()).add(point["training.learning_rate"])
    assert len(others) == 4 and all(len(seen) == 4 for seen in others.values())
    for point in points:
        for name, distribution in SPACE.items():
            assert distribution._contains(distribution.to_internal_repr(point[name]))
    # the quasi-random half spreads over the learning-rate range, not onto the grid
    assert len({p["training.learning_rate"] for p in rest}) == 16


# --- replay against a synthetic table ------------------------------------------------------------------------

def synthetic_table(tmp_path: Path, configs: int = 40, seeds: int = 2) -> Path:
    """Curves whose final value is set by the learning rate, ranked the same at every step: early stopping
    with a good ranking must beat training every trial to its end."""
    runs = []
    rng = np.random.default_rng(0)
    for config_id in range(configs):
        rate = float(10 ** rng.uniform(-5, -1))
        final = 1.0 + abs(math.log10(rate) + 3)  # best at 1e-3
        params = {"training.learning_rate": rate, "lora.rank": int(rng.choice([8, 16])),
                  "lora.dropout": float(rng.uniform(0, 0.1))}
        for seed in range(seeds):
            rows = [{"step": step, "value": final + 3.0 / step * 10 + 0.01 * seed, "device_seconds": step / 10.0,
                     "tokens": step * 100, "startup_seconds": 0.1, "diverged": False} for step in range(10, 101, 10)]
            runs.append({"config_id": config_id, "seed": seed, "params": params, "rows": rows})
    metadata = {"config": "synthetic.yaml", "task": "synthetic", "metric": "eval_loss", "mode": "min",
                "max_steps": 100, "eval_steps": 10, "model": "none",
                "space": {name: od.distribution_to_json(d) for name, d in SPACE.items()}}
    out = tmp_path / "synthetic.parquet"
    curves.write_table(runs, out, metadata)
    return out


def test_a_table_reads_back_with_its_space_and_curves(tmp_path):
    task = replay.load_task(synthetic_table(tmp_path))
    assert task.space == SPACE
    assert len(task.config_ids) == 40 and all(len(runs) == 2 for runs in task.curves.values())
    assert list(task.curves[0][0].steps) == list(range(10, 101, 10))
    # the nearest row of a configuration in the table is that configuration
    frame = curves.read_table(tmp_path / "synthetic.parquet").frame
    row = frame[frame["config_id"] == 7].iloc[0]
    assert replay.nearest(task, {name: replay._plain(row[curves.PARAM_PREFIX + name]) for name in SPACE}) == 7


def test_replay_reports_ratios_against_random_and_the_bounds(tmp_path):
    table = synthetic_table(tmp_path)
    summary = replay.replay(str(table), ["random", "ray_asha_random"], workers=2, trials=24, seeds=20)
    assert {"table", "workers", "trials", "seeds", "results"} <= set(summary)
    rows = {(r["method"], r["target"]): r for r in summary["results"]}
    for target in replay.TARGETS:
        assert rows[("random", target)]["median_ratio"] == 1.0  # random against itself, seed by seed
        assert rows[("oracle", target)]["median_ratio"] >= rows[("random", target)]["median_ratio"]
        for method in ("ray_asha_random", "perfect_asha"):
            row = rows[(method, target)]
            assert row["ci95_low"] <= row["median_ratio"] <= row["ci95_high"]
            assert 0.0 <= row["p_better"] <= 1.0 and 0.0 <= row["success_rate"] <= 1.0
    # rankings at every rung equal the final ones here: stopping early must save compute
    assert rows[("ray_asha_random", "top5%")]["median_ratio"] > 1.0
    assert rows[("ray_asha_random", "top5%")]["p_better"] > 0.5
    json.dumps(summary)


def test_a_sweep_that_misses_the_target_counts_its_whole_compute(tmp_path):
    task = replay.load_task(synthetic_table(tmp_path))
    trace = replay.Trace(compute=np.array([1.0, 2.0, 3.0]), values=np.array([9.0, 8.0, 7.0]), total=5.0, trials=3)
    assert replay.compute_to_target(task, trace, 7.5) == (3.0, True)
    assert replay.compute_to_target(task, trace, 1.0) == (5.0, False)
    # a failure never flatters the method that failed
    assert replay.paired_ratio((10.0, True), (5.0, True)) == 2.0
    assert replay.paired_ratio((50.0, False), (5.0, True)) == 10.0  # random's whole compute: a lower bound
    assert replay.paired_ratio((10.0, True), (2.0, False)) == 0.0
    assert replay.paired_ratio((50.0, False), (20.0, False)) == 1.0


def test_paused_trials_continue_their_curve_in_the_replay(tmp_path):
    task = replay.load_task(synthetic_table(tmp_path))
    settings = replay.METHODS["tpe_promotion"]
    trace = replay.simulate(task, settings, workers=2, trials=12, seed=0)
    # every evaluation of every trial is reported once, in time order, and compute only grows
    assert np.all(np.diff(trace.compute) >= 0)
    runs_to_end = (trace.values < 1.0 + 3.0 / 100 * 10 + 0.5).sum()
    assert trace.trials == 12 and runs_to_end >= 1


# --- the options the benchmark measures ------------------------------------------------------------------------

def test_tpe_options_reach_optunas_sampler(tmp_path):
    search = make_search(config(search={"multivariate": True, "constant_liar": True, "startup_trials": 3}),
                         SPACE, None, storage=optuna.storages.InMemoryStorage())
    sampler = search._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._group and sampler._constant_liar
    assert sampler._parzen_estimator_parameters is not None and sampler._n_startup_trials == 3


@pytest.mark.parametrize("stopped_trials, expected", [("pruned", optuna.trial.TrialState.PRUNED),
                                                      ("complete", optuna.trial.TrialState.COMPLETE)])
def test_a_trial_stopped_early_enters_the_study_as_the_config_says(stopped_trials, expected):
    search = make_search(config(search={"stopped_trials": stopped_trials}), SPACE, None,
                         storage=optuna.storages.InMemoryStorage())
    for trial_id in ("a", "b"):
        search.suggest(trial_id)
    search.on_trial_result("a", {"step": 30, "eval_loss": 2.0})
    search.on_trial_complete("a", {"step": 30, "eval_loss": 2.0})  # stopped by the scheduler at step 30
    search.on_trial_complete("b", {"step": 100, "eval_loss": 1.5})  # ran to max_steps
    states = [t.state for t in search._ot_study.get_trials(deepcopy=False)]
    assert states == [expected, optuna.trial.TrialState.COMPLETE]
    if expected == optuna.trial.TrialState.PRUNED:
        assert search._ot_study.trials[0].intermediate_values == {30: 2.0}


def test_brackets_make_asynchronous_hyperband():
    scheduler = make_scheduler(config(scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 3,
                                                "brackets": 2}))
    assert isinstance(scheduler, AsyncHyperBandScheduler) and len(scheduler._brackets) == 2
    with pytest.raises(ValueError, match="scheduler.brackets 2 is for type asha"):
        config(scheduler={"type": "promotion_asha", "brackets": 2})


class FakeTrial:
    def __init__(self, trial_id):
        self.trial_id, self.status = trial_id, "RUNNING"


class FakeController:
    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials


def test_promotion_asha_pauses_at_a_rung_until_a_trial_is_in_its_top_third():
    scheduler = make_scheduler(config(scheduler={"type": "promotion_asha", "grace_period": 10,
                                                 "reduction_factor": 3}))
    scheduler.set_search_properties("eval_loss", "min")
    assert isinstance(scheduler, PromotionASHA) and scheduler.milestones == [10, 30, 90]
    trials = [FakeTrial(name) for name in "abc"]
    controller = FakeController(trials)

    def decide(trial, step, loss):
        return scheduler.on_trial_result(controller, trial, {"step": step, "eval_loss": loss})

    # the first trials have nothing to be compared with: they wait at the first rung
    assert decide(trials[0], 10, 2.0) == TrialScheduler.PAUSE
    trials[0].status = "PAUSED"
    assert decide(trials[1], 10, 3.0) == TrialScheduler.PAUSE
    trials[1].status = "PAUSED"
    assert scheduler.choose_trial_to_run(controller) is None  # 2 results: the top third is nobody yet
    # a third result makes the best of the three (a, 2.0) promotable; c (worse) waits too
    assert decide(trials[2], 10, 4.0) == TrialScheduler.PAUSE
    trials[2].status = "PAUSED"
    assert scheduler.choose_trial_to_run(controller) is trials[0]
    assert scheduler.choose_trial_to_run(controller) is trials[0]  # idempotent until it runs
    trials[0].status = "RUNNING"
    assert decide(trials[0], 20, 1.9) == TrialScheduler.CONTINUE  # resumed: between rungs it runs on
    assert "a" in scheduler.promoted[0] and scheduler.choose_trial_to_run(controller) is None
    assert decide(trials[0], 30, 1.8) == TrialScheduler.PAUSE  # alone at the second rung
    # a new trial that beats its rung's top third at once goes on without pausing
    d = FakeTrial("d")
    controller.trials.append(d)
    for loss, name in ((1.0, "e"), (5.0, "f")):
        decide(FakeTrial(name), 10, loss)
    assert decide(d, 10, 0.5) == TrialScheduler.CONTINUE
    assert decide(d, 100, 0.4) == TrialScheduler.STOP  # max_steps


def test_every_replay_method_is_a_valid_config_with_the_scheduler_its_name_says(tmp_path):
    task = replay.load_task(synthetic_table(tmp_path))
    for method, settings in replay.METHODS.items():
        config = replay.method_config(task, settings, trials=8, workers=2, seed=0)
        expected = "none" if method == "random" else "promotion_asha" if "promotion" in method or method == "default" \
            else "asha"
        assert config.scheduler.type == expected, method

