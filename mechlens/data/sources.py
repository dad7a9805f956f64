"""Text sources, by name, as streams.

Built-in (offline, written for mechlens, shipped as package data):

* ``contexts`` -- short everyday-activity contexts (the role of HellaSwag validation ``ctx``);
* ``reviews``  -- short movie-review sentences (the role of rotten_tomatoes ``test``);
* ``coffee``   -- an expository article on coffee, one document (the role of Wikipedia's
  "Turkish coffee" page), in which ``" coffee"`` is a single GPT-2 token occurring 21 times.

Original sources, for online users: ``hellaswag`` (validation ``ctx``), ``rotten_tomatoes``
(``test`` text), ``wikipedia:<Page title>`` (plain-text extract), and any hub dataset as
``hf:REPO[:CONFIG]:SPLIT[:COLUMN]`` (column ``text`` by default; with three parts the middle one is a
split when it looks like one -- ``train``, ``test``, ``validation``, ``dev``... -- otherwise a config).
Local files, read through Hugging Face ``datasets`` builders in streaming mode: ``.txt`` (one text per
non-empty line; ``path.txt#document`` reads the whole file as one text), ``.jsonl``, ``.csv`` and
``.parquet`` (column ``text``, or ``path.csv#COLUMN`` / ``#column=NAME``); ``#encoding=NAME`` for a
text file that is not utf-8. Every text is stripped; empty ones are skipped.

:func:`iter_texts` streams a source (memory does not grow with the corpus), cut to its first ``n_texts``
and sharded by rank for data-parallel runs; :func:`load_texts` is the same as a list; :func:`check_source`
checks a source cheaply (its first text only) before any model is loaded.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import pathlib
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mechlens import hub
from mechlens.errors import DataError

T = TypeVar("T")

BUILTIN = {
    "contexts": "everyday-activity contexts (>= 300), the offline stand-in for HellaSwag validation ctx",
    "reviews": "movie-review sentences (>= 64), the offline stand-in for rotten_tomatoes test",
    "coffee": "an expository article on coffee (one document), the stand-in for Wikipedia 'Turkish coffee'",
}
HUB = {
    "hellaswag": ("Rowan/hellaswag", "validation", "ctx", "contexts"),
    "rotten_tomatoes": ("cornell-movie-review-data/rotten_tomatoes", "test", "text", "reviews"),
}
SOURCES = {**BUILTIN, **{k: f"Hugging Face dataset {v[0]} ({v[1]} {v[2]}); needs the hub" for k, v in HUB.items()}}
SOURCES["wikipedia:<title>"] = "plain text of an English Wikipedia page; needs the web"
SOURCES["hf:REPO[:CONFIG]:SPLIT[:COLUMN]"] = (
    "any Hugging Face hub dataset, streamed (column text by default); needs the hub"
)
SOURCES["<file>.txt|.jsonl|.csv|.parquet"] = (
    "local texts (txt: one per line, or #document; jsonl/csv/parquet: #COLUMN, default text; "
    "#encoding=NAME, default utf-8)"
)
FILE_TYPES = (".txt", ".jsonl", ".csv", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval", "evaluation", "val")


def _builtin(name: str) -> list[str]:
    text = (importlib.resources.files("mechlens.data") / "texts" / f"{name}.txt").read_text(encoding="utf-8")
    if name == "coffee":
        return [text.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _wikipedia(title: str) -> list[str]:
    if not hub.reachable("en.wikipedia.org"):
        raise DataError(
            f"wikipedia:{title} needs the web, which is unreachable (offline). Use the built-in 'coffee' article "
            "instead (--data coffee), or a local file with '#document'."
        )
    q = urllib.parse.urlencode(
        {"action": "query", "prop": "extracts", "explaintext": 1, "format": "json", "titles": title, "redirects": 1}
    )
    req = urllib.request.Request(f"https://en.wikipedia.org/w/api.php?{q}", headers={"User-Agent": "mechlens"})
    with urllib.request.urlopen(req, timeout=20) as r:
        pages = json.load(r)["query"]["pages"]
    page = next(iter(pages.values()))
    if "extract" not in page:
        raise DataError(f"Wikipedia has no page titled {title!r}: check the title")
    return [page["extract"]]


def _options(path: pathlib.Path, opt: str) -> tuple[str | None, bool, str]:
    """``FILE#opt,opt``: ``document`` (a .txt file is one text), ``encoding=NAME`` (default utf-8), and
    for .jsonl/.csv a column name (``column=NAME`` or just ``NAME``; default ``text``)."""
    column, document, encoding = None, False, "utf-8"
    for o in filter(None, (x.strip() for x in opt.split(","))):
        key, eq, value = o.partition("=")
        if o == "document":
            document = True
        elif key == "encoding" and eq:
            encoding = value
        elif key == "column" and eq:
            column = value
        elif not eq:
            column = o
        else:
            raise DataError(f"--data {path}#{opt}: unknown option {o!r}; use #document, #encoding=NAME or #COLUMN")
    try:
        "".encode(encoding)
    except LookupError:
        raise DataError(f"--data {path}#{opt}: unknown text encoding {encoding!r}; e.g. #encoding=latin-1") from None
    return column, document, encoding


def batched(iterable: Iterable[T], n: int) -> Iterator[tuple[T, ...]]:
    """Tuples of ``n`` items (the last one shorter): ``itertools.batched`` of Python 3.12, here for 3.11."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    if hasattr(itertools, "batched"):
        yield from itertools.batched(iterable, n)
        return
    it = iter(iterable)
    while batch := tuple(itertools.islice(it, n)):
        yield batch


