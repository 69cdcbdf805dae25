"""The sweep configuration: one YAML file, `key=value` overrides, validated at once.

Every default lives here and only here. Validation collects every problem before
anything runs, and each message names the field, shows the value and states the
rule (torchtune's `config/_validate.py`, optuna's `but got {x=}`).
"""

from __future__ import annotations

import codecs
import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StrictBool,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from lora_sweep.direction import Direction
from lora_sweep.trial_report import EVAL_LOSS, OBJECTIVE_METRICS, TASK_METRICS

TARGET_MODULE_PRESETS = ("attention", "mlp", "all-linear")
# LoRA inits that start the adapter from a decomposition of the adapted weights and take that part out
# of them (W_res = W - B0 A0): they rewrite the base model's weights.
REWRITES_BASE_WEIGHTS = ("pissa", "olora")


def _is_control(ch: str) -> bool:
    return ord(ch) < 0x20 or ord(ch) == 0x7F


def _escape_controls(text: str) -> str:
    return "".join(repr(ch)[1:-1] if _is_control(ch) else ch for ch in str(text))


class ConfigError(ValueError):
    """Every problem found in a config, one line each."""

    def __init__(self, problems: list[str], source: str = "config"):
        # A control character in a quoted path or value must not start a line of its own (a forged `error:`).
        self.problems = [_escape_controls(problem) for problem in problems]
        self.source = _escape_controls(source)
        problems = self.problems
        # One line per problem, each naming where it is: greppable, and readable one at a time.
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))

    def in_config_file(self, path: str | Path) -> "ConfigError":
        """Name the config file in problems found by a later check (model, data, resources, ...) of its fields."""
        if self.source in CHECK_LAYERS or self.source.startswith("search space"):
            return ConfigError(self.problems, f"{path} ({self.source})")
        return self


# Sources of problems that are about fields of the config file rather than another file.
CHECK_LAYERS = ("config", "model", "data", "resources", "output", "ray")


def asha_rung_count(grace_period: int, reduction_factor: float, max_steps: int) -> int:
    """How many rungs Ray's ASHA makes (its own formula, rounding included)."""
    return int(math.log(max_steps / grace_period) / math.log(reduction_factor) + 1)


def _not_a_bool(value: Any) -> Any:
    # YAML's `true` is not 1.0: a bool where a number belongs is a mistake, not a value.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Strict where YAML makes mistakes easy: `batch_size: true` is not 1, `8.5` is not 8, `"yes"` is not True.
# Floats stay lax for strings, because PyYAML reads `1e-4` (no dot) as the string "1e-4".
# No setting is near 2^53: a bound keeps a 40-digit number from reaching Ray, numpy or a message in full.
def _not_huge(value: int) -> int:
    if abs(value) > 2**53:
        raise ValueError(f"Input should be at most 2^53 (no setting is near that), but got {cut(str(value), 30)}")
    return value


Int = Annotated[int, Strict(), AfterValidator(_not_huge)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


def _plain_text(value: str) -> str:
    # A newline or NUL in a path would forge lines of the messages that quote it, or break the OS call.
    if any(_is_control(ch) for ch in value):
        raise ValueError("must not hold control characters (a newline, tab or NUL)")
    if len(value) > 4096:
        raise ValueError(f"is {len(value):,} characters long; a path or URI is at most 4096")
    return value


PathText = Annotated[str, AfterValidator(_plain_text)]  # a path, URI or address: one line of plain text
RAY_RESOURCE_STEP = 0.0001  # Ray counts fractional resources in steps of this (it fails a trial asking finer)


def _ray_resource(value: Optional[float]) -> Optional[float]:
    if value and abs(value / RAY_RESOURCE_STEP - round(value / RAY_RESOURCE_STEP)) > 1e-6:
        raise ValueError(f"Ray counts resources in steps of {RAY_RESOURCE_STEP}, but got {value}")
    return value


RayAmount = Annotated[float, BeforeValidator(_not_a_bool), AfterValidator(_ray_resource)]
SEED_MAX = 2**32 - 1  # numpy's and Optuna's seeds are 32-bit
NAME_MAX_LENGTH = 200
# The recipes lora_sweep.trainables ships (its TRAINABLES has exactly these keys).
TrainableName = Literal["lora_causal_lm"]
# pyarrow's filesystems for shared storage (its `file://` is `output_dir`, and `mock://` a test double).
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
MAX_ASHA_RUNGS = 100  # a reduction factor near 1 makes millions of rungs (and Ray builds each one)


class _Strict(BaseModel):
    # allow_inf_nan=False: `inf`/`nan` are never a setting (an infinite GPU share, a NaN learning rate).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    path: PathText = Field(description="Local folder or hub id of the base causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: StrictBool = False
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "none", description="QLoRA: trials load the base in 4 bits (bitsandbytes, CUDA only), NF4 or FP4 with "
        "double quantization; the final evaluation and export use the full-precision base.")


class ColumnMapping(_Strict):
    system: Optional[str] = "system"
    instruction: str = "instruction"
    input: Optional[str] = "input"
    response: str = "response"

    @model_validator(mode="after")
    def _one_field_per_column(self) -> "ColumnMapping":
        # Two fields reading one column would put the same text in two places (e.g. the prompt in the response).
        field_of: dict[str, str] = {}
        for field in ("instruction", "response", "system", "input"):
            column = getattr(self, field)
            if column is None:
                continue
            if column in field_of:
                fix = (f"set `{field}: null` if the file has no {field} column" if field in ("system", "input")
                       else "map each to a column of its own")
                raise ValueError(f"`{field_of[column]}` and `{field}` both read column {column!r}; {fix}")
            field_of[column] = field
        return self


