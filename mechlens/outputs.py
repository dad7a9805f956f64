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
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from mechlens.errors import OutputError

MARKER = ".mechlens-run.json"


def _manifest(d: pathlib.Path) -> set[str] | None:
    """Files listed by ``d``'s marker, or ``None`` if ``d`` has no readable mechlens marker."""
    try:
        doc = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("written_by") != "mechlens" or not isinstance(doc.get("files"), list):
        return None
    return {str(f) for f in doc["files"]}


def _contents(d: pathlib.Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*")}


def _check_replaceable(out: pathlib.Path, shown: str) -> None:
    """``shown``: how the destination is named in messages (e.g. ``--out runs/x``)."""
    """Refuse unless ``out`` is absent, an empty directory, or an earlier mechlens run (and only that)."""
    if out.is_symlink():
        raise OutputError(f"{shown} is a symbolic link: pass the path of a new directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{shown} is an existing file: pass the path of a new directory")
    try:
        present = _contents(out)
    except OSError as e:
        raise OutputError(f"{shown} cannot be read ({e.strerror}): pass the path of a new directory") from None
    if not present:
        return
    listed = _manifest(out)
    foreign = sorted(present - (listed or set()) - {MARKER})
    if listed is None or foreign:
        example = foreign[0] if foreign else sorted(present)[0]
        raise OutputError(
            f"{shown} is a non-empty directory that mechlens did not write (it holds {example!r}): pass "
            "the path of a new directory; mechlens only replaces its own earlier runs"
        )


def _is_within(a: pathlib.Path, b: pathlib.Path) -> bool:
    """``a`` is ``b`` or inside it."""
    return a == b or b in a.parents


class Destination:
    """A checked output directory and the temporary sibling a run is written into (see the module doc)."""

    def __init__(self, out: pathlib.Path, shown: str, tmp: pathlib.Path, made: list[pathlib.Path]):
        self.out, self.shown, self.tmp, self._made = out, shown, tmp, made

    def commit(self) -> None:
        files = sorted(_contents(self.tmp))
        (self.tmp / MARKER).write_text(json.dumps({"written_by": "mechlens", "files": files}, indent=1))
        _check_replaceable(self.out, self.shown)  # again: the destination may have changed meanwhile
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            shutil.rmtree(old)  # an earlier mechlens run, checked above to hold only the files it lists

    def abort(self) -> None:
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
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as e:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise OutputError(f"{shown} cannot be written ({e.strerror}): pass a directory you can write to") from None
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    return Destination(path, shown, tmp, made)
