"""Rows of several named columns from a local .jsonl / .csv / .parquet file (e.g. prompt pairs), read
with pandas: every value a string as written; one-line errors naming the file and the missing column."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from mechlens.errors import DataError

RECORD_TYPES = (".jsonl", ".csv", ".parquet")


def load_records(source: str, columns: Sequence[str], n_rows: int | None = None) -> list[dict[str, str]]:
    """The first ``n_rows`` rows (all when None) of ``source`` with the given ``columns``."""
    import pandas as pd

    path = pathlib.Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"--data {source}: no such file; pass a .jsonl, .csv or .parquet file with the columns "
                        f"{', '.join(columns)}")  # fmt: skip
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
        raise DataError(f"--data {source} has no column {missing[0]!r} (columns: {sorted(map(str, frame.columns))}): "
                        f"it needs {', '.join(columns)}")  # fmt: skip
    if n_rows is not None:
        frame = frame.head(n_rows)
    return [{c: "" if row[c] is None else str(row[c]) for c in columns} for row in frame.to_dict("records")]
