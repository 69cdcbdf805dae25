"""Does the replay match reality? Real sweeps of a table's task, against the replay's 90% band.

    python benchmarks/reality.py TABLE CONFIG [--methods random,default] [--seeds 3] [--trials 32] [--json]

For each method, `--seeds` real sweeps (`sweep run CONFIG` with the method's settings, 2 trials at a time)
and 200 replayed ones on TABLE with the same number of trials. For each target of the table, a real sweep's
compute-to-target is the device-seconds its trials had spent (Tune's `time_total_s` of each trial's latest
report, summed) when a report first reached the target, in the order the reports came; it should land
inside the replay's 5th to 95th percentile of the same figure. The table's seconds come from the machine
that built it: each real figure is also given on the table's clock (divided by `machine_factor`, this
machine's seconds over the table's for the same configuration and step), and checked against the band.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import replay  # noqa: E402


def overrides(settings: dict, name: str, seed: int, trials: int, out: str) -> list[str]:
    found = [f"name={name}", f"seed={seed}", f"search.num_trials={trials}", "search.max_concurrent_trials=2",
             f"output_dir={out}", "ray.num_cpus=2"]
    for key, value in settings.items():
        found.append(f"{key}={'null' if value == 'EVAL' else json.dumps(value) if isinstance(value, bool) else value}")
    return found


def real_compute_to_target(sweep_dir: Path, task: replay.Task, target: float) -> tuple[float, bool]:
    from lora_sweep.report import trial_histories  # the engine's own reader of Tune's result.json files

    reports = [(row.timestamp, row.time_total_s, trial_id, getattr(row, task.metric))
               for trial_id, history in trial_histories(sweep_dir).items() for row in history.itertuples()]
    spent: dict[str, float] = {}
    for _, seconds, trial_id, value in sorted(reports):
        spent[trial_id] = seconds
        if task.reaches(value, target):
            return sum(spent.values()), True
    return sum(spent.values()), False


def machine_factor(sweep_dirs: list[Path], task: replay.Task) -> float:
    """How much slower this machine trains than the one that built the table: the median, over the real trials
    that ran without a pause, of their seconds to their last report over the table's seconds for the same
    configuration (nearest row, mean over its seeds) to the same step, start-up included. Compute-to-target
    in seconds can only be compared on one clock; the ratios within a table do not need this."""
    from lora_sweep.report import trial_histories

    ratios = []
    for sweep_dir in sweep_dirs:
        for history in trial_histories(sweep_dir).values():
            last = history.iloc[-1]
            if int(last["iterations_since_restore"]) != int(last["training_iteration"]):
                continue  # paused and resumed: its clock holds more than one start-up
            params = {name: last["config"][name] for name in task.space}
            runs = task.curves[replay.nearest(task, params)]
            table = np.mean([c.startup + c.seconds[list(c.steps).index(int(last["step"]))] for c in runs])
            ratios.append(float(last["time_total_s"]) / table)
    return float(np.median(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table")
    parser.add_argument("config")
    parser.add_argument("--methods", default="random,default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    task = replay.load_task(args.table)
    with tempfile.TemporaryDirectory() as out:
        sweeps = {method: [real_sweep(args.config, method, seed, args.trials, out) for seed in range(args.seeds)]
                  for method in args.methods.split(",")}
        factor = machine_factor([d for dirs in sweeps.values() for d in dirs], task)
        rows = []
        for method, real_dirs in sweeps.items():
            replayed = [replay.simulate(task, replay.METHODS[method], 2, args.trials, seed) for seed in range(200)]
            for target_name, fraction in replay.TARGETS.items():
                target = task.target(fraction)
                band = [replay.compute_to_target(task, trace, target)[0] for trace in replayed]
                low, high = np.percentile(band, [5, 95])
                real = [real_compute_to_target(d, task, target) for d in real_dirs]
                on_table_clock = [seconds / factor for seconds, _ in real]
                rows.append({"method": method, "target": target_name, "replay_p5": round(float(low), 1),
                             "replay_p95": round(float(high), 1), "real": [round(r[0], 1) for r in real],
                             "real_reached": [r[1] for r in real],
                             "inside": [bool(low <= r[0] <= high) for r in real],
                             "real_on_table_clock": [round(x, 1) for x in on_table_clock],
                             "inside_on_table_clock": [bool(low <= x <= high) for x in on_table_clock]})
    if args.json:
        print(json.dumps({"table": Path(args.table).name, "trials": args.trials, "machine_factor": round(factor, 3),
                          "rows": rows}))
    else:
        print(f"this machine's seconds / the table's, same configuration and step: {factor:.3f}")
        for row in rows:
            print(f"{row['method']:<18}{row['target']:<10} replay 90% band [{row['replay_p5']}, {row['replay_p95']}] s, "
                  f"real {row['real']} s, inside {row['inside']}; on the table's clock {row['real_on_table_clock']} s, "
                  f"inside {row['inside_on_table_clock']}")


def real_sweep(config: str, method: str, seed: int, trials: int, out: str) -> Path:
    """`sweep run CONFIG` with the method's settings, 2 trials at a time; its folder."""
    name = f"reality-{method}-{seed}"
    done = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "run", config,
                           *overrides(replay.METHODS[method], name, 100 + seed, trials, out)],
                          capture_output=True, text=True, cwd=HERE.parent, env={**os.environ, "LORA_SWEEP_TUNE_VERBOSE": "0"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return Path(out) / name


if __name__ == "__main__":
    main()
