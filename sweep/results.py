"""Typed per-trial results, the leaderboard, and promotion of the best checkpoint.

Promotion looks at every evaluation a trial reported, not only its last one:
a trial that peaked at step 120 and then overfit is promoted at step 120.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, Optional, TypeVar, cast

import pandas as pd
from pydantic import TypeAdapter, ValidationError

from lora_sweep.config import ConfigError, SweepConfig, cut, shown
from lora_sweep.folder import BEST_FILE, CONFIG_FILE, CONFIRM_FILE, LEADERBOARD_FILE
from lora_sweep.storage import is_directory, tree_bytes
from lora_sweep.trial_report import (ADAPTER_PARAMS, BEST_EVALUATION_KEYS, DIVERGED, DIVERGED_REASON, STEP,
                                     TOKENS_SEEN)

TrialStatus = Literal["completed", "stopped early", "errored"]
PARAM_PREFIX = "param:"  # leaderboard columns of sampled values: param:<dotted field>


@dataclass
class TrialRecord:
    trial_id: str
    status: TrialStatus
    params: dict[str, Any]
    best_metric: Optional[float]
    best_step: Optional[int]
    steps_run: int
    wall_seconds: float
    error: str = ""
    best_checkpoint: Optional[str] = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # every kept one: path, step, metric
    trial_dir: str = ""
    disk_bytes: int = 0
    device_seconds: float = 0.0  # wall seconds times the devices the trial held (config.devices_per_trial)
    tokens_seen: int = 0  # training tokens (not padding) the trial processed
    adapter_params: int = 0  # trainable LoRA parameters (DoRA's magnitudes included)
    # promotion.confirm: the best metric of this configuration per training seed, the sweep's own seed included.
    seed_metrics: dict[str, float] = field(default_factory=dict)


def seed_spread(record: TrialRecord) -> Optional[tuple[float, float, int]]:
    """Mean, sample standard deviation (0 for one run) and count of a confirmed configuration's per-seed metric."""
    values = list(record.seed_metrics.values())
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def ended_status(errored: bool, steps_run: int, max_steps: int) -> TrialStatus:
    """How a trial ended: errored (an exception or a diverged loss), completed (ran max_steps) or stopped early (ASHA)."""
    if errored:
        return "errored"
    return "completed" if steps_run >= max_steps else "stopped early"


def _error_summary(error: BaseException) -> str:
    """The last line of a trial's error: in Ray's traceback text, that is the exception and its message."""
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__


