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
    from scipy.stats import bootstrap

    out: list[tuple[float | None, float | None]] = [(None, None)] * len(groups)
    by_n: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_n.setdefault(len(g), []).append(i)
    for n, idx in sorted(by_n.items()):
        if n < 2:
            continue
        data = np.stack([groups[i] for i in idx]).astype(np.float64)
        const = np.ptp(data, axis=-1) == 0  # every unit equal: the interval is the value itself
        batch = max(1, int(1.25e7 // data.size))
        with np.errstate(invalid="ignore", divide="ignore"):
            res = bootstrap(
                (data,),
                np.mean,
                axis=-1,
                vectorized=True,
                n_resamples=n_resamples,
                batch=batch,
                confidence_level=confidence,
                method=method,
                random_state=np.random.default_rng(seed),
            )
        lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
        for j, i in enumerate(idx):
            if const[j]:
                out[i] = (float(data[j, 0]), float(data[j, 0]))
            elif math.isfinite(lo[j]) and math.isfinite(hi[j]):
                out[i] = (float(lo[j]), float(hi[j]))
    return out


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
    from scipy.stats import bootstrap

    def ratio(a, b, axis=-1):
        return np.mean(a, axis=axis) / np.mean(b, axis=axis)

    out: list[tuple[float | None, float | None]] = [(None, None)] * len(numerators)
    by_n: dict[int, list[int]] = {}
    for i, g in enumerate(numerators):
        if len(g) != len(denominators[i]):
            raise ValueError(f"group {i}: {len(g)} numerators but {len(denominators[i])} denominators")
        by_n.setdefault(len(g), []).append(i)
    for n, idx in sorted(by_n.items()):
        if n < 2:
            continue
        num = np.stack([numerators[i] for i in idx]).astype(np.float64)
        den = np.stack([denominators[i] for i in idx]).astype(np.float64)
        const = (np.ptp(num, axis=-1) == 0) & (np.ptp(den, axis=-1) == 0)
        batch = max(1, int(1.25e7 // (2 * num.size)))
        with np.errstate(invalid="ignore", divide="ignore"):
            res = bootstrap(
                (num, den),
                ratio,
                paired=True,
                axis=-1,
                vectorized=True,
                n_resamples=n_resamples,
                batch=batch,
                confidence_level=confidence,
                method=method,
                random_state=np.random.default_rng(seed),
            )
            point = ratio(num, den)
        lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
        for j, i in enumerate(idx):
            if const[j] and math.isfinite(point[j]):
                out[i] = (float(point[j]), float(point[j]))
            elif math.isfinite(lo[j]) and math.isfinite(hi[j]):
                out[i] = (float(lo[j]), float(hi[j]))
    return out
