"""Text sources, by name.

Built-in (offline, written for mechlens, shipped as package data):

* ``contexts`` -- short everyday-activity contexts (the role of HellaSwag validation ``ctx``);
* ``reviews``  -- short movie-review sentences (the role of rotten_tomatoes ``test``);
* ``coffee``   -- an expository article on coffee, one document (the role of Wikipedia's
  "Turkish coffee" page), in which ``" coffee"`` is a single GPT-2 token occurring 21 times.

Original sources, for online users: ``hellaswag`` (validation ``ctx``), ``rotten_tomatoes``
(``test`` text), ``wikipedia:<Page title>`` (plain-text extract). Local files: ``.txt`` (one text per
non-empty line; ``path.txt#document`` reads the whole file as one text), ``.jsonl`` and ``.csv``
(column ``text``, or ``path.csv#column``).
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import pathlib
import urllib.parse
import urllib.request
from collections.abc import Sequence

from mechlens import hub
from mechlens.errors import DataError

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
SOURCES["<file>.txt|.jsonl|.csv"] = (
    "local texts (txt: one per line, or #document; jsonl/csv: #COLUMN, default text; #encoding=NAME, default utf-8)"
)


def _builtin(name: str) -> list[str]:
    text = (importlib.resources.files("mechlens.data") / "texts" / f"{name}.txt").read_text(encoding="utf-8")
    if name == "coffee":
        return [text.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _hub_dataset(name: str) -> list[str]:
    repo, split, column, alternative = HUB[name]
    if not hub.reachable():
        raise DataError(
            f"data source {name!r} needs the Hugging Face hub, which is unreachable (offline). Use the built-in "
            f"{alternative!r} instead (--data {alternative}), or a local .txt/.jsonl/.csv file."
        )
    import datasets

    return [str(t) for t in datasets.load_dataset(repo, split=split)[column]]


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


def _read_text(path: pathlib.Path, encoding: str) -> str:
    try:
        return path.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"--data {path}: byte {e.start} is not valid {encoding} ({e.reason}); name the file's encoding, "
            f"e.g. --data '{path}#encoding=latin-1'"
        ) from None
    except OSError as e:
        raise DataError(f"--data {path}: cannot read the file ({e.strerror})") from None


def _file(spec: str) -> list[str]:
    path_s, _, opt = spec.partition("#")
    path = pathlib.Path(path_s).expanduser()
    if not path.is_file():
        raise DataError(f"no such file {path}: pass an existing .txt, .jsonl or .csv file or a built-in source")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise DataError(f"unsupported file type {suffix!r}: use .txt, .jsonl or .csv")
    column, document, encoding = _options(path, opt)
    text = _read_text(path, encoding)
    if suffix == ".txt":
        return [text.strip()] if document else [ln.strip() for ln in text.splitlines() if ln.strip()]
    column = column or "text"
    if suffix == ".jsonl":
        rows = []
        for i, ln in enumerate(text.splitlines()):
            if ln.strip():
                try:
                    row = json.loads(ln)
                except ValueError as e:
                    raise DataError(
                        f"--data {path}: line {i + 1} is not JSON ({e.msg}): one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"--data {path}: line {i + 1} is not a JSON object: one object per line")
                rows.append(row)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if rows and column not in rows[0]:
        raise DataError(f"{path} has no column {column!r} (columns: {sorted(rows[0])}): use {path}#<column>")
    return [str(r[column]).strip() for r in rows if r.get(column) is not None and str(r[column]).strip()]


def load_texts(source: str) -> list[str]:
    """Texts of a source: a built-in name, ``hellaswag``, ``rotten_tomatoes``, ``wikipedia:<title>``,
    or a local file (see module docstring). Offline use of a web source fails fast naming the built-in."""
    if source in BUILTIN:
        texts = _builtin(source)
    elif source in HUB:
        texts = _hub_dataset(source)
    elif source.startswith("wikipedia:"):
        texts = _wikipedia(source.removeprefix("wikipedia:"))
    elif pathlib.Path(source.partition("#")[0]).suffix:
        texts = _file(source)
    else:
        raise DataError(f"unknown data source {source!r}: expected one of {', '.join(SOURCES)}")
    if not texts:
        raise DataError(f"--data {source}: the source holds no text (only empty or whitespace lines)")
    return texts


def check_source(source: str) -> None:
    """Check a data source before any model is loaded: a local file is read (encoding, columns, at
    least one text), an online source needs the network (it fails at once offline); built-ins pass."""
    if source in BUILTIN:
        return
    if source in HUB:
        if not hub.reachable():
            _hub_dataset(source)  # raises the offline error naming the built-in alternative
        return
    if source.startswith("wikipedia:"):
        if not hub.reachable("en.wikipedia.org"):
            _wikipedia(source.removeprefix("wikipedia:"))  # raises the offline error
        return
    load_texts(source)


def split_train_test(texts: Sequence, n_train: int, n_test: int) -> tuple[list, list]:
    """The first ``n_train`` texts and the next ``n_test`` (no overlap); an error naming how many exist."""
    if n_train + n_test > len(texts):
        raise DataError(
            f"asked for {n_train} train + {n_test} test texts but the source has only {len(texts)}: "
            f"lower --n-train/--n-test (e.g. {len(texts) // 2} + {len(texts) - len(texts) // 2})"
        )
    return list(texts[:n_train]), list(texts[n_train : n_train + n_test])
