"""`sweep run` / `sweep resume` end to end: preflight -> data -> Ray Tune -> leaderboard -> promote -> eval + export.

Everything that can be checked is checked before Ray starts and before anything
is written. A sweep folder records enough to be resumed from any point: the
resolved config is written first, the prepared data and provenance next, then
Ray Tune's own experiment state; promotion and export are re-done on resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od
import ray
import torch
from pyarrow import ArrowException
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from sweep import faults
from sweep.config import CONFIG_FILE, ConfigError, SweepConfig, config_to_yaml, load_config
from sweep.data import TokenizedData, save_prepared, tokenize_splits
from sweep.disk import prune_checkpoints
from sweep.driver import STUDY_FILE, budget_spent, run_sweep
from sweep.export import FinalReport, finalize
from sweep.lora import resolve_target_modules
from sweep.placement import check_placement
from sweep.progress import SweepState, live_progress, mark_state
from sweep.provenance import provenance
from sweep.results import TrialRecord, promote, read_best, trial_record, write_atomically, write_best, write_leaderboard
from sweep.search_space import build_search_space
from sweep.storage import check_storage, fetch_trial_results, holds_files, mirror_to_storage, open_storage
from sweep.warm_start import warm_start_points
from trainables.lora_causal_lm import load_tokenizer

PROVENANCE_FILE = "provenance.json"
log = logging.getLogger(__name__)


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (Ctrl-C); its state is saved for `sweep resume`."""


@dataclass
class SweepOutcome:
    sweep_dir: Path
    records: list[TrialRecord]
    final: FinalReport


