"""Fault injection for tests of the engine's failure handling; inert unless armed.

Failure handling that is never exercised does not work, so the tests make real
faults happen inside real trials and at real points of the driver. Every variable
below acts only when `LORA_SWEEP_TEST_HOOKS=armed` is set too, so a stray one in a
user's shell cannot make a sweep sleep forever or fail every trial (it is ignored,
with a warning); armed, a malformed value is refused before anything runs.

- `LORA_SWEEP_INJECT_FAULT=KIND@STEP` makes every trial fail when it reaches
  optimizer step STEP. KIND is `exception`, `oom` (torch.OutOfMemoryError) or
  `nan` (the trainable weights become NaN, so the loss does too). With `LORA_SWEEP_FAULT_ONCE_DIR=DIR`
  each trial fails only once (a transient fault): a marker file per trial in DIR
  records that it already failed.
- `LORA_SWEEP_STALL_AT=POINT` makes the driver stop at POINT (one of
  `STALL_POINTS`), write `<sweep folder>/.stalled-at-POINT` and sleep, so a test
  can kill it there.
- `LORA_SWEEP_TUNE_VERBOSE=0..3` sets Ray Tune's verbosity (default 1).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback
from transformers import TrainerCallback

from lora_sweep.config import ConfigError, shown

STALL_POINTS = ("data_preparation", "between_trials", "export")
FAULT_KINDS = ("exception", "oom", "nan")
ARMING_VARIABLE, ARMED = "LORA_SWEEP_TEST_HOOKS", "armed"
HOOK_VARIABLES = ("LORA_SWEEP_INJECT_FAULT", "LORA_SWEEP_FAULT_ONCE_DIR", "LORA_SWEEP_STALL_AT", "LORA_SWEEP_TUNE_VERBOSE")
log = logging.getLogger(__name__)


def _hook(name: str) -> Optional[str]:
    """A hook variable's value, only when the hooks are armed."""
    if os.environ.get(ARMING_VARIABLE) != ARMED:
        return None
    return os.environ.get(name) or None


def check_test_hooks() -> None:
    """Before anything runs: armed hooks have well-formed values; unarmed ones are named as ignored."""
    arming = os.environ.get(ARMING_VARIABLE) or None  # set but empty counts as unset
    present = [name for name in HOOK_VARIABLES if os.environ.get(name)]
    if arming is not None and arming != ARMED:
        raise ConfigError([f"`{ARMING_VARIABLE}`: must be {ARMED!r} (tests only) or unset, but got {shown(arming)}"],
                          "environment")
    if arming is None:
        if present:
            log.warning("ignored: %s set, but the test hooks act only with %s=%s (tests only)",
                        ", ".join(present), ARMING_VARIABLE, ARMED)
        return
    problems = []
    stall = os.environ.get("LORA_SWEEP_STALL_AT")
    if stall and stall not in STALL_POINTS:
        problems.append(f"`LORA_SWEEP_STALL_AT`: must be one of {', '.join(STALL_POINTS)}, but got {shown(stall)}")
    try:
        planned_fault()
    except ValueError as error:
        problems.append(str(error))
    verbose = os.environ.get("LORA_SWEEP_TUNE_VERBOSE")
    if verbose and verbose not in ("0", "1", "2", "3"):
        problems.append(f"`LORA_SWEEP_TUNE_VERBOSE`: must be 0, 1, 2 or 3, but got {shown(verbose)}")
    once = os.environ.get("LORA_SWEEP_FAULT_ONCE_DIR")
    if once and not Path(once).parent.is_dir():
        problems.append(f"`LORA_SWEEP_FAULT_ONCE_DIR`: the folder above {shown(once)} does not exist")
    if problems:
        raise ConfigError(problems, "environment")


def stall_point() -> Optional[str]:
    return _hook("LORA_SWEEP_STALL_AT")


def tune_verbosity() -> int:
    value = _hook("LORA_SWEEP_TUNE_VERBOSE")
    return int(value) if value in ("0", "1", "2", "3") else 1


class InjectedFault(RuntimeError):
    pass


def stall_if_asked(point: str, sweep_dir: Path) -> None:
    if stall_point() != point:
        return
    (sweep_dir / f".stalled-at-{point}").write_text(str(os.getpid()))
    while True:  # until the test kills this process
        time.sleep(1)


def planned_fault() -> Optional[tuple[str, int]]:
    spec = _hook("LORA_SWEEP_INJECT_FAULT")
    if not spec:
        return None
    kind, _, step = spec.partition("@")
    if kind not in FAULT_KINDS or not step.isdigit():
        raise ValueError(f"`LORA_SWEEP_INJECT_FAULT`: must look like KIND@STEP with KIND one of {', '.join(FAULT_KINDS)}, "
                         f"but got {shown(spec)}")
    return kind, int(step)


def fault_due(trial_key: str, step: int) -> Optional[str]:
    """The kind of fault to raise at this step of this trial, if any (and record it when transient)."""
    plan = planned_fault()
    if plan is None or plan[1] != step:
        return None
    once_dir = _hook("LORA_SWEEP_FAULT_ONCE_DIR")
    if once_dir:
        marker = Path(once_dir) / f"{trial_key}.failed"
        if marker.exists():
            return None
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
    return plan[0]


def raise_fault(kind: str, step: int) -> None:
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at step {step})")
    raise InjectedFault(f"injected failure at step {step}")


class FaultInjector(TrainerCallback):
    """Makes the planned fault happen inside a real trial, at the planned optimizer step."""

    def __init__(self, trial_key: str, model: Any):
        self.trial_key = trial_key
        self.model = model

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        kind = fault_due(self.trial_key, state.global_step)
        if kind == "nan":
            import torch

            with torch.no_grad():
                for parameter in self.model.parameters():
                    if parameter.requires_grad:
                        parameter.fill_(math.nan)
        elif kind is not None:
            raise_fault(kind, state.global_step)


class StallBetweenTrials(Callback):
    """Stops the driver right after a trial ends."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = sweep_dir

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        stall_if_asked("between_trials", self.sweep_dir)


def trainer_callbacks(trial_key: str, model: Any) -> list[TrainerCallback]:
    """The trial's fault injector when a fault is planned; none otherwise."""
    return [FaultInjector(trial_key, model)] if planned_fault() else []


def tune_callbacks(sweep_dir: Path) -> list[Callback]:
    """The driver's stall between trials when asked for; none otherwise."""
    return [StallBetweenTrials(sweep_dir)] if stall_point() == "between_trials" else []
