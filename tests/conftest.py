"""Shared fixtures: a tiny Llama built from a config and a tiny config that points at it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweep.tiny_model import build_tiny_llama

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

    from sweep.config import LoraConfig
    from sweep.lora import lora_settings

    def count(model_path: str, rank: int) -> int:
        base = AutoModelForCausalLM.from_pretrained(model_path)
        model = peft.get_peft_model(base, lora_settings(LoraConfig(rank=rank), base))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    return count
