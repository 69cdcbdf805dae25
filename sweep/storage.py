"""A sweep's storage URI: where trials keep their checkpoints and the sweep folder is mirrored.

With `storage: s3://bucket/prefix` (or gs://, or any URI pyarrow's filesystems
open), Ray Tune stores every trial's results and checkpoints at
`<storage>/<name>/tune/` straight from the node that ran it, so a cluster needs
no shared disk. The driver keeps working in the local sweep folder
(`<output_dir>/<name>/`) and copies it to `<storage>/<name>/` when the data is
prepared, when the sweep ends (however it ends) and after `sweep export`; the promoted checkpoint is
fetched from storage for the final evaluation, and trials on a node without the
prepared data fetch it from storage once per node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from lora_sweep.config import ConfigError, SweepConfig, redact_uri
from lora_sweep.folder import CONFIRM_DIR_NAME, DATA_DIR, MARKER_FILE, TUNE_DIR_NAME, WORKERS_DIR

# Tune's per-trial files the driver reads back (report, learning curves); checkpoints stay in storage.
TRIAL_RESULT_FILES = ("result.json", "params.json", "progress.csv")
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")  # a live database's own files: its snapshot is what is copied


@dataclass(frozen=True)
class Storage:
    filesystem: pafs.FileSystem
    root: str  # the sweep folder's path inside `filesystem`
    uri: str  # as the config gives it, with anything secret-looking masked: for messages

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])


def open_storage(config: SweepConfig) -> Optional[Storage]:
    """The sweep's storage, or None when it has none (everything stays in the local sweep folder)."""
    if not config.storage:
        return None
    try:
        filesystem, base = pafs.FileSystem.from_uri(config.storage)
    except (pa.ArrowInvalid, ValueError, OSError) as error:
        reason = _first_line(error).replace(config.storage, redact_uri(config.storage))
        raise ConfigError([f"`storage`: cannot open {redact_uri(config.storage)!r}: {reason}"], "output") from None
    return Storage(filesystem, f"{base.rstrip('/')}/{config.name}", redact_uri(config.storage))


