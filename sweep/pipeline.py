"""`sweep run` end to end: preflight -> data prep -> Ray Tune -> leaderboard -> promote -> final eval + export.

Everything that can be checked is checked before Ray starts, and every problem
found is reported together.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from sweep.config import ConfigError, SweepConfig, config_to_yaml, load_config
from sweep.data import PreparedData, prepare_data
from sweep.driver import run_sweep
from sweep.export import FinalReport, finalize
from sweep.lora import resolve_target_modules
from sweep.provenance import provenance
from sweep.results import TrialRecord, promote, read_best, trial_record, write_atomically, write_best, write_leaderboard
from sweep.search_space import build_search_space
from trainables.lora_causal_lm import load_tokenizer

CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"


@dataclass
class SweepOutcome:
    sweep_dir: Path
    records: list[TrialRecord]
    final: FinalReport


def check_model(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> None:
    """The model exists, is a causal LM, and every target-module setting the sweep can pick matches it."""
    try:
        model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError([f"`model.path`: cannot load a model config from {config.model.path!r} ({error})"], "model") from None
    try:
        with init_empty_weights():  # module names only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    except ValueError as error:
        raise ConfigError([f"`model.path`: {config.model.path!r} is not a causal LM ({error})"], "model") from None
    targets = [config.lora.target_modules]
    choice = space.get("lora.target_modules")
    if isinstance(choice, od.CategoricalDistribution):
        targets.extend(choice.choices)
    problems = []
    for target in targets:
        try:
            resolve_target_modules(skeleton, target)
        except ConfigError as error:
            problems.extend(error.problems)
    if problems:
        raise ConfigError(sorted(set(problems)), "model")


def preflight(config: SweepConfig) -> tuple[dict[str, od.BaseDistribution], Any]:
    space = build_search_space(config)
    check_model(config, space)
    return space, load_tokenizer(config)


def prepare_sweep_dir(config: SweepConfig, overwrite: bool) -> Path:
    sweep_dir = config.sweep_dir
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        if not overwrite:
            raise ConfigError(
                [f"`name`: the sweep folder {sweep_dir} already exists; pass --overwrite to replace it or pick another name"],
                "output",
            )
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir


def run(config: SweepConfig, overwrite: bool = False) -> SweepOutcome:
    space, tokenizer = preflight(config)
    sweep_dir = prepare_sweep_dir(config, overwrite)
    (sweep_dir / CONFIG_FILE).write_text(config_to_yaml(config), encoding="utf-8")
    prepared: PreparedData = prepare_data(config.data, tokenizer, config.seed, sweep_dir / "data")
    record = provenance(config.seed, prepared.data_hash, prepared.counts)
    record["data_path"] = str(prepared.path.resolve())
    record["rows_dropped"] = prepared.dropped
    write_atomically(sweep_dir / PROVENANCE_FILE, json.dumps(record, indent=2))

    result_grid = run_sweep(config, space, prepared.path, sweep_dir)
    records = [trial_record(result, config) for result in result_grid]
    write_leaderboard(records, sweep_dir, config)
    best = promote(records, config)
    write_best(best, sweep_dir)
    final = finalize(sweep_dir, config, best, prepared.path, record)
    return SweepOutcome(sweep_dir, records, final)


def load_sweep(sweep_dir: Path) -> tuple[SweepConfig, dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder (no {CONFIG_FILE})")
    config = load_config(sweep_dir / CONFIG_FILE)
    record = json.loads((sweep_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    return config, record


def export(sweep_dir: Path) -> FinalReport:
    """Re-run the final evaluation and export of a finished sweep."""
    config, record = load_sweep(sweep_dir)
    return finalize(Path(sweep_dir), config, read_best(sweep_dir), Path(record["data_path"]), record)
