"""Search spaces: YAML data -> Optuna distributions, and trial params -> a trial's config.

A search space is pure data (Ray's OptunaSearch docstring): a mapping of dotted
config fields to one of four distribution types. No I/O happens when sampling.
"""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import optuna.distributions as od
from pydantic import ValidationError

from lora_sweep import search_spaces
from lora_sweep.config import ConfigError, SweepConfig, format_errors, read_yaml, shown

SHIPPED_SPACES_DIR = Path(search_spaces.__file__).resolve().parent

# The config fields a search space may vary, and the Python type each must take.
TUNABLE_FIELDS: dict[str, type] = {
    "training.learning_rate": float,
    "training.batch_size": int,
    "training.gradient_accumulation_steps": int,
    "training.warmup_ratio": float,
    "training.weight_decay": float,
    "training.lr_scheduler": str,
    "training.max_grad_norm": float,
    "lora.rank": int,
    "lora.alpha_multiple": float,
    "lora.dropout": float,
    "lora.target_modules": str,
    "lora.use_rslora": bool,
    "lora.use_dora": bool,
    "lora.init": str,
    "lora.loraplus_lr_ratio": float,
}
DISTRIBUTION_TYPES = ("uniform", "loguniform", "int", "choice")


def shipped_spaces() -> list[str]:
    return sorted(p.stem for p in SHIPPED_SPACES_DIR.glob("*.yaml"))


def resolve_space_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return SHIPPED_SPACES_DIR / f"{name_or_path}.yaml"


def load_space_file(name_or_path: str) -> dict[str, dict[str, Any]]:
    path = resolve_space_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            [f"`search.space`: {name_or_path!r} is neither a file nor a shipped space ({', '.join(shipped_spaces())})"],
            "search space",
        )
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not isinstance(raw.get("parameters"), dict):
        raise ConfigError(["the file must be a mapping with a `parameters:` mapping"], str(path))
    unknown = set(raw) - {"description", "parameters"}
    if unknown:
        raise ConfigError([f"unknown top-level key(s) {sorted(unknown)}; allowed: description, parameters"], str(path))
    parameters: dict[str, dict[str, Any]] = raw["parameters"]
    return parameters


