"""The result every study returns: its typed parts, metrics (JSON), tidy tables (CSV), plotly figures,
provenance.

A study's part functions return **frozen dataclasses with jaxtyping-annotated fields** (checked at
runtime under pytest). ``results.json`` is derived from them generically by :func:`metrics_of`: every
field becomes a metric under its own name (nested parts become nested objects), except fields
declared with :func:`not_in_metrics` (large arrays that belong in the CSVs and figures, and objects
that are not numbers). The field names are therefore the public metric schema: rename none.
"""

from __future__ import annotations

import dataclasses
import math
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


NOT_IN_METRICS = "mechlens_not_in_metrics"


def not_in_metrics(**kwargs: Any) -> Any:
    """A dataclass field kept in the typed result (for tables, figures, further analysis) but left out
    of ``results.json`` (e.g. full logits, the loss matrix, decoded strings of every token)."""
    return dataclasses.field(metadata={NOT_IN_METRICS: True}, **kwargs)


def metrics_of(x: Any) -> Any:
    """The JSON metrics of a typed result: dataclasses become dicts of their fields (without
    :func:`not_in_metrics` fields), tensors and arrays nested lists, NaN and inf ``None``; mappings
    and sequences are converted element by element."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {
            f.name: metrics_of(getattr(x, f.name))
            for f in dataclasses.fields(x)
            if not f.metadata.get(NOT_IN_METRICS, False)
        }
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
    any NaN left in a result is an error (:func:`mechlens.runner.check_finite`), never a silent gap."""
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
