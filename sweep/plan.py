"""`sweep plan`: what a sweep would do and cost, worked out from its config alone.

It runs every check `sweep run` runs before it writes anything (config, search space,
model, resources, data; a cluster's size is only known once `sweep run` connects), then counts: trials, the training steps ASHA could spend, LoRA parameters and the
disk the sweep will use. It starts no Ray and writes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import optuna.distributions as od
import torch

from sweep.config import SweepConfig, asha_rung_count
from sweep.data import tokenize_splits
from sweep.driver import trials_that_fit
from sweep.lora import resolve_target_modules, targeted_module_names
from sweep.pipeline import check_model, check_output_dir, check_resources, local_ray_resources
from sweep.placement import check_placement
from sweep.storage import open_storage
from sweep.search_space import apply_params, build_search_space, describe
from sweep.warm_start import warm_start_points
from trainables.lora_causal_lm import load_tokenizer

# A Trainer checkpoint holds the adapter weights, AdamW's two moments (3x the adapter) and about
# 20 KB of scheduler, RNG and trainer state (measured on the demo model, BENCHMARKS.md "Disk").
CHECKPOINT_STATE_BYTES = 20_000
ADAPTER_BYTES_PER_PARAMETER = 4  # peft keeps adapter weights in float32 whatever the base dtype
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class SweepPlan:
    name: str
    sweep_dir: str
    storage: Optional[str]  # <storage>/<name>/: checkpoints and a copy of the sweep folder
    search_space: dict[str, str]
    sampler: str
    objectives: list[str]  # "metric (mode)", and the cost minimised beside it
    num_trials: int
    max_concurrent_trials: int
    max_steps: int
    scheduler: str
    asha_rungs: list[int]
    most_training_steps: int
    expected_training_steps: int
    examples: dict[str, int]
    rows_dropped: dict[str, int]
    base_parameters: int
    largest_adapter_parameters: int
    resources_per_trial: dict[str, float]
    disk_bytes: dict[str, int]
    sweep_dir_exists: bool  # `sweep run` would then need --overwrite or --resume
    warm_start_points: list[dict[str, Any]]  # the earlier sweep's configs that run first
    warm_start_sources: list[str]  # the earlier trial of each
    warm_start_skipped: list[str]  # earlier trials not used, and why


def asha_rungs(config: SweepConfig) -> list[int]:
    """The steps at which ASHA compares trials (Ray's rungs: grace * factor^k below max_steps)."""
    if config.scheduler.type != "asha":
        return []
    grace, factor, top = config.scheduler.grace_period, config.scheduler.reduction_factor, config.training.max_steps
    return [int(grace * factor**k) for k in range(asha_rung_count(grace, factor, top))]


def expected_steps(config: SweepConfig, rungs: list[int]) -> int:
    """Training steps if ASHA kept 1 in `reduction_factor` trials at every rung (synchronous halving)."""
    top = config.training.max_steps
    if not rungs:
        return config.search.num_trials * top
    per_trial = rungs[0]
    for k, start in enumerate(rungs):
        end = rungs[k + 1] if k + 1 < len(rungs) else top
        per_trial += (end - start) / config.scheduler.reduction_factor ** (k + 1)
    return int(round(config.search.num_trials * per_trial))


def _space_values(distribution: Optional[od.BaseDistribution], default: Any) -> list[Any]:
    if isinstance(distribution, od.CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, od.IntDistribution):
        return [distribution.low, distribution.high]
    return [default]


def largest_adapter(config: SweepConfig, space: dict[str, od.BaseDistribution], skeleton: torch.nn.Module) -> int:
    """LoRA parameters of the largest adapter the sweep can pick: rank x (in + out) per adapted layer."""
    modules = dict(skeleton.named_modules())
    largest = 0
    for rank in _space_values(space.get("lora.rank"), config.lora.rank):
        for target in _space_values(space.get("lora.target_modules"), config.lora.target_modules):
            lora = apply_params(config, {"lora.rank": rank, "lora.target_modules": target}).lora
            resolved = resolve_target_modules(skeleton, lora.target_modules)
            names = targeted_module_names(skeleton, resolved)
            total = 0
            for name in names:
                weight = modules[name].weight
                total += rank * (weight.shape[0] + weight.shape[1])
            largest = max(largest, total)
    return largest


def concurrent_trials(config: SweepConfig) -> int:
    """Trials at once, as `sweep run` will count them on a local Ray (a cluster's size is unknown before
    connecting: then at most all of them)."""
    if config.ray.address and not config.search.max_concurrent_trials:
        return config.search.num_trials
    return trials_that_fit(config, *local_ray_resources(config))


def make_plan(config: SweepConfig) -> SweepPlan:
    space = build_search_space(config)
    check_resources(config)
    check_placement(config)
    check_output_dir(config)
    storage = open_storage(config)  # the URI opens; writing to it is checked by `sweep run` (a plan writes nothing)
    warm = warm_start_points(config, space)
    skeleton = check_model(config, space)
    tokenized = tokenize_splits(config.data, load_tokenizer(config), config.seed)
    rungs = asha_rungs(config)
    adapter = largest_adapter(config, space, skeleton)
    base_parameters = sum(p.numel() for p in skeleton.parameters())
    checkpoint = adapter * ADAPTER_BYTES_PER_PARAMETER * 3 + CHECKPOINT_STATE_BYTES
    keep = config.checkpoints.keep
    dtype_bytes = DTYPE_BYTES.get(config.model.dtype, 4)
    scheduler = (
        f"ASHA: trials compared at steps {rungs}, 1 in {config.scheduler.reduction_factor:g} goes on"
        if config.scheduler.type == "asha" else "none: every trial runs to max_steps"
    )
    return SweepPlan(
        name=config.name,
        sweep_dir=str(config.sweep_dir),
        storage=f"{storage.uri.split('?')[0].rstrip('/')}/{config.name}/" if storage else None,
        search_space={name: describe(d) for name, d in space.items()},
        sampler=config.search.sampler,
        objectives=[f"{metric} ({mode})" for metric, mode in config.objectives],
        num_trials=config.search.num_trials,
        max_concurrent_trials=concurrent_trials(config),
        max_steps=config.training.max_steps,
        scheduler=scheduler,
        asha_rungs=rungs,
        most_training_steps=config.search.num_trials * config.training.max_steps,
        expected_training_steps=expected_steps(config, rungs),
        examples=tokenized.counts,
        rows_dropped=tokenized.dropped,
        base_parameters=base_parameters,
        largest_adapter_parameters=adapter,
        resources_per_trial={"cpu": config.resources.cpu, "gpu": config.resources.gpu},
        disk_bytes={
            "checkpoint": checkpoint,
            # While it runs, each trial keeps its k best and its latest; a running one can hold one more.
            "during_sweep_at_most": config.search.num_trials * (keep + 1) * checkpoint
            + concurrent_trials(config) * checkpoint,
            "after_sweep": (keep + 1) * checkpoint,
            "export": adapter * ADAPTER_BYTES_PER_PARAMETER + base_parameters * dtype_bytes,
        },
        sweep_dir_exists=config.sweep_dir.exists() and any(config.sweep_dir.iterdir()),
        warm_start_points=warm.points,
        warm_start_sources=warm.sources,
        warm_start_skipped=warm.skipped,
    )


def _bytes(value: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(value)


def plan_lines(plan: SweepPlan) -> list[str]:
    lines = [f"sweep {plan.name} -> {plan.sweep_dir}"]
    if plan.storage:
        lines.append(f"storage: {plan.storage} (trials' checkpoints, and a copy of the sweep folder)")
    lines.append("search space:")
    lines += [f"  {name}: {text}" for name, text in plan.search_space.items()] or ["  (none: every trial runs the fixed config)"]
    lines += [
        f"sampler: {plan.sampler}; trials: {plan.num_trials}, {plan.max_concurrent_trials} at a time; "
        f"each up to {plan.max_steps} steps",
        f"objectives: {' and '.join(plan.objectives)}"
        + (" (Pareto front; ASHA compares trials on the first)" if len(plan.objectives) > 1 else ""),
        f"scheduler: {plan.scheduler}",
        f"training steps: at most {plan.most_training_steps:,} (every trial to the end); "
        f"about {plan.expected_training_steps:,} if ASHA stops trials at the usual rate",
        f"data: {', '.join(f'{k} {v}' for k, v in plan.examples.items())} examples"
        + (f" (dropped: {', '.join(f'{v} {k}' for k, v in plan.rows_dropped.items() if v)})"
           if any(plan.rows_dropped.values()) else ""),
        f"model: {plan.base_parameters:,} parameters; largest adapter the sweep can pick: "
        f"{plan.largest_adapter_parameters:,} LoRA parameters",
        f"each trial asks for {plan.resources_per_trial['cpu']:g} CPU and {plan.resources_per_trial['gpu']:g} GPU",
        f"disk: {_bytes(plan.disk_bytes['checkpoint'])} per checkpoint; at most "
        f"{_bytes(plan.disk_bytes['during_sweep_at_most'])} of checkpoints while it runs, "
        f"{_bytes(plan.disk_bytes['after_sweep'])} after; export {_bytes(plan.disk_bytes['export'])}",
    ]
    if plan.warm_start_points:
        lines.append(f"warm start: {len(plan.warm_start_points)} configs of an earlier sweep run first:")
        lines += [f"  trial {source}: " + ", ".join(f"{k}={v}" for k, v in point.items())
                  for source, point in zip(plan.warm_start_sources, plan.warm_start_points)]
        lines += [f"  skipped {reason}" for reason in plan.warm_start_skipped]
    if plan.sweep_dir_exists:
        lines.append(f"note: {plan.sweep_dir} exists: `sweep run` needs --resume (continue it) or --overwrite")
    return lines


def plan_json(plan: SweepPlan) -> dict[str, Any]:
    return asdict(plan)