@dataclass(frozen=True)
class SweepFolder:
    """One sweep's folder: the local folder the driver works in and its storage, opened once per command.

    As Ray's `StorageContext` does for a run: everything that asks where a sweep's experiments, checkpoints
    and mirrored files are goes through this object; the names of the files in it are in `lora_sweep.folder`.
    """

    local: Path
    storage: Optional[Storage]  # None: no `storage`, everything stays in `local`

    @classmethod
    def of(cls, config: SweepConfig, local: Optional[Path] = None) -> SweepFolder:
        """The folder of `config`'s sweep (at `local` when given: a resumed sweep's folder may have moved)."""
        return cls(Path(local) if local is not None else config.sweep_dir, open_storage(config))

    @property
    def filesystem(self) -> pafs.FileSystem:
        """Where the trials' checkpoints are: the storage's filesystem, or the local disk."""
        return self.storage.filesystem if self.storage else pafs.LocalFileSystem()

    def experiment_root(self) -> tuple[str, Optional[pafs.FileSystem]]:
        """Where Tune keeps the sweep's experiments (tune/, confirm/): `<storage>/<name>/`, written straight from
        each node, or the local folder (the filesystem is then None: Tune's own local default)."""
        if self.storage is not None:
            return self.storage.root, self.storage.filesystem
        return str(self.local.resolve()), None

    def workers_runs(self) -> tuple[str, Optional[pafs.FileSystem]]:
        """Where the Ray Train runs of running data-parallel trials are kept (WORKERS_DIR), as experiment_root."""
        root, filesystem = self.experiment_root()
        return f"{root}/{WORKERS_DIR}", filesystem

    def remove_workers_runs(self) -> None:
        """The Ray Train runs of data-parallel trials that ended without their own cleanup (a sweep stopped or
        killed while they ran): called when no trial runs; Tune holds their checkpoints."""
        with contextlib.suppress(OSError):  # none there (FileNotFoundError), or storage that cannot delete now
            self.filesystem.delete_dir(self.workers_runs()[0])

    def experiment_path(self, name: str) -> str:
        """An experiment's folder (TUNE_DIR_NAME, CONFIRM_DIR_NAME) as `filesystem` spells its paths."""
        return self.storage.path(name) if self.storage else str((self.local / name).resolve())

    def prepared_data_in_storage(self, data_path: Path) -> Optional[str]:
        """Where nodes that do not see the driver's disk fetch the prepared data from (None without storage)."""
        return self.storage.path(DATA_DIR, Path(data_path).name) if self.storage else None

    def where(self) -> str:
        """` in <storage uri>` for messages about a path in storage, else nothing."""
        return f" in {self.storage.uri}" if self.storage else ""

    def mirror(self, records_only: bool = False) -> None:
        """The local folder copied to storage (`mirror_to_storage`); nothing without storage."""
        if self.storage is not None:
            mirror_to_storage(self.local, self.storage, records_only)

    def fetch_trial_results(self) -> None:
        """Tune's per-trial result files from storage into the local folder; nothing without storage."""
        if self.storage is not None:
            fetch_trial_results(self.storage, self.local)

    def local_checkpoint(self, path: str) -> contextlib.AbstractContextManager[Path]:
        """A checkpoint of this sweep on the local disk (a temporary copy when it is in storage)."""
        return local_checkpoint(path, self.storage)

    def stored_files(self) -> bool:
        """Whether the sweep's folder in storage holds anything (False without storage)."""
        return self.storage is not None and holds_files(self.storage)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_storage(config: SweepConfig) -> None:
    """Before anything runs: the storage opens, and a file can be written there and deleted again."""
    storage = open_storage(config)
    if storage is None:
        return
    probe = storage.path(f".lora-sweep-probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.filesystem.create_dir(storage.root, recursive=True)
        with storage.filesystem.open_output_stream(probe) as handle:
            handle.write(b"lora-sweep can write here")
        storage.filesystem.delete_file(probe)
    except (OSError, pa.ArrowException) as error:
        raise ConfigError([f"`storage`: cannot write to {storage.uri} ({storage.root}): {_first_line(error)}"],
                          "output") from None


def _exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return bool(filesystem.get_file_info(path).type != pafs.FileType.NotFound)


def holds_files(storage: Storage) -> bool:
    """Whether the sweep's folder in storage has anything in it."""
    if not is_directory(storage.filesystem, storage.root):
        return False
    entries = storage.filesystem.get_file_info(pafs.FileSelector(storage.root, allow_not_found=True))
    return any(entry.base_name != MARKER_FILE for entry in entries)  # the engine's marker alone holds nothing


def is_directory(filesystem: pafs.FileSystem, path: str) -> bool:
    return bool(filesystem.get_file_info(path).type == pafs.FileType.Directory)


def tree_bytes(filesystem: pafs.FileSystem, path: str) -> int:
    """Bytes of every file under `path` (0 when it is not there)."""
    if not is_directory(filesystem, path):
        return 0
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(info.size or 0 for info in infos if info.type == pafs.FileType.File)


def mirror_to_storage(sweep_dir: Path, storage: Storage, records_only: bool = False) -> None:
    """Copy the local sweep folder to storage: everything but Tune's folders (Tune stores those itself) and
    hidden staging folders. Prepared data (data/<hash>/, content-hashed) is copied once; other folders
    (export/, tensorboard/, report/) replace what storage had, so a re-export leaves no stale files.
    `records_only`: the driver's files alone (status, study, config, provenance, ...), not its folders: what a
    running sweep copies at every trial's start and end, so that another machine can continue it.
    The Optuna study is copied from a consistent snapshot (SQLite's online backup): the driver may be writing it."""
    for entry in sorted(Path(sweep_dir).iterdir()):
        if entry.name in (TUNE_DIR_NAME, CONFIRM_DIR_NAME) or entry.name.startswith("."):
            continue
        if entry.name.endswith(SQLITE_SIDE_FILES) or (records_only and entry.is_dir()):
            continue
        if entry.name.endswith(".db") and entry.is_file():
            _upload_database(entry, storage, storage.path(entry.name))
            continue
        if entry.name == DATA_DIR and entry.is_dir():
            for prepared in sorted(entry.iterdir()):
                if not prepared.name.startswith(".") and not _exists(storage.filesystem, storage.path(DATA_DIR, prepared.name)):
                    _upload(prepared, storage, storage.path("data", prepared.name))
            continue
        _upload(entry, storage, storage.path(entry.name))


def _upload_database(local: Path, storage: Storage, target: str) -> None:
    """A SQLite file as one consistent snapshot (the online backup API), written to storage whole."""
    with tempfile.TemporaryDirectory(prefix="lora-sweep-db-") as scratch:
        snapshot = Path(scratch) / local.name
        source = sqlite3.connect(f"file:{local.resolve()}?mode=ro", uri=True, timeout=60)
        try:
            destination = sqlite3.connect(snapshot)
            with destination:
                source.backup(destination)
            destination.close()
        finally:
            source.close()
        with storage.filesystem.open_output_stream(target) as handle:  # S3: the object appears whole at the end
            handle.write(snapshot.read_bytes())


def fetch_sweep_folder(storage: Storage, local: Path) -> None:
    """A sweep folder from storage alone, into `local` (which must not exist): everything but Tune's experiment
    folders, which Tune restores from storage itself. For `sweep resume <uri>` on a machine with nothing local."""
    local.mkdir(parents=True)
    for info in storage.filesystem.get_file_info(pafs.FileSelector(storage.root, recursive=True)):
        relative = info.path[len(storage.root) + 1:]
        if info.type != pafs.FileType.File or relative.split("/")[0] in (TUNE_DIR_NAME, CONFIRM_DIR_NAME):
            continue
        target = local / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(target), source_filesystem=storage.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())