def _usable(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def trial_record(result: Any, config: SweepConfig) -> TrialRecord:
    """One Ray Tune `Result` -> a TrialRecord (best over every reported evaluation)."""
    metric = config.search.metric
    history: pd.DataFrame = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
    last = result.metrics or {}
    trial_id = str(last.get("trial_id") or Path(result.path).name)
    steps_run = _column_max(history, STEP)
    wall = float(last.get("time_total_s", 0.0) or 0.0)
    record = TrialRecord(
        trial_id=trial_id, status="completed", params=dict(result.config or {}), best_metric=None,
        best_step=None, steps_run=steps_run, wall_seconds=round(wall, 2),
    )
    if result.error is not None:
        record.error = _error_summary(result.error)
    elif DIVERGED_REASON in history and history[DIVERGED_REASON].notna().any():
        record.error = str(history[DIVERGED_REASON].dropna().iloc[-1])
    record.status = ended_status(bool(record.error), steps_run, config.training.max_steps)
    usable = history[history[metric].map(_usable)] if metric in history else history.iloc[0:0]
    if DIVERGED in usable:
        usable = usable[~usable[DIVERGED].astype(bool)]
    record.checkpoints = [
        {"path": checkpoint.path, "step": int(metrics.get(STEP, -1)), "metric": float(metrics[metric])}
        for checkpoint, metrics in result.best_checkpoints or []
        if _usable(metrics.get(metric)) and is_directory(checkpoint.filesystem, checkpoint.path)
    ]
    if len(usable):
        best_value = usable[metric].min() if config.direction.ascending else usable[metric].max()
        # Evaluations tied at the best (a task metric often is: the same share of right answers): the first
        # whose checkpoint Tune kept, so that the promoted step can be exported.
        tied = usable[usable[metric] == best_value]
        kept = {c["step"] for c in record.checkpoints}
        with_checkpoint = tied[tied[STEP].map(lambda step: int(step) in kept)]
        best_row = (with_checkpoint if len(with_checkpoint) else tied).iloc[0]
        record.best_metric = float(best_row[metric])
        record.best_step = int(best_row[STEP])
        record.best_metrics = {
            k: best_row[k].item() if hasattr(best_row[k], "item") else best_row[k]
            for k in BEST_EVALUATION_KEYS
            if k in best_row
        }
    record.best_checkpoint = next((c["path"] for c in record.checkpoints if c["step"] == record.best_step), None)
    record.trial_dir = str(result.path)
    record.disk_bytes = tree_bytes(result.filesystem, result.path)  # on the local disk or in storage
    record.device_seconds = round(wall * config.devices_per_trial, 2)
    record.tokens_seen = _column_max(history, TOKENS_SEEN)
    record.adapter_params = _column_max(history, ADAPTER_PARAMS)
    return record


def _column_max(history: pd.DataFrame, name: str) -> int:
    """The largest value a trial reported for `name` (0 when it reported none)."""
    return int(history[name].max()) if name in history and len(history) else 0


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` all at once: readers see the old file or the new one, never a part, even
    across a power cut (the data and the rename are fsync'd). On any failure (a full disk) the old file is
    untouched and no temporary file is left. The temporary file gets a fresh name (O_EXCL), so a link planted
    in the folder is never written through."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the records are as readable as any other file here
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def replace_folder(staging: Path, target: Path) -> None:
    """Swap a complete `staging` folder in for `target` (export/, report/): the previous one is moved aside
    first and deleted only once the new one is in place."""
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)  # left by a swap that was killed half-way
    if target.exists():
        target.rename(previous)
    staging.rename(target)
    if previous.exists():
        shutil.rmtree(previous)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry is data of the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not on every platform or filesystem: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_leaderboard(records: list[TrialRecord], sweep_dir: Path, config: SweepConfig) -> Path:
    """One row per trial, best first; errored trials last. With a cost minimised too: its value at each
    trial's best step, and whether the trial is on the Pareto front."""
    front = {r.trial_id for r in pareto_front(records, config)} if config.search.also_minimize else set()
    rows = []
    for r in records:
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status}
        row.update({f"{PARAM_PREFIX}{k}": v for k, v in sorted(r.params.items())})
        row.update({
            f"best_{config.search.metric}": r.best_metric, "best_step": r.best_step, "steps_run": r.steps_run,
            "wall_seconds": r.wall_seconds, "device_seconds": r.device_seconds, "tokens_seen": r.tokens_seen,
            "adapter_params": r.adapter_params, "disk_bytes": r.disk_bytes, "error": r.error,
        })
        if config.search.also_minimize:
            row[f"best_step_{config.search.also_minimize}"] = cost(r, config)
            row["pareto"] = r.trial_id in front
        if config.promotion.confirm:
            spread = seed_spread(r)
            row.update({f"mean_{config.search.metric}": spread[0] if spread else None,
                        f"std_{config.search.metric}": spread[1] if spread else None,
                        "seeds": spread[2] if spread else None})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if "seeds" in frame:  # a whole number, blank for the trials not confirmed
        frame["seeds"] = frame["seeds"].astype("Int64")
    if len(frame):
        frame = frame.sort_values(
            by=f"best_{config.search.metric}", ascending=config.direction.ascending, na_position="last", kind="stable"
        )
    path = sweep_dir / LEADERBOARD_FILE
    write_atomically(path, frame.to_csv(index=False))
    return path


class NoUsableTrialError(RuntimeError):
    pass


def cost(record: TrialRecord, config: SweepConfig) -> float:
    """The cost a multi-objective sweep minimises, at the trial's best step (inf when it has none)."""
    value = record.best_metrics.get(config.search.also_minimize or "", math.nan)
    return float(value) if _usable(value) else math.inf


def _oriented(record: TrialRecord, config: SweepConfig) -> float:
    """The trial's best metric, turned so that lower is better (a trial without one: last)."""
    return config.direction.sign * record.best_metric if record.best_metric is not None else math.inf


def pareto_front(records: list[TrialRecord], config: SweepConfig) -> list[TrialRecord]:
    """Trials with a best metric that no other trial beats on both metric (at its best step) and cost, best first."""
    usable = [r for r in records if r.best_metric is not None]
    points = {r.trial_id: (_oriented(r, config), cost(r, config)) for r in usable}

    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in points.values())

    return sorted((r for r in usable if not dominated(points[r.trial_id])), key=lambda r: points[r.trial_id])


def promote(records: list[TrialRecord], config: SweepConfig) -> TrialRecord:
    """The trial (and step) with the best metric over every evaluation of every trial.

    With `search.also_minimize`, the promotion rule: among trials with a checkpoint, the one with the
    lowest cost whose metric is within `search.pareto_tolerance` (a fraction) of the best metric; ties
    go to the better metric. That trial is on the Pareto front of the trials with a checkpoint; a
    tolerance of 0 promotes the best metric, as a single-objective sweep does.
    """
    candidates = promotable(records, config)
    if not candidates:
        reasons = "; ".join(f"{r.trial_id}: {r.status} {r.error}".strip() for r in records) or "no trials ran"
        raise NoUsableTrialError(f"no trial reported a finite `{config.search.metric}` with a checkpoint ({reasons})")
    confirmed = [r for r in candidates if r.seed_metrics]
    if confirmed:  # promotion.confirm: the best mean over seeds; a tie goes to the better single run
        return min(confirmed, key=lambda r: (config.direction.sign * _seed_mean(r), _oriented(r, config)))
    best = candidates[0]
    if not config.search.also_minimize:
        return best
    allowed = config.search.pareto_tolerance * abs(best.best_metric or 0.0)  # promotable: it has one
    close = [r for r in candidates if _oriented(r, config) - _oriented(best, config) <= allowed]
    return min(close, key=lambda r: (cost(r, config), _oriented(r, config)))


def _seed_mean(record: TrialRecord) -> float:
    spread = seed_spread(record)
    return spread[0] if spread else math.nan


def promotable(records: list[TrialRecord], config: SweepConfig) -> list[TrialRecord]:
    """Trials with a finite best metric and its checkpoint, best first: what `promote` and the confirm step pick from."""
    return sorted((r for r in records if r.best_metric is not None and r.best_checkpoint),
                  key=lambda r: _oriented(r, config))


def promotion_rule(config: SweepConfig) -> str:
    """How `promote` picked, in words (model card, final_metrics.json)."""
    metric = f"`{config.search.metric}` ({config.search.mode})"
    confirm = config.promotion.confirm
    if confirm:
        return (f"the best mean {metric} over {confirm.seeds + 1} seeds (the sweep's seed and {confirm.seeds} more) "
                f"of the top {confirm.top} trials' configurations; the sweep's own trial of that configuration is promoted")
    if not config.search.also_minimize:
        return f"the best {metric} over every evaluation of every trial"
    return (f"from the Pareto front of {metric} and `{config.search.also_minimize}` (min): the lowest "
            f"`{config.search.also_minimize}` within {config.search.pareto_tolerance:g} (relative) of the best {metric}")


def write_best(best: TrialRecord, sweep_dir: Path) -> Path:
    path = sweep_dir / BEST_FILE
    write_atomically(path, json.dumps(asdict(best), indent=2, default=str))
    return path


def read_best(sweep_dir: Path) -> TrialRecord:
    folder = sweep_folder(sweep_dir)
    path = folder / BEST_FILE
    if not path.exists():
        require_sweep_folder(folder)
        raise FileNotFoundError(f"{path} not found: the sweep has not finished promotion (run `sweep run` first)")
    return read_shape(TrialRecord, path, rewritten_by_resume(folder))


def sweep_totals(sweep_dir: Path) -> dict[str, Any]:
    """What the whole sweep spent, from its leaderboard: trials, device-seconds, training tokens; and its
    `promotion.confirm` runs with their device-seconds, from confirm.csv, when it has them."""
    board = read_leaderboard(sweep_dir)

    def column(table: pd.DataFrame, name: str) -> float:  # a cell that is not a number counts as 0, as an empty one
        return float(pd.to_numeric(table[name], errors="coerce").fillna(0).sum()) if name in table else 0.0

    totals = {"trials": int(len(board)), "device_seconds": round(column(board, "device_seconds"), 1),
              "tokens_seen": int(column(board, "tokens_seen"))}
    if (Path(sweep_dir) / CONFIRM_FILE).is_file():  # the confirm runs, apart: the trials' figures stay the sweep's own
        runs = read_leaderboard(sweep_dir, ("of", "seed", "device_seconds"), CONFIRM_FILE)
        totals.update(confirm_runs=int(len(runs)), confirm_device_seconds=round(column(runs, "device_seconds"), 1))
    return totals


# Reading a sweep folder. The read commands (status, best, report, export, generate) get every file of the
# folder through these, so that a damaged file is refused in one form: `FILE: what is wrong; what to do`
# (a ConfigError, exit 2), never a traceback.

T = TypeVar("T")


def rewritten_by_resume(sweep_dir: Path) -> str:
    """What to do about a damaged file that `sweep resume` writes again (promotion, export, leaderboard)."""
    return f"`sweep resume {sweep_dir}` writes it again"


def sweep_folder(sweep_dir: Path, missing: str = "give the folder `sweep run` made, e.g. results/<name>") -> Path:
    """The folder a read command was given, refused unless it is a folder; `missing` is what to do when there
    is none."""
    path = Path(sweep_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(["a file, not a sweep folder; give the folder `sweep run` made, e.g. results/<name>"], str(path))
    raise ConfigError([f"folder not found: {missing}"], str(path))


def require_sweep_folder(sweep_dir: Path) -> None:
    """A folder `sweep run` made holds config.yaml from its start (the message docs/errors.md lists)."""
    if not (Path(sweep_dir) / CONFIG_FILE).exists():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder (no {CONFIG_FILE})")


def _json_kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _read_text(path: Path, refuse: Callable[[str], NoReturn], kind: str) -> str:
    """A sweep folder's file as UTF-8 text; anything else goes to `refuse` with what it is."""
    if path.is_dir():
        refuse("a folder, not a file")
    try:
        raw = path.read_bytes()
    except OSError as error:
        refuse(f"cannot read it ({error.strerror or error})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        refuse(f"not a {kind} (byte 0x{raw[error.start]:02x} at offset {error.start} is not UTF-8)")


def read_json(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON object in a file of a sweep folder; a file that is unreadable, not JSON or not an object is a
    ConfigError naming it and ending with `remedy` (what to do about it)."""
    path = Path(path)

    def refuse(what: str) -> NoReturn:
        raise ConfigError([f"{what}; {remedy}"], str(path))

    text = _read_text(path, refuse, "text file")
    if not text.strip():
        refuse("empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        refuse(f"not valid JSON ({error.msg.removesuffix(' at')} at line {error.lineno}, column {error.colno})")
    except RecursionError:
        refuse("not valid JSON (nested too deeply)")
    except ValueError as error:  # Python's limit on the digits of an integer (4300)
        refuse(f"not valid JSON here ({cut(str(error).split(';')[0], 80)})")
    if not isinstance(data, dict):
        refuse(f"must be a JSON object, but got {_json_kind(data)}")
    return data


@lru_cache(maxsize=None)
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def shape_problem(error: ValidationError) -> str:
    """The first thing wrong in a file's JSON, as `field`: what is wrong (got value), and how many more."""
    problems = error.errors()
    first = problems[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "missing":
        what = "required field is missing"
    else:
        what = f"{first['msg']} (got {shown(first.get('input'))})"
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return f"`{location}`: {what}{more}"


def parse_shape(kind: type[T], data: dict[str, Any], path: Path, remedy: str) -> T:
    """`data` (a file's JSON object) checked against the dataclass or model `kind`; a ConfigError naming the
    file and the first field that does not fit, else the typed value. Keys `kind` does not know are ignored."""
    try:
        value: T = _adapter(cast(Any, kind)).validate_python(data)  # a type is hashable; the cache's stub says Hashable
        return value
    except ValidationError as error:
        raise ConfigError([f"{shape_problem(error)}; {remedy}"], str(path)) from None


def read_shape(kind: type[T], path: Path, remedy: str) -> T:
    """A file of a sweep folder read with `read_json` and checked with `parse_shape`."""
    return parse_shape(kind, read_json(path, remedy), path, remedy)


def read_leaderboard(sweep_dir: Path, required: tuple[str, ...] = ("trial_id", "status"),
                     file: str = LEADERBOARD_FILE) -> pd.DataFrame:
    """leaderboard.csv, or another of the sweep's tables (`file`: confirm.csv); an empty table when the sweep has
    not written it; a file that is not a CSV table with the `required` columns is a ConfigError naming it."""
    folder = Path(sweep_dir)
    path = folder / file
    if not path.exists():
        return pd.DataFrame()
    remedy = rewritten_by_resume(folder)

    def refuse(what: str) -> NoReturn:
        raise ConfigError([f"{what}; {remedy}"], str(path))

    text = _read_text(path, refuse, "CSV text file")
    if "\x00" in text:
        refuse("not a CSV text file (it holds NUL bytes)")
    try:
        board = pd.read_csv(io.StringIO(text))
    except pd.errors.EmptyDataError:  # a sweep whose trials all vanished writes a header-less empty table
        return pd.DataFrame()
    except (pd.errors.ParserError, ValueError) as error:
        refuse(f"not a CSV table ({cut(' '.join(str(error).split()), 120)})")
    missing = [column for column in required if column not in board.columns]
    if missing:
        refuse(f"no column(s) {missing}; it has {shown(list(board.columns))}")
    return board
