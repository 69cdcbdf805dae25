"""Warm start: an earlier sweep's best configs become this sweep's first trials.

The earlier sweep's leaderboard ranks its trials; each trial's full config (its
sampled values over its own fixed config) gives the value of every field this
sweep searches, so a field the earlier sweep kept fixed still gets the value
that trial really ran with. A config that falls outside this sweep's space is
skipped and said so; the sampler learns from the re-run trials like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna.distributions as od
import pandas as pd

from lora_sweep.config import ConfigError, SweepConfig, load_config
from lora_sweep.folder import CONFIG_FILE, LEADERBOARD_FILE
from lora_sweep.results import PARAM_PREFIX
from lora_sweep.search_space import TUNABLE_FIELDS, apply_params, describe

OUTSIDE = object()  # a value the search space cannot pick


@dataclass
class WarmStart:
    points: list[dict[str, Any]] = field(default_factory=list)  # one per trial to run first, best first
    sources: list[str] = field(default_factory=list)  # the earlier trial each point comes from
    skipped: list[str] = field(default_factory=list)  # why an earlier trial was not used


def _typed(name: str, value: Any) -> Any:
    """A leaderboard cell (CSV: numpy scalars, 'True', NaN) -> the Python value the field takes."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    wanted = TUNABLE_FIELDS.get(name)
    if wanted is bool:
        return value if isinstance(value, bool) else str(value).strip().lower() == "true"
    if wanted is int:
        return int(value)
    if wanted is float:
        return float(value)
    return value.item() if hasattr(value, "item") else value


def in_space(distribution: od.BaseDistribution, value: Any) -> Any:
    """`value` as the sampler could have picked it (a choice's own value: 2.0 -> 2), or OUTSIDE.

    Optuna would enqueue an outside value anyway, with only a warning.
    """
    if isinstance(distribution, od.CategoricalDistribution):
        return next((choice for choice in distribution.choices if _same(choice, value)), OUTSIDE)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return OUTSIDE
    if not isinstance(distribution, (od.IntDistribution, od.FloatDistribution)):
        return OUTSIDE  # not one this engine makes
    if not distribution.low <= value <= distribution.high:
        return OUTSIDE
    step = getattr(distribution, "step", None)
    if step is not None and not math.isclose(round((value - distribution.low) / step) * step,
                                             value - distribution.low, abs_tol=1e-9):
        return OUTSIDE
    return value


def _same(choice: Any, value: Any) -> bool:
    """Numbers by value (the config holds alpha 2.0 where the space lists 2), but True is not the choice 1."""
    numbers = (int, float)
    if isinstance(choice, numbers) and isinstance(value, numbers) and not isinstance(choice, bool) \
            and not isinstance(value, bool):
        return choice == value
    return type(choice) is type(value) and choice == value


def _field_value(config: SweepConfig, dotted: str) -> Any:
    section, name = dotted.split(".", 1)
    return getattr(getattr(config, section), name)


def warm_start_points(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> WarmStart:
    """The earlier sweep's best `top` configs that fit this sweep's space; every problem is a ConfigError."""
    warm = config.search.warm_start
    if warm is None:
        return WarmStart()
    folder = Path(warm.sweep)
    where = "`search.warm_start.sweep`"
    if not space:
        raise ConfigError(["`search.warm_start`: this sweep searches nothing (its search space is empty), "
                           "so there is nothing to seed"], "config")
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError([f"{where}: {folder} is not a sweep folder (no {CONFIG_FILE})"], "config")
    if not (folder / LEADERBOARD_FILE).is_file():
        raise ConfigError([f"{where}: {folder} has no {LEADERBOARD_FILE}: its trials have not ended "
                           f"(finish it with `sweep resume {folder}`)"], "config")
    earlier = load_config(folder / CONFIG_FILE)
    board = pd.read_csv(folder / LEADERBOARD_FILE)
    metric = f"best_{earlier.search.metric}"
    usable = board[(board["status"] != "errored") & board[metric].notna()] if metric in board else board.iloc[0:0]
    usable = usable.sort_values(metric, ascending=earlier.direction.ascending, kind="stable")
    result = WarmStart()
    for _, row in usable.iterrows():
        if len(result.points) == warm.top:
            break
        trial = str(row["trial_id"])
        typed = {name: _typed(name, row[column]) for column in board.columns if column.startswith(PARAM_PREFIX)
                 for name in [column[len(PARAM_PREFIX):]]}
        params = {name: value for name, value in typed.items() if value is not None}
        try:
            ran = apply_params(earlier, params)
        except ConfigError as error:
            result.skipped.append(f"trial {trial}: its params no longer make a valid config ({error.problems[0]})")
            continue
        ran_with = {name: _field_value(ran, name) for name in space}
        point = {name: in_space(d, ran_with[name]) for name, d in space.items()}
        outside = [f"`{name}` = {ran_with[name]!r} is outside this sweep's space ({describe(d)})"
                   for name, d in space.items() if point[name] is OUTSIDE]
        if outside:
            result.skipped.append(f"trial {trial}: {'; '.join(outside)}")
        elif point in result.points:
            result.skipped.append(f"trial {trial}: the same config as trial {result.sources[result.points.index(point)]}")
        else:
            result.points.append(point)
            result.sources.append(trial)
    if not result.points:
        reasons = "; ".join(result.skipped) or f"no trial of it reported a finite {earlier.search.metric}"
        raise ConfigError([f"{where}: no config of {folder} can seed this sweep ({reasons})"], "config")
    return result
