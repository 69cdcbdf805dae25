"""What runs inside one trial, as a small class behind a recipe interface, and the entry points Ray Tune calls.

As torchtune's recipes do (`setup / train / cleanup`): a `Recipe` builds everything it needs from the trial's
config in `setup`, trains in `train` (reporting every evaluation with a checkpoint through its `Reporter`, and
resuming from `reporter.restored_checkpoint()`), and gives back what it borrowed in `cleanup`, which runs however
the trial ends (an ASHA stop ends it inside a report). The config's `trainable` names the recipe; the ones shipped
are in `lora_sweep.trainables`. Reporting sits behind `Reporter`, so the same code runs under Ray Tune and in a
plain unit test.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterator, Optional, Protocol

from transformers import set_seed

from lora_sweep.config import SweepConfig
from lora_sweep.search_space import apply_params
from lora_sweep.storage import local_prepared_data
from lora_sweep.trial_report import NODE_ID


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...

    def restored_checkpoint(self) -> ContextManager[Optional[Path]]:
        """The checkpoint a restarted trial resumes from (None for a fresh trial), valid inside the block."""
        ...


class TuneReporter:
    """Reports to Ray Tune; the checkpoint folder is copied to the sweep's storage by Tune."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        import ray
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # Which Ray node ran the trial: on a cluster, the first thing to know about a slow or failed one.
        tune.report({**metrics, NODE_ID: ray.get_runtime_context().get_node_id()}, checkpoint=checkpoint)

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)


@dataclass
class ListReporter:
    """Keeps every report in memory (tests, and single runs outside Tune)."""

    reports: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_files: list[list[str]] = field(default_factory=list)  # checkpoints are temporary: keep a listing
    keep_checkpoints_in: Optional[Path] = None  # copy each checkpoint here (as step-N/) when set
    resume_from: Optional[Path] = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        self.reports.append(dict(metrics))
        self.checkpoint_files.append(sorted(os.listdir(checkpoint_dir)) if checkpoint_dir else [])
        if checkpoint_dir and self.keep_checkpoints_in:
            shutil.copytree(checkpoint_dir, self.keep_checkpoints_in / f"step-{metrics['step']}")

    @contextlib.contextmanager
    def restored_checkpoint(self) -> Iterator[Optional[Path]]:
        yield self.resume_from


@dataclass
class TrialOutcome:
    """How a trial ended when it ran to its own end (an ASHA stop ends it inside `report`)."""

    steps: int
    diverged_reason: Optional[str]
    best_metric: Optional[float]


class Recipe(abc.ABC):
    """One trial's training: built from the trial's config (the sweep's config with the trial's params applied)."""

    name: ClassVar[str]  # what the config's `trainable` says to pick this recipe

    def __init__(self, config: SweepConfig, params: dict[str, Any], data_path: str, reporter: Reporter,
                 started: float):
        self.config = config
        self.params = params  # the trial's own params (its key for the test hooks)
        self.data_path = data_path  # the prepared data (lora_sweep.data.save_prepared) on this node
        self.reporter = reporter
        self.started = started  # perf_counter at the trial's start: its start-up time is reported

    @abc.abstractmethod
    def setup(self) -> None:
        """Load the model, the data and everything `train` needs."""

    @abc.abstractmethod
    def train(self) -> TrialOutcome:
        """Train to `training.max_steps` (or until a report ends the trial), reporting every evaluation."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Give back what `setup` borrowed (a kept base model); runs however the trial ended, after a partial setup too."""


_long_lived_objects_frozen = False


def freeze_long_lived_objects() -> None:
    """Once per worker process: take what is alive now (imported modules, Ray) out of the cyclic GC's scans.

    The Trainer starts every `train()` with a full `gc.collect()` (accelerate's `free_memory`).
    With torch, transformers and peft imported that walks about 430,000 objects: 0.23 s of a
    0.30 s trial start-up, paid by every trial. Frozen objects are still freed by reference
    counting; only reference cycles among them are never collected, and they are imports that
    live as long as the process. Objects made later (each trial's Trainer, LoRA layers, the
    kept base model) are scanned and collected as before.
    """
    global _long_lived_objects_frozen
    if not _long_lived_objects_frozen:
        gc.collect()  # garbage made so far goes now, not into the frozen generation
        gc.freeze()
        _long_lived_objects_frozen = True


def recipe_named(name: str) -> type[Recipe]:
    from lora_sweep.trainables import TRAINABLES  # the shipped recipes import this module for its base class

    return TRAINABLES[name]


def run_trial(params: dict[str, Any], base_config: dict[str, Any], data_path: str, reporter: Reporter) -> TrialOutcome:
    """Run one trial: the config's recipe with the trial's params, reporting every evaluation."""
    started = time.perf_counter()
    freeze_long_lived_objects()
    config = apply_params(SweepConfig.model_validate(base_config), params)
    set_seed(config.seed)
    recipe = recipe_named(config.trainable)(config, params, data_path, reporter, started)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


def tune_trainable(params: dict[str, Any], base_config: dict[str, Any], data_path: str,
                   data_in_storage: Optional[str] = None) -> None:
    """Ray Tune's entry point (bound with `tune.with_parameters`); data-parallel trials have their own
    (lora_sweep.distributed)."""
    data_path = local_prepared_data(data_path, data_in_storage, base_config["storage"])
    run_trial(params, base_config, data_path, TuneReporter())


def confirm_trainable(params: dict[str, Any], base_config: dict[str, Any], data_path: str,
                      data_in_storage: Optional[str] = None) -> None:
    """Ray Tune's entry point for `promotion.confirm`'s runs: `params` is {"run": {"of", "seed", "params"}},
    one of the sweep's configurations trained again with another seed (its initialisation and data order)."""
    run = params["run"]
    tune_trainable(run["params"], {**base_config, "seed": run["seed"]}, data_path, data_in_storage)