@dataclass(frozen=True)
class HubSpec:
    """A hub dataset: ``hf:REPO[:CONFIG]:SPLIT[:COLUMN]`` (or a named original such as ``hellaswag``)."""

    spec: str
    repo: str
    config: str | None
    split: str
    column: str | None

    @property
    def column_hint(self) -> str:
        """How to name another column in this spec."""
        if self.config:
            return f"hf:{self.repo}:{self.config}:{self.split}:<column>"
        if _looks_like_split(self.split):
            return f"hf:{self.repo}:{self.split}:<column>"
        return f"hf:{self.repo}:default:{self.split}:<column>"


def _looks_like_split(name: str) -> bool:
    low = name.lower()
    return any(low == s or (low.startswith(s) and not low[len(s)].isalpha()) for s in SPLIT_NAMES)


def parse_hf(spec: str) -> HubSpec:
    """``hf:REPO:SPLIT``, ``hf:REPO:SPLIT:COLUMN`` or ``hf:REPO:CONFIG:SPLIT`` (three parts: the middle
    one is a split when it looks like one, else a config), ``hf:REPO:CONFIG:SPLIT:COLUMN``."""
    parts = spec.removeprefix("hf:").split(":")
    if not 2 <= len(parts) <= 4 or not all(p.strip() for p in parts):
        raise DataError(
            f"--data {spec}: expected hf:REPO[:CONFIG]:SPLIT[:COLUMN], e.g. --data hf:stanfordnlp/imdb:test:text"
        )
    repo, *rest = (p.strip() for p in parts)
    if len(rest) == 1:
        return HubSpec(spec, repo, None, rest[0], None)
    if len(rest) == 3:
        return HubSpec(spec, repo, *rest)
    if _looks_like_split(rest[0]):
        return HubSpec(spec, repo, None, rest[0], rest[1])
    return HubSpec(spec, repo, rest[0], rest[1], None)


def _hub_offline(source: str) -> DataError:
    if source in HUB:
        alternative = HUB[source][3]
        return DataError(
            f"data source {source!r} needs the Hugging Face hub, which is unreachable (offline). Use the built-in "
            f"{alternative!r} instead (--data {alternative}), or a local .txt/.jsonl/.csv/.parquet file."
        )
    return DataError(
        f"--data {source} needs the Hugging Face hub, which is unreachable (offline): use a local "
        ".txt/.jsonl/.csv/.parquet file (--data FILE) or a built-in source (--data contexts, reviews or coffee)"
    )


def _check_n(n_texts: int | None) -> int | None:
    if n_texts is None:
        return None
    if isinstance(n_texts, bool) or not isinstance(n_texts, int) or n_texts < 1:
        raise DataError(f"--n-texts must be a whole number >= 1 (or left out for all texts), got {n_texts!r}")
    return n_texts


def _check_shard(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank {rank!r} of world size {world_size!r}: need 0 <= rank < world_size")


def _round_robin(texts: Iterable[str], n_texts: int | None, rank: int, world_size: int) -> Iterator[str]:
    return itertools.islice(texts, rank, n_texts, world_size)


def _file_parts(source: str) -> tuple[pathlib.Path, str | None, bool, str]:
    path_s, _, opt = source.partition("#")
    path = pathlib.Path(path_s).expanduser()
    if not path.is_file():
        raise DataError(
            f"no such file {path}: pass an existing .txt, .jsonl, .csv or .parquet file or a built-in source"
        )
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"--data {path}: unsupported file type {suffix!r}: use .txt, .jsonl, .csv or .parquet")
    column, document, encoding = _options(path, opt)
    if suffix == ".parquet" and encoding != "utf-8":
        raise DataError(f"--data {path}#{opt}: a .parquet file has no text encoding; drop #encoding")
    return path, column, document, encoding


def _is_file(source: str) -> bool:
    return bool(pathlib.Path(source.partition("#")[0]).suffix)


