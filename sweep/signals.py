"""SIGTERM stops a sweep the way one Ctrl-C does.

Slurm, Kubernetes and `timeout` send SIGTERM first (then SIGKILL after a grace period). The driver
forwards it to whatever handles Ctrl-C at that moment: Ray Tune's handler while trials run (Tune
stops them, saves its experiment state and returns), Python's KeyboardInterrupt otherwise (data
preparation, export). Either way the sweep folder is left resumable and the CLI exits with
`TERMINATED_EXIT_CODE` (128 + 15, what a shell reports for a process ended by SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Iterator, Optional

TERMINATED_EXIT_CODE = 143
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (SIGINT): 128 + 2
_received: set[int] = set()


def _forward_to_ctrl_c_handler(signum: int, frame: Optional[FrameType]) -> None:
    _received.add(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIG_IGN or SIG_DFL: still stop, as a Ctrl-C would by default
        raise KeyboardInterrupt


def stop_on_sigterm_like_ctrl_c() -> None:
    """Install the forwarding handler (the main thread only can; `ray.init` replaces it, so call it after)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _forward_to_ctrl_c_handler)


def stop_exit_code() -> int:
    """The exit code of a sweep that stopped on a signal: 143 after a SIGTERM, 130 after Ctrl-C."""
    return TERMINATED_EXIT_CODE if signal.SIGTERM in _received else INTERRUPTED_EXIT_CODE


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """Around code that installs its own SIGTERM handler (`ray.init`, whose handler calls sys.exit(15)):
    such an exit becomes a stop (KeyboardInterrupt, exit 143), and the forwarding handler is put back."""
    try:
        yield
    except SystemExit as exit_:
        if exit_.code != signal.SIGTERM:
            raise
        _received.add(signal.SIGTERM)
        raise KeyboardInterrupt from None
    finally:
        stop_on_sigterm_like_ctrl_c()


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (Ctrl-C, SIGTERM); its state is saved for `sweep resume`."""


@dataclass
class TuneStop:
    """Whether Ray Tune was stopped by a signal during the block (known once the block ends)."""

    interrupted: bool = False


@contextlib.contextmanager
def ctrl_c_handler_kept() -> Iterator[TuneStop]:
    """Around `Tuner.fit()`: tells whether a Ctrl-C or SIGTERM stopped Tune, and puts the handlers back.

    Tune installs its own Ctrl-C handler for the fit; on a signal that handler ends the fit and puts the
    previous handler back, and it returns normally with the running trials marked as ended in memory
    (its saved state still has them running). So a handler found put back means a stop. Tune leaves its
    handler in place after a normal end, where it would only note a stop that nothing reads: the previous
    one is put back, so a Ctrl-C or SIGTERM during promotion and export stops the sweep at once.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if in_main_thread else None
    usr1 = signal.getsignal(signal.SIGUSR1) if in_main_thread and hasattr(signal, "SIGUSR1") else None
    tune_handles_ctrl_c = in_main_thread and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0)
    stop = TuneStop()
    try:
        yield stop
    finally:
        if in_main_thread:
            stop.interrupted = tune_handles_ctrl_c and signal.getsignal(signal.SIGINT) is before
            if before is not None:
                signal.signal(signal.SIGINT, before)
            if usr1 is not None:
                signal.signal(signal.SIGUSR1, usr1)
