"""The package as users install it: a wheel with one import name, whose demo runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_the_wheel_installs_only_lora_sweep_and_its_demo_runs_from_any_folder(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("lora_sweep-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"lora_sweep", wheel.name.split("-py")[0] + ".dist-info"}
    for data in ("lora_sweep/examples/demo.yaml", "lora_sweep/examples/data/demo.jsonl",
                 "lora_sweep/examples/tiny-llama/model.safetensors", "lora_sweep/examples/tiny-llama/tokenizer.json",
                 "lora_sweep/search_spaces/lora_default.yaml", "lora_sweep/trainables/lora_causal_lm.py"):
        assert data in names, data
    # Installed apart from the checkout (the test's own environment provides the dependencies), then run
    # from an empty folder that is not the checkout: nothing may come from the repository.
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "LORA_SWEEP_TUNE_VERBOSE": "0"}
    where = subprocess.run([sys.executable, "-c", "import lora_sweep, lora_sweep.trainables; "
                            "print(lora_sweep.__file__); print(lora_sweep.trainables.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and all(line.startswith(str(site)) for line in where.stdout.split()), where
    commands = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=120)
    for command in ("run", "resume", "demo", "plan", "status", "best", "report", "generate", "export"):
        assert f" {command} " in commands.stdout, (command, commands.stdout)
    demo = subprocess.run([sys.executable, "-m", "lora_sweep.cli", "demo", "search.num_trials=2",
                           "training.max_steps=20", "training.eval_steps=10", "scheduler.type=none"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    sweep_dir = elsewhere / "results" / "demo"
    assert (sweep_dir / "export" / "merged" / "model.safetensors").is_file()
    ran = (sweep_dir / "config.yaml").read_text()
    assert str(site / "lora_sweep" / "examples" / "tiny-llama") in ran  # the shipped model, not the checkout's
