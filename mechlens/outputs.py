"""Output directories that never destroy data mechlens did not write.

A run writes into a *new* directory, or replaces an earlier mechlens run: a directory holding the
marker file :data:`MARKER` that mechlens writes there, and nothing besides the files that marker
lists. Everything else is refused with :class:`~mechlens.errors.OutputError` (exit 2) before any
compute: an existing file, a non-empty directory mechlens did not write, a symbolic link, the current
directory or one of its parents, an input of ``compare``. No option turns a refusal into a deletion.

:func:`prepare_output` does the checks and creates the temporary sibling the run is written into,
so an unwritable destination fails at once, not after the studies ran. :meth:`Destination.commit`
writes the marker, checks the destination again (it may have changed during a long run) and swaps
the new directory in with two renames; :meth:`Destination.abort` removes what was created.

**Content-aware markers.** The marker records the SHA-256 of every file mechlens wrote. A rerun
replaces an earlier run only if every file in it is byte-identical to what mechlens wrote; an edited
file, an added file or directory, or a marker without digests (an older mechlens) is refused, naming
the first such file in sorted order. A file the user deleted is not data lost and does not block.

**The window between the last check and the rename** is closed as far as a directory allows: the
earlier run is first renamed to a private sibling (``.NAME.old-PID``), *then* checked again, and put
back (the run refused) if anything in it changed; SIGINT and SIGTERM are blocked from the final check
to the end of the swap. What remains is a process that already holds a file open inside the earlier
run and writes through that descriptor after the last check: no path-based check can see that.

**Temporary directories** (``.NAME.tmp-*`` beside ``--out``) carry the marker from the start, with
``"state": "partial"`` and the writing process' id. A run ended by a signal removes its own (see
:mod:`mechlens.signals`); one ended by SIGKILL or a power cut leaves it, and the next run writing into
the same parent directory removes every such directory whose marker is mechlens' and whose process
is gone; directories without that marker are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator, Sequence

from mechlens.errors import OutputError

MARKER = ".mechlens-run.json"


def _manifest(d: pathlib.Path) -> dict[str, str | None] | None:
    """Files listed by ``d``'s marker with their SHA-256 (``None``: a marker of an older mechlens, which
    recorded names only), or ``None`` if ``d`` has no readable mechlens marker of a finished run."""
    try:
        doc = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("written_by") != "mechlens" or doc.get("state", "done") != "done":
        return None
    files = doc.get("files")
    if isinstance(files, dict) and all(isinstance(v, str) for v in files.values()):
        return {str(f): v for f, v in files.items()}
    if isinstance(files, list):
        return {str(f): None for f in files}
    return None


def _digest(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _contents(d: pathlib.Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")}


def _first_not_mechlens(d: pathlib.Path, present: set[str]) -> tuple[str, str] | None:
    """The first entry of ``d`` (sorted) that mechlens did not write as it is now, and why; ``None`` if
    every entry is a file the marker lists with its digest unchanged, or a directory holding such files."""
    listed = _manifest(d)
    if listed is None:
        return sorted(present)[0], "holds"
    parents = {p for f in listed for p in pathlib.PurePosixPath(f).parents}
    for name in sorted(present - {MARKER}):
        path = d / name
        if name in listed and path.is_file() and not path.is_symlink():
            want = listed[name]
            if want is None:
                return name, "holds"  # an older marker: the file may have been edited, nothing tells
            if _digest(path) != want:
                return name, "edited"
        elif not (pathlib.PurePosixPath(name) in parents and path.is_dir() and not path.is_symlink()):
            return name, "holds"
    return None


def _check_replaceable(out: pathlib.Path, shown: str) -> None:
    """Refuse unless ``out`` is absent, an empty directory, or an earlier mechlens run (and only that, every
    file byte-identical to what mechlens wrote). ``shown``: how the destination is named in messages
    (e.g. ``--out runs/x``)."""
    if out.is_symlink():
        raise OutputError(f"{shown} is a symbolic link: pass the path of a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{shown} is an existing file: pass the path of a new directory")
    try:
        present = _contents(out)
        if not present:
            return
        found = _first_not_mechlens(out, present)
    except OSError as e:
        raise OutputError(f"{shown} cannot be read ({e.strerror}): pass the path of a new directory") from None
    if found is None:
        return
    name, why = found
    if why == "edited":
        raise OutputError(
            f"{shown} is an earlier mechlens run, but {name!r} was edited since mechlens wrote it: pass the path "
            "of a new directory (mechlens never replaces a file it did not write as it is)"
        )
    raise OutputError(
        f"{shown} is a non-empty directory that mechlens did not write (it holds {name!r}): pass "
        "the path of a new directory; mechlens only replaces its own earlier runs"
    )


def _alive(pid: int, host: str) -> bool:
    """Whether process ``pid`` of ``host`` may still be running (another host's: assumed so)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(parent: pathlib.Path) -> list[pathlib.Path]:
    """Remove the temporary directories (``.*.tmp-*``) in ``parent`` that carry mechlens' partial-run marker
    and whose writing process is gone (a run killed by SIGKILL); nothing else. Returns what was removed."""
    removed = []
    try:
        candidates = [p for p in parent.glob(".*.tmp-*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for p in candidates:
        try:
            doc = json.loads((p / MARKER).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("written_by") != "mechlens" or doc.get("state") != "partial":
            continue
        pid, host = doc.get("pid"), doc.get("host")
        if not isinstance(pid, int) or not isinstance(host, str) or _alive(pid, host):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back (delivered on exit) in the main thread; elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _is_within(a: pathlib.Path, b: pathlib.Path) -> bool:
    """``a`` is ``b`` or inside it."""
    return a == b or b in a.parents


class Destination:
    """A checked output directory and the temporary sibling a run is written into (see the module doc)."""

    def __init__(self, out: pathlib.Path, shown: str, tmp: pathlib.Path, made: list[pathlib.Path]):
        self.out, self.shown, self.tmp, self._made = out, shown, tmp, made

    def commit(self) -> None:
        files = sorted(f for f in _contents(self.tmp) if f != MARKER and (self.tmp / f).is_file())
        doc = {"written_by": "mechlens", "state": "done", "files": {f: _digest(self.tmp / f) for f in files}}
        (self.tmp / MARKER).write_text(json.dumps(doc, indent=1))
        with _signals_blocked():  # the swap is not cut in half by Ctrl-C or SIGTERM
            _check_replaceable(self.out, self.shown)  # again: the destination may have changed meanwhile
            old = None
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                self.out.rename(old)
                try:  # renamed away: no path can reach it now; check once more what the user may have changed
                    _check_replaceable(old, self.shown)
                except OutputError:
                    old.rename(self.out)
                    raise
            self.tmp.rename(self.out)
            if old is not None:
                shutil.rmtree(old)  # an earlier mechlens run, checked above to hold only the files it wrote

    def abort(self) -> None:
        with _signals_blocked():  # a second Ctrl-C does not leave half a temporary directory
            shutil.rmtree(self.tmp, ignore_errors=True)
            for d in reversed(self._made):  # parents this destination created, innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()

    @contextlib.contextmanager
    def writing(self) -> Iterator[pathlib.Path]:
        """Yield the temporary directory; commit on success, abort on any error."""
        try:
            yield self.tmp
            self.commit()
        except BaseException:
            self.abort()
            raise


def prepare_output(
    out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike] = (), what: str = "--out"
) -> Destination:
    """Check ``out`` (see the module docstring) and create its temporary sibling; ``inputs`` are
    directories the run reads (``compare``), which ``out`` must neither be, contain, nor lie in.
    ``what`` names the destination in messages (the flag or argument it came from)."""
    shown = f"{what} {os.fspath(out)}"
    path = pathlib.Path(out).expanduser().absolute()
    real = path.resolve()
    cwd = pathlib.Path.cwd().resolve()
    if _is_within(cwd, real):
        raise OutputError(
            f"{shown} is the current directory or one of its parents: pass a new directory, e.g. --out runs/NAME"
        )
    for inp in inputs:
        r = pathlib.Path(inp).expanduser().resolve()
        if _is_within(real, r) or _is_within(r, real):
            raise OutputError(f"{shown} is, contains or lies inside the input {os.fspath(inp)}: pass a new directory")
    _check_replaceable(path, shown)
    made: list[pathlib.Path] = []
    parent = path.parent
    missing = [p for p in [parent, *parent.parents] if not p.exists()]
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
        if not parent.is_dir():
            raise OutputError(f"{shown}: {parent} is not a directory: pass a path inside a directory")
        _remove_stale_temporaries(parent)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
        partial = {"written_by": "mechlens", "state": "partial", "pid": os.getpid(), "host": socket.gethostname()}
        (tmp / MARKER).write_text(json.dumps(partial))
    except OSError as e:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise OutputError(f"{shown} cannot be written ({e.strerror}): pass a directory you can write to") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    return Destination(path, shown, tmp, made)
