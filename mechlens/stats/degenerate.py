"""Degenerate inputs to a statistic, named instead of reported as findings.

Decided per statistic (``docs/reliability.md`` has the table):

- **Refused** (:class:`~mechlens.errors.DataError`, one line naming the quantity and the flag): a
  regressor or response with zero variance (:func:`check_regression`; a regression on a constant has no
  slope, and statsmodels' pseudo-inverse would report a confident one), and a fit on fewer points than
  its parameters plus one (no residual degree of freedom: no standard error, no p-value).
- **Marked** (a sentence in ``results.json`` under ``degenerate`` and at the start of the headline): texts
  repeated within a split or shared between the training and the test split (:func:`repeated_rows`).
  Natural corpora repeat a few short texts, so refusing would block sound runs; the mark says how many,
  and that the p-values treat repeats as independent and the test score is partly on seen texts.
- **Never returned**: a NaN or infinity in a public part function's result raises
  :class:`~mechlens.errors.NonFiniteError` naming the quantity (:func:`require_finite`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mechlens.errors import DataError, NonFiniteError

# a spread below this, relative to the values' scale, is a constant up to float rounding (float32 losses
# carry ~1e-7 relative error, so genuinely varying data sits many orders of magnitude above it)
_REL_SPREAD = 1e-12


def zero_variance(values: Any) -> bool:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return True
    return float(np.ptp(v)) <= _REL_SPREAD * max(1.0, float(np.abs(v).max()))


def check_regression(x: Any, y: Any, *, n_params: int, what: str, x_name: str, y_name: str, fix: str) -> None:
    """Refuse a regression of ``y`` on ``x`` that has no answer: fewer than ``n_params + 1`` points, or
    ``x`` or ``y`` constant. ``what`` names the fit, ``fix`` what the user can change (a flag)."""
    n = int(np.asarray(y).size)
    if n < n_params + 1:
        raise DataError(
            f"{what}: {n} points for {n_params} parameters leave no residual degree of freedom (no standard "
            f"error, no p-value): {fix}"
        )
    if zero_variance(y):
        raise DataError(f"{what}: the response ({y_name}) has the same value at all {n} points: {fix}")
    if zero_variance(x):
        raise DataError(
            f"{what}: the regressor ({x_name}) has the same value at all {n} points, so {y_name} cannot be "
            f"regressed on it: {fix}"
        )


def require_finite(where: str, values: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteError` naming the first quantity of ``values`` that holds a NaN or infinity."""
    for name, v in values.items():
        a = np.asarray(v, dtype=np.float64)
        if not np.isfinite(a).all():
            raise NonFiniteError(
                f"{where}: {name} is NaN or infinite ({a.reshape(-1)[~np.isfinite(a.reshape(-1))][0]}); the inputs "
                "are degenerate for this statistic (e.g. constant, or too few points)"
            )


def repeated_rows(train: Any, test: Any) -> tuple[int, int]:
    """``(repeats within train, test rows equal to some train row)`` for integer row matrices (token ids)."""
    tr = np.ascontiguousarray(np.asarray(train, dtype=np.int64))
    te = np.ascontiguousarray(np.asarray(test, dtype=np.int64))
    seen = {r.tobytes() for r in tr}
    return len(tr) - len(seen), sum(r.tobytes() in seen for r in te)
