"""Shared fixtures: a tiny Llama built from a config and a tiny config that points at it; an S3 server on
loopback; an earlier sweep's folder for warm start."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import Callable
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from lora_sweep.config import config_to_yaml, load_config
from lora_sweep.folder import CONFIG_FILE
from lora_sweep.results import TrialRecord, write_leaderboard
from lora_sweep.search_space import build_search_space
from lora_sweep.testing.tiny_model import build_tiny_llama

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64, seed=0)


@pytest.fixture
def raw_config(tiny_model_dir, tmp_path) -> dict:
    """A small valid config as a dict; tests change it and write it with `write_config`."""
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "results"),
        "seed": 0,
        "model": {"path": str(tiny_model_dir), "dtype": "float32"},
        "data": {"files": [str(ASSETS / "instructions.jsonl")], "max_length": 160},
        "training": {"max_steps": 6, "eval_steps": 3, "batch_size": 4, "eval_batch_size": 16},
        "search": {"space": "lr_only", "num_trials": 2, "max_concurrent_trials": 2},
        "scheduler": {"type": "asha", "grace_period": 3},
        "evaluation": {"max_new_tokens": 4},
        "ray": {"num_cpus": 2},
    }


@pytest.fixture
def write_config(tmp_path):
    def write(raw: dict, name: str = "sweep.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture(scope="session")
def peft_trainable_parameters():
    """What peft itself makes trainable for the config's LoRA settings at a rank: the count to check others by."""
    import peft
    from transformers import AutoModelForCausalLM

    from lora_sweep.config import LoraConfig
    from lora_sweep.lora import lora_settings

    def count(model_path: str, rank: int) -> int:
        base = AutoModelForCausalLM.from_pretrained(model_path)
        model = peft.get_peft_model(base, lora_settings(LoraConfig(rank=rank), base))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    return count


def assert_refused(result, expected: str, before: set[str] | None = None, root: Path | None = None,
                   max_lines: int = 3, max_chars: int = 400) -> None:
    """A clean refusal: exit 2, 1 to `max_lines` lines each starting `error: `, `expected` in the output,
    no traceback, no line longer than `max_chars`, and (given `before`, a listing of `root`) nothing written."""
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if not line.startswith("warning: ")]
    assert 1 <= len(lines) <= max_lines, lines
    assert all(line.startswith("error: ") for line in lines), lines
    assert all(len(line) <= max_chars for line in lines), [len(line) for line in lines]
    assert expected in output, output
    if before is not None and root is not None:
        assert listing(root) == before, "something was written"


def refused_case(command: str, change, expected: str, raw_config: dict, write_config, tmp_path: Path):
    """One row of a bad-input table: `change` the valid config, run `sweep COMMAND` on it, and check a clean
    refusal that wrote nothing and names the config file. Returns the CLI result for further checks."""
    from typer.testing import CliRunner

    from lora_sweep.cli import app

    change(raw_config, tmp_path)
    config_path = write_config(raw_config)
    before = listing(tmp_path)
    result = CliRunner().invoke(app, [command, str(config_path)])
    assert_refused(result, expected, before, tmp_path)
    return result


def listing(root: Path) -> set[str]:
    """Every path under `root`, relative to it (to check that a refused command wrote nothing)."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def wait_until_answering(url: str, what: str, up: tuple[int, ...] = (200,), given_up: Callable[[], bool] = lambda: False,
                         timeout: float = 120.0) -> None:
    """Wait until a server a test started answers `url` with an HTTP status in `up` (RuntimeError naming `what` after
    `timeout` seconds, or at once when `given_up()`: the server's process ended)."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status in up:
                    return
        except urllib.error.HTTPError as refused:
            if refused.code in up:
                return
        except OSError:
            pass
        if given_up() or time.time() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for a server a test starts, or one that must not answer)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Storage: an S3 server on loopback (tests of `storage:`).

@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on loopback with an empty bucket `sweeps`; yields the endpoint URL.

    moto keeps its buckets per process, so each test's server starts by deleting what an earlier one left."""
    moto_server = pytest.importorskip("moto.server")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    filesystem = pafs.S3FileSystem(region="us-east-1", endpoint_override=endpoint, allow_bucket_creation=True,
                                   allow_bucket_deletion=True)
    if filesystem.get_file_info("sweeps").type != pafs.FileType.NotFound:
        filesystem.delete_dir("sweeps")
    filesystem.create_dir("sweeps")
    yield endpoint
    server.stop()


def s3_uri(endpoint: str, bucket: str = "sweeps") -> str:
    return f"s3://{bucket}/team?region=us-east-1&endpoint_override={endpoint}"


def stored_files(storage, under: str = "") -> set[str]:
    """The files under the sweep's folder in storage (or its `under`), relative to it."""
    root = storage.path(under) if under else storage.root
    infos = storage.filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


# Warm start: an earlier sweep's folder, and a sweep seeded from it.

def leaderboard_record(trial_id: str, status: str, metric, **params) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, status=status, params=params, best_metric=metric, best_step=3,
                       steps_run=6, wall_seconds=1.0)


@pytest.fixture
def earlier_sweep(raw_config, write_config, tmp_path):
    """An ended sweep's folder as warm start reads it: its config and its leaderboard (rank was fixed at 4)."""
    raw = {**raw_config, "name": "earlier", "lora": {"rank": 4}}
    raw["search"] = {"space": None, "num_trials": 5, "parameters": {
        "training.learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
        "lora.dropout": {"type": "uniform", "low": 0.0, "high": 0.2}}}
    config = load_config(write_config(raw, "earlier.yaml"))
    folder = tmp_path / "earlier"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(config_to_yaml(config))
    write_leaderboard([
        leaderboard_record("t_far", "completed", 2.0, **{"training.learning_rate": 0.05, "lora.dropout": 0.0}),
        leaderboard_record("t_best", "stopped early", 1.0, **{"training.learning_rate": 3e-3, "lora.dropout": 0.1}),
        leaderboard_record("t_error", "errored", None, **{"training.learning_rate": 1e-3, "lora.dropout": 0.0}),
        leaderboard_record("t_second", "completed", 1.5, **{"training.learning_rate": 1e-3, "lora.dropout": 0.05}),
        leaderboard_record("t_same", "completed", 1.6, **{"training.learning_rate": 1e-3, "lora.dropout": 0.05}),
    ], folder, config)
    return folder


def new_sweep(raw_config, write_config, earlier, top=3, **parameters):
    raw_config["search"] = {"space": None, "num_trials": 4, "warm_start": {"sweep": str(earlier), "top": top},
                            "parameters": parameters or {
                                "training.learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                                "lora.rank": {"type": "choice", "values": [2, 4, 8]}}}
    config = load_config(write_config(raw_config))
    return config, build_search_space(config)
