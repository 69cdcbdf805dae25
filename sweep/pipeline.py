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
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

import optuna.distributions as od
import pyarrow.fs as pafs
import ray
from pyarrow import ArrowException

from lora_sweep.config import ConfigError, SweepConfig, config_to_yaml, cut, load_config, shown, shown_path
from lora_sweep.confirm import ConfirmRun, confirm_plan, confirm_runs, with_seed_metrics, write_confirm_runs
from lora_sweep.data import TokenizedData, save_prepared
from lora_sweep.disk import prune_checkpoints
from lora_sweep.driver import budget_spent, check_study, run_confirmation, run_sweep
from lora_sweep.export import FinalReport, finalize
from lora_sweep.folder import CONFIG_FILE, DATA_DIR, MARKER_FILE, PROVENANCE_FILE, STUDY_FILE
from lora_sweep.preflight import local_model_missing, preflight
from lora_sweep.progress import SweepState, live_progress, mark_state
from lora_sweep.provenance import provenance
from lora_sweep.results import (TrialRecord, promote, read_best, read_json, read_leaderboard, require_sweep_folder,
                           sweep_folder, trial_record, write_atomically, write_best, write_leaderboard)
from lora_sweep.safety import (check_state_files_are_ours, clear_sweep_folder, driver_lock, holds_anything,
                               is_sweep_folder, mark_stored_sweep_folder, mark_sweep_folder, stored_sweep_id, sweep_id)
from lora_sweep.search_space import apply_params
from lora_sweep.signals import SweepInterrupted
from lora_sweep.storage import Storage, SweepFolder, fetch_sweep_folder, open_storage, storage_of_uri
from lora_sweep.testing import faults
from lora_sweep.trackers import log_promoted_model
from lora_sweep.warm_start import warm_start_points

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    sweep_dir: Path
    records: list[TrialRecord]
    final: FinalReport


def warm_start_seeds(config: SweepConfig, space: dict[str, od.BaseDistribution]) -> list[dict[str, Any]]:
    """The earlier sweep's configs this one runs first (read once: what is logged is what is enqueued)."""
    warm = warm_start_points(config, space)
    earlier = config.search.warm_start.sweep if config.search.warm_start else None
    for source in warm.sources:
        log.info("warm start: trial %s of %s runs first", source, earlier)
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
                 "(or --resume), " if local_taken or storage is None else f"storage already holds a sweep at {storage.path()}; ")
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
    record["data_format"], record["template"] = tokenized.format, tokenized.template  # `auto` and unset resolved
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


def resume_from_storage(uri: str, local: Optional[Path] = None, live: bool = False) -> SweepOutcome:
    """Continue a sweep from its storage alone (`sweep resume s3://bucket/prefix/NAME`), on a machine with nothing
    of it: its folder is fetched into `local` (default: the config's output_dir when relative, else results/,
    then the sweep's name) and resumed there; Tune restores the trials from storage."""
    storage = storage_of_uri(uri)
    config_path = storage.path(CONFIG_FILE)
    if stored_sweep_id(storage.filesystem, storage.root) is None or not _stored_file(storage, CONFIG_FILE):
        raise ConfigError([f"{storage.uri} is not a sweep's storage folder (no {MARKER_FILE} and {CONFIG_FILE} "
                           "there); give <storage>/<name> as the sweep wrote it"], "resume")
    with tempfile.TemporaryDirectory(prefix="lora-sweep-config-") as scratch:
        pafs.copy_files(config_path, f"{scratch}/{CONFIG_FILE}", source_filesystem=storage.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        stored = load_config(Path(scratch) / CONFIG_FILE)
    # Compared as paths (bucket/prefix/name): opening the config's URI could need its endpoint, given in its query.
    written = urlsplit(stored.storage) if stored.storage else None
    expected = f"{written.netloc}{written.path}".rstrip("/") + f"/{stored.name}" if written else None
    if expected is None or expected.lstrip("/") != storage.root.lstrip("/"):
        raise ConfigError([f"{storage.uri} holds a sweep whose `storage` is {stored.storage!r} and name "
                           f"{stored.name!r}; give <storage>/<name> as its config says"], "resume")
    if local is None:
        parent = Path(stored.output_dir) if not Path(stored.output_dir).is_absolute() else Path("results")
        local = parent / stored.name
    local = Path(local)
    if local.exists() and any(local.iterdir()):
        raise ConfigError([f"{local} already exists; resume that folder with `sweep resume {local}`, or move it away "
                           f"to resume {storage.uri} from storage"], "resume")
    if local.exists():
        local.rmdir()  # empty: the fetch makes it
    fetch_sweep_folder(storage, local)
    provenance_file = local / PROVENANCE_FILE
    if provenance_file.is_file():  # the prepared data is the copy fetched here now, not the old machine's
        record = read_json(provenance_file, "delete it: the resume then prepares the data again and rewrites it")
        record["data_path"] = str((local / DATA_DIR / Path(str(record.get("data_path", ""))).name).resolve())
        write_atomically(provenance_file, json.dumps(record, indent=2))
    log.info("fetched %s into %s; resuming it there", storage.uri, local)
    return resume(local, live=live)


def _stored_file(storage: Storage, name: str) -> bool:
    return bool(storage.filesystem.get_file_info(storage.path(name)).type == pafs.FileType.File)


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
    log_to_trackers(config, sweep_dir, final)
    # The confirm runs' checkpoints compete for `checkpoints.keep` with the trials' (a luckier seed's adapter).
    pruned = prune_checkpoints(records + [run.record for run in runs], best, config, folder)
    records, kept = pruned[:len(records)], pruned[len(records):]
    write_leaderboard(records, sweep_dir, config)
    if runs:
        write_confirm_runs([replace(run, record=r) for run, r in zip(runs, kept, strict=True)], sweep_dir, config)
    return SweepOutcome(sweep_dir, records, final)


def log_to_trackers(config: SweepConfig, sweep_dir: Path, final: FinalReport) -> None:
    """The promoted model to MLflow (logged and registered), when it is a tracker. A tracker that fails here is
    a warning: the export it would record is complete and verified in the sweep folder."""
    try:
        version = log_promoted_model(config, sweep_dir, sweep_id(sweep_dir) or config.name, final)
    except Exception as error:  # noqa: BLE001 - any tracker failure; the export stands
        log.warning("could not log the promoted model to MLflow (%s); the export in %s is complete", cut(
            (str(error).strip().splitlines() or [type(error).__name__])[0], 200), sweep_dir)
        return
    if version is not None:
        log.info("MLflow: the promoted model is version %s of %s", version, config.mlflow.model_name or config.name)


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
    assert confirm is not None, "confirm_plan plans runs only for promotion.confirm"
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
    log_to_trackers(config, folder.local, final)
    folder.mirror()  # storage gets the new export too
    return final
