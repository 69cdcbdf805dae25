"""`sweep run` / `sweep resume` end to end: preflight -> data -> Ray Tune -> leaderboard -> [confirm] -> promote -> eval
+ export.

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
import pickle
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import optuna.distributions as od
import ray
import torch
from pyarrow import ArrowException
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils.import_utils import check_torch_load_is_safe

from lora_sweep.config import ConfigError, SweepConfig, config_to_yaml, cut, load_config, shown, shown_path
from lora_sweep.data import TokenizedData, load_examples, save_prepared, tokenize_splits
from lora_sweep.disk import check_free_space, disk_needs, nearest_existing, prune_checkpoints
from lora_sweep.confirm import ConfirmRun, confirm_plan, confirm_runs, with_seed_metrics, write_confirm_runs
from lora_sweep.driver import (budget_spent, check_cluster_address, check_study, concurrent_trials, local_ray_resources,
                               run_confirmation, run_sweep)
from lora_sweep.export import FinalReport, finalize
from lora_sweep.folder import CONFIG_FILE, DATA_DIR, MARKER_FILE, PROVENANCE_FILE, STUDY_FILE
from lora_sweep.testing import faults
from lora_sweep.testing.faults import check_test_hooks
from lora_sweep.lora import largest_adapter, resolve_target_modules
from lora_sweep.placement import check_placement, model_positions
from lora_sweep.progress import SweepState, live_progress, mark_state
from lora_sweep.provenance import provenance
from lora_sweep.results import (TrialRecord, promote, read_best, read_json, read_leaderboard, require_sweep_folder,
                           sweep_folder, trial_record, write_atomically, write_best, write_leaderboard)
from lora_sweep.safety import (check_state_files_are_ours, clear_sweep_folder, driver_lock, holds_anything, is_sweep_folder, mark_stored_sweep_folder, mark_sweep_folder, stored_sweep_id, sweep_id)
from lora_sweep.search_space import apply_params, build_search_space
from lora_sweep.signals import SweepInterrupted
from lora_sweep.storage import SweepFolder, check_storage, open_storage
from lora_sweep.warm_start import warm_start_points
from lora_sweep.trainables.lora_causal_lm import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    sweep_dir: Path
    records: list[TrialRecord]
    final: FinalReport


def local_model_missing(path: str) -> bool:
    """A `model.path` written as a local folder (not a hub id) that is not there."""
    return path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir()


def check_model(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> torch.nn.Module:
    """The model exists, is a causal LM whose weights load safely, has positions for `data.max_length` tokens,
    and every target-module setting the sweep can pick matches it.

    Returns the model's skeleton: its modules on the meta device, with no weights.
    """
    path = config.model.path
    named = shown_path(path)
    folder = Path(path).expanduser()
    if local_model_missing(path):
        raise ConfigError([f"`model.path`: folder not found: {path}"], "model")
    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError([f"`model.path`: cannot load a model config from {named} ({reason})"], "model") from None
    # An encoder is refused by what transformers knows of it, not by a list of names. transformers maps encoders
    # (BERT, RoBERTa, ELECTRA, XLM-R, ...) to a *ForCausalLM class too, but that class attends both ways unless the
    # config sets `is_decoder: true`, so each token would see the very token it is trained to predict. The model
    # types that transformers also gives a masked-LM head are exactly these encoders and the encoder-decoders
    # (BART, mBART, ...), whose causal class is the decoder half alone, without the encoder it was trained with.
    model_type = getattr(model_config, "model_type", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ConfigError([f"`model.path`: {named} is an encoder-decoder (model_type {model_type}), not a causal LM; "
                           "LoRA here trains decoder-only models"], "model")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
        raise ConfigError([f"`model.path`: {named} is an encoder (model_type {model_type}), not a causal LM: its "
                           "attention sees every token unless its config sets is_decoder: true"], "model")
    try:
        with init_empty_weights():  # module names only: no memory, no weights read
            skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    except ValueError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError([f"`model.path`: {named} is not a causal LM ({reason})"], "model") from None
    problems = []
    if folder.is_dir():  # a hub id is read from the local cache by transformers itself
        pickles = sorted(folder.glob("pytorch_model*.bin"))
        if not ((folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file() or pickles):
            problems.append(f"`model.path`: no weights in {named} (model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin)")
        elif not (folder / SAFE_WEIGHTS_NAME).is_file() and not (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
            # Pickled weights are accepted because transformers 5 reads them only with torch.load(weights_only=True)
            # (nothing here passes weights_only=False), which unpickles tensors and plain containers and refuses
            # any other object, so a pickle cannot run code. transformers refuses pickles on torch < 2.6 (CVE-2025-
            # 32434); both refusals are made here, once, instead of in every trial. map_location="meta" (and mmap
            # where the format allows) reads the pickle's structure, not its tensors.
            try:
                check_torch_load_is_safe()
            except ValueError:
                problems.append(f"`model.path`: {named} holds its weights only as a pickle (pytorch_model.bin), which "
                                f"transformers loads only with torch >= 2.6, but this is {torch.__version__}; upgrade "
                                "torch, or save the weights as safetensors")
                pickles = []
            for weights in pickles:
                try:
                    torch.load(weights, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(weights))
                except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
                    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: Please use|\n|$)", str(error))
                    reason = (found.group(1) if found else (str(error).strip().splitlines() or [""])[0])[:120]
                    problems.append(f"`model.path`: {weights.name} in {named} is not a plain tensor pickle; pickles are "
                                    f"only loaded with torch.load(weights_only=True), which refuses it ({reason})")
                    break
    # Positions past the model's own are out of its embedding table (learned positions: an index error in the
    # trial) or where it was never trained (rotary): neither trains what the user means. The name differs by model.
    found = model_positions(model_config)
    if found and found[1] < config.data.max_length:
        key, positions = found
        problems.append(f"`data.max_length`: {config.data.max_length} is more than the model's {positions} "
                        f"positions ({key} in its config); lower data.max_length to {positions} or less")
    targets = [config.lora.target_modules]
    choice = space.get("lora.target_modules")
    if isinstance(choice, od.CategoricalDistribution):
        targets.extend(choice.choices)
    target_problems = []
    for target in targets:
        try:
            resolve_target_modules(skeleton, target)
        except ConfigError as error:
            target_problems.extend(error.problems)
    problems.extend(sorted(set(target_problems)))
    if problems:
        raise ConfigError(problems, "model")
    return skeleton


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
    existing = nearest_existing(config.sweep_dir)
    if not existing.is_dir():
        raise ConfigError([f"`output_dir`: {existing} is a file, so {config.sweep_dir} cannot be created"], "output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError([f"`output_dir`: {existing} is not writable, so {config.sweep_dir} cannot be created"], "output")


@dataclass(frozen=True)
class Checked:
    """What the checks found, before anything is written: `sweep run` goes on with it, `sweep plan` shows it."""

    space: dict[str, od.BaseDistribution]
    tokenizer: Any
    tokenized: TokenizedData
    skeleton: torch.nn.Module  # the model's modules on the meta device
    concurrent: int  # trials at once
    base_parameters: int
    adapter_parameters: int  # of the largest adapter the sweep can pick
    disk: dict[str, int]  # bytes, as `disk_needs` counts them


def preflight(config: SweepConfig, probe_storage: bool = True) -> Checked:
    """Every check, then the data tokenized in memory; nothing is written (but a storage probe, when asked).

    The model's own code (`trust_remote_code`) is imported only after every check that does not need the
    model passed: the config, search space, resources, output, storage, cluster address and the data files.
    """
    if config.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: the Python code in %s will run on this machine and in every "
                    "trial; use it only for a model whose code you trust", config.model.path)
    check_test_hooks()
    space = build_search_space(config)
    check_resources(config)
    check_placement(config)
    check_output_dir(config)
    if probe_storage:
        check_storage(config)
    else:
        open_storage(config)  # the URI opens; a plan writes nothing, so it does not probe
    check_cluster_address(config)
    examples = load_examples(config.data, config.seed)
    skeleton = check_model(config, space)
    tokenizer = load_tokenizer(config)
    tokenized = tokenize_splits(config.data, tokenizer, config.seed, examples)
    concurrent = concurrent_trials(config)
    base_parameters = sum(p.numel() for p in skeleton.parameters())
    adapter_parameters = largest_adapter(config, space, skeleton)
    disk = disk_needs(config, adapter_parameters, base_parameters, concurrent)
    short_of_space = check_free_space(config, disk, concurrent)
    if short_of_space:
        log.warning(short_of_space)
    return Checked(space, tokenizer, tokenized, skeleton, concurrent, base_parameters, adapter_parameters, disk)


def warm_start_seeds(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> list[dict[str, Any]]:
    """The earlier sweep's configs this one runs first (read once: what is logged is what is enqueued)."""
    warm = warm_start_points(config, space)
    for source in warm.sources:
        log.info("warm start: trial %s of %s runs first", source, config.search.warm_start.sweep)
    for reason in warm.skipped:
        log.warning("warm start: skipped %s", reason)
    return warm.points


