"""What the engine may touch: sweep folders it made, one driver per folder, state files the user owns.

- A sweep folder the engine creates holds a marker file (`MARKER_FILE`), locally and in storage.
  `--overwrite` (and `sweep demo`) delete only a folder with that marker: a mistyped `output_dir`
  or `name` can never delete a user's own folder.
- A driver holds `LOCK_FILE` in the sweep folder for its lifetime (an exclusive `flock`, released by
  the kernel when the process dies, plus the host and PID for messages), so a second `run --resume`,
  `resume`, `--overwrite` or `export` on a live sweep is refused. Read-only commands take no lock.
- On resume Ray Tune unpickles its own state files, which runs code: a local folder whose state files
  another user owns (or anyone may write) is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from lora_sweep.config import ConfigError
from lora_sweep.folder import CONFIRM_DIR_NAME, LOCK_FILE, MARKER_FILE, TUNE_DIR_NAME


_MARKER_CONTENT = {"created_by": "lora-sweep", "what": "a sweep folder; `sweep run --overwrite` may replace it"}


def _marker(text: str) -> Optional[dict[str, Any]]:
    """The marker's content, or None when the text is not a marker the engine wrote."""
    try:
        content = json.loads(text)
    except ValueError:
        return None
    ours = isinstance(content, dict) and content.get("created_by") == _MARKER_CONTENT["created_by"]
    return content if ours else None


