"""Bad input a user can fix: one error class, one exit status, one printer.

Every such error (a config value, missing data, weights that cannot be read, a run directory that
cannot be continued, a busy run directory, a full disk) subclasses `UserError`. The command-line
tools catch it, print each line of its message as `<tool>: error: <line>` on stderr and exit with
`EXIT_BAD_INPUT`; anything else is a bug or a crash and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

EXIT_OK = 0
EXIT_FAILED = 1  # a crash, or a run that diverged
EXIT_BAD_INPUT = 2
EXIT_TERMINATED = 128 + 15  # what a shell reports for a process that SIGTERM ended


class UserError(Exception):
    """Input the user can fix; the message says what is wrong and what is allowed."""


def print_error(tool: str, error: BaseException | str) -> None:
    """`<tool>: error: <line>` on stderr for each line of the message (the class name if it has none)."""
    text = str(error)
    lines = text.splitlines() or [type(error).__name__]
    for line in lines:
        print(f"{tool}: error: {line}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM arrived (`kill`, `timeout`, Docker, Kubernetes): a run stops as on Ctrl-C, resumable."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated`, so that a run records its interruption. A handler someone
    else installed (submitit's, on a cluster) is left alone, as is any thread but the main one."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
