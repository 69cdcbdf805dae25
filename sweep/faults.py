"""Fault injection for tests of the engine's failure handling; inert unless its variables are set.

Failure handling that is never exercised does not work, so the tests make real
faults happen inside real trials and at real points of the driver:

- `LORA_SWEEP_INJECT_FAULT=KIND@STEP` makes every trial fail when it reaches
  optimizer step STEP. KIND is `exception`, `oom` (torch.OutOfMemoryError) or
  `nan` (the trainable weights become NaN, so the loss does too). With `LORA_SWEEP_FAULT_ONCE_DIR=DIR`
  each trial fails only once (a transient fault): a marker file per trial in DIR
  records that it already failed.
- `LORA_SWEEP_STALL_AT=POINT` makes the driver stop at POINT (one of
  `STALL_POINTS`), write `<sweep folder>/.stalled-at-POINT` and sleep, so a test
  can kill it there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

STALL_POINTS = ("data_preparation", "between_trials", "export")
FAULT_KINDS = ("exception", "oom", "nan")


class InjectedFault(RuntimeError):
    pass


def stall_if_asked(point: str, sweep_dir: Path) -> None:
    if os.environ.get("LORA_SWEEP_STALL_AT") != point:
        return
    (sweep_dir / f".stalled-at-{point}").write_text(str(os.getpid()))
    while True:  # until the test kills this process
        time.sleep(1)


def planned_fault() -> Optional[tuple[str, int]]:
    spec = os.environ.get("LORA_SWEEP_INJECT_FAULT")
    if not spec:
        return None
    kind, _, step = spec.partition("@")
    if kind not in FAULT_KINDS or not step.isdigit():
        raise ValueError(f"LORA_SWEEP_INJECT_FAULT must look like KIND@STEP with KIND in {FAULT_KINDS}, but got {spec!r}")
    return kind, int(step)


def fault_due(trial_key: str, step: int) -> Optional[str]:
    """The kind of fault to raise at this step of this trial, if any (and record it when transient)."""
    plan = planned_fault()
    if plan is None or plan[1] != step:
        return None
    once_dir = os.environ.get("LORA_SWEEP_FAULT_ONCE_DIR")
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