class SplitFractions(_Strict):
    train: Float = Field(0.8, ge=0.0, le=1.0)
    val: Float = Field(0.1, ge=0.0, le=1.0)
    test: Float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions_make_a_whole(self) -> "SplitFractions":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, but got {total:g}")
        for name in ("train", "val", "test"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"`{name}` must be > 0 so that split is not empty, but got {getattr(self, name)}")
        return self


class SplitFiles(_Strict):
    train: PathText
    val: PathText
    test: PathText


class SplitNames(_Strict):
    """The dataset's own split names used as the sweep's train / val / test."""

    train: str
    val: str
    test: str


class DatasetSource(_Strict):
    """A dataset by name, as `datasets.load_dataset` takes it, or a folder written by `save_to_disk`."""

    path: str = Field(min_length=1, description="A hub id, a local folder (data files, or a loading script with "
                      "datasets < 4, which dropped scripts), "
                      "a builder name (json, csv, parquet) with data_files, or a folder written by save_to_disk.")
    name: Optional[str] = Field(None, description="The dataset's configuration name.")
    split: Optional[str] = Field(None, description="One split, then divided by data.split.")
    revision: Optional[str] = None
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = None
    splits: Optional[SplitNames] = Field(None, description="Which of the dataset's splits are train, val and test "
                                         "(default: train, validation or val or valid, test, when it has all three).")

    @model_validator(mode="after")
    def _split_or_splits(self) -> "DatasetSource":
        if self.split is not None and self.splits is not None:
            raise ValueError("set `split` (one split, divided by data.split) or `splits` (the dataset's three), not both")
        return self


class DataConfig(_Strict):
    files: list[PathText] = Field(default_factory=list, description="JSONL, CSV or Parquet files, split by `split`.")
    split_files: Optional[SplitFiles] = None
    dataset: Optional[DatasetSource] = None
    format: Literal["auto", "instruction", "messages", "sharegpt", "prompt_completion", "text"] = Field(
        "auto", description="How rows are read: `auto` picks it from the columns present (`sweep plan` shows which); "
        "`instruction` (data.columns), `messages` ({role, content} lists), `sharegpt` ({from, value} lists), "
        "`prompt_completion` (prompt + completion columns) or `text` (loss on every token).")
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    template: Optional[Literal["default", "alpaca", "chat"]] = Field(
        None, description="Unset: `default` for the instruction format; for conversations the tokenizer's chat "
        "template, or `default` turn by turn when it has none. prompt_completion and text are used as written.")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Conversations: the loss is on every assistant turn, or on the last one only.")
    default_system: str = ""
    split: SplitFractions = Field(default_factory=SplitFractions)
    max_length: Int = Field(512, ge=8)
    packing: StrictBool = Field(False, description="Pack short training examples into sequences of max_length "
                                "tokens, each example seeing only itself (position ids restart per example).")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if sum((bool(self.files), self.split_files is not None, self.dataset is not None)) != 1:
            raise ValueError("set exactly one of `files` (split by `split`), `split_files` or `dataset`")
        return self


class LoraConfig(_Strict):
    rank: Int = Field(8, ge=1, le=65536)
    alpha_multiple: Float = Field(2.0, gt=0.0, description="lora_alpha = alpha_multiple * rank")
    dropout: Float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["attention", "mlp", "all-linear"], list[str]] = "attention"
    use_rslora: StrictBool = Field(False, description="rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank.")
    use_dora: StrictBool = Field(False, description="DoRA: learn a magnitude per output besides the low-rank direction.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="peft's LoRA init: Kaiming-uniform A (default), Gaussian A, or PiSSA / OLoRA, which "
        "start A and B from the adapted weights' SVD / QR and take that part out of the base weights.")
    loraplus_lr_ratio: Optional[Float] = Field(
        None, gt=0.0, description="LoRA+: the learning rate of the B matrices is this many times A's (off when unset).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must be a preset (attention, mlp, all-linear) or a non-empty list of module names")
        return value


class TrainingConfig(_Strict):
    learning_rate: Float = Field(2e-4, gt=0.0)
    batch_size: Int = Field(8, ge=1)
    gradient_accumulation_steps: Int = Field(1, ge=1)
    warmup_ratio: Float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: Float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: Float = Field(1.0, gt=0.0)
    max_steps: Int = Field(200, ge=1, le=100_000_000, description="Optimizer steps of a trial that is never stopped early.")
    eval_steps: Int = Field(20, ge=1, description="Evaluate and report every this many steps.")
    eval_batch_size: Int = Field(16, ge=1)
    gradient_checkpointing: StrictBool = False


class WarmStartConfig(_Strict):
    sweep: PathText = Field(description="Folder of an earlier sweep (e.g. results/demo) whose best configs run first.")
    top: Int = Field(3, ge=1, description="How many of its best trials to re-run as this sweep's first trials.")


