"""The sweep configuration: one YAML file, `key=value` overrides, validated at once.

Every default lives here and only here. Validation collects every problem before
anything runs, and each message names the field, shows the value and states the
rule (torchtune's `config/_validate.py`, optuna's `but got {x=}`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Metrics the trainable reports at every evaluation; the sweep can optimise any of them.
REPORTED_METRICS = ("eval_loss", "eval_perplexity", "train_loss")
# Costs the trainable also reports, which a sweep can minimise beside its metric (multi-objective search).
COST_METRICS = ("adapter_params", "eval_ms_per_example")
TARGET_MODULE_PRESETS = ("attention", "mlp", "all-linear")
# LoRA inits that start the adapter from a decomposition of the adapted weights and take that part out
# of them (W_res = W - B0 A0): they rewrite the base model's weights.
REWRITES_BASE_WEIGHTS = ("pissa", "olora")
CONFIG_FILE = "config.yaml"  # a sweep folder's copy of the resolved config it runs


class ConfigError(ValueError):
    """Every problem found in a config, one line each."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        self.source = source
        # One line per problem, each naming where it is: greppable, and readable one at a time.
        super().__init__("\n".join(f"{source}: {problem}" for problem in problems))

    def in_config_file(self, path: str | Path) -> "ConfigError":
        """Name the config file in problems found by a later check (model, data, resources, ...) of its fields."""
        if self.source in CHECK_LAYERS or self.source.startswith("search space"):
            return ConfigError(self.problems, f"{path} ({self.source})")
        return self


# Sources of problems that are about fields of the config file rather than another file.
CHECK_LAYERS = ("config", "model", "data", "resources", "output")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: str = Field(description="Local folder or hub id of the base causal LM.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "none", description="QLoRA: trials load the base in 4 bits (bitsandbytes, CUDA only), NF4 or FP4 with "
        "double quantization; the final evaluation and export use the full-precision base.")


class ColumnMapping(_Strict):
    system: Optional[str] = "system"
    instruction: str = "instruction"
    input: Optional[str] = "input"
    response: str = "response"


class SplitFractions(_Strict):
    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

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
    train: str
    val: str
    test: str


class DataConfig(_Strict):
    files: list[str] = Field(default_factory=list, description="JSONL, CSV or Parquet files, split by `split`.")
    split_files: Optional[SplitFiles] = None
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    template: Literal["default", "alpaca", "chat"] = "default"
    default_system: str = ""
    split: SplitFractions = Field(default_factory=SplitFractions)
    max_length: int = Field(512, ge=8)

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if bool(self.files) == bool(self.split_files):
            raise ValueError("set exactly one of `files` (split by `split`) or `split_files`")
        return self


class LoraConfig(_Strict):
    rank: int = Field(8, ge=1)
    alpha_multiple: float = Field(2.0, gt=0.0, description="lora_alpha = alpha_multiple * rank")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[Literal["attention", "mlp", "all-linear"], list[str]] = "attention"
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank.")
    use_dora: bool = Field(False, description="DoRA: learn a magnitude per output besides the low-rank direction.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="peft's LoRA init: Kaiming-uniform A (default), Gaussian A, or PiSSA / OLoRA, which "
        "start A and B from the adapted weights' SVD / QR and take that part out of the base weights.")
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0.0, description="LoRA+: the learning rate of the B matrices is this many times A's (off when unset).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must be a preset (attention, mlp, all-linear) or a non-empty list of module names")
        return value