def check_sweep_dir_free(config: SweepConfig, overwrite: bool) -> None:
    """Before anything is written: the sweep folder (and its storage) is empty, or --overwrite replaces a folder
    the engine made. Finished work is only replaced on --overwrite: trials left in storage would otherwise mix
    into this sweep's report and never be pruned. A folder without the engine's marker is never deleted, and
    storage is replaced only when its marker is the one of this local sweep folder (not another machine's
    sweep of the same name, which may be running)."""
    folder = SweepFolder.of(config)
    sweep_dir, storage = folder.local, folder.storage
    local_taken = holds_anything(sweep_dir)
    stored_taken = folder.stored_files()
    if local_taken and not is_sweep_folder(sweep_dir):
        raise ConfigError([f"`name`: {sweep_dir} exists and was not created by lora-sweep (no {MARKER_FILE} in it): "
                           "it is never replaced or deleted; pick another `name` or `output_dir`"], "output")
    if storage is not None and stored_taken:
        stored = stored_sweep_id(storage.filesystem, storage.root)
        if stored is None:
            raise ConfigError([f"`name`: {storage.path()} in storage holds files that lora-sweep did not write (no "
                               f"{MARKER_FILE}): they are never replaced or deleted; pick another `name` or `storage`"],
                              "output")
        if overwrite and stored != sweep_id(sweep_dir):
            raise ConfigError([f"`name`: {storage.path()} in storage holds another sweep of this name (made from another "
                               "folder or machine, and maybe running): --overwrite replaces only the storage of this "
                               f"folder's own sweep; pick another `name`, or delete {storage.path()} yourself"], "output")
    if (local_taken or stored_taken) and not overwrite:
        where = (f"the sweep folder {sweep_dir} already exists; continue it with `sweep resume {sweep_dir}` "
                 "(or --resume), " if local_taken else f"storage already holds a sweep at {storage.path()}; ")
        raise ConfigError([f"`name`: {where}replace it with --overwrite, or pick another name"], "output")