def metric_problem(metric: str, specs: list[str]) -> str:
    """Why `search.metric` names nothing a trial reports, or "" when it does. A custom metric's names are known
    only once it is imported: with one configured, any name passes here and `sweep run` checks it before any trial."""
    if metric in OBJECTIVE_METRICS or metric in specs or any(":" in spec for spec in specs):
        return ""
    if metric in TASK_METRICS:  # a built-in the trials would report, were it configured
        return (f"{metric!r} is a task metric, reported only when evaluation.metrics lists it (it lists "
                f"{', '.join(specs) or 'none'}); add {metric} there")
    return (f"must be one the trainable reports ({', '.join(OBJECTIVE_METRICS)}, or a task metric listed in "
            f"evaluation.metrics: {', '.join(TASK_METRICS)}), but got {metric!r}")


class SearchConfig(_Strict):
    space: Optional[PathText] = Field("lora_default", description="Name in search_spaces/ or a path to a YAML space.")
    parameters: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Inline entries; override `space`.")
    num_trials: Int = Field(8, ge=1, le=1_000_000)
    max_concurrent_trials: Optional[Int] = Field(None, ge=1)
    metric: str = EVAL_LOSS
    mode: Literal["min", "max"] = "min"
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: Int = Field(
        20, ge=1, description="Random trials before TPE models the results (Optuna's default is 10; 20 was as good "
        "on the replay's targets and better on anytime regret: see BENCHMARKS.md, Search)."
    )
    multivariate: StrictBool = Field(
        False, description="TPE models the parameters jointly (Optuna's multivariate, grouped TPE) instead of one by one.")
    constant_liar: StrictBool = Field(
        False, description="TPE counts running trials as bad results, so that trials running side by side spread out.")
    stopped_trials: Literal["complete", "pruned"] = Field(
        "complete", description="How a trial the scheduler stopped early enters the study: `complete` with its last "
        "value, or `pruned` (TPE then ranks it below every finished trial, by the step it reached and its value there).")
    also_minimize: Optional[Literal["adapter_params", "eval_ms_per_example"]] = Field(
        None, description="A cost minimised beside `metric`: the sampler searches for the Pareto front of both.")
    pareto_tolerance: Float = Field(
        0.01, ge=0.0, description="Promotion with `also_minimize`: the cheapest Pareto trial whose metric is within "
        "this fraction of the best metric.")
    warm_start: Optional[WarmStartConfig] = Field(
        None, description="Seed the sweep with an earlier sweep's best configs (they run first, then the sampler).")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str, info: ValidationInfo) -> str:
        # Checked here, beside every other field's error, when load_config passes the file's evaluation.metrics
        # in the context; SweepConfig's own check covers a config validated without it.
        specs = (info.context or {}).get("evaluation_metrics")
        if isinstance(specs, list):
            problem = metric_problem(value, [s for s in specs if isinstance(s, str)])
            if problem:
                raise ValueError(problem)
        return value



class SchedulerConfig(_Strict):
    type: Literal["asha", "promotion_asha", "none"] = Field(
        "promotion_asha", description="`asha`: Ray Tune's asynchronous ASHA (a trial is stopped when it reaches a rung below the "
        "cutoff of the trials that reached it before); `promotion_asha`: a trial pauses at each rung until it is in "
        "the rung's top 1/reduction_factor (the default: 2.04x and 1.93x less compute than random search to a top-2% "
        "result on the replay benchmark's two tables, against 1.26x and 1.00x for asha with the old settings; "
        "BENCHMARKS.md); `none`: every trial runs to max_steps.")
    grace_period: Optional[Int] = Field(
        None, ge=1, description="Steps every trial runs before the scheduler may stop or pause it; none: one "
        "evaluation (`training.eval_steps`), the first point where trials can be compared.")
    reduction_factor: Float = Field(3.0, gt=1.0)
    brackets: Int = Field(1, ge=1, le=8, description="ASHA brackets: more than 1 is asynchronous Hyperband, each "
                          "trial drawn into a bracket whose first rung is `reduction_factor` times later than the last's.")


class ResourcesConfig(_Strict):
    cpu: RayAmount = Field(1.0, gt=0.0, description="CPUs of a trial (of each worker, with `workers` > 1).")
    gpu: RayAmount = Field(0.0, ge=0.0, description="GPUs of a trial (of each worker, with `workers` > 1); more than "
                           "1 spreads one model's layers over them (device_map, for a model too big for one GPU).")
    workers: Int = Field(1, ge=1, description="Data-parallel workers per trial: more than 1 makes each trial a Ray "
                         "Train TorchTrainer (DDP), each worker with `cpu` and `gpu`; batch_size is per worker, so "
                         "the global batch is workers x batch_size x gradient_accumulation_steps.")

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"must be a fraction of one GPU or a whole number of GPUs, but got {value}")
        return value


class CheckpointConfig(_Strict):
    keep: Int = Field(2, ge=1, description="Adapter checkpoints kept per trial, best by the sweep metric.")


class EvaluationConfig(_Strict):
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match"], description="Task metrics of generated answers: exact_match, "
        "token_f1, rouge_l, bleu, chrf, or your own module:function / file.py:function.")
    max_new_tokens: Int = Field(32, ge=1)
    max_examples: Optional[Int] = Field(None, ge=1, description="Cap on test examples for generation metrics.")
    val_examples: Optional[Int] = Field(
        None, ge=0, description="Validation examples each trial answers (greedy) at an evaluation, for the task "
        "metrics in its reports; unset: 32 when search.metric is a task metric, else 0 (no generation in trials).")
    generate_every: Int = Field(1, ge=1, description="Generate at every this-many-th evaluation; the reports between "
                                "repeat the last generated values.")
    verify_tolerance: Optional[Float] = Field(
        None, gt=0.0, description="Max |logit difference| merged vs adapter; None: 1e-4 for float32, 5e-2 for 16-bit."
    )

    @field_validator("metrics")
    @classmethod
    def _known_or_custom(cls, value: list[str]) -> list[str]:
        built_in = TASK_METRICS
        unknown = [m for m in value if m not in built_in and ":" not in m]
        if unknown:
            raise ValueError(f"{unknown} are not built-in metrics ({', '.join(built_in)}) nor module:function "
                             "(or path/to/file.py:function) of your own")
        if len(set(value)) < len(value):
            raise ValueError(f"each metric once, but got {value}")
        return value


