"""The result every study returns: metrics (JSON), tidy tables (CSV), plotly figures, provenance."""

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
