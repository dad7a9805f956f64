"""Progress: one transient bar per long step, all through :func:`bar`; status lines through :func:`status`.
Both are shown on a terminal only (stderr a TTY), and never with ``QUIET`` (``--quiet``), so logs,
pipes and tests see results and errors alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
QUIET = False


def bar(
    iterable: Iterable[T], desc: str, *, show: bool = True, unit: str = "it", total: int | None = None
) -> Iterable[T]:
    """``iterable`` wrapped in a transient tqdm bar, unless ``show`` is false or mechlens is quiet."""
    if QUIET or not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=False, disable=None)  # None: off when not a TTY


def status(message: str) -> None:
    """A one-line status message on stderr (``[mechlens] ...``), on a terminal and when not quiet."""
    import sys

    if not QUIET and sys.stderr.isatty():
        print(f"[mechlens] {message}", file=sys.stderr)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No bars or status lines inside (e.g. per-batch steps under a stream's own bar: one bar at a time)."""
    global QUIET
    before, QUIET = QUIET, True
    try:
        yield
    finally:
        QUIET = before