def prepare_sweep_dir(config: SweepConfig, overwrite: bool) -> Path:
    """An empty, marked local sweep folder, and nothing of an earlier sweep of this name in its storage.

    Called with the driver lock held, after `check_sweep_dir_free`: each delete re-checks the marker.
    """
    check_sweep_dir_free(config, overwrite)
    folder = SweepFolder.of(config)
    sweep_dir, storage = folder.local, folder.storage
    if overwrite:
        if is_sweep_folder(sweep_dir):
            clear_sweep_folder(sweep_dir)
        if storage is not None and folder.stored_files():
            storage.filesystem.delete_dir_contents(storage.root)  # its marker is this folder's: checked above
    sweep_dir.mkdir(parents=True, exist_ok=True)
    new_id = mark_sweep_folder(sweep_dir, config.name)
    if storage is not None:
        mark_stored_sweep_folder(storage.filesystem, storage.root, config.name, new_id)
    return sweep_dir


def _write_data_and_provenance(config: SweepConfig, tokenized: TokenizedData, sweep_dir: Path) -> dict[str, Any]:
    faults.stall_if_asked("data_preparation", sweep_dir)
    prepared = save_prepared(tokenized, sweep_dir / DATA_DIR)
    record = provenance(config.seed, prepared.data_hash, prepared.counts)
    record["data_path"] = str(prepared.path.resolve())
    record["rows_dropped"] = prepared.dropped
    # Written last: its presence means the data is complete.
    write_atomically(sweep_dir / PROVENANCE_FILE, json.dumps(record, indent=2))
    return record


def run(config: SweepConfig, overwrite: bool = False, live: bool = False) -> SweepOutcome:
    """Start a sweep. `live`: draw the progress table in the terminal and send Ray's output to logs/ray.log."""
    checked = preflight(config)
    space, tokenized = checked.space, checked.tokenized
    seeds = warm_start_seeds(config, space)
    check_sweep_dir_free(config, overwrite)
    with driver_lock(config.sweep_dir, "sweep run --overwrite" if overwrite else "sweep run"), stopped_as(config.sweep_dir):
        folder = SweepFolder(prepare_sweep_dir(config, overwrite), open_storage(config))
        write_atomically(folder.local / CONFIG_FILE, config_to_yaml(config))
        record = _write_data_and_provenance(config, tokenized, folder.local)
        return _tune_and_finish(config, space, folder, record, resume=False, live=live, seeds=seeds)


