"""Mutual information: a 2-D histogram estimate (bits) and the Kraskov kNN estimator (nats) -- sklearn's
``mutual_info_regression`` for one pair, and a vectorised form of the same estimator for many pairs
at once (:func:`mi_knn_many`, equal to sklearn pair by pair; tested)."""

from __future__ import annotations

import numpy as np
from scipy.special import digamma

_MAX_BATCH_ELEMENTS = 2**24  # pairs x samples x samples distances held at once (128 MiB of float64)


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
    return float(
        mutual_info_regression(x, np.asarray(y, np.float64), n_neighbors=n_neighbors, random_state=random_state)[0]
    )


def _scaled_with_noise(v: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """sklearn's preparation of a continuous variable: unit variance (no centring; a constant stays
    as it is), then ``1e-10 * max(1, mean |v|)`` times the given standard-normal noise."""
    std = v.std(-1, keepdims=True)
    v = v / np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
    return v + 1e-10 * np.maximum(1, np.abs(v).mean(-1, keepdims=True)) * noise


def mi_knn_many(x: np.ndarray, y: np.ndarray, random_state: int = 0, n_neighbors: int = 3) -> np.ndarray:
    """Kraskov (KSG, algorithm 1) MI in nats between ``x[p]`` and ``y[p]`` for every pair ``p`` of
    ``[pairs, samples]`` arrays, as :func:`mi_knn` computes it (same scaling, same seeded noise,
    Chebyshev radius to the k-th neighbour, strict counts, clipped at 0), with dense distance
    matrices in batches instead of one KD-tree per pair."""
    x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same [pairs, samples] shape, got {x.shape} and {y.shape}")
    n_pairs, n = x.shape
    if n <= n_neighbors:
        raise ValueError(f"{n} samples is too few for n_neighbors={n_neighbors}: need more than {n_neighbors}")
    rng = np.random.RandomState(random_state)  # sklearn's order: the feature's noise, then the target's
    x = _scaled_with_noise(x, rng.standard_normal(size=(n, 1))[:, 0])
    y = _scaled_with_noise(y, rng.standard_normal(size=n))
    out = np.empty(n_pairs)
    step = max(1, _MAX_BATCH_ELEMENTS // (n * n))
    for start in range(0, n_pairs, step):
        xs, ys = x[start : start + step], y[start : start + step]
        dx = np.abs(xs[:, :, None] - xs[:, None, :])
        dy = np.abs(ys[:, :, None] - ys[:, None, :])
        joint = np.maximum(dx, dy)
        joint[:, np.arange(n), np.arange(n)] = np.inf  # a point is not its own neighbour
        radius = np.nextafter(np.partition(joint, n_neighbors - 1, axis=-1)[..., n_neighbors - 1], 0)
        nx = (dx <= radius[..., None]).sum(-1) - 1.0  # minus the point itself
        ny = (dy <= radius[..., None]).sum(-1) - 1.0
        mi = digamma(n) + digamma(n_neighbors) - digamma(nx + 1).mean(-1) - digamma(ny + 1).mean(-1)
        out[start : start + step] = np.maximum(mi, 0)
    return out


def pairwise_mi(rows: np.ndarray, random_state: int = 0, n_jobs: int = 1) -> np.ndarray:
    """Symmetric matrix of the kNN MI (:func:`mi_knn`) between every pair of rows (the diagonal is
    left 0). Up to 2,048 samples per row all pairs go through :func:`mi_knn_many`; longer rows use
    sklearn's KD-trees pair by pair, in parallel with joblib when ``n_jobs != 1``."""
    rows = np.asarray(rows, np.float64)
    n = len(rows)
    i_idx, j_idx = np.triu_indices(n, 1)
    if rows.shape[1] <= 2048:
        vals = mi_knn_many(rows[i_idx], rows[j_idx], random_state)
    elif n_jobs == 1:
        vals = [mi_knn(rows[i], rows[j], random_state) for i, j in zip(i_idx, j_idx, strict=True)]
    else:
        from joblib import Parallel, delayed

        vals = Parallel(n_jobs=n_jobs)(
            delayed(mi_knn)(rows[i], rows[j], random_state) for i, j in zip(i_idx, j_idx, strict=True)
        )
    out = np.zeros((n, n))
    out[i_idx, j_idx] = out[j_idx, i_idx] = vals
    return out
