"""SIGINT and SIGTERM end a command cleanly: one line, exit 130 / 143, nothing left beside ``--out``.

SIGTERM is what ``kill``, ``timeout``, Slurm and ``docker stop`` send; by default it ends Python at
once, skipping every cleanup. :func:`handled` turns it into :class:`Terminated`, a
:class:`KeyboardInterrupt` (so ``except Exception`` in the library does not swallow it, and the output
code that removes its temporary directory on any ``BaseException`` runs, :mod:`mechlens.outputs`), and
:func:`message` gives the command line's one line and exit code for either signal. SIGKILL cannot be
caught: the temporary directory it leaves carries mechlens' partial-run marker and is removed by the
next run writing beside it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another handled signal) arrived: unwind like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum, _frame) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def message(e: KeyboardInterrupt) -> tuple[str, int]:
    """The one line for stderr and the exit code (128 + the signal's number: 130 SIGINT, 143 SIGTERM)."""
    signum = getattr(e, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    return (
        f"mechlens: error: interrupted by {name} before the command finished: its partial output was removed "
        "and nothing else changed; run the command again for its results",
        128 + int(signum),
    )
