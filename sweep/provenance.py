"""What a results folder records about how it was made: versions, git SHA, seed, data hash."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("lora-sweep", "torch", "transformers", "peft", "ray", "optuna", "datasets", "tensorboard", "accelerate")
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when the package runs from one


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_sha() -> str:
    if not (PROJECT_ROOT / ".git").exists():  # an installed wheel: site-packages may sit inside someone's repository
        return "unknown (an installed package, not a checkout)"
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return f"{out}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(seed: int, data_hash: str, data_counts: dict[str, int]) -> dict[str, Any]:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "data_hash": data_hash,
        "data_counts": data_counts,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
    }