@contextlib.contextmanager
def stopped_as(sweep_dir: Path) -> Iterator[None]:
    """A Ctrl-C or SIGTERM outside Tune (data preparation, export) ends as a stop with the resume command."""
    try:
        yield
    except KeyboardInterrupt:
        saved = (sweep_dir / CONFIG_FILE).is_file()
        raise SweepInterrupted(f"its state is saved: continue with `sweep resume {sweep_dir}`" if saved
                               else "before anything of the sweep was written") from None


def resume(sweep_dir: Path, live: bool = False) -> SweepOutcome:
    """Continue a sweep from wherever it stopped: data, trials, promotion or export."""
    sweep_dir = Path(sweep_dir).resolve()
    if not (sweep_dir / CONFIG_FILE).is_file():
        raise ConfigError([f"{sweep_dir} is not a sweep folder (no {CONFIG_FILE}); start one with `sweep run`"], "resume")
    check_state_files_are_ours(sweep_dir)
    config = load_config(sweep_dir / CONFIG_FILE)
    if config.name == sweep_dir.name:  # its output_dir may be relative to where it started: check this folder
        config = config.model_copy(update={"output_dir": str(sweep_dir.parent)})
    check_study(sweep_dir, config.name)  # before Optuna opens it for writing (it adds its tables to any SQLite file)
    checked = preflight(config)
    with driver_lock(sweep_dir, "sweep resume"), stopped_as(sweep_dir):
        return _resume_locked(config, checked.space, checked.tokenized, sweep_dir, live)


def _resume_locked(config: SweepConfig, space: dict[str, od.BaseDistribution], tokenized: TokenizedData,
                   sweep_dir: Path, live: bool) -> SweepOutcome:
    # Once the study exists its warm start is enqueued there; the earlier sweep is not needed again (it may be gone).
    seeds = [] if (sweep_dir / STUDY_FILE).is_file() else warm_start_seeds(config, space)
    provenance_file = sweep_dir / PROVENANCE_FILE
    if provenance_file.is_file():
        record = read_json(provenance_file, "delete it: the resume then prepares the data again and rewrites it")
        if record.get("data_hash") != tokenized.data_hash:
            raise ConfigError(
                [f"the data or tokenizer changed since the sweep started (hash {record.get('data_hash')} -> "
                 f"{tokenized.data_hash}); resuming would mix two datasets"],
                str(sweep_dir),
            )
    else:
        record = _write_data_and_provenance(config, tokenized, sweep_dir)
    return _tune_and_finish(config, space, SweepFolder.of(config, sweep_dir), record, resume=True, live=live, seeds=seeds)


def _tune_and_finish(config: SweepConfig, space: dict[str, od.BaseDistribution], folder: SweepFolder,
                     record: dict[str, Any], resume: bool, live: bool, seeds: list[dict[str, Any]] | None = None) -> SweepOutcome:
    state: SweepState = "failed"
    sweep_dir = folder.local
    folder.mirror()  # config, provenance and the prepared data reach storage before any trial needs them
    with live_progress(sweep_dir) if live else contextlib.nullcontext():
        try:
            outcome = _tune_and_export(config, space, folder, record, resume, seeds)
            state = "finished"
        except (SweepInterrupted, KeyboardInterrupt):  # a second Ctrl-C, or one during export: still resumable
            state = "stopped"
            raise
        finally:
            try:  # inside the live view, so that its last table says how the sweep ended
                mark_state(sweep_dir, state)
            except (OSError, ValueError) as error:  # never hide the sweep's own error behind this one (a damaged file)
                log.warning("could not record the sweep's state in status.json: %s", error)
            if folder.storage is not None:  # however the sweep ended, storage gets what the driver has
                try:
                    folder.mirror()
                except (OSError, ArrowException) as error:
                    log.warning("could not copy the sweep folder to %s: %s", folder.storage.uri, error)
    return outcome


