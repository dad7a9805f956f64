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
