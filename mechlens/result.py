"""The result every study returns: its typed parts, metrics (JSON), tidy tables (CSV), plotly figures,
provenance.

A study's part functions return **frozen dataclasses with jaxtyping-annotated fields** (checked at
runtime under pytest). ``results.json`` is derived from them generically by :func:`metrics_of`: every
field becomes a metric under its own name (nested parts become nested objects), except fields
declared with :func:`not_in_metrics` (large arrays that belong in the CSVs and figures, and objects
that are not numbers), and every :class:`view` (a flat name for a value a part holds, declared once on
the result class: the study's name map; no value is stored twice). The field and view names are
therefore the public metric schema: rename none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def to_jsonable(x: Any) -> Any:
    """numpy / torch / dataclasses -> plain JSON types; NaN and inf -> None."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        return to_jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    return x


# the columns of a study's ``samples(result)`` (per-unit statistics, :mod:`mechlens.comparison`)
SAMPLE_COLUMNS = ["quantity", "layer", "relative_depth", "position", "word", "unit", "sample", "value"]


def sample_table(quantity, value, *, unit, sample, layer=None, relative_depth=None, position=None, word=None):
    """One block of a study's per-unit samples as a pandas DataFrame with :data:`SAMPLE_COLUMNS`: ``value``,
    ``sample`` and the given columns are aligned 1-d arrays (``quantity`` and ``unit``: one string, or an
    object array); ``layer``, ``position`` and ``word`` are missing where ``None`` (a list) or negative (an
    integer array), all missing when not given; ``relative_depth`` NaN when not given."""
    import pandas as pd

    value = np.asarray(value, dtype=np.float64).reshape(-1)
    n = len(value)

    def ints(x) -> Any:
        if x is None:
            return pd.arrays.IntegerArray(np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool))
        if isinstance(x, np.ndarray) and x.dtype.kind in "iu":
            x = x.astype(np.int64, copy=False)
            return pd.arrays.IntegerArray(np.maximum(x, 0), x < 0)
        return pd.array(list(x), dtype="Int64")

    def text(x) -> Any:  # one shared str per row (np.full of a str as object would make one per row)
        return pd.Series([x] * n if isinstance(x, str) else x, dtype=object, copy=False)

    depth = np.full(n, np.nan) if relative_depth is None else np.asarray(relative_depth, dtype=np.float64)
    return pd.DataFrame(
        {
            "quantity": text(quantity),
            "layer": ints(layer),
            "relative_depth": depth,
            "position": ints(position),
            "word": ints(word),
            "unit": text(unit),
            "sample": np.asarray(sample, dtype=np.int64),
            "value": value,
        },
        columns=SAMPLE_COLUMNS,
        copy=False,
    )


NOT_IN_METRICS = "mechlens_not_in_metrics"


def not_in_metrics(**kwargs: Any) -> Any:
    """A dataclass field kept in the typed result (for tables, figures, further analysis) but left out
    of ``results.json`` (e.g. full logits, the loss matrix, decoded strings of every token)."""
    return dataclasses.field(metadata={NOT_IN_METRICS: True}, **kwargs)


class view:
    """A ``results.json`` name declared on a study's typed result as a view of its parts: nothing is
    stored twice. ``name = view("logistic.accuracy_train")`` reads that attribute path of the result;
    ``name = view(fn)`` computes ``fn(result)`` (e.g. a fit evaluated at the studied position). A view is a
    metric (:func:`metrics_of`) and an attribute (``result.parts.name``), and the views of a class are its
    study's declared map from the flat ``results.json`` names to the parts that hold the values."""

    def __init__(self, source: str | Callable[[Any], Any]):
        self.source = source
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if callable(self.source):
            return self.source(obj)
        x = obj
        for attr in self.source.split("."):
            x = getattr(x, attr)
        return x

    def __repr__(self) -> str:
        return f"view({self.source if isinstance(self.source, str) else self.name!r})"


def views_of(cls: type) -> list[str]:
    """The names of ``cls``' :class:`view` attributes, base classes first, each in declaration order."""
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        names += [k for k, v in vars(klass).items() if isinstance(v, view) and k not in names]
    return names


def metrics_of(x: Any) -> Any:
    """The JSON metrics of a typed result: dataclasses become dicts of their fields (without
    :func:`not_in_metrics` fields) followed by their :class:`view` names, tensors and arrays nested lists,
    NaN and inf ``None``; mappings and sequences are converted element by element."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {
            f.name: metrics_of(getattr(x, f.name))
            for f in dataclasses.fields(x)
            if not f.metadata.get(NOT_IN_METRICS, False)
        }
        return out | {name: metrics_of(getattr(x, name)) for name in views_of(type(x))}
    if isinstance(x, dict):
        return {str(k): metrics_of(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [metrics_of(v) for v in x]
    return to_jsonable(x)


def format_values(xs) -> str:
    """A short list of numbers for a headline: ``[1.23, nan, 4.56]`` (``None`` as nan)."""
    return "[" + ", ".join("nan" if x is None else f"{x:.2f}" for x in xs) + "]"


def none_where(x: Any, undefined: Any) -> list:
    """``x`` as nested lists with ``None`` where ``undefined`` (broadcast against ``x``) is true: the
    explicit form of "no value here by construction" (e.g. a position no valid token reached), so that
    any NaN left in a result is an error (:func:`mechlens.plan.check_finite`), never a silent gap."""
    x = np.asarray(x, dtype=np.float64)
    und = np.broadcast_to(np.asarray(undefined, dtype=bool), x.shape)
    return np.where(und, None, x.astype(object)).tolist()


@dataclasses.dataclass
class StudyResult:
    study: str
    model: str
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    config: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> plotly Figure
    parts: Any = None  # the study's typed result (a frozen dataclass of its parts); metrics derive from it

    def to_json(self) -> dict[str, Any]:
        return to_jsonable(
            {
                "study": self.study,
                "model": self.model,
                "metrics": self.metrics,
                "provenance": self.provenance,
                "config": self.config,
            }
        )
