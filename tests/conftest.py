"""Shared fixtures: a tiny Llama built from a config and a tiny config that points at it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
