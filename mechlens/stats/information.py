"""Mutual information: a 2-D histogram estimate (bits) and sklearn's kNN estimator (nats)."""

from __future__ import annotations

import numpy as np


def mi_histogram(x: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Plug-in MI from a ``bins x bins`` joint histogram, in bits."""
    joint, _, _ = np.histogram2d(np.asarray(x, np.float64), np.asarray(y, np.float64), bins=bins)
    pxy = joint / joint.sum()
    px, py = pxy.sum(1, keepdims=True), pxy.sum(0, keepdims=True)
    nz = pxy > 0
    return float((pxy[nz] * np.log2(pxy[nz] / (px @ py)[nz])).sum())


def mi_knn(x: np.ndarray, y: np.ndarray, random_state: int = 0, n_neighbors: int = 3) -> float:
    """sklearn's ``mutual_info_regression`` (Kraskov kNN estimator, nats), ``random_state`` fixed
    because sklearn adds a little noise to the inputs."""
    from sklearn.feature_selection import mutual_info_regression

    x = np.asarray(x, np.float64).reshape(-1, 1)
    return float(mutual_info_regression(x, np.asarray(y, np.float64), n_neighbors=n_neighbors,
                                        random_state=random_state)[0])  # fmt: skip


def pairwise_mi(rows: np.ndarray, random_state: int = 0, n_jobs: int = 1) -> np.ndarray:
    """Symmetric matrix of :func:`mi_knn` between every pair of rows (the diagonal is left 0);
    pairs run in parallel with joblib when ``n_jobs != 1``."""
    n = len(rows)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if n_jobs == 1:
        vals = [mi_knn(rows[i], rows[j], random_state) for i, j in pairs]
    else:
        from joblib import Parallel, delayed

        vals = Parallel(n_jobs=n_jobs)(delayed(mi_knn)(rows[i], rows[j], random_state) for i, j in pairs)
    out = np.zeros((n, n))
    for (i, j), v in zip(pairs, vals, strict=True):
        out[i, j] = out[j, i] = v
    return out
