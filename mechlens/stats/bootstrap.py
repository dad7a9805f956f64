"""Bootstrap confidence intervals of means (:func:`scipy.stats.bootstrap`), batched over groups of equal
size: the intervals of :mod:`mechlens.comparison` and of the lens study's figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_intervals(
    groups: Sequence[np.ndarray], confidence: float, n_resamples: int, method: str, seed: int
) -> list[tuple[float | None, float | None]]:
    """Bootstrap CI of the mean of each group (groups of equal size are resampled in one vectorised call;
    the batch size keeps the resampled array near 100 MB)."""
    return _grouped([(g,) for g in groups], _mean, False, confidence, n_resamples, method, seed)


def ratio_intervals(
    numerators: Sequence[np.ndarray],
    denominators: Sequence[np.ndarray],
    confidence: float,
    n_resamples: int,
    method: str,
    seed: int,
) -> list[tuple[float | None, float | None]]:
    """Bootstrap CI of the ratio of means ``mean(num) / mean(den)`` of each group, resampling the units
    (the paired entries of ``num`` and ``den``) together (:func:`scipy.stats.bootstrap`, ``paired=True``);
    groups of equal size in one vectorised call, as :func:`mean_intervals`. ``(None, None)`` for a group of
    fewer than 2 units or a non-finite interval (e.g. a denominator whose resamples reach 0)."""
    for i, (a, b) in enumerate(zip(numerators, denominators, strict=True)):
        if len(a) != len(b):
            raise ValueError(f"group {i}: {len(a)} numerators but {len(b)} denominators")
    groups = list(zip(numerators, denominators, strict=True))
    return _grouped(groups, _ratio, True, confidence, n_resamples, method, seed)


def _mean(a, axis=-1):
    return np.mean(a, axis=axis)


def _ratio(a, b, axis=-1):
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


def _grouped(
    groups: Sequence[tuple[np.ndarray, ...]],
    statistic,
    paired: bool,
    confidence: float,
    n_resamples: int,
    method: str,
    seed: int,
) -> list[tuple[float | None, float | None]]:
    """The interval of ``statistic`` of each group (a tuple of equally long samples), groups of equal size
    in one vectorised :func:`scipy.stats.bootstrap` call; a group whose samples are all constant has the
    statistic itself as its interval."""
    from scipy.stats import bootstrap

    out: list[tuple[float | None, float | None]] = [(None, None)] * len(groups)
    by_n: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_n.setdefault(len(g[0]), []).append(i)
    for n, idx in sorted(by_n.items()):
        if n < 2:
            continue
        data = tuple(np.stack([groups[i][k] for i in idx]).astype(np.float64) for k in range(len(groups[idx[0]])))
        const = np.all([np.ptp(d, axis=-1) == 0 for d in data], axis=0)  # every unit equal
        batch = max(1, int(1.25e7 // sum(d.size for d in data)))
        with np.errstate(invalid="ignore", divide="ignore"):
            res = bootstrap(
                data,
                statistic,
                paired=paired,
                axis=-1,
                vectorized=True,
                n_resamples=n_resamples,
                batch=batch,
                confidence_level=confidence,
                method=method,
                random_state=np.random.default_rng(seed),
            )
            point = statistic(*(d[:, :1] for d in data))  # a constant group's value (of its first unit: exact)
        lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
        for j, i in enumerate(idx):
            if const[j] and math.isfinite(point[j]):
                out[i] = (float(point[j]), float(point[j]))
            elif math.isfinite(lo[j]) and math.isfinite(hi[j]):
                out[i] = (float(lo[j]), float(hi[j]))
    return out
