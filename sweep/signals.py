"""SIGTERM stops a sweep the way one Ctrl-C does.

Slurm, Kubernetes and `timeout` send SIGTERM first (then SIGKILL after a grace period). The driver
forwards it to whatever handles Ctrl-C at that moment: Ray Tune's handler while trials run (Tune
stops them, saves its experiment state and returns), Python's KeyboardInterrupt otherwise (data
preparation, export). Either way the sweep folder is left resumable and the CLI exits with
`TERMINATED_EXIT_CODE` (128 + 15, what a shell reports for a process ended by SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

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