def sweep_id(folder: Path) -> Optional[str]:
    """The id the engine wrote in a local sweep folder's marker; None when the folder is not one it made."""
    marker = Path(folder) / MARKER_FILE
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        content = _marker(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return str(content.get("sweep_id", "")) if content is not None else None


def is_sweep_folder(folder: Path) -> bool:
    """Whether the engine created this local folder as a sweep folder (its marker is there)."""
    return sweep_id(folder) is not None


def mark_sweep_folder(folder: Path, name: str) -> str:
    """Write the marker of a new sweep folder, with a new sweep id (the same id marks its storage)."""
    new_id = uuid.uuid4().hex
    (Path(folder) / MARKER_FILE).write_text(json.dumps(
        {**_MARKER_CONTENT, "name": name, "sweep_id": new_id, "created_at": time.time()}), encoding="utf-8")
    return new_id


def stored_sweep_id(filesystem: pafs.FileSystem, root: str) -> Optional[str]:
    """The id in a storage folder's marker; None when the engine did not make that folder."""
    try:
        with filesystem.open_input_stream(f"{root}/{MARKER_FILE}") as handle:
            content = _marker(handle.read(4096).decode("utf-8", errors="replace"))
    except (OSError, pa.ArrowException):
        return None
    return str(content.get("sweep_id", "")) if content is not None else None


def mark_stored_sweep_folder(filesystem: pafs.FileSystem, root: str, name: str, new_id: str) -> None:
    filesystem.create_dir(root, recursive=True)
    with filesystem.open_output_stream(f"{root}/{MARKER_FILE}") as handle:
        handle.write(json.dumps({**_MARKER_CONTENT, "name": name, "sweep_id": new_id,
                                 "created_at": time.time()}).encode("utf-8"))


def nested_sweep_folders(folder: Path) -> list[Path]:
    """Sweep folders inside this one (another sweep whose `output_dir` lies in it): never deleted with it."""
    return sorted(marker.parent for marker in Path(folder).rglob(MARKER_FILE) if marker.parent != Path(folder))


def holds_anything(folder: Path) -> bool:
    """Whether a folder holds more than the engine's own marker and lock (a folder made and then left before
    anything was written holds nothing to keep or resume)."""
    folder = Path(folder)
    return folder.is_dir() and any(entry.name not in (MARKER_FILE, LOCK_FILE) for entry in folder.iterdir())


def clear_sweep_folder(folder: Path) -> None:
    """Delete what a marked sweep folder holds, except the lock of the driver that is replacing it."""
    if not is_sweep_folder(folder):  # checked again right before deleting: the one place that deletes
        raise ConfigError([f"`name`: {folder} was not created by lora-sweep (no {MARKER_FILE} in it); "
                           "nothing was deleted"], "output")
    nested = nested_sweep_folders(folder)
    if nested:
        raise ConfigError([f"`name`: {folder} holds another sweep's folder ({nested[0]}): --overwrite would delete "
                           "it too; nothing was deleted: move that sweep out first"], "output")
    for entry in Path(folder).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _describe_holder(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {since}"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def driver_lock(folder: Path, command: str = "this command") -> Iterator[None]:
    """Hold the sweep folder's driver lock for the block; refuse (ConfigError) if a live driver holds it.

    The kernel's `flock` decides on this host (a killed driver's lock is free at once). A lock recorded by
    another host cannot be checked from here: it is refused, saying how to clear it if that driver is gone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError([f"another driver is running this sweep ({_describe_holder(holder)}): {command} would "
                               f"race it; wait for it to end or stop it (`sweep status {folder}` shows it); "
                               "status, best and report work meanwhile"], str(folder)) from None
        holder = _read_holder(fd)  # what the last holder left, now that no one holds it here
        if holder and holder.get("host") != socket.gethostname():
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise ConfigError([f"the sweep is locked by a driver on another host ({_describe_holder(holder)}), which "
                               f"cannot be checked from here; if that driver is gone, delete {path} and run again"],
                              str(folder))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                                  "command": command}).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock is a free one, also for a driver on another host
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        content = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return content if isinstance(content, dict) else {}


def lock_holder(folder: Path) -> Optional[dict[str, Any]]:
    """The live driver recorded in a sweep folder's lock on this host, if any (for messages and tests)."""
    try:
        holder = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return None
    if not holder or not isinstance(holder, dict):  # empty, or not the object the lock writes
        return None
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
        return None
    return holder


# Ray Tune's state files that a resume unpickles: its snapshot (the newest file of each kind, by name, is the one
# read) and any pickle under tune/ (tuner.pkl, trials' error.pkl).
TUNE_SNAPSHOT_PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
_UNPICKLED_SUFFIXES = (".pkl", ".pickle")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def write_access_problem(path: Path) -> Optional[str]:
    """Why someone other than this user could have written `path` (None when only this user could)."""
    info = path.lstat()
    me = os.geteuid()
    if info.st_uid != me:
        return f"{path} is owned by {_owner(info.st_uid)}, not by you ({_owner(me)})"
    if info.st_mode & 0o022:
        return f"{path} can be written by {'any user' if info.st_mode & 0o002 else 'its group'}"
    return None


def check_state_files_are_ours(sweep_dir: Path) -> None:
    """Before a resume (and again right before Tune restores): every file Ray Tune will unpickle, and every
    folder above it up to the sweep folder, is owned by this user and writable by no one else."""
    sweep_dir = Path(sweep_dir)
    experiments = [sweep_dir / TUNE_DIR_NAME, sweep_dir / CONFIRM_DIR_NAME]
    prefixes = tuple(pattern[:pattern.index("-*")] for pattern in TUNE_SNAPSHOT_PATTERNS)
    candidates = [p for experiment in experiments if experiment.is_dir() for p in experiment.rglob("*")
                  if p.name.endswith(_UNPICKLED_SUFFIXES) or p.name.startswith(prefixes)]
    folders = {sweep_dir, *experiments, *(p.parent for p in candidates)}
    problems = []
    for path in [*sorted(folders), *candidates]:
        try:
            problem = write_access_problem(path)
        except FileNotFoundError:
            continue
        if problem:
            problems.append(problem)
        if len(problems) >= 2:
            break
    if problems:
        raise ConfigError([f"{problem}: resuming unpickles Ray Tune's state files, which runs their code; resume only "
                           "sweep folders that you alone can write (chmod go-w)" for problem in problems], str(sweep_dir))


def recover_truncated_tune_snapshot(tune_dir: Path, ray_temp: Path) -> list[str]:
    """Put back a complete copy of a Tune snapshot file that a killed driver left empty; the names recovered.

    Tune writes its snapshot atomically to a staging folder in Ray's temp folder, then copies it into the sweep
    folder with a plain copy: a driver killed during that copy leaves an empty file, and Tune, unable to read
    it, starts the experiment over instead of resuming it (every trial again). The staging copy of the dead
    driver's session is still complete on this machine unless the temp folder was cleared. Without one, the
    resume is refused (ConfigError) rather than started over.
    """
    recovered = []
    for pattern in TUNE_SNAPSHOT_PATTERNS:
        files = sorted(tune_dir.glob(pattern))
        if not files or files[-1].stat().st_size > 0:
            continue
        broken = files[-1]
        copies = [path for path in ray_temp.glob(f"session_*/artifacts/*/{tune_dir.name}/driver_artifacts/{broken.name}")
                  if _trusted_copy(path)]
        if not copies:
            raise ConfigError([f"{broken} is empty: the driver was killed while Ray Tune copied its state, and no "
                               f"complete copy is left in {ray_temp}; a resume would start every trial over, so it "
                               "is refused (the finished trials' results stay in the folder)"], str(tune_dir.parent))
        newest = max(copies, key=lambda path: path.stat().st_mtime)
        partial = broken.with_name(f".{broken.name}.recovering")
        shutil.copyfile(newest, partial)
        os.replace(partial, broken)
        recovered.append(broken.name)
    return recovered


def _trusted_copy(path: Path) -> bool:
    """A staging copy that is complete and that no one but this user could have written (it will be unpickled)."""
    try:
        return path.stat().st_size > 0 and write_access_problem(path) is None and write_access_problem(path.parent) is None
    except OSError:
        return False


def fill_in_deleted_checkpoints(filesystem: Optional[pafs.FileSystem], experiment: str) -> list[str]:
    """Give each unfinished trial the checkpoint Tune's saved state names, when a killed driver left that state
    naming one already deleted; the paths filled in.

    Tune deletes a trial's checkpoints beyond `checkpoints.keep` at once, but copies its experiment state to the
    sweep's folder (or storage) in the background: a driver killed while that copy lags behind leaves a state
    whose trial resumes from a checkpoint that is gone, and Tune then fails the trial ("Could not recover from
    checkpoint as it does not exist on storage anymore"). The trial's newer checkpoint is still there (Tune wrote
    it before it deleted the older one): it is copied under the name the state holds, and the trial goes on from
    there, later than the state knows, never from the start. Only trials that had not ended are looked at.
    """
    fs = filesystem or pafs.LocalFileSystem()
    try:
        listing = fs.get_file_info(pafs.FileSelector(experiment))
    except (OSError, pa.ArrowException):
        return []
    states = sorted(info.path for info in listing
                    if info.base_name.startswith("experiment_state-") and info.base_name.endswith(".json"))
    if not states:
        return []
    try:
        with fs.open_input_stream(states[-1]) as stream:
            trial_data = json.loads(stream.read())["trial_data"]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return []  # Tune reports a state it cannot read itself
    filled = []
    for trial_state, run_state in trial_data:
        trial = json.loads(trial_state) if isinstance(trial_state, str) else trial_state
        run = json.loads(run_state) if isinstance(run_state, str) else run_state
        name = (run.get("last_result") or {}).get("checkpoint_dir_name")
        if trial.get("status") in ("TERMINATED", "ERROR") or not name or not trial.get("relative_logdir"):
            continue
        trial_dir = f"{experiment}/{trial['relative_logdir']}"
        wanted = f"{trial_dir}/{name}"
        if fs.get_file_info(wanted).type != pafs.FileType.NotFound:
            continue
        newer = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
                       if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
                       and info.base_name > name)
        if newer:
            fs.create_dir(wanted, recursive=True)  # a local copy needs the folder made first
            pafs.copy_files(newer[-1], wanted, source_filesystem=fs, destination_filesystem=fs)
            filled.append(wanted)
    return filled