def _tune_and_export(config: SweepConfig, space: dict[str, od.BaseDistribution], folder: SweepFolder,
                     record: dict[str, Any], resume: bool, seeds: list[dict[str, Any]] | None = None) -> SweepOutcome:
    sweep_dir, data_path = folder.local, Path(record["data_path"])
    ours = not ray.is_initialized()  # a Ray the caller started is the caller's to stop
    try:
        result_grid = run_sweep(config, space, data_path, folder, resume=resume, seeds=seeds)
        records = [trial_record(result, config) for result in result_grid]
        folder.fetch_trial_results()  # trials' result files (in storage when there is one) for `sweep report`
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
        runs = _confirm(config, records, data_path, folder, resume, budget)
    finally:
        # Ray's part is done: its workers (and the base models they keep) free their memory before the
        # final evaluation loads models here, and no late worker log reaches the terminal after the live view.
        if ours:
            ray.shutdown()
    if runs:
        records = with_seed_metrics(records, runs, config)
        write_leaderboard(records, sweep_dir, config)
    best = promote(records, config)
    write_best(best, sweep_dir)
    mark_state(sweep_dir, "exporting")
    faults.stall_if_asked("export", sweep_dir)
    final = finalize(folder, config, best, data_path, record)
    # The confirm runs' checkpoints compete for `checkpoints.keep` with the trials' (a luckier seed's adapter).
    pruned = prune_checkpoints(records + [run.record for run in runs], best, config, folder)
    records, kept = pruned[:len(records)], pruned[len(records):]
    write_leaderboard(records, sweep_dir, config)
    if runs:
        write_confirm_runs([replace(run, record=r) for run, r in zip(runs, kept, strict=True)], sweep_dir, config)
    return SweepOutcome(sweep_dir, records, final)


def _confirm(config: SweepConfig, records: list[TrialRecord], data_path: Path, folder: SweepFolder, resume: bool,
             budget: str | None) -> list[ConfirmRun]:
    """`promotion.confirm`'s runs (none when it is off), trained before promotion; confirm.csv lists them."""
    plan = confirm_plan(records, config)
    if not plan:
        return []
    if budget:  # the budget bounds the whole tuning phase, the confirm runs included
        log.warning("promotion.confirm skipped (%s): promoting the single best trial", budget)
        return []
    confirm = config.promotion.confirm
    log.info("promotion.confirm: training the top %d configurations with %d more seed(s) each (%d runs)",
             len(plan) // confirm.seeds, confirm.seeds, len(plan))
    runs = confirm_runs(run_confirmation(config, plan, data_path, folder, resume=resume), config)
    write_confirm_runs(runs, folder.local, config)
    return runs


def load_sweep(sweep_dir: Path, data: bool = False) -> tuple[SweepConfig, dict[str, Any]]:
    """A sweep folder's config and provenance record, for the commands that read one; a damaged file is a
    ConfigError naming it. `data`: the prepared data the record points at must be there too (export's test split)."""

    sweep_dir = sweep_folder(sweep_dir)
    require_sweep_folder(sweep_dir)
    try:
        config = load_config(sweep_dir / CONFIG_FILE)
    except ConfigError as error:  # a few short lines: what is wrong with the file, not a screen of it
        problems = [cut(problem, 200) for problem in error.problems]
        if len(problems) > 3:
            problems = problems[:2] + [f"... and {len(problems) - 2} more problems"]
        raise ConfigError(problems, error.source) from None
    path = sweep_dir / PROVENANCE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the sweep stopped while preparing its data "
                                f"(`sweep resume {sweep_dir}` prepares it)")
    remedy = f"delete it, and `sweep resume {sweep_dir}` prepares the data again and rewrites it"
    record = read_json(path, remedy)
    if not isinstance(record.get("data_path"), str):
        problem = "required field is missing" if "data_path" not in record else \
            f"must be a path, but got {shown(record['data_path'])}"
        raise ConfigError([f"`data_path`: {problem}; {remedy}"], str(path))
    if data and not (Path(record["data_path"]) / "dataset_dict.json").is_file():
        raise ConfigError([f"`data_path`: the prepared data is gone ({record['data_path']}); {remedy}"], str(path))
    return config, record


def export(sweep_dir: Path) -> FinalReport:
    """Re-run the final evaluation and export of a finished sweep.

    Everything it reads is checked before the lock is taken and before its evaluation loads any model.
    """
    config, record = load_sweep(sweep_dir, data=True)
    if local_model_missing(config.model.path):
        raise ConfigError([f"`model.path`: the base model {shown_path(config.model.path)} is gone; the export "
                           "merges the adapter into it: restore it there"], str(Path(sweep_dir) / CONFIG_FILE))
    best = read_best(sweep_dir)
    apply_params(config, best.params)  # the promoted trial's config is valid
    read_leaderboard(sweep_dir)  # its totals go into the model card
    budget_spent(sweep_dir)
    folder = SweepFolder.of(config, Path(sweep_dir))
    with driver_lock(folder.local, "sweep export"):
        final = finalize(folder, config, best, Path(record["data_path"]), record)
    folder.mirror()  # storage gets the new export too
    return final