def storage_of_uri(uri: str) -> Storage:
    """The storage of a sweep named by its URI (`<storage>/<name>`, as `sweep resume` and `sweep status` take it)."""
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError, OSError) as error:
        reason = _first_line(error).replace(uri, redact_uri(uri))
        raise ConfigError([f"cannot open {redact_uri(uri)!r}: {reason}"], "storage") from None
    return Storage(filesystem, path.rstrip("/"), redact_uri(uri))


def _upload(local: Path, storage: Storage, target: str) -> None:
    if local.is_dir():
        if _exists(storage.filesystem, target):
            storage.filesystem.delete_dir(target)
        storage.filesystem.create_dir(target, recursive=True)
    pafs.copy_files(str(local.resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=storage.filesystem)


def fetch_trial_results(storage: Storage, sweep_dir: Path) -> None:
    """Tune's per-trial result files from storage into the local sweep folder's tune/ (no checkpoints)."""
    tune_root = storage.path(TUNE_DIR_NAME)
    if not is_directory(storage.filesystem, tune_root):
        return
    for info in storage.filesystem.get_file_info(pafs.FileSelector(tune_root, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name in TRIAL_RESULT_FILES:
            relative = info.path[len(tune_root) + 1:]
            if "/checkpoint_" in f"/{relative}":
                continue
            target = Path(sweep_dir) / TUNE_DIR_NAME / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(target), source_filesystem=storage.filesystem,
                            destination_filesystem=pafs.LocalFileSystem())


@contextlib.contextmanager
def local_checkpoint(path: str, storage: Optional[Storage]) -> Iterator[Path]:
    """A checkpoint folder on the local disk: the path itself without storage, else a temporary copy."""
    if storage is None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="lora-sweep-checkpoint-") as scratch:
        pafs.copy_files(path, scratch, source_filesystem=storage.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        yield Path(scratch)


def local_prepared_data(data_path: str, data_in_storage: Optional[str], storage_uri: Optional[str]) -> str:
    """The prepared data on this node: the driver's folder when this node sees it (one machine, a shared
    disk), else a copy fetched from `data_in_storage` (in the sweep's storage) once per node and reused
    by its later trials."""
    if Path(data_path).is_dir() or not data_in_storage or not storage_uri:
        return data_path
    filesystem = pafs.FileSystem.from_uri(storage_uri)[0]
    cache = Path(tempfile.gettempdir()) / "lora-sweep-data" / Path(data_path).name
    if not cache.is_dir():
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        pafs.copy_files(data_in_storage, str(partial), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        try:
            partial.rename(cache)  # atomic: a trial beside this one may have fetched it first
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            if not cache.is_dir():
                raise
    return str(cache)