class TrainingConfig(_Strict):
    learning_rate: float = Field(2e-4, gt=0.0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_steps: int = Field(200, ge=1, description="Optimizer steps of a trial that is never stopped early.")
    eval_steps: int = Field(20, ge=1, description="Evaluate and report every this many steps.")
    eval_batch_size: int = Field(16, ge=1)
    gradient_checkpointing: bool = False


class WarmStartConfig(_Strict):
    sweep: str = Field(description="Folder of an earlier sweep (e.g. results/demo) whose best configs run first.")
    top: int = Field(3, ge=1, description="How many of its best trials to re-run as this sweep's first trials.")


class SearchConfig(_Strict):
    space: Optional[str] = Field("lora_default", description="Name in search_spaces/ or a path to a YAML space.")
    parameters: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Inline entries; override `space`.")
    num_trials: int = Field(8, ge=1)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(
        10, ge=1, description="Random trials before TPE models the results (Optuna's default, kept: see BENCHMARKS.md)."
    )
    also_minimize: Optional[Literal["adapter_params", "eval_ms_per_example"]] = Field(
        None, description="A cost minimised beside `metric`: the sampler searches for the Pareto front of both.")
    pareto_tolerance: float = Field(
        0.01, ge=0.0, description="Promotion with `also_minimize`: the cheapest Pareto trial whose metric is within "
        "this fraction of the best metric.")
    warm_start: Optional[WarmStartConfig] = Field(
        None, description="Seed the sweep with an earlier sweep's best configs (they run first, then the sampler).")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        if value not in REPORTED_METRICS:
            raise ValueError(f"must be one the trainable reports ({', '.join(REPORTED_METRICS)}), but got {value!r}")
        return value


class SchedulerConfig(_Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(40, ge=1, description="Steps every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(3.0, gt=1.0)


class ResourcesConfig(_Strict):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"must be a fraction of one GPU or a whole number of GPUs, but got {value}")
        return value


class CheckpointConfig(_Strict):
    keep: int = Field(2, ge=1, description="Adapter checkpoints kept per trial, best by the sweep metric.")


class EvaluationConfig(_Strict):
    max_new_tokens: int = Field(32, ge=1)
    max_examples: Optional[int] = Field(None, ge=1, description="Cap on test examples for generation metrics.")
    verify_tolerance: Optional[float] = Field(
        None, gt=0.0, description="Max |logit difference| merged vs adapter; None: 1e-4 for float32, 5e-2 for 16-bit."
    )


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="None starts Ray locally; 'auto' or HOST:PORT joins a cluster.")
    num_cpus: Optional[int] = Field(None, ge=1)
    num_gpus: Optional[float] = Field(None, ge=0)


class BudgetConfig(_Strict):
    """Limits on the tuning phase; when one is spent, no trial starts, running ones stop, and the sweep
    promotes and exports from what ran."""

    wall_hours: Optional[float] = Field(None, gt=0.0, description="Hours of tuning, from the sweep's first start.")
    device_hours: Optional[float] = Field(
        None, gt=0.0, description="Trial hours times the devices each holds (its GPUs, or its CPUs when it has none).")


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = "results"
    storage: Optional[str] = Field(
        None, description="URI (s3://, gs://, any pyarrow filesystem) where trials store checkpoints and the sweep "
        "folder is mirrored, as <storage>/<name>/; the driver works in <output_dir>/<name>/.")
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    failure_retries: int = Field(0, ge=0, description="Times a failed trial is retried from its last checkpoint.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) of what the sampler optimises: the metric, then the cost when one is minimised too."""
        cost = [(self.search.also_minimize, "min")] if self.search.also_minimize else []
        return [(self.search.metric, self.search.mode), *cost]

    @property
    def devices_per_trial(self) -> float:
        """What a trial holds, for device-hours: its GPUs, or its CPUs when it asks for no GPU."""
        return self.resources.gpu if self.resources.gpu > 0 else self.resources.cpu

    @field_validator("storage")
    @classmethod
    def _a_uri(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and "://" not in value:
            raise ValueError("must be a URI such as s3://bucket/prefix or gs://bucket/prefix "
                             "(a local or shared folder is `output_dir`)")
        query = value.partition("?")[2].lower() if value else ""
        secrets = [key for key in ("access_key", "secret_key", "session_token") if f"{key}=" in query]
        if secrets:
            # The config is saved in the sweep folder (and its storage), and the URI shows in messages.
            raise ValueError(f"must not carry credentials ({', '.join(secrets)}): they would be saved in config.yaml; "
                             "give them through the environment (AWS_ACCESS_KEY_ID, ...) or an instance role")
        return value

    @model_validator(mode="after")
    def _steps_agree(self) -> "SweepConfig":
        problems = []
        t = self.training
        if t.eval_steps > t.max_steps:
            problems.append(f"training.eval_steps must be <= training.max_steps ({t.max_steps}), but got {t.eval_steps}")
        if self.scheduler.type == "asha" and self.scheduler.grace_period > t.max_steps:
            problems.append(
                f"scheduler.grace_period must be <= training.max_steps ({t.max_steps}), "
                f"but got {self.scheduler.grace_period}"
            )
        if self.model.quantization != "none":
            if self.resources.gpu == 0:
                problems.append(f"model.quantization {self.model.quantization} (bitsandbytes 4-bit) trains on CUDA "
                                "GPUs only, but resources.gpu is 0: give each trial a GPU or set it to none")
            if self.lora.init in REWRITES_BASE_WEIGHTS:
                problems.append(f"lora.init {self.lora.init} rewrites the base weights, which a 4-bit base "
                                f"(model.quantization {self.model.quantization}) cannot hold exactly: use default or gaussian")
        warm = self.search.warm_start
        if warm is not None and warm.top > self.search.num_trials:
            problems.append(
                f"search.warm_start.top must be <= search.num_trials ({self.search.num_trials}), but got {warm.top}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name


def format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parent = _parent_model(item["loc"][:-1])
            key = str(item["loc"][-1])
            hint = ""
            if parent is not None:
                close = difflib.get_close_matches(key, list(parent.model_fields), n=1)
                if close:
                    hint = f" (did you mean `{close[0]}`?)"
            problems.append(f"`{location}`: unknown key{hint}; valid keys here: {', '.join(parent.model_fields) if parent else '?'}")
            continue
        if item["type"] == "missing":
            problems.append(f"`{location}`: required field is missing")
            continue
        shown = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        problems.append(f"`{location}`: {message}{shown}" if location else f"{message}{shown}")
    return problems


def _parent_model(loc: tuple) -> type[BaseModel] | None:
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 0.0003)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: must look like dotted.key=value"], "command line")
    key, _, value = text.partition("=")
    if not key.strip():
        raise ConfigError([f"override {text!r}: the key before '=' is empty"], "command line")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


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
        raise ConfigError([f"{what} file not found: {path}"], str(path))
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"YAML syntax error{where}: {getattr(error, 'problem', error)}"], str(path)) from None
    except OSError as error:
        raise ConfigError([f"cannot read {what} file: {error.strerror}"], str(path)) from None


def validate_config(raw: Any, source: str = "config") -> SweepConfig:
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of keys, but got {type(raw).__name__}"], source)
    try:
        return SweepConfig.model_validate(raw)
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
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        candidate = base / model["path"]
        # A hub id like "org/model" stays as it is unless a folder of that name exists.
        if candidate.exists() or model["path"].startswith((".", "/")):
            model["path"] = str(candidate.resolve())
    search = raw.get("search")
    if isinstance(search, dict) and isinstance(search.get("space"), str):
        candidate = base / search["space"]
        if candidate.is_file():
            search["space"] = str(candidate.resolve())
    warm = search.get("warm_start") if isinstance(search, dict) else None
    if isinstance(warm, dict) and isinstance(warm.get("sweep"), str):
        # A sweep folder, named like `output_dir`: relative to the working directory. Stored absolute, so a
        # resumed sweep (its config.yaml read from anywhere) finds it again.
        warm["sweep"] = str(Path(warm["sweep"]).expanduser().resolve())


def config_to_yaml(config: SweepConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