def check_model(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> torch.nn.Module:
    """The model exists, is a causal LM, and every target-module setting the sweep can pick matches it.

    Returns the model's skeleton: its modules on the meta device, with no weights.
    """
    if config.model.path.startswith((".", "/", "~")) and not Path(config.model.path).expanduser().is_dir():
        raise ConfigError([f"`model.path`: folder not found: {config.model.path}"], "model")
    try:
        model_config = AutoConfig.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError([f"`model.path`: cannot load a model config from {config.model.path!r} ({reason})"], "model") from None
    try:
        with init_empty_weights():  # module names only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    except ValueError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError([f"`model.path`: {config.model.path!r} is not a causal LM ({reason})"], "model") from None
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
    return skeleton


def local_ray_resources(config: SweepConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the local Ray that `sweep run` starts will have: the config's, else this machine's."""
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    gpus = config.ray.num_gpus if config.ray.num_gpus is not None else torch.cuda.device_count()
    return cpus, gpus


def check_resources(config: SweepConfig) -> None:
    """A trial that asks for more than a local Ray has would wait forever: refuse it up front.

    On an existing cluster (`ray.address`) the driver checks after connecting instead.
    """
    if config.ray.address:
        return
    cpus, gpus = local_ray_resources(config)
    problems = []
    if config.resources.cpu > cpus:
        problems.append(f"`resources.cpu`: a trial asks for {config.resources.cpu} CPUs but this machine's Ray has {cpus}")
    if config.resources.gpu > gpus:
        problems.append(f"`resources.gpu`: a trial asks for {config.resources.gpu} GPUs but this machine's Ray has {gpus:g}")
    if problems:
        raise ConfigError(problems, "resources")


def check_output_dir(config: SweepConfig) -> None:
    existing = config.sweep_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError([f"`output_dir`: {existing} is a file, so {config.sweep_dir} cannot be created"], "output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"`output_dir`: {existing} is not writable, so {config.sweep_dir} cannot be created"], "output")


def preflight(config: SweepConfig) -> tuple[dict[str, od.BaseDistribution], Any, TokenizedData]:
    """Every check, then the data tokenized in memory; nothing is written."""
    if config.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: the model's own Python code from %s will run", config.model.path)
    space = build_search_space(config)
    check_resources(config)
    check_placement(config)
    check_output_dir(config)
    check_storage(config)
    check_model(config, space)
    tokenizer = load_tokenizer(config)
    return space, tokenizer, tokenize_splits(config.data, tokenizer, config.seed)


def warm_start_seeds(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> list[dict[str, Any]]:
    """The earlier sweep's configs this one runs first (read once: what is logged is what is enqueued)."""
    warm = warm_start_points(config, space)
    for source in warm.sources:
        log.info("warm start: trial %s of %s runs first", source, config.search.warm_start.sweep)
    for reason in warm.skipped:
        log.warning("warm start: skipped %s", reason)
    return warm.points


def prepare_sweep_dir(config: SweepConfig, overwrite: bool) -> Path:
    """An empty local sweep folder, and nothing of an earlier sweep of this name in its storage.

    Finished work is only replaced on --overwrite: trials left in storage would otherwise mix into
    this sweep's report and never be pruned.
    """
    sweep_dir = config.sweep_dir
    storage = open_storage(config)
    local_taken = sweep_dir.exists() and any(sweep_dir.iterdir())
    stored_taken = storage is not None and holds_files(storage)
    if (local_taken or stored_taken) and not overwrite:
        where = (f"the sweep folder {sweep_dir} already exists; continue it with `sweep resume {sweep_dir}` "
                 "(or --resume), " if local_taken else f"storage already holds a sweep at {storage.path()}; ")
        raise ConfigError([f"`name`: {where}replace it with --overwrite, or pick another name"], "output")
    if local_taken:
        shutil.rmtree(sweep_dir)
    if stored_taken:
        storage.filesystem.delete_dir(storage.root)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir


def _write_data_and_provenance(config: SweepConfig, tokenized: TokenizedData, sweep_dir: Path) -> dict[str, Any]:
    faults.stall_if_asked("data_preparation", sweep_dir)
    prepared = save_prepared(tokenized, sweep_dir / "data")
    record = provenance(config.seed, prepared.data_hash, prepared.counts)
    record["data_path"] = str(prepared.path.resolve())
    record["rows_dropped"] = prepared.dropped
    # Written last: its presence means the data is complete.
    write_atomically(sweep_dir / PROVENANCE_FILE, json.dumps(record, indent=2))
    return record


def run(config: SweepConfig, overwrite: bool = False, live: bool = False) -> SweepOutcome:
    """Start a sweep. `live`: draw the progress table in the terminal and send Ray's output to logs/ray.log."""
    space, _, tokenized = preflight(config)
    seeds = warm_start_seeds(config, space)
    sweep_dir = prepare_sweep_dir(config, overwrite)
    write_atomically(sweep_dir / CONFIG_FILE, config_to_yaml(config))
    record = _write_data_and_provenance(config, tokenized, sweep_dir)
    return _tune_and_finish(config, space, sweep_dir, record, resume=False, live=live, seeds=seeds)


def resume(sweep_dir: Path, live: bool = False) -> SweepOutcome:
    """Continue a sweep from wherever it stopped: data, trials, promotion or export."""
    sweep_dir = Path(sweep_dir).resolve()
    if not (sweep_dir / CONFIG_FILE).is_file():
        raise ConfigError([f"{sweep_dir} is not a sweep folder (no {CONFIG_FILE}); start one with `sweep run`"], "resume")
    config = load_config(sweep_dir / CONFIG_FILE)
    space, _, tokenized = preflight(config)
    # Once the study exists its warm start is enqueued there; the earlier sweep is not needed again (it may be gone).
    seeds = [] if (sweep_dir / STUDY_FILE).is_file() else warm_start_seeds(config, space)
    provenance_file = sweep_dir / PROVENANCE_FILE
    if provenance_file.is_file():
        record = json.loads(provenance_file.read_text(encoding="utf-8"))
        if record["data_hash"] != tokenized.data_hash:
            raise ConfigError(
                [f"the data or tokenizer changed since the sweep started (hash {record['data_hash']} -> "
                 f"{tokenized.data_hash}); resuming would mix two datasets"],
                str(sweep_dir),
            )
    else:
        record = _write_data_and_provenance(config, tokenized, sweep_dir)
    return _tune_and_finish(config, space, sweep_dir, record, resume=True, live=live, seeds=seeds)


def _tune_and_finish(config: SweepConfig, space: dict[str, od.BaseDistribution], sweep_dir: Path,
                     record: dict[str, Any], resume: bool, live: bool, seeds: list[dict[str, Any]] | None = None) -> SweepOutcome:
    state: SweepState = "failed"
    storage = open_storage(config)
    if storage is not None:  # config, provenance and the prepared data, before any trial needs them
        mirror_to_storage(sweep_dir, storage)
    with live_progress(sweep_dir) if live else contextlib.nullcontext():
        try:
            outcome = _tune_and_export(config, space, sweep_dir, record, resume, seeds)
            state = "finished"
        except (SweepInterrupted, KeyboardInterrupt):  # a second Ctrl-C, or one during export: still resumable
            state = "stopped"
            raise
        finally:
            try:  # inside the live view, so that its last table says how the sweep ended
                mark_state(sweep_dir, state)
            except OSError as error:  # never hide the sweep's own error behind this one
                log.warning("could not record the sweep's state in status.json: %s", error)
            if storage is not None:  # however the sweep ended, storage gets what the driver has
                try:
                    mirror_to_storage(sweep_dir, storage)
                except (OSError, ArrowException) as error:
                    log.warning("could not copy the sweep folder to %s: %s", storage.uri, error)
    return outcome


def _tune_and_export(config: SweepConfig, space: dict[str, od.BaseDistribution], sweep_dir: Path,
                     record: dict[str, Any], resume: bool, seeds: list[dict[str, Any]] | None = None) -> SweepOutcome:
    data_path = Path(record["data_path"])
    ours = not ray.is_initialized()  # a Ray the caller started is the caller's to stop
    try:
        result_grid = run_sweep(config, space, data_path, sweep_dir, resume=resume, seeds=seeds)
        records = [trial_record(result, config) for result in result_grid]
        storage = open_storage(config)
        if storage is not None:  # trials' result files beside the driver's own, for `sweep report`
            fetch_trial_results(storage, sweep_dir)
    finally:
        # Ray's part is done: its workers (and the base models they keep) free their memory before the
        # final evaluation loads models here, and no late worker log reaches the terminal after the live view.
        if ours:
            ray.shutdown()
    write_leaderboard(records, sweep_dir, config)
    ended = result_grid.num_terminated + result_grid.num_errors
    budget = budget_spent(sweep_dir)
    if budget:
        log.warning("%s after %d of %d trials: promoting from what ran", budget, ended, config.search.num_trials)
    elif ended < config.search.num_trials:
        raise SweepInterrupted(
            f"the sweep stopped with {ended} of {config.search.num_trials} trials ended; "
            f"its state is saved: continue with `sweep resume {sweep_dir}`"
        )
    best = promote(records, config)
    write_best(best, sweep_dir)
    mark_state(sweep_dir, "exporting")
    faults.stall_if_asked("export", sweep_dir)
    final = finalize(sweep_dir, config, best, data_path, record)
    records = prune_checkpoints(records, best, config, sweep_dir)
    write_leaderboard(records, sweep_dir, config)
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
    final = finalize(Path(sweep_dir), config, read_best(sweep_dir), Path(record["data_path"]), record)
    storage = open_storage(config)
    if storage is not None:  # storage gets the new export too
        mirror_to_storage(Path(sweep_dir), storage)
    return final
