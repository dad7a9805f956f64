"""Rows of several named columns from a local .jsonl / .csv / .parquet file (e.g. prompt pairs), read
with pandas: every value a string as written; one-line errors naming the file and the missing column."""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator, Sequence

from mechlens.errors import DataError

RECORD_TYPES = (".jsonl", ".csv", ".parquet")


def load_records(source: str, columns: Sequence[str], n_rows: int | None = None) -> list[dict[str, str]]:
    """The first ``n_rows`` rows (all when None) of ``source`` with the given ``columns``."""
    import pandas as pd

    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"--data {source}: no such file; pass a .jsonl, .csv or .parquet file with the columns {', '.join(columns)}"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, nrows=n_rows)
        elif suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=n_rows)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"--data {source}: unsupported file type {suffix!r}: use {', '.join(RECORD_TYPES)}")
    except DataError:
        raise
    except Exception as e:  # pandas' parse errors: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"--data {source}: cannot read it as {suffix[1:]} ({first})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"--data {source} has no column {missing[0]!r} (columns: {sorted(map(str, frame.columns))}): "
            f"it needs {', '.join(columns)}"
        )
    if n_rows is not None:
        frame = frame.head(n_rows)
    return [{c: "" if row[c] is None else str(row[c]) for c in columns} for row in frame.to_dict("records")]


def iter_records(
    source: str, columns: Sequence[str], n_rows: int | None = None, chunk_rows: int = 1024
) -> Iterator[dict[str, str]]:
    """:func:`load_records` as a stream: the file is read ``chunk_rows`` rows at a time (pandas' chunked
    readers; a parquet file by row group batches through pyarrow), so memory does not grow with its
    length. The first chunk is read (and its columns checked) by the first ``next``."""
    import pandas as pd

    path = pathlib.Path(source).expanduser()
    load_records(source, columns, 1)  # the file, its type and its columns: the same one-line errors
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        chunks = pd.read_json(path, lines=True, dtype=False, nrows=n_rows, chunksize=chunk_rows)
    elif suffix == ".csv":
        chunks = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=n_rows, chunksize=chunk_rows)
    else:
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=list(columns))
        chunks = (b.to_pandas() for b in batches)
    left = n_rows
    with contextlib.ExitStack() as stack:
        if hasattr(chunks, "__enter__"):
            chunks = stack.enter_context(chunks)
        for frame in chunks:
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise DataError(f"--data {source}: a row without the column {missing[0]!r}")
            for row in frame.to_dict("records"):
                if left is not None and left <= 0:
                    return
                yield {c: "" if row[c] is None else str(row[c]) for c in columns}
                left = None if left is None else left - 1
