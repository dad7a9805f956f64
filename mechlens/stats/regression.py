"""Regressions: OLS (statsmodels + sklearn), multinomial logistic, least squares, sqrt(layer) fits."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mechlens.errors import DataError, NonFiniteError


def ols(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """``y ~ const + x`` with statsmodels (full table) and sklearn (same intercept and slope)."""
    from sklearn.linear_model import LinearRegression

    # the two names, not statsmodels.api, which imports every statsmodels model (~0.6 s CPU per run)
    from statsmodels.regression.linear_model import OLS
    from statsmodels.tools.tools import add_constant

    x = np.asarray(x, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y, dtype=np.float64)
    fit = OLS(y, add_constant(x, has_constant="add")).fit()
    sk = LinearRegression().fit(x, y)
    return {
        "params": fit.params.tolist(),
        "bse": fit.bse.tolist(),
        "tvalues": fit.tvalues.tolist(),
        "pvalues": fit.pvalues.tolist(),
        "r2": float(fit.rsquared),
        "r2_adj": float(fit.rsquared_adj),
        "nobs": int(fit.nobs),
        "summary": summary_without_clock(fit),
        "sklearn_intercept": float(sk.intercept_),
        "sklearn_coef": sk.coef_.tolist(),
        "predictions": fit.predict(add_constant(x, has_constant="add")).tolist(),
    }


def summary_without_clock(fit) -> str:
    """statsmodels' OLS summary as printed, less its ``Date:`` and ``Time:`` rows (the time of printing, not
    of the data: results.json stays byte-identical across identical runs; the run's date is ``_run.date``).
    The left column moves up by two rows; the right column keeps its place."""
    s = fit.summary()
    top = s.tables[0]
    left = [(r[0].data, r[1].data) for r in top if r[0].data.strip() not in ("Date:", "Time:")]
    right = [(r[2].data, r[3].data) for r in top if r[2].data.strip()]
    n = max(len(left), len(right))
    for i, row in enumerate(top[:n]):
        (row[0].data, row[1].data), (row[2].data, row[3].data) = (
            left[i] if i < len(left) else ("", ""),
            right[i] if i < len(right) else ("", ""),
        )
    del top[n:]
    return str(s)


@dataclasses.dataclass(frozen=True)
class LogisticConfig:
    solver: str = "lbfgs"
    C: float = 1.0
    tol: float = 1e-6
    max_iter: int = 2000
    random_state: int = 0


def logistic(x_train, y_train, x_test, y_test, cfg: LogisticConfig = LogisticConfig()) -> dict[str, Any]:
    """Multinomial logistic regression of class on ``x``; train and test accuracy, confusion matrices."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix

    x_train = np.asarray(x_train, dtype=np.float64).reshape(len(y_train), -1)
    x_test = np.asarray(x_test, dtype=np.float64).reshape(len(y_test), -1)
    clf = LogisticRegression(
        solver=cfg.solver, C=cfg.C, tol=cfg.tol, max_iter=cfg.max_iter, random_state=cfg.random_state
    ).fit(x_train, y_train)
    classes = clf.classes_
    out: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "classes": classes.tolist(),
        "intercepts": clf.intercept_.tolist(),
        "slopes": clf.coef_[:, 0].tolist(),
        "chance": 1.0 / len(classes),
        "n_iter": int(np.max(clf.n_iter_)),
    }
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        proba = clf.predict_proba(x)
        pred = classes[proba.argmax(1)]
        cm = confusion_matrix(y, pred, labels=classes)
        row_pct = 100.0 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
        out[split] = {
            "accuracy": float((pred == y).mean()),
            "accuracy_by_class": (np.diag(cm) / np.maximum(cm.sum(1), 1)).tolist(),
            "confusion": cm.tolist(),
            "confusion_row_percent": row_pct.tolist(),
            "probabilities": proba.tolist(),
            "predicted": pred.tolist(),
        }
    return out


def lstsq_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ``y`` on ``x``. A non-finite value is an error, never dropped
    silently: choose the points before fitting."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise NonFiniteError(f"a line fit got NaN or infinite values at points {np.nonzero(~np.isfinite(x + y))[0]}")
    if len(x) < 2:
        raise DataError(f"a line fit needs at least 2 points, got {len(x)}")
    a = np.stack([np.ones(len(x)), x], 1)
    (b0, b1), *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(b0), float(b1)


def sqrt_line(values: np.ndarray) -> dict[str, Any]:
    """``value ~ intercept + slope * sqrt(layer)`` over readout points 0..L (the laminar fit)."""
    layers = np.arange(len(values), dtype=np.float64)
    b0, b1 = lstsq_line(np.sqrt(layers), values)
    return {"intercept": b0, "slope": b1, "fitted": (b0 + b1 * np.sqrt(layers)).tolist()}
