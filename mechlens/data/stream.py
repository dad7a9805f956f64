"""Streams of texts through Hugging Face ``datasets``: local .txt/.jsonl/.csv/.parquet files and hub datasets.

Every stream is an ``IterableDataset`` (``load_dataset(..., streaming=True)``) cleaned to one column of
non-empty, stripped texts, cut to its first ``n_texts`` and split by rank with
``datasets.distributed.split_dataset_by_node(strategy="examples")``: rank ``r`` of ``w`` keeps the texts
``r, r + w, r + 2w, ...`` of the whole cleaned stream, so the shards are disjoint, their union is the
single-process stream, and a text's global index is known on every rank. Memory is one chunk of the file
(:data:`CHUNK_BYTES` for .txt/.jsonl, :data:`CSV_ROWS` rows for .csv, one row group for .parquet), never the corpus.

Errors of the file (undecodable bytes, a line that is not JSON, a missing column) become one-line
:class:`~mechlens.errors.DataError` messages naming ``--data`` and the fix, whichever chunk they are in:
the byte offset of an undecodable byte and the line number of a bad JSON line are found by re-reading the
file from its start on the error path only.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import inspect
import itertools
import json
import logging
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

from mechlens.errors import DataError

CHUNK_BYTES = 1 << 20  # bytes a .txt/.jsonl builder reads at a time: the memory of a stream, not of the corpus
CSV_ROWS = 1000  # rows the .csv builder (pandas) reads at a time (its default, 10,000, is ~10 MB of documents)
BATCH = 256  # texts handed over per step of the datasets iterator
TEXT = "text"  # the one column of a cleaned stream


@contextlib.contextmanager
def quiet_datasets():
    """Silence ``datasets``' own logging and progress bars while it works for us: its failures reach the
    user as one-line DataErrors, and a log line or a bar on stderr would break the CLI's one-line errors."""
    import datasets.utils as dtqdm

    logger = logging.getLogger("datasets")
    level, bars_off = logger.level, dtqdm.are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL + 1)
    dtqdm.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_off:
            dtqdm.enable_progress_bars()


def decode_error(path: pathlib.Path, encoding: str) -> DataError:
    """The one-line error for undecodable bytes, with the byte offset in the FILE (not in a chunk):
    the file is decoded again from its start, on this error path only."""
    dec = codecs.getincrementaldecoder(encoding)(errors="strict")
    pos, start, reason = 0, None, None
    try:
        with open(path, "rb") as f:
            while reason is None:
                chunk = f.read(CHUNK_BYTES)
                pending = len(dec.getstate()[0])
                try:
                    dec.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    start, reason = pos - pending + e.start, e.reason
                except UnicodeError as e:  # e.g. utf-16 without a byte-order mark
                    reason = str(e)
                if not chunk:
                    break
                pos += len(chunk)
    except OSError as e:
        return DataError(f"--data {path}: cannot read the file ({e.strerror})")
    where = f"byte {start} is" if start is not None else "the file is"
    return DataError(
        f"--data {path}: {where} not valid {encoding} ({reason or 'undecodable'}); name the file's encoding, "
        f"e.g. --data '{path}#encoding=latin-1'"
    )


def json_lines_error(path: pathlib.Path, encoding: str, err: Exception) -> DataError:
    """The first line of a .jsonl file that is not one JSON object, found by re-reading the file."""
    try:
        with open(path, encoding=encoding, errors="strict") as f:
            for i, ln in enumerate(f):
                if not ln.strip():
                    continue
                try:
                    row = json.loads(ln)
                except ValueError as e:
                    return DataError(f"--data {path}: line {i + 1} is not JSON ({e.msg}): one JSON object per line")
                if not isinstance(row, dict):
                    return DataError(f"--data {path}: line {i + 1} is not a JSON object: one object per line")
    except UnicodeError:
        return decode_error(path, encoding)
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(
        f"--data {path}: cannot read it as JSON lines ({msg}); one object per line, a field of one type, no blank lines"
    )


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def missing_column(where: str, column: str, columns, hint: str) -> DataError:
    return DataError(f"{where} has no column {column!r} (columns: {sorted(columns)}): use {hint}")


def cleaner(column: str) -> Callable[[dict[str, list]], dict[str, list]]:
    """Batched map: the column's values as stripped strings, empty and missing ones dropped."""

    def clean(batch: dict[str, list]) -> dict[str, list]:
        vals = (None if v is None else str(v).strip() for v in batch[column])
        return {TEXT: [v for v in vals if v]}

    return clean