class RayConfig(_Strict):
    address: Optional[PathText] = Field(None, description="None starts Ray locally; 'auto' or HOST:PORT joins a cluster.")
    num_cpus: Optional[Int] = Field(None, ge=1)
    num_gpus: Optional[RayAmount] = Field(None, ge=0)

    @field_validator("address")
    @classmethod
    def _an_address(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value == "auto":
            return value
        rest = value.removeprefix("ray://")
        try:
            parts = urlsplit(f"//{rest}")
            port, host = parts.port, parts.hostname
        except ValueError:
            port, host = None, None
        too_long = host is not None and (len(host) > 253 or any(len(label) > 63 for label in host.split(".")))
        if not host or too_long or port is None or port == 0 or parts.path or parts.query or "@" in rest:
            raise ValueError("must be `auto`, HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379) or "
                             "ray://HOST:PORT for Ray Client; leave it unset for a local Ray")
        return value


class MlflowConfig(_Strict):
    """Where `trackers: [mlflow]` logs (see lora_sweep.trackers)."""

    tracking_uri: Optional[PathText] = Field(
        None, description="An MLflow server (http://host:5000) or store (sqlite:///path.db); unset: "
        "MLFLOW_TRACKING_URI, else a SQLite store in the sweep folder (mlflow.db).")
    experiment: Optional[str] = Field(None, min_length=1, max_length=500,
                                      description="The MLflow experiment; unset: the sweep's name.")
    register_model: bool = Field(True, description="Register the promoted merged model in the Model Registry.")
    model_name: Optional[str] = Field(None, min_length=1, max_length=250,
                                            description="Its name in the registry; unset: the sweep's name.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: Optional[str]) -> Optional[str]:
        found = uri_credentials(value) if value else []
        if found and found != [UNPARSEABLE_URI]:
            # The config is saved in the sweep folder (and its storage), and the URI shows in messages.
            raise ValueError(f"must not carry credentials ({', '.join(found)}): they would be saved in config.yaml; "
                             "give them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                             "MLFLOW_TRACKING_TOKEN in the environment")
        return value


class WandbConfig(_Strict):
    """Where `trackers: [wandb]` logs: one run per trial, grouped by the sweep's name."""

    project: Optional[str] = Field(None, pattern=r"^[^/\\#?%:]{1,128}$",
                                   description="The W&B project; unset: the sweep's name.")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline writes runs under `dir` for `wandb sync` later; online needs WANDB_API_KEY.")
    dir: Optional[PathText] = Field(None, description="Where W&B writes its files; unset: the sweep folder.")


class BudgetConfig(_Strict):
    """Limits on the tuning phase; when one is spent, no trial starts, running ones stop, and the sweep
    promotes and exports from what ran."""

    wall_hours: Optional[Float] = Field(None, gt=0.0, description="Hours of tuning, from the sweep's first start.")
    device_hours: Optional[Float] = Field(
        None, gt=0.0, description="Trial hours times the devices each holds (its GPUs, or its CPUs when it has none).")


class ConfirmConfig(_Strict):
    """Re-train the sweep's best configurations with more seeds before promotion, and promote by the mean."""

    top: Int = Field(3, ge=1, description="The best trials (by the sweep metric) whose configurations are re-trained.")
    seeds: Int = Field(1, ge=1, le=100, description="More seeds each configuration is trained with (seed+1, seed+2, ...).")


class PromotionConfig(_Strict):
    confirm: Optional[ConfirmConfig] = Field(
        None, description="None: promote the single best trial. {top: K, seeds: N}: train the top K configurations "
        "with N more seeds each and promote the configuration with the best mean (see BENCHMARKS.md, Search).")


class SweepConfig(_Strict):
    # One path segment: <output_dir>/<name> is the only folder the sweep writes to (no '/', no '..').
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=NAME_MAX_LENGTH)
    output_dir: PathText = "results"
    storage: Optional[PathText] = Field(
        None, description="URI (s3://, gs://, any pyarrow filesystem) where trials store checkpoints and the sweep "
        "folder is mirrored, as <storage>/<name>/; the driver works in <output_dir>/<name>/.")
    seed: Int = Field(0, ge=0, le=SEED_MAX)
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    failure_retries: Int = Field(0, ge=0, description="Times a failed trial is retried from its last checkpoint.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    trainable: TrainableName = Field(
        "lora_causal_lm", description="What a trial runs: a recipe of lora_sweep.trainables, by name.")
    trackers: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list, description="Trackers the driver logs every trial to, beside TensorBoard.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) of what the sampler optimises: the metric, then the cost when one is minimised too."""
        cost = [(self.search.also_minimize, "min")] if self.search.also_minimize else []
        return [(self.search.metric, self.search.mode), *cost]

    @property
    def direction(self) -> Direction:
        """`search.mode` as the type every comparison goes through."""
        return Direction(self.search.mode)

    @property
    def grace_steps(self) -> int:
        """Steps before the scheduler may stop or pause a trial: `scheduler.grace_period`, else one evaluation."""
        return self.scheduler.grace_period or self.training.eval_steps

    @property
    def devices_per_trial(self) -> float:
        """What a trial holds, for device-hours: its GPUs, or its CPUs when it asks for no GPU (every worker's)."""
        per_worker = self.resources.gpu if self.resources.gpu > 0 else self.resources.cpu
        return per_worker * self.resources.workers

    @field_validator("output_dir")
    @classmethod
    def _resolvable(cls, value: str) -> str:
        try:
            Path(value).resolve()
        except (RuntimeError, OSError) as error:  # a symlink loop, a name too long
            raise ValueError(f"cannot be resolved to a folder ({cut(str(error), 80)})") from None
        return value

    @field_validator("storage")
    @classmethod
    def _a_uri(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "://" not in value:
            raise ValueError("must be a URI such as s3://bucket/prefix or gs://bucket/prefix "
                             "(a local or shared folder is `output_dir`)")
        scheme = value.partition("://")[0].lower() if value else ""
        if value is not None and scheme not in STORAGE_SCHEMES:
            raise ValueError(f"must be a URI of one of the schemes {', '.join(STORAGE_SCHEMES)}, but its scheme is "
                             f"{shown(scheme)} (a local or shared folder is `output_dir`)")
        found = uri_credentials(value) if value else []
        if found == [UNPARSEABLE_URI]:
            raise ValueError("cannot be parsed as a URI (check the host, port and brackets)")
        if value is not None and "#" in value:
            raise ValueError("must not hold a fragment (#...): it is no part of a storage location")
        if value is not None and not found and scheme in _NEEDS_A_BUCKET and not urlsplit(value).netloc:
            raise ValueError(f"must name a bucket or container after {scheme}://, like {scheme}://bucket/prefix")
        if found:
            # The config is saved in the sweep folder (and its storage), and the URI shows in messages.
            raise ValueError(f"must not carry credentials ({', '.join(found)}): they would be saved in config.yaml "
                             "and shown in messages; give them through the environment (AWS_ACCESS_KEY_ID, ...), "
                             "a credentials file or an instance role")
        return value

    @model_validator(mode="after")
    def _steps_agree(self) -> "SweepConfig":
        problems = []
        t = self.training
        if t.eval_steps > t.max_steps:
            problems.append(f"training.eval_steps must be <= training.max_steps ({t.max_steps}), but got {t.eval_steps}")
        grace = self.grace_steps
        if self.scheduler.brackets > 1 and self.scheduler.type != "asha":
            problems.append(f"scheduler.brackets {self.scheduler.brackets} is for type asha (asynchronous Hyperband), "
                            f"but the type is {self.scheduler.type}; set type: asha, or leave brackets at 1")
        if self.scheduler.type != "none" and grace > t.max_steps:
            problems.append(
                f"scheduler.grace_period must be <= training.max_steps ({t.max_steps}), "
                f"but got {grace}" + ("" if self.scheduler.grace_period else " (training.eval_steps, its default)")
            )
        if self.scheduler.type != "none" and grace <= t.max_steps:
            rungs = asha_rung_count(grace, self.scheduler.reduction_factor, t.max_steps)
            if rungs > MAX_ASHA_RUNGS:
                problems.append(
                    f"scheduler.reduction_factor {self.scheduler.reduction_factor} with grace_period "
                    f"{grace} and max_steps {t.max_steps} makes {rungs:,} ASHA rungs, but at most "
                    f"{MAX_ASHA_RUNGS} are allowed: raise the factor (2 to 4 is usual)")
        if self.resources.workers > 1 and 0 < self.resources.gpu < 1:
            problems.append(f"`resources.workers`: {self.resources.workers} with resources.gpu {self.resources.gpu:g}, "
                            "but data-parallel workers cannot share a GPU (NCCL refuses two ranks on one device): "
                            "set gpu: 1, or keep workers: 1 to fit several trials on one GPU")
        if self.resources.workers > 1 and self.resources.gpu > 1:
            problems.append(f"`resources.workers`: {self.resources.workers} with resources.gpu {self.resources.gpu:g}, "
                            "but a data-parallel worker trains on one GPU: set gpu: 1 and raise "
                            "workers, or keep workers: 1 to spread one model over several GPUs")
        if self.model.quantization != "none":
            if self.resources.gpu == 0:
                problems.append(f"model.quantization {self.model.quantization} (bitsandbytes 4-bit) trains on CUDA "
                                "GPUs only, but resources.gpu is 0: give each trial a GPU or set it to none")
            if self.lora.init in REWRITES_BASE_WEIGHTS:
                problems.append(f"lora.init {self.lora.init} rewrites the base weights, which a 4-bit base "
                                f"(model.quantization {self.model.quantization}) cannot hold exactly: use default or gaussian")
        metric = self.search.metric
        if metric_problem(metric, self.evaluation.metrics):
            problems.append(f"`search.metric`: {metric_problem(metric, self.evaluation.metrics)}")
        elif metric in TASK_METRICS and self.search.mode == "min":
            problems.append(f"`search.mode`: {metric} is higher for better answers, so the sweep would look for the "
                            "worst ones: set search.mode: max")
        if metric not in OBJECTIVE_METRICS and self.evaluation.val_examples == 0:
            problems.append(f"`evaluation.val_examples`: 0 generates nothing in trials, but search.metric {metric} "
                            "is a task metric of generated answers: leave it unset (32) or set a number above 0")
        if len(set(self.trackers)) < len(self.trackers):
            problems.append(f"`trackers`: {self.trackers} names a tracker twice")
        for tracker, defaults in (("mlflow", MlflowConfig()), ("wandb", WandbConfig())):
            # (a config saved with every field written, as the sweep folder's is, holds the defaults)
            if getattr(self, tracker) != defaults and tracker not in self.trackers:
                problems.append(f"`{tracker}`: settings for a tracker that `trackers` does not list "
                                f"({self.trackers}); add {tracker} there")
        warm = self.search.warm_start
        if warm is not None and warm.top > self.search.num_trials:
            problems.append(
                f"search.warm_start.top must be <= search.num_trials ({self.search.num_trials}), but got {warm.top}")
        confirm = self.promotion.confirm
        if confirm is not None and confirm.top > self.search.num_trials:
            problems.append(
                f"promotion.confirm.top must be <= search.num_trials ({self.search.num_trials}), but got {confirm.top}")
        if confirm is not None and self.search.also_minimize:
            problems.append(f"promotion.confirm averages `{self.search.metric}` over seeds, but with "
                            f"search.also_minimize ({self.search.also_minimize}) promotion picks from a Pareto front: "
                            "leave one of them unset")
        if confirm is not None and self.seed + confirm.seeds > SEED_MAX:
            problems.append(f"promotion.confirm.seeds {confirm.seeds} trains with seeds {self.seed + 1} to "
                            f"{self.seed + confirm.seeds}, but seeds must be <= {SEED_MAX}: lower `seed`")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def generated_val_examples(self) -> int:
        """Validation examples a trial answers at an evaluation (`evaluation.val_examples`; unset: 32 when the
        sweep's metric is a task metric, which only generation gives, else none)."""
        if self.evaluation.val_examples is not None:
            return self.evaluation.val_examples
        return 0 if self.search.metric in OBJECTIVE_METRICS else 32

    @property
    def confirm_seeds(self) -> list[int]:
        """The seeds `promotion.confirm` trains the top configurations with, beside the sweep's own `seed`."""
        confirm = self.promotion.confirm
        return [self.seed + i for i in range(1, confirm.seeds + 1)] if confirm else []

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name


# Query keys of a storage URI that hold secrets (pyarrow's access_key/secret_key/session_token, GCS's
# access_token, Azure's account_key/sas_token, presigned URLs' X-Amz-Signature/Credential/Security-Token).
_SECRET_KEY_PARTS = {"key", "secret", "token", "password", "passwd", "credential", "signature", "sig"}
_SECRET_KEY_WORDS = ("secret", "password", "credential", "signature", "token", "accesskey")


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return bool(_SECRET_KEY_PARTS & set(re.split(r"[_\-.]", lowered))) or any(w in lowered for w in _SECRET_KEY_WORDS)


UNPARSEABLE_URI = "a URI that cannot be parsed"
# Schemes whose user info names a place, not a secret: Azure's container@account, HDFS's user@namenode.
_USER_INFO_IS_A_NAME = ("abfs", "abfss", "hdfs", "viewfs")


_NEEDS_A_BUCKET = ("s3", "gs", "gcs", "abfs", "abfss")
# A secret written anywhere in a URI: `key=value` of a secret-looking key (in the query, in `;` parameters or
# URL-encoded) and user info with a password (also inside a query value, such as an endpoint's URL).
_SECRET_ASSIGNMENT = re.compile(r"(?i)((?:secret|password|passwd|credential|signature|token|access_?key|account_?key"
                                r"|sig)[a-z0-9_\-]*\s*(?:=|%3d))([^&;#/]*)")
_PASSWORD_IN_URL = re.compile(r"//[^/@?#]*:[^/@?#]*@")


def uri_credentials(uri: str) -> list[str]:
    """What in a URI looks like a credential: a password (or, for S3 and GCS, any user info) before '@',
    and query keys naming a secret. A URI that cannot be parsed is reported as such: it cannot be checked."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a malformed host or port
    except ValueError:
        return [UNPARSEABLE_URI]
    user_info = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
    found = []
    if user_info is not None and (":" in user_info or parts.scheme.lower() not in _USER_INFO_IS_A_NAME):
        found.append("user info before '@'")
    # Only the key's name is kept for the message: an encoded `=` (secret_key%3Dvalue) makes the value part of it.
    found += [re.split(r"[^A-Za-z0-9_\-]", key)[0][:40] for key, _ in parse_qsl(parts.query, keep_blank_values=True)
              if _is_secret_key(key)]
    if not found and (_SECRET_ASSIGNMENT.search(uri) or _PASSWORD_IN_URL.search(uri.partition("://")[2])):
        found.append("a secret-looking key=value or a password in a URL inside it")
    return found


def redact_uri(uri: str) -> str:
    """The URI with user info and secret query values replaced by ***: safe to print or save, also when it is
    malformed or lacks its scheme (everything before the last '@' of its first part goes)."""
    scheme, separator, rest = uri.partition("://")
    if not separator:
        scheme, rest = "", uri
    location, slash, path = rest.partition("/")
    if "@" in location:
        location = "***@" + location.rpartition("@")[2]
    path, question, query = path.partition("?") if slash else ("", *location.partition("?")[1:])
    if not slash and question:
        location = location.partition("?")[0]
    pairs = [pair.partition("=") for pair in query.split("&")] if question else []
    query = "&".join(f"{k}=***" if _is_secret_key(k) else f"{k}{eq}{v}" for k, eq, v in pairs)
    shown_uri = f"{scheme}{separator}{location}{slash}{path}{question}{query}"
    shown_uri = _PASSWORD_IN_URL.sub("//***@", shown_uri)
    return _SECRET_ASSIGNMENT.sub(r"\1***", shown_uri)


VALUE_SHOWN_CHARS = 80


def cut(text: str, limit: int = VALUE_SHOWN_CHARS) -> str:
    """Text for a message, cut to `limit` characters (an alias bomb or a pasted file stays readable)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shown_path(path: str, limit: int = VALUE_SHOWN_CHARS) -> str:
    """A path for a message, quoted; a long one keeps its end, which names the file or model."""
    return repr(path if len(path) <= limit else f"...{path[-(limit - 3):]}")


def shown(value: Any, limit: int = VALUE_SHOWN_CHARS) -> str:
    """A value for a message: its repr, cut to `limit` characters."""
    return cut(repr(value), limit)


def format_errors(error: ValidationError) -> list[str]:
    problems = []
    merged: dict[str, list[str]] = {}
    for item in error.errors():
        # Union members' tags (`literal['attention', ...]`, `list[str]`) name no field: drop them.
        location = cut(".".join(str(part) for part in item["loc"] if "[" not in str(part)))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parent = _parent_model(item["loc"][:-1])
            key = str(item["loc"][-1])
            hint = ""
            if parent is not None:
                close = difflib.get_close_matches(key, list(parent.model_fields), n=1)
                if close:
                    hint = f" (did you mean `{close[0]}`?)"
            # (the key cut short: the line has the valid keys to list)
            problems.append(f"`{cut(location, 40)}`: unknown key{hint}; valid keys here: "
                            f"{', '.join(parent.model_fields) if parent else '?'}")
            continue
        if item["type"] == "missing":
            problems.append(f"`{location}`: required field is missing")
            continue
        value = item.get("input")
        if location in ("storage", "ray.address", "mlflow.tracking_uri") and isinstance(value, str):
            value = redact_uri(value)  # never print a credential, even in the error that refuses it
        got = f" (got {shown(value)})" if "input" in item and not isinstance(item["input"], dict) else ""
        merged.setdefault(location, []).append(f"{message}{got}")
    for location, messages in merged.items():  # one line per field: a union's alternatives joined by "or"
        text = "; or ".join(dict.fromkeys(messages))
        problems.append(f"`{location}`: {text}" if location else text)
    return problems


def _parent_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = SweepConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


class _SweepYamlLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types
    """PyYAML's safe loader (no Python tags), refusing a key given twice in one mapping: YAML's
    last-one-wins would silently drop the first value, usually a typo or a bad merge."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} appears twice in one mapping ({where}); keep one", key_node.start_mark)
            lines[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Merge keys (`<<: [*a, *a, ...]`) copy entries into each mapping that uses them: nested ten deep, a file of
        # 400 bytes would grow to billions of entries before the size check below could see it.
        super().flatten_mapping(node)
        if len(node.value) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"a mapping expands to more than {MAX_YAML_VALUES:,} keys through merge keys (<<)",
                node.start_mark)


_SweepYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _SweepYamlLoader.construct_mapping)


def _yaml_1_2_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if len(text) > 30:  # no setting has 30 digits; Python refuses past 4300 with advice about its own internals
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text):,} digits", node.start_mark)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _yaml_1_2_scalars(loader: type[yaml.SafeLoader]) -> None:
    """Booleans, integers and floats as YAML 1.2 reads them: only true/false are booleans (YAML 1.1 also turns
    yes, no, on, off, y and n into booleans, so `trust_remote_code: on` would pass for true), 010 is ten, and
    1e-4 is a float (YAML 1.1 wants 1.0e-4 and reads 1e-4 as a string)."""
    replaced = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in entries if tag not in replaced]
                                      for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    # Integers as YAML 1.2 writes them: 010 is ten (YAML 1.1: eight) and 1:30 is text (YAML 1.1: ninety).
    loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
    loader.add_constructor("tag:yaml.org,2002:int", _yaml_1_2_int)
    loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))


_yaml_1_2_scalars(_SweepYamlLoader)

# Values a config may hold once YAML aliases are expanded: a 1 KB "billion laughs" file expands to millions,
# which validation, messages and config.yaml would each write out in full.
MAX_YAML_VALUES = 100_000
MAX_YAML_BYTES = 1_000_000


def _expanded_size_exceeds(value: Any, limit: int) -> bool:
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def byte_order_mark_codec(data: bytes) -> Optional[str]:
    """The codec a byte-order mark at the start names, or None. UTF-32's come first: its little-endian mark
    begins with UTF-16's."""
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            return codec
    return None


def decode_text(data: bytes) -> str:
    """Text of a file: UTF-8, or UTF-8/16/32 with a byte-order mark. ValueError says what else it is."""
    codec = byte_order_mark_codec(data)
    try:
        return data.decode(codec or "utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not {(codec or 'utf-8').upper()} text (byte 0x{data[error.start]:02x} at offset "
                         f"{error.start}); save it as UTF-8") from None


def parse_yaml_text(text: str) -> Any:
    """YAML by the sweep's rules: safe tags only, no duplicate keys, bounded alias expansion. ValueError on any problem."""
    if "\x00" in text:
        raise ValueError("holds NUL characters: UTF-16 without a byte-order mark? save it as UTF-8")
    try:
        value = yaml.load(text, Loader=_SweepYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ValueError("YAML nested too deeply (thousands of levels); a sweep config is a few levels deep") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        kind = "YAML error" if isinstance(error, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ValueError(f"{kind}{where}: {cut(' '.join(str(problem).split()), 160)}") from None
    if _expanded_size_exceeds(value, MAX_YAML_VALUES):
        raise ValueError(f"expands to more than {MAX_YAML_VALUES:,} values (YAML aliases repeated into each other?); "
                         "a sweep config is a few dozen")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 0.0003)."""
    if "=" not in text:
        raise ConfigError([f"override {shown(text)}: must look like dotted.key=value"], "command line")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    if not all(part.strip() for part in path):
        raise ConfigError([f"override {shown(text)}: the key before '=' must be dotted names, like training.batch_size"],
                          "command line")
    if not value.strip():
        return path, None
    try:
        return path, parse_yaml_text(value)
    except ValueError as error:
        raise ConfigError([f"override {shown(text)}: the value is not valid here: {error}"], "command line") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path, what: str = "config") -> Any:
    if path.is_dir():
        raise ConfigError([f"{what} path is a folder, not a file"], str(path))
    if not path.is_file():
        what_it_is = "not a regular file" if path.exists() else "not found"
        raise ConfigError([f"{what} file {what_it_is}: {path}"], str(path))
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ValueError(f"is {size:,} bytes; a {what} file is a few KB (at most {MAX_YAML_BYTES:,} bytes)")
        return parse_yaml_text(decode_text(path.read_bytes()))
    except ValueError as error:
        raise ConfigError([str(error)], str(path)) from None
    except OSError as error:
        raise ConfigError([f"cannot read {what} file: {error.strerror}"], str(path)) from None


def validate_config(raw: Any, source: str = "config") -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of keys, but got {type(raw).__name__}"], source)
    try:
        evaluation = raw.get("evaluation") if isinstance(raw, dict) else None
        specs = evaluation.get("metrics", ["exact_match"]) if isinstance(evaluation, dict) else ["exact_match"]
        return SweepConfig.model_validate(raw, context={"evaluation_metrics": specs})
    except ValidationError as error:
        raise ConfigError(format_errors(error), source) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML, apply `key=value` overrides, validate; paths in it are relative to the file."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
        _resolve_relative_paths(raw, path.parent)
    return validate_config(raw, str(path))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # too long, a NUL byte: not a file; the field's own check names the problem
        return False


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Data files and local model folders are written relative to the config file."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("files"), list):
            data["files"] = [resolve(f) for f in data["files"]]
        if isinstance(data.get("split_files"), dict):
            data["split_files"] = {k: resolve(v) for k, v in data["split_files"].items()}
        dataset = data.get("dataset")
        if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
            # As model.path: a hub id like "org/name" stays as it is unless a folder or file of that name exists.
            given = dataset["path"]
            candidate = Path(given).expanduser() if given.startswith("~") else base / given
            if _exists(candidate) or given.startswith((".", "/", "~")):
                dataset["path"] = str(candidate.resolve())
            files = dataset.get("data_files")
            def local(file: Any) -> Any:  # a data file next to the config; anything else (a URL, a glob) as given
                return resolve(file) if isinstance(file, str) and _exists(base / file) else file

            if isinstance(files, str):
                dataset["data_files"] = local(files)
            elif isinstance(files, list):
                dataset["data_files"] = [local(f) for f in files]
            elif isinstance(files, dict):
                dataset["data_files"] = {k: [local(f) for f in v] if isinstance(v, list) else local(v)
                                         for k, v in files.items()}
    evaluation = raw.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("metrics"), list):
        # A custom metric in a file (path/to/file.py:function) is relative to the config file, as the data is.
        evaluation["metrics"] = [
            f"{resolve(m.rpartition(':')[0])}:{m.rpartition(':')[2]}"
            if isinstance(m, str) and m.rpartition(":")[0].endswith(".py") else m
            for m in evaluation["metrics"]]
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        candidate = base / model["path"]
        # A hub id like "org/model" stays as it is unless a folder of that name exists.
        if _exists(candidate) or model["path"].startswith((".", "/")):
            model["path"] = str(candidate.resolve())
    search = raw.get("search")
    if isinstance(search, dict) and isinstance(search.get("space"), str):
        space = search["space"]
        # A path (it has a folder or a YAML suffix) is relative to the config file; a bare name is a shipped space.
        if "/" in space or space.endswith((".yaml", ".yml")) or _is_file(base / space):
            search["space"] = str((base / space).resolve())
    warm = search.get("warm_start") if isinstance(search, dict) else None
    if isinstance(warm, dict) and isinstance(warm.get("sweep"), str):
        # A sweep folder, named like `output_dir`: relative to the working directory. Stored absolute, so a
        # resumed sweep (its config.yaml read from anywhere) finds it again.
        warm["sweep"] = str(Path(warm["sweep"]).expanduser().resolve())


def config_to_yaml(config: SweepConfig) -> str:
    text: str = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return text
