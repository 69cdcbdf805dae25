"""Learning-curve tables: every configuration of a fixed design trained to its end, every evaluation recorded.

    python benchmarks/curves.py build CONFIG --out TABLE.parquet [--configs 128] [--seeds 2] [--workers 2]
    python benchmarks/curves.py show TABLE.parquet

The design is drawn from CONFIG's own search space (the one `sweep run CONFIG` samples): half of it a
log-spaced learning-rate grid crossed with quasi-random points of the other parameters (every one of those
points at every grid rate, so a table can tell how much the other parameters matter once the learning rate
is right), the other half quasi-random points over the whole space (Optuna's scrambled Sobol sampler). Each
configuration runs once per seed through the engine's own trainable (`run_trial`, the code a sweep's trials
run), to `training.max_steps`, with no scheduler.

One row per evaluation: config id, seed, step, the sweep metric, device-seconds so far (from the trial's
first optimizer step: training, evaluations and checkpoints; start-up is its own column), tokens so far, and
the configuration's parameters (`param:<field>` columns). The parquet file's metadata holds the search space
(Optuna's JSON form), the metric and its mode, and the training budget, so `replay.py` needs nothing else.

A build writes each finished run to TABLE.parquet.parts.jsonl first: a killed build continues where it
stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import optuna.distributions as od

LEARNING_RATE = "training.learning_rate"
PARAM_PREFIX = "param:"
METADATA_KEY = b"lora_sweep_curves"


# --- the design --------------------------------------------------------------------------------------------

def quasi_random_points(space: dict[str, od.BaseDistribution], count: int, seed: int) -> list[dict[str, Any]]:
    """`count` points of Optuna's scrambled Sobol sequence over `space` (categoricals by index)."""
    if not space or count <= 0:
        return [{} for _ in range(max(count, 0))]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                                                    warn_independent_sampling=False))
    points = []
    for _ in range(count):
        trial = study.ask(space)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)  # QMC ignores values; telling keeps the sequence moving in one study
    return points


def learning_rate_grid(distribution: od.BaseDistribution, count: int) -> list[float]:
    if isinstance(distribution, od.CategoricalDistribution):
        return [float(v) for v in distribution.choices]
    low, high = math.log(distribution.low), math.log(distribution.high)
    if count == 1:
        return [math.exp((low + high) / 2)]
    # exp(log(x)) can land a rounding step outside the range: the ends are the range's own, the rest clamped
    inner = [math.exp(low + (high - low) * i / (count - 1)) for i in range(1, count - 1)]
    return [distribution.low, *(min(max(r, distribution.low), distribution.high) for r in inner), distribution.high]