def _has_strategy() -> bool:
    from datasets.distributed import split_dataset_by_node

    return "strategy" in inspect.signature(split_dataset_by_node).parameters


def pipeline(ds, column: str, columns: list[str], n_texts: int | None, rank: int, world_size: int):
    """(dataset, python_step): the cleaned stream of ``column``, its first ``n_texts``, this rank's share.
    ``python_step`` is True where the installed ``datasets`` cannot split by examples (no ``strategy``
    argument) while a shard split would break the global order: the caller then keeps every
    ``world_size``-th text itself."""
    from datasets.distributed import split_dataset_by_node

    ds = ds.map(cleaner(column), batched=True, batch_size=BATCH, remove_columns=list(columns))
    if n_texts is not None:
        ds = ds.take(n_texts)
    if world_size == 1:
        return ds, False
    if _has_strategy():
        return split_dataset_by_node(ds, rank=rank, world_size=world_size, strategy="examples"), False
    if ds.num_shards % world_size != 0:  # "auto" is "examples" here
        return split_dataset_by_node(ds, rank=rank, world_size=world_size), False
    return ds, True


def iterate(ds, translate: Callable[[Exception], Exception | None], *, step: tuple[int, int] | None = None):
    """Yield the texts of a cleaned dataset batch by batch, datasets' errors translated to DataErrors."""
    it = ds.iter(batch_size=BATCH)
    texts: Iterator[str] = _texts(it, translate)
    if step is not None:
        rank, world_size = step
        texts = itertools.islice(texts, rank, None, world_size)
    yield from texts


@contextlib.contextmanager
def translated(translate: Callable[[Exception], Exception | None]) -> Iterator[None]:
    """datasets' output silenced and its errors translated: ``translate(e)`` gives the error to raise (a
    :class:`DataError` naming the fix) or ``None`` (``e`` is raised as it is, a bug shows its traceback);
    a :class:`DataError` passes through."""
    try:
        with quiet_datasets():
            yield
    except DataError:
        raise
    except Exception as e:
        mine = translate(e)
        if mine is None:
            raise
        raise mine from None


def _texts(it, translate) -> Iterator[str]:
    while True:
        with translated(translate):
            batch = next(it, None)
        if batch is None:
            return
        yield from batch[TEXT]


def load(builder: str, *args: Any, translate: Callable[[Exception], Exception | None], **kwargs: Any):
    """``load_dataset(builder, ..., split=..., streaming=True)`` with datasets' errors translated."""
    import datasets

    with translated(translate):
        return datasets.load_dataset(builder, *args, streaming=True, **kwargs)


def peek_columns(ds, translate) -> list[str]:
    """Column names of a stream whose features are unknown until read: the keys of its first row."""
    if ds.column_names is not None:
        return list(ds.column_names)
    with translated(translate):
        first = next(iter(ds), None)
    return [] if first is None else list(first)


# ---------------------------------------------------------------------------------------------- local files