def _stream(source: str, n_texts: int | None, rank: int, world_size: int) -> Iterator[str]:
    """This rank's share of the first ``n_texts`` texts of a named source; cheap errors raised at once."""
    from mechlens.data import stream

    if source in BUILTIN:
        return _round_robin(_builtin(source), n_texts, rank, world_size)
    if source in HUB or source.startswith("hf:"):
        if source in HUB:
            repo, split, column, _ = HUB[source]
            spec = HubSpec(source, repo, None, split, column)
        else:
            spec = parse_hf(source)
        if not hub.reachable():
            raise _hub_offline(source)
        return stream.hub_stream(
            source, spec.repo, spec.config, spec.split, spec.column, n_texts, rank, world_size, spec.column_hint
        )
    if source.startswith("wikipedia:"):
        return _round_robin(_wikipedia(source.removeprefix("wikipedia:")), n_texts, rank, world_size)
    if _is_file(source):
        path, column, document, encoding = _file_parts(source)
        return stream.file_stream(path, column, document, encoding, n_texts, rank, world_size)
    raise DataError(f"unknown data source {source!r}: expected one of {', '.join(SOURCES)}")


def _not_empty(texts: Iterator[str], source: str, rank: int) -> Iterator[str]:
    """Pass the texts through; rank 0 (which holds the stream's first text) raises if there were none."""
    empty = True
    for t in texts:
        empty = False
        yield t
    if empty and rank == 0:
        raise DataError(f"--data {source}: the source holds no text (only empty or whitespace lines)")


def iter_texts(
    source: str | Iterable[str], n_texts: int | None = None, *, rank: int = 0, world_size: int = 1
) -> Iterator[str]:
    """Stream the texts of ``source``: a built-in name, ``hellaswag``, ``rotten_tomatoes``,
    ``wikipedia:<title>``, ``hf:REPO[:CONFIG]:SPLIT[:COLUMN]``, a local file (see the module docstring),
    or an iterable of texts (taken as they are).

    The stream is the first ``n_texts`` texts of the whole source (all when None), of which this process
    keeps those at global index ``i`` with ``i % world_size == rank``: the ranks' shards are disjoint and
    their union is the single-process stream (see :func:`iter_indexed` for the global indices). Local files
    and hub datasets stream through ``datasets`` (``split_dataset_by_node``), so memory does not grow with
    the corpus. Cheap errors (unknown source, missing file, bad option, hub offline) are raised by this
    call; errors inside a file (undecodable bytes, bad JSON) while iterating; rank 0 raises for a source
    with no text at all.
    """
    n_texts = _check_n(n_texts)
    _check_shard(rank, world_size)
    if not isinstance(source, str):
        return _round_robin(iter(source), n_texts, rank, world_size)
    return _not_empty(_stream(source, n_texts, rank, world_size), source, rank)


def iter_indexed(
    source: str | Iterable[str], n_texts: int | None = None, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, str]]:
    """:func:`iter_texts` with each text's global index (its place in the single-process stream):
    ``rank, rank + world_size, ...``. Use it to key per-item work that must not depend on sharding,
    such as :class:`mechlens.stats.streaming.Reservoir` priorities."""
    texts = iter_texts(source, n_texts, rank=rank, world_size=world_size)
    return ((rank + k * world_size, t) for k, t in enumerate(texts))


def shard(data: str | Iterable, n_texts: int | None = None) -> Iterator[tuple[int, object]]:
    """This rank's share of the first ``n_texts`` items (all when ``None``) of ``data``, keyed by global
    index: a source streamed (:func:`iter_indexed`), or items given in Python (texts or token ids; index =
    place in the list, rank ``r`` of ``w`` keeping the indices ``i % w == r``). One process: all of them."""
    from mechlens import distributed

    rank, world_size = distributed.world()
    if isinstance(data, str):
        return iter_indexed(data, n_texts, rank=rank, world_size=world_size)
    first = itertools.islice(enumerate(data), n_texts)
    return ((i, t) for i, t in first if i % world_size == rank)


def load_texts(source: str, n_texts: int | None = None) -> list[str]:
    """All texts of a source (or its first ``n_texts``) as a list: :func:`iter_texts` in one process.
    Offline use of a web source fails fast naming the built-in or local files."""
    return list(iter_texts(source, n_texts))


def check_source(source: str) -> None:
    """Check a data source before any model is loaded, cheaply: a local file's first text only (missing
    file, type, options, undecodable first bytes, bad first JSON lines, missing column, empty file), an
    online source needs the network (it fails at once offline); a hub dataset is opened and its first
    row read (name, config, split and column); built-ins pass."""
    if source in BUILTIN:
        return
    if source.startswith("wikipedia:"):
        if not hub.reachable("en.wikipedia.org"):
            _wikipedia(source.removeprefix("wikipedia:"))  # raises the offline error
        return
    for _ in iter_texts(source, 1):
        break


def split_train_test(texts: Sequence, n_train: int, n_test: int) -> tuple[list, list]:
    """The first ``n_train`` texts and the next ``n_test`` (no overlap); an error naming how many exist."""
    if n_train + n_test > len(texts):
        raise DataError(
            f"asked for {n_train} train + {n_test} test texts but the source has only {len(texts)}: "
            f"lower --n-train/--n-test (e.g. {len(texts) // 2} + {len(texts) - len(texts) // 2})"
        )
    return list(texts[:n_train]), list(texts[n_train : n_train + n_test])
