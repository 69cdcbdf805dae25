"""`sweep plan`: what a sweep would do and cost, worked out from its config alone.

It runs every check `sweep run` runs before it writes anything (config, search space,
model, resources, data; a cluster's size is only known once `sweep run` connects), then counts: trials, the training steps ASHA could spend, LoRA parameters and the
disk the sweep will use. It starts no Ray and writes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from lora_sweep.config import SweepConfig, asha_rung_count
from lora_sweep.disk import human_bytes
from lora_sweep.preflight import preflight
from lora_sweep.safety import holds_anything, is_sweep_folder
from lora_sweep.search_space import describe
from lora_sweep.storage import SweepFolder
from lora_sweep.trackers import tracker_targets
from lora_sweep.warm_start import warm_start_points


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
    data_format: str  # `data.format` (`auto` resolved from the columns)
    template: str  # what the data is rendered with (`none`: as written)
    train_on: str  # conversations: which assistant turns carry the loss
    generation_per_evaluation: dict[str, Any]  # what a trial generates at an evaluation for its task metrics
    base_parameters: int
    largest_adapter_parameters: int
    resources_per_trial: dict[str, float]
    disk_bytes: dict[str, int]
    sweep_dir_exists: bool  # `sweep run` would then need --overwrite or --resume
    sweep_dir_is_ours: bool  # False: a folder lora-sweep did not make, which `sweep run` refuses to touch
    warm_start_points: list[dict[str, Any]]  # the earlier sweep's configs that run first
    warm_start_sources: list[str]  # the earlier trial of each
    warm_start_skipped: list[str]  # earlier trials not used, and why
    confirm_runs: int  # promotion.confirm: runs to the end before promotion (top K configurations x N seeds)
    confirm_seeds: list[int]
    trackers: list[str]  # where each configured tracker logs ("mlflow: http://...", "wandb: offline in ...")


def asha_rungs(config: SweepConfig) -> list[int]:
    """The steps at which the scheduler compares trials (ASHA's rungs: grace * factor^k below max_steps)."""
    if config.scheduler.type == "none":
        return []
    grace, factor, top = config.grace_steps, config.scheduler.reduction_factor, config.training.max_steps
    return [int(grace * factor**k) for k in range(asha_rung_count(grace, factor, top))]


def expected_steps(config: SweepConfig, rungs: list[int]) -> int:
    """Training steps if ASHA kept 1 in `reduction_factor` trials at every rung (synchronous halving)."""
    top = config.training.max_steps
    if not rungs:
        return config.search.num_trials * top
    per_trial: float = rungs[0]
    for k, start in enumerate(rungs):
        end = rungs[k + 1] if k + 1 < len(rungs) else top
        per_trial += (end - start) / config.scheduler.reduction_factor ** (k + 1)
    return int(round(config.search.num_trials * per_trial))


def generation_cost(config: SweepConfig, val_examples: int) -> dict[str, Any]:
    """What a trial's evaluation generates for its task metrics: examples, new tokens at most, how often."""
    examples = min(config.generated_val_examples, val_examples)
    evaluations = config.training.max_steps // config.training.eval_steps
    return {"examples": examples, "max_new_tokens": config.evaluation.max_new_tokens,
            "tokens_at_most": examples * config.evaluation.max_new_tokens,
            "every": config.evaluation.generate_every,
            "generations_per_trial": -(-evaluations // config.evaluation.generate_every) if examples else 0,
            "metrics": config.evaluation.metrics if examples else []}


def make_plan(config: SweepConfig) -> SweepPlan:
    checked = preflight(config, probe_storage=False)
    space, tokenized = checked.space, checked.tokenized
    storage = SweepFolder.of(config).storage
    warm = warm_start_points(config, space)
    rungs = asha_rungs(config)
    factor = f"{config.scheduler.reduction_factor:g}"
    scheduler = {
        "asha": f"ASHA: trials compared at steps {rungs}, 1 in {factor} goes on",
        "promotion_asha": f"promotion ASHA: trials pause at steps {rungs}; the best 1 in {factor} of each step resumes",
        "none": "none: every trial runs to max_steps",
    }[config.scheduler.type]
    sweep_dir = config.sweep_dir
    taken = holds_anything(sweep_dir)
    return SweepPlan(
        name=config.name,
        sweep_dir=str(sweep_dir),
        storage=f"{storage.uri.split('?')[0].rstrip('/')}/{config.name}/" if storage else None,
        search_space={name: describe(d) for name, d in space.items()},
        sampler=config.search.sampler,
        objectives=[f"{metric} ({mode})" for metric, mode in config.objectives],
        num_trials=config.search.num_trials,
        max_concurrent_trials=checked.concurrent,
        max_steps=config.training.max_steps,
        scheduler=scheduler,
        asha_rungs=rungs,
        most_training_steps=config.search.num_trials * config.training.max_steps,
        expected_training_steps=expected_steps(config, rungs),
        examples=tokenized.counts,
        rows_dropped=tokenized.dropped,
        data_format=tokenized.format,
        template=tokenized.template,
        train_on=config.data.train_on,
        generation_per_evaluation=generation_cost(config, tokenized.counts["val"]),
        base_parameters=checked.base_parameters,
        largest_adapter_parameters=checked.adapter_parameters,
        resources_per_trial={"cpu": config.resources.cpu, "gpu": config.resources.gpu,
                             "workers": config.resources.workers},
        disk_bytes=checked.disk,
        sweep_dir_exists=taken,
        sweep_dir_is_ours=not taken or is_sweep_folder(sweep_dir),
        warm_start_points=warm.points,
        warm_start_sources=warm.sources,
        warm_start_skipped=warm.skipped,
        confirm_runs=config.promotion.confirm.top * config.promotion.confirm.seeds if config.promotion.confirm else 0,
        confirm_seeds=config.confirm_seeds,
        trackers=tracker_targets(config, sweep_dir),
    )


def trial_resources_line(resources: dict[str, float]) -> str:
    """What a trial holds: its CPU and GPU, or its workers' (each `cpu` and `gpu`) when data-parallel."""
    cpu, gpu, workers = resources["cpu"], resources["gpu"], int(resources["workers"])
    if workers == 1:
        return f"each trial asks for {cpu:g} CPU and {gpu:g} GPU"
    return (f"each trial: {workers} data-parallel workers (Ray Train, DDP) of {cpu:g} CPU and {gpu:g} GPU each, "
            f"{cpu * workers:g} CPU and {gpu * workers:g} GPU in all; the global batch is {workers} x batch_size")


def plan_lines(plan: SweepPlan) -> list[str]:
    lines = [f"sweep {plan.name} -> {plan.sweep_dir}"]
    if plan.storage:
        lines.append(f"storage: {plan.storage} (trials' checkpoints, and a copy of the sweep folder; "
                     f"`sweep resume {plan.storage.rstrip('/')}` continues it from any machine)")
    if plan.trackers:
        lines.append(f"trackers: {'; '.join(plan.trackers)}")
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
           if any(plan.rows_dropped.values()) else "")
        + f"; format {plan.data_format}, template {plan.template}"
        + (f", loss on {plan.train_on.replace('_', ' ')} turns" if plan.data_format in ("messages", "sharegpt") else ""),
        f"model: {plan.base_parameters:,} parameters; largest adapter the sweep can pick: "
        f"{plan.largest_adapter_parameters:,} LoRA parameters",
        trial_resources_line(plan.resources_per_trial),
        f"disk: {human_bytes(plan.disk_bytes['checkpoint'])} per checkpoint; at most "
        f"{human_bytes(plan.disk_bytes['during_sweep_at_most'])} of checkpoints while it runs, "
        f"{human_bytes(plan.disk_bytes['after_sweep'])} after; export {human_bytes(plan.disk_bytes['export'])}",
    ]
    cost = plan.generation_per_evaluation
    if cost["examples"]:
        lines.append(f"generation in trials: {cost['examples']} validation answers of up to {cost['max_new_tokens']} "
                     f"tokens (at most {cost['tokens_at_most']:,} greedy tokens) at every "
                     f"{'' if cost['every'] == 1 else str(cost['every']) + '-th '}evaluation, "
                     f"{cost['generations_per_trial']} times in a full trial, for {', '.join(cost['metrics'])}")
    if plan.confirm_runs:
        lines.append(f"promotion: the top {plan.confirm_runs // len(plan.confirm_seeds)} configurations train again "
                     f"with seeds {plan.confirm_seeds} ({plan.confirm_runs} more runs of {plan.max_steps} steps); "
                     "the best mean is promoted")
    if plan.warm_start_points:
        lines.append(f"warm start: {len(plan.warm_start_points)} configs of an earlier sweep run first:")
        lines += [f"  trial {source}: " + ", ".join(f"{k}={v}" for k, v in point.items())
                  for source, point in zip(plan.warm_start_sources, plan.warm_start_points, strict=True)]
        lines += [f"  skipped {reason}" for reason in plan.warm_start_skipped]
    if plan.sweep_dir_exists and not plan.sweep_dir_is_ours:
        lines.append(f"note: {plan.sweep_dir} exists and was not made by lora-sweep: `sweep run` refuses to write "
                     "there, --overwrite included; pick another name or output_dir")
    elif plan.sweep_dir_exists:
        lines.append(f"note: {plan.sweep_dir} exists: `sweep run` needs --resume (continue it) or --overwrite")
    return lines


def plan_json(plan: SweepPlan) -> dict[str, Any]:
    return asdict(plan)