BUILDERS = {".txt": "text", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def file_translator(path: pathlib.Path, suffix: str, encoding: str) -> Callable[[Exception], Exception | None]:
    def translate(e: Exception) -> Exception | None:
        if isinstance(e, UnicodeError):
            return decode_error(path, encoding)
        if isinstance(e, FileNotFoundError):
            return DataError(f"no such file {path}: pass an existing .txt, .jsonl, .csv or .parquet file")
        if isinstance(e, OSError) and not isinstance(e, UnicodeError):
            return DataError(f"--data {path}: cannot read the file ({e.strerror or _first_line(e)})")
        if suffix == ".jsonl" and isinstance(e, ValueError):  # pyarrow.ArrowInvalid is a ValueError
            return json_lines_error(path, encoding, e)
        if suffix == ".csv" and type(e).__name__ in ("ParserError", "EmptyDataError"):
            return DataError(f"--data {path}: not a valid CSV file ({_first_line(e)}); one header line, then rows")
        if suffix == ".parquet" and type(e).__name__ in ("ArrowInvalid", "ArrowIOError"):
            return DataError(f"--data {path}: not a valid Parquet file ({_first_line(e)})")
        return None

    return translate


def _csv_header(path: pathlib.Path, encoding: str) -> list[str] | None:
    """The header row of a .csv file (the csv module, the file's encoding), None for an empty file."""
    try:
        with open(path, encoding=encoding, errors="strict", newline="") as f:
            return next(csv.reader(f), None)
    except UnicodeError:
        raise decode_error(path, encoding) from None
    except csv.Error as e:
        raise DataError(f"--data {path}: not a valid CSV file ({e}); one header line, then rows") from None


def file_stream(
    path: pathlib.Path,
    column: str | None,
    document: bool,
    encoding: str,
    n_texts: int | None,
    rank: int,
    world_size: int,
) -> Iterator[str]:
    """This rank's share of the first ``n_texts`` texts of a local file (suffix checked by the caller)."""
    import datasets

    suffix = path.suffix.lower()
    translate = file_translator(path, suffix, encoding)
    data_files = glob.escape(str(path.resolve()))  # a literal path, not a pattern ('[1].txt' would match nothing)
    kw: dict[str, Any] = {"data_files": data_files, "split": "train"}
    hint = f"{path}#<column>"
    if suffix == ".txt":
        kw.update(encoding=encoding, chunksize=CHUNK_BYTES, sample_by="document" if document else "line")
        column, columns = "text", ["text"]
        ds = load("text", translate=translate, **kw)
    elif suffix == ".jsonl":
        column = column or "text"
        ds = load("json", translate=translate, encoding=encoding, chunksize=CHUNK_BYTES, **kw)
        columns = peek_columns(ds, translate)
        if columns and column not in columns:
            raise missing_column(str(path), column, columns, hint)
    elif suffix == ".csv":
        column = column or "text"
        header = _csv_header(path, encoding)
        if not header:
            return iter(())
        if column not in header:
            raise missing_column(str(path), column, header, hint)
        columns = list(dict.fromkeys(header))
        # every column a string, as written: no number parsing ('1.50' stays '1.50'), no 'NA' -> missing
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        kw.update(encoding=encoding, features=features, keep_default_na=False, na_filter=False, chunksize=CSV_ROWS)
        ds = load("csv", translate=translate, **kw)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        column = column or "text"
        try:
            schema = pq.read_schema(path)
        except Exception as e:  # ArrowInvalid: not a parquet file
            raise DataError(f"--data {path}: not a valid Parquet file ({_first_line(e)})") from None
        if column not in schema.names:
            raise missing_column(str(path), column, schema.names, hint)
        columns = [column]
        from datasets.packaged_modules.parquet.parquet import ParquetConfig

        if "fragment_scan_options" in ParquetConfig.__dataclass_fields__:
            import pyarrow.dataset as pds

            # one row group at a time: pyarrow's default pre-buffering reads every row group of the file first
            kw["fragment_scan_options"] = pds.ParquetFragmentScanOptions(pre_buffer=False)
        ds = load("parquet", translate=translate, columns=[column], **kw)
    else:  # pragma: no cover - the caller checks suffixes
        raise AssertionError(suffix)
    ds, python_step = pipeline(ds, column, columns, n_texts, rank, world_size)
    return iterate(ds, translate, step=(rank, world_size) if python_step else None)


# ---------------------------------------------------------------------------------------------- hub datasets


def hub_translator(spec: str) -> Callable[[Exception], Exception | None]:
    def translate(e: Exception) -> Exception | None:
        name = type(e).__name__
        if name in ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "FileNotFoundError"):
            return DataError(
                f"--data {spec}: the hub has no such dataset, or it is gated or private ({_first_line(e)}); "
                "check the name, or log in with `hf auth login`"
            )
        if isinstance(e, (ValueError, KeyError)) and any(
            w in str(e) for w in ("split", "Split", "BuilderConfig", "config", "Config")
        ):
            return DataError(f"--data {spec}: {_first_line(e)}; use hf:REPO[:CONFIG]:SPLIT[:COLUMN]")
        if isinstance(e, (ConnectionError, TimeoutError, OSError)):
            return DataError(f"--data {spec}: the hub could not be read ({_first_line(e)}); check the network")
        return None

    return translate


def hub_stream(
    spec: str,
    repo: str,
    config: str | None,
    split: str,
    column: str | None,
    n_texts: int | None,
    rank: int,
    world_size: int,
    hint: str,
) -> Iterator[str]:
    """This rank's share of the first ``n_texts`` texts of a hub dataset (the caller checked the network);
    ``hint`` is how the user names another column."""
    translate = hub_translator(spec)
    args = (repo, config) if config else (repo,)
    ds = load(*args, split=split, translate=translate)
    columns = peek_columns(ds, translate)
    column = column or "text"
    if column not in columns:
        raise missing_column(f"--data {spec}", column, columns, hint)
    ds, python_step = pipeline(ds, column, columns, n_texts, rank, world_size)
    return iterate(ds, translate, step=(rank, world_size) if python_step else None)