def design(space: dict[str, od.BaseDistribution], count: int, seed: int, grid_points: int = 8) -> list[dict[str, Any]]:
    """`count` configurations: a learning-rate grid crossed with quasi-random other parameters, then
    quasi-random points over the whole space. Without a learning rate in the space, all quasi-random."""
    if LEARNING_RATE not in space:
        return quasi_random_points(space, count, seed)
    rates = learning_rate_grid(space[LEARNING_RATE], grid_points)
    others = {name: distribution for name, distribution in space.items() if name != LEARNING_RATE}
    crossed = (count // 2) // len(rates)
    configs = [{LEARNING_RATE: rate, **point}
               for point in quasi_random_points(others, crossed, seed) for rate in rates]
    return configs + quasi_random_points(space, count - len(configs), seed + 1)


# --- one run --------------------------------------------------------------------------------------------

@dataclass
class TimedReporter:
    """The trainable's Reporter for a table: each evaluation with the device-seconds spent so far."""

    metric: str
    started: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        seconds = time.perf_counter() - self.started - float(metrics["startup_seconds"])
        self.rows.append({"step": int(metrics["step"]), "value": float(metrics[self.metric]),
                          "device_seconds": seconds, "tokens": int(metrics["tokens_seen"]),
                          "startup_seconds": float(metrics["startup_seconds"]), "diverged": bool(metrics["diverged"])})

    def restored_checkpoint(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext(None)  # a table's runs always start fresh


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration with one seed to its end; the rows of its curve."""
    from lora_sweep.recipe import run_trial

    base = dict(job["base_config"])
    base["seed"] = job["seed"]
    reporter = TimedReporter(job["metric"])
    run_trial(job["params"], base, job["data_path"], reporter)
    return {"config_id": job["config_id"], "seed": job["seed"], "params": job["params"], "rows": reporter.rows}


def _worker_init() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)


# --- build ----------------------------------------------------------------------------------------------

def build(config_path: str, out: Path, configs: int, seeds: int, workers: int, first_seed: int = 0) -> Path:
    from lora_sweep.config import load_config
    from lora_sweep.data import prepare_data
    from lora_sweep.search_space import build_search_space
    from lora_sweep.models import load_tokenizer

    config = load_config(config_path)
    space = build_search_space(config)
    points = design(space, configs, config.seed)
    scratch = Path(tempfile.mkdtemp(prefix="curves-data-"))
    prepared = prepare_data(config.data, load_tokenizer(config), config.seed, scratch)
    base_config = config.model_dump(mode="json")
    base_config["resources"]["cpu"] = 1  # one thread per run: runs go side by side, one per worker
    jobs = [{"config_id": i, "seed": first_seed + s, "params": params, "base_config": base_config,
             "data_path": str(prepared.path), "metric": config.search.metric}
            for s in range(seeds) for i, params in enumerate(points)]
    parts = out.with_name(out.name + ".parts.jsonl")
    finished = [json.loads(line) for line in parts.read_text().splitlines()] if parts.exists() else []
    done = {(run["config_id"], run["seed"]) for run in finished}
    todo = [job for job in jobs if (job["config_id"], job["seed"]) not in done]
    print(f"{len(jobs)} runs ({configs} configurations x {seeds} seeds), {len(done)} done before, {len(todo)} to run "
          f"on {workers} workers", flush=True)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_worker_init, maxtasksperchild=None) as pool, parts.open("a") as sink:
        for count, result in enumerate(pool.imap_unordered(run_one, todo), 1):
            sink.write(json.dumps(result) + "\n")
            sink.flush()
            finished.append(result)
            if count % 8 == 0 or count == len(todo):
                elapsed = time.perf_counter() - started
                print(f"  {count}/{len(todo)} runs, {elapsed:.0f} s, about {elapsed / count * (len(todo) - count):.0f} s "
                      "left", flush=True)
    write_table(finished, out, table_metadata(config, space, config_path))
    return out


def table_metadata(config: Any, space: dict[str, od.BaseDistribution], config_path: str) -> dict[str, Any]:
    return {
        "config": Path(config_path).name,
        "task": config.name,
        "metric": config.search.metric,
        "mode": config.search.mode,
        "max_steps": config.training.max_steps,
        "eval_steps": config.training.eval_steps,
        "space": {name: od.distribution_to_json(distribution) for name, distribution in space.items()},
        "model": Path(config.model.path).name,
    }


def write_table(runs: list[dict[str, Any]], out: Path, metadata: dict[str, Any]) -> None:
    """`runs`: what `run_one` returns (config id, seed, params, rows); one parquet row per evaluation."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = []
    for run in runs:
        for row in run["rows"]:
            records.append({"config_id": run["config_id"], "seed": run["seed"], **row,
                            **{PARAM_PREFIX + name: value for name, value in run["params"].items()}})
    frame = pd.DataFrame.from_records(records).sort_values(["config_id", "seed", "step"]).reset_index(drop=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata)})
    pq.write_table(table, out, compression="zstd")
    print(f"wrote {out}: {len(frame)} rows, {frame.groupby(['config_id', 'seed']).ngroups} runs, "
          f"{out.stat().st_size / 1e6:.2f} MB", flush=True)


# --- read -----------------------------------------------------------------------------------------------

@dataclass
class CurveTable:
    """A table as replay uses it: its space and metric, and every (config, seed) curve."""

    frame: Any  # pandas DataFrame, one row per evaluation
    metadata: dict[str, Any]

    @property
    def space(self) -> dict[str, od.BaseDistribution]:
        return {name: od.json_to_distribution(text) for name, text in self.metadata["space"].items()}

    @property
    def mode(self) -> str:
        return self.metadata["mode"]

    @property
    def metric(self) -> str:
        return self.metadata["metric"]


def read_table(path: str | Path) -> CurveTable:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    return CurveTable(table.to_pandas(), metadata)


def show(path: str) -> None:
    table = read_table(path)
    frame = table.frame
    last = frame.sort_values("step").groupby(["config_id", "seed"]).tail(1)
    print(json.dumps({k: v for k, v in table.metadata.items() if k != "space"}))
    print(f"{frame.groupby(['config_id', 'seed']).ngroups} runs, {frame['config_id'].nunique()} configurations, "
          f"seeds {sorted(frame['seed'].unique())}, {len(frame)} rows")
    print(f"final {table.metric}: min {last['value'].min():.4f}, median {last['value'].median():.4f}, "
          f"max {last['value'].max():.4f}; device-seconds per run: median {last['device_seconds'].median():.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="run the design and write the table")
    make.add_argument("config")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--configs", type=int, default=128)
    make.add_argument("--seeds", type=int, default=2)
    make.add_argument("--workers", type=int, default=2)
    look = commands.add_parser("show", help="summarise a table")
    look.add_argument("table")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.config, args.out, args.configs, args.seeds, args.workers)
    else:
        show(args.table)


if __name__ == "__main__":
    main()