def _distribution(name: str, spec: Any) -> tuple[od.BaseDistribution | None, list[str]]:
    """One entry -> (distribution, problems). Problems name the parameter, value and rule."""
    where = f"`{str(name)[:80]}`"
    if name not in TUNABLE_FIELDS:
        return None, [f"{where}: not a tunable field; tunable: {', '.join(TUNABLE_FIELDS)}"]
    if not isinstance(spec, dict):
        return None, [f"{where}: must be a mapping like {{type: uniform, low: 0, high: 1}}, but got {shown(spec)}"]
    kind = spec.get("type")
    if kind not in DISTRIBUTION_TYPES:
        return None, [f"{where}.type: must be one of {', '.join(DISTRIBUTION_TYPES)}, but got {shown(kind)}"]
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high", "step"}
    extra = set(spec) - allowed
    if extra:
        return None, [f"{where}: unknown key(s) {shown(sorted(map(str, extra)))} for type {kind}; allowed: {sorted(allowed)}"]
    wanted = TUNABLE_FIELDS[name]
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            return None, [f"{where}.values: must be a non-empty list, but got {shown(values)}"]
        wrong = [v for v in values if not _fits(v, wanted)]
        if wrong:
            return None, [f"{where}.values: every value must be {wanted.__name__}, but got {shown(wrong)}"]
        return od.CategoricalDistribution(values), []
    if kind == "int" and wanted is not int:
        return None, [f"{where}.type: int is only for integer fields, but {name} is {wanted.__name__}"]
    if kind != "int" and wanted is not float:
        return None, [f"{where}.type: {kind} is only for float fields; use int or choice for {name}"]
    low: Any = spec.get("low")  # checked below, then numbers
    high: Any = spec.get("high")
    step: Any = spec.get("step")
    problems = []
    for key, value in (("low", low), ("high", high)):
        if not _fits(value, float):
            problems.append(f"{where}.{key}: must be a number, but got {shown(value)}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}.{key}: must be a finite number, but got {value}")
        elif kind == "int" and isinstance(value, float) and not value.is_integer():
            # int() would truncate 1.5 to 1 without a word: a range the user did not write.
            problems.append(f"{where}.{key}: an int distribution needs whole-number bounds, but got {value}")
        elif abs(value) > 2**53:  # no setting is near it; Decimal and Optuna's grids fail on such numbers
            problems.append(f"{where}.{key}: must be at most 2^53 in size, but got {shown(value)}")
    if step is not None:
        if kind == "loguniform":
            # Optuna forbids log=True with a step: a log scale has no evenly spaced grid.
            problems.append(f"{where}.step: a loguniform distribution takes no step (Optuna forbids log with step), "
                            f"but got {shown(step)}; drop it, or use uniform with a step")
        elif not _fits(step, float) or (isinstance(step, float) and not math.isfinite(step)) or step <= 0:
            problems.append(f"{where}.step: must be a finite number > 0, but got {shown(step)}")
        elif kind == "int" and isinstance(step, float) and not step.is_integer():
            problems.append(f"{where}.step: an int distribution needs a whole-number step, but got {step}")
    if problems:
        return None, problems
    if kind == "int":
        low, high, step = int(low), int(high), int(step if step is not None else 1)
    if low > high:
        return None, [f"{where}: low must be <= high, but got low={low}, high={high}"]
    if kind == "loguniform" and low <= 0:
        return None, [f"{where}.low: log-uniform needs low > 0, but got {low}"]
    if step is not None:
        # Optuna only warns and lowers `high` to the last multiple of step: the space would silently differ from
        # the file. Decimal, as Optuna's own check uses, so that 0.1 - 0.0 is a multiple of 0.01.
        span, d_low, d_step = Decimal(str(high)) - Decimal(str(low)), Decimal(str(low)), Decimal(str(step))
        if span % d_step != 0:
            below = d_low + (span // d_step) * d_step
            return None, [f"{where}: (high - low) = {span} is not a multiple of step {step}, so high={high} could "
                          f"never be sampled; make high {below} or {below + d_step}"]
    if kind == "int":
        return od.IntDistribution(low, high, step=step), []
    if kind == "loguniform":
        return od.FloatDistribution(float(low), float(high), log=True), []
    return od.FloatDistribution(float(low), float(high), step=None if step is None else float(step)), []


def describe(distribution: od.BaseDistribution) -> str:
    if isinstance(distribution, od.CategoricalDistribution):
        return f"choice of {list(distribution.choices)}"
    if not isinstance(distribution, (od.IntDistribution, od.FloatDistribution)):
        return repr(distribution)  # not one this engine makes
    kind = "log-uniform" if getattr(distribution, "log", False) else "uniform"
    if isinstance(distribution, od.IntDistribution):
        kind = "integer"
    step = f", step {distribution.step}" if getattr(distribution, "step", None) not in (None, 1) else ""
    return f"{kind} in [{distribution.low:g}, {distribution.high:g}]{step}"


def _fits(value: Any, wanted: type) -> bool:
    if wanted is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if wanted is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, wanted)


def build_search_space(config: SweepConfig) -> dict[str, od.BaseDistribution]:
    """The sweep's space: the named file's entries, then inline entries on top. All problems at once."""
    entries: dict[str, Any] = {}
    if config.search.space:
        entries.update(load_space_file(config.search.space))
    entries.update(config.search.parameters)
    space, problems = {}, []
    for name, spec in entries.items():
        distribution, found = _distribution(name, spec)
        problems.extend(found)
        if distribution is not None:
            space[name] = distribution
    problems.extend(_values_the_config_rejects(config, space))
    if problems:
        raise ConfigError(problems, f"search space ({config.search.space or 'inline'})")
    return space


def _values_the_config_rejects(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> list[str]:
    """Every value a trial could get must pass the config's own rules, checked before any trial starts."""
    problems: list[str] = []
    for name, distribution in space.items():
        if isinstance(distribution, od.CategoricalDistribution):
            candidates = list(distribution.choices)
        elif isinstance(distribution, (od.IntDistribution, od.FloatDistribution)):
            candidates = [distribution.low, distribution.high]
        else:  # not one this engine makes
            continue
        for value in candidates:
            try:
                apply_params(config, {name: value})
            except ConfigError as error:
                problems.extend(f"{problem} (a value the search space can pick)" for problem in error.problems)
    return problems


def apply_params(config: SweepConfig, params: dict[str, Any]) -> SweepConfig:
    """The config one trial runs: the fixed config with the sampled values written over it."""
    raw = config.model_dump()
    unknown = [dotted for dotted in params if dotted not in TUNABLE_FIELDS]
    if unknown:  # a damaged best.json or leaderboard, say: never written over the config's own keys
        raise ConfigError([f"{shown(unknown[0])}: not a tunable field ({len(unknown)} such); tunable: "
                           f"{', '.join(TUNABLE_FIELDS)}"], "trial params")
    for dotted, value in params.items():
        section, field = dotted.split(".", 1)
        raw[section][field] = value
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_errors(error), f"trial params {params}") from None
