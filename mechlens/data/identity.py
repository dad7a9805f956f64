"""Whether two data-source specs name the same texts: resolved paths, then a content fingerprint.

A tuned lens' card records the source it was trained on as spelled (``fx/one.txt``), the resolved path
of a local file, and :func:`fingerprint` of its first texts (the held-out ones and the first training
text). An evaluation source is the training source when its resolved path is the card's, or when its
first texts have the same fingerprint (a copy, a symbolic link, another spelling of a hub source). A
source whose first texts differ is other data; a file holding later training texts of the same corpus
in another order is not recognised (the card keeps no per-text record of the training stream).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pathlib
from collections.abc import Iterable


def resolved(source: str) -> str | None:
    """The resolved path of a local-file source (its ``#options`` kept), or ``None`` for any other source."""
    path_s, sep, opt = source.partition("#")
    path = pathlib.Path(path_s).expanduser()
    if not path.suffix or not path.is_file():
        return None
    return os.fspath(path.resolve()) + sep + opt


def fingerprint(texts: Iterable[str], n: int) -> str:
    """SHA-256 (first 16 hex digits) of the first ``n`` texts, each as its UTF-8 bytes after its length."""
    h = hashlib.sha256()
    count = 0
    for t in itertools.islice(texts, n):
        b = str(t).encode("utf-8", "surrogatepass")
        h.update(f"{len(b)}:".encode())
        h.update(b)
        count += 1
    h.update(f"n={count}".encode())
    return h.hexdigest()[:16]


def source_fingerprint(source: str | Iterable[str], n: int) -> str:
    """:func:`fingerprint` of the first ``n`` texts of a source spec or of texts given in Python."""
    from mechlens.data import iter_texts

    return fingerprint(iter_texts(source, n) if isinstance(source, str) else list(source), n)
