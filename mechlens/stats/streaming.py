"""Streaming, mergeable statistics: memory constant in the number of texts, results independent of sharding.

Each accumulator has ``update(...)`` (one batch), ``merge(other)`` (associative; returns self) and
``state()``: the live tensors that hold it. :class:`Moments`, :class:`NormalEquations` and
:class:`Histogram` are sums (``reduce = "sum"``): ``torch.distributed.all_reduce(SUM)`` of every tensor of
``state()``, in place, merges the ranks' accumulators (see :func:`mechlens.distributed.merge`). All sums
are float64 on the CPU (a batch is reduced on its own device first, then added). A :class:`Reservoir`
is merged by gathering (``reduce = "gather"``): the ``size`` smallest priorities of the union.

Precision: float64 sums of ``n`` terms carry a relative error of about ``n * 2**-53`` in the worst case
(``sqrt(n) * 2**-53`` typically). Variances come from ``sum(x**2)/n - mean**2``, which loses a further
factor ``mean**2 / var``; for activations with mean/std up to 1e3 that is still ~1e-10 relative.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from mechlens.errors import DataError

F64 = torch.float64


def _f64(x: Any) -> torch.Tensor:
    """A float64 tensor on the input's own device (numpy arrays and lists become CPU tensors)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(F64)


def _mask(mask: Any, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask broadcast to ``like``'s shape (numpy broadcasting: aligned on the right)."""
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    m = m.to(device=like.device, dtype=torch.bool)
    try:
        return torch.broadcast_to(m, like.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(m.shape)} does not broadcast to values {tuple(like.shape)}") from None


class Moments:
    """Count, sum and sum of squares per key (e.g. per [layer, position]) -> mean and population std.

    ``update(values, mask=None)``: ``values`` of shape ``(n, *shape)`` is reduced over its first axis;
    ``mask`` (broadcastable to ``values``; True = counts) leaves padding out, NaN in padding included.
    A key with no values has mean and std NaN.
    """

    reduce: ClassVar[str] = "sum"

    def __init__(self, shape: tuple[int, ...] | int = ()):
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.count = torch.zeros(self.shape, dtype=F64)
        self.sum = torch.zeros(self.shape, dtype=F64)
        self.sumsq = torch.zeros(self.shape, dtype=F64)

    def update(self, values: Any, mask: Any = None) -> Moments:
        x = _f64(values)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"values of shape {tuple(x.shape)}: expected (n, *{self.shape})")
        if mask is None:
            self.count += x.shape[0]
        else:
            m = _mask(mask, x)
            x = torch.where(m, x, torch.zeros((), dtype=F64, device=x.device))
            self.count += m.sum(0).to(F64).cpu()
        self.sum += x.sum(0).cpu()
        self.sumsq += (x * x).sum(0).cpu()
        return self

    def merge(self, other: Moments) -> Moments:
        if other.shape != self.shape:
            raise ValueError(f"cannot merge Moments of shapes {self.shape} and {other.shape}")
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Moments:
        out = cls(tuple(np.shape(state["count"])))
        for k in ("count", "sum", "sumsq"):
            getattr(out, k).copy_(_f64(state[k]).cpu())
        return out

    @property
    def mean(self) -> np.ndarray:
        n = self.count.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, self.sum.numpy() / n, np.nan)

    @property
    def var(self) -> np.ndarray:
        """Population variance (numpy ``var``, ``ddof=0``), clipped at 0 against rounding."""
        n = self.count.numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sum.numpy() / n
            return np.where(n > 0, np.maximum(self.sumsq.numpy() / n - mean * mean, 0.0), np.nan)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


class NormalEquations:
    """OLS ``y ~ const + x`` from its sufficient statistics: ``X'X``, ``X'y``, ``y'y``, ``n`` (X with the
    constant column first, as ``statsmodels.add_constant``). :meth:`fit` gives the statsmodels OLS table
    (params, bse, tvalues, pvalues, r2, r2_adj, nobs, F, log-likelihood, AIC/BIC) without the points.

    The solve is equilibrated (``X'X`` scaled to unit diagonal), so its error is that of the scaled
    condition number; the residual sum of squares is ``y'y - b'X'y``, which loses ``y'y / SSR`` in
    relative precision (an R² of 0.999999 costs ~6 digits). Residual-based diagnostics of statsmodels'
    summary (Durbin-Watson, Jarque-Bera, omnibus) need the points and are not available.
    """

    reduce: ClassVar[str] = "sum"

    def __init__(self, k: int = 1):
        self.k = int(k)
        self.xtx = torch.zeros((self.k + 1, self.k + 1), dtype=F64)
        self.xty = torch.zeros(self.k + 1, dtype=F64)
        self.yty = torch.zeros((), dtype=F64)
        self.n = torch.zeros((), dtype=F64)

    def update(self, x: Any, y: Any, mask: Any = None) -> NormalEquations:
        """``x`` of shape ``(n,)`` (one regressor) or ``(n, k)``; ``y`` of shape ``(n,)``; ``mask`` (n,)."""
        y = _f64(y).reshape(-1)
        x = _f64(x).to(y.device).reshape(y.shape[0], -1)
        if x.shape[1] != self.k:
            raise ValueError(f"x has {x.shape[1]} regressors, expected {self.k}")
        if mask is not None:
            m = _mask(mask, y)
            x, y = x[m], y[m]
        a = torch.cat([torch.ones((x.shape[0], 1), dtype=F64, device=x.device), x], 1)
        self.xtx += (a.T @ a).cpu()
        self.xty += (a.T @ y).cpu()
        self.yty += (y @ y).cpu()
        self.n += y.shape[0]
        return self

    def merge(self, other: NormalEquations) -> NormalEquations:
        if other.k != self.k:
            raise ValueError(f"cannot merge NormalEquations with {self.k} and {other.k} regressors")
        self.xtx += other.xtx
        self.xty += other.xty
        self.yty += other.yty
        self.n += other.n
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "xty": self.xty, "yty": self.yty, "n": self.n}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NormalEquations:
        out = cls(np.shape(state["xty"])[0] - 1)
        for k in ("xtx", "xty", "yty", "n"):
            getattr(out, k).copy_(_f64(state[k]).cpu())
        return out

    def _solve(self) -> tuple[np.ndarray, np.ndarray]:
        """(params, inverse of X'X), equilibrated; a DataError if the regressors are collinear."""
        xtx, xty = self.xtx.numpy(), self.xty.numpy()
        d = np.sqrt(np.diag(xtx))
        if not np.all(d > 0):
            raise DataError("OLS has no data (or an all-zero regressor): use more texts (--n-texts, --data)")
        s = xtx / np.outer(d, d)
        if np.linalg.cond(s) > 1e12:
            raise DataError(
                "OLS regressors are collinear over these data (e.g. a regressor that never varies): "
                "use more varied texts (--data, --n-texts)"
            )
        inv = np.linalg.inv(s) / np.outer(d, d)
        params = np.linalg.solve(s, xty / d) / d
        return params, inv

    def fit(self) -> dict[str, Any]:
        from scipy import stats

        n, p = float(self.n), self.k + 1
        df_resid, df_model = n - p, float(self.k)
        if df_resid <= 0:
            raise DataError(f"OLS with {p} parameters needs more than {p} points, got {int(n)}: use more texts")
        params, inv = self._solve()
        yty, sum_y = float(self.yty), float(self.xty[0])
        ssr = max(yty - float(params @ self.xty.numpy()), 0.0)
        centered_tss = yty - sum_y * sum_y / n
        ess = centered_tss - ssr
        scale = ssr / df_resid
        cov = scale * inv
        bse = np.sqrt(np.diag(cov))
        with np.errstate(divide="ignore", invalid="ignore"):
            tvalues = params / bse
            r2 = 1.0 - ssr / centered_tss if centered_tss > 0 else float("nan")
            fvalue = (ess / df_model) / scale if df_model > 0 else float("nan")
        llf = -n / 2.0 * (math.log(2 * math.pi) + math.log(ssr / n) + 1.0) if ssr > 0 else float("inf")
        return {
            "params": params.tolist(),
            "bse": bse.tolist(),
            "tvalues": tvalues.tolist(),
            "pvalues": (2 * stats.t.sf(np.abs(tvalues), df_resid)).tolist(),
            "r2": float(r2),
            "r2_adj": float(1.0 - (n - 1.0) / df_resid * (1.0 - r2)),
            "nobs": int(n),
            "df_model": df_model,
            "df_resid": df_resid,
            "ssr": ssr,
            "ess": ess,
            "centered_tss": centered_tss,
            "scale": scale,
            "fvalue": float(fvalue),
            "f_pvalue": float(stats.f.sf(fvalue, df_model, df_resid)) if df_model > 0 else float("nan"),
            "llf": llf,
            "aic": -2 * llf + 2 * p,
            "bic": -2 * llf + math.log(n) * p,
            "cov_params": cov.tolist(),
        }

    def predict(self, x: Any) -> np.ndarray:
        params, _ = self._solve()
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.k)
        return params[0] + x @ params[1:]


class Histogram:
    """Counts of values in fixed bins per key, numpy ``histogram`` semantics (bins ``[a, b)``, the last
    ``[a, b]``), with the values below, above and NaN counted apart so no value is lost silently.

    ``update(values, mask=None)``: ``values`` of shape ``(n, *shape)``; ``counts`` has shape
    ``(*shape, len(edges) - 1)``.
    """

    reduce: ClassVar[str] = "sum"

    def __init__(self, edges: Any, shape: tuple[int, ...] | int = ()):
        e = np.asarray(edges, dtype=np.float64)
        if e.ndim != 1 or len(e) < 2 or not np.all(np.diff(e) > 0) or not np.all(np.isfinite(e)):
            raise ValueError("edges must be finite and strictly increasing, at least 2 of them")
        self.edges = torch.as_tensor(e)
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.counts = torch.zeros((*self.shape, len(e) - 1), dtype=F64)
        self.below = torch.zeros(self.shape, dtype=F64)
        self.above = torch.zeros(self.shape, dtype=F64)
        self.nan = torch.zeros(self.shape, dtype=F64)

    def update(self, values: Any, mask: Any = None) -> Histogram:
        x = _f64(values)
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"values of shape {tuple(x.shape)}: expected (n, *{self.shape})")
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else _mask(mask, x)
        edges = self.edges.to(x.device)
        nb = len(edges) - 1
        isnan = torch.isnan(x) & m
        below = (x < edges[0]) & m
        above = (x > edges[-1]) & m
        inside = m & ~isnan & ~below & ~above
        b = torch.bucketize(x, edges, right=True) - 1  # edges[b] <= x < edges[b + 1]
        b = b.clamp(max=nb - 1)  # x == last edge -> the last bin
        keys = torch.arange(math.prod(self.shape), device=x.device).reshape(self.shape).expand_as(x)
        flat = (keys * nb + b)[inside]
        counts = torch.bincount(flat, minlength=math.prod(self.shape) * nb).to(F64)
        self.counts += counts.reshape(self.counts.shape).cpu()
        self.below += below.sum(0).to(F64).cpu()
        self.above += above.sum(0).to(F64).cpu()
        self.nan += isnan.sum(0).to(F64).cpu()
        return self

    def merge(self, other: Histogram) -> Histogram:
        if other.shape != self.shape or not torch.equal(other.edges, self.edges):
            raise ValueError("cannot merge histograms with different edges or keys")
        for k in ("counts", "below", "above", "nan"):
            getattr(self, k).add_(getattr(other, k))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "below": self.below, "above": self.above, "nan": self.nan}


# ------------------------------------------------------------------------------------------------ reservoir

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: Any) -> np.ndarray:
    """SplitMix64's finaliser of ``x + golden gamma`` (uint64, wrapping): a fast, vectorised hash whose
    outputs for consecutive inputs are statistically independent and uniform on [0, 2**64)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return np.asarray(z ^ (z >> np.uint64(31)))


def priorities(index: Any, seed: int) -> np.ndarray:
    """The priority of the items at global indices ``index`` under ``seed``: a hash of (seed, index),
    so an item's fate does not depend on which rank saw it, or in which batch."""
    idx = np.asarray(index, dtype=np.int64).astype(np.uint64)
    return splitmix64(idx ^ splitmix64(np.uint64(seed)))


class Reservoir:
    """A seeded uniform sample of ``size`` items (without replacement) from a stream, independent of sharding.

    Each item has a priority hashed from its GLOBAL index and the seed (:func:`priorities`); the sample is
    the ``size`` items of smallest priority (ties, which need a 64-bit hash collision, go to the smaller
    index). Since that is a property of the set of items seen, merging two reservoirs (the ``size``
    smallest of their union) gives exactly the reservoir of a single process that saw both streams.
    Items are rows of a float64 array (``update(index, rows)``, rows of shape ``(n, *item_shape)``), or
    indices only (``rows=None``). Global indices must be unique over the stream (e.g. text index times the
    maximum length plus position, from :func:`mechlens.data.iter_indexed`).

    Memory: ``16 + 8 * prod(item_shape)`` bytes per kept item (priority, index, float64 row), at most
    ``size`` items, whatever the length of the stream. Items live in fixed slots: an update writes the
    entering items over the evicted ones in place (storage grows by doubling up to ``size`` slots while
    the reservoir fills), so reading a stream never copies the kept rows; ``index``, ``priority`` and
    ``rows`` give them in global-index order (a copy, sorted once per change).
    """

    reduce: ClassVar[str] = "gather"

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self.size, self.seed = int(size), int(seed)
        self.seen = 0
        self._n = 0  # slots [0, _n) are filled; storage capacity len(self._priority) <= size
        self._priority = np.empty(0, np.uint64)
        self._index = np.empty(0, np.int64)
        self._rows: np.ndarray | None = None
        self._order: np.ndarray | None = None  # the filled slots in global-index order (cached)

    def _reserve(self, n: int, item_shape: tuple[int, ...] | None) -> None:
        """Storage for ``n`` items (and rows of ``item_shape``): doubled when short, never above ``size``."""
        cap = len(self._priority)
        if item_shape is not None and self._rows is None:
            self._rows = np.empty((cap, *item_shape), np.float64)
        if n <= cap:
            return
        cap = min(self.size, max(n, 2 * cap, 64))
        keep = slice(0, self._n)
        for name in ("_priority", "_index", "_rows"):
            old = getattr(self, name)
            if old is not None:
                new = np.empty((cap, *old.shape[1:]), old.dtype)
                new[keep] = old[keep]
                setattr(self, name, new)

    def _offer(self, pri: np.ndarray, idx: np.ndarray, rows: np.ndarray | None) -> None:
        """Keep the ``size`` smallest (priority, index) of the kept items and these: entering items are
        written into the evicted (or free) slots; nothing else moves."""
        n = self._n
        if n >= self.size:  # full: only items below the current largest priority can enter
            keep = pri < self._priority[:n].max()
            pri, idx = pri[keep], idx[keep]
            rows = None if rows is None else rows[keep]
        self._reserve(n, None if rows is None else rows.shape[1:])
        if not len(idx):
            return
        all_pri = np.concatenate([self._priority[:n], pri])
        m = len(all_pri)
        if m > self.size:
            all_idx = np.concatenate([self._index[:n], idx])
            cut = np.partition(all_pri, self.size - 1)[self.size - 1]
            cand = np.nonzero(all_pri <= cut)[0]  # all with priority <= the size-th smallest (ties included)
            won = cand[np.lexsort((all_idx[cand], all_pri[cand]))][: self.size]
            stays = np.zeros(n, bool)
            stays[won[won < n]] = True
            enter = np.sort(won[won >= n]) - n
            slots = np.concatenate([np.nonzero(~stays)[0], np.arange(n, self.size)])
        else:
            enter = np.arange(len(idx))
            slots = np.arange(n, m)
        n_after = min(m, self.size)
        self._reserve(n_after, None)
        self._priority[slots] = pri[enter]
        self._index[slots] = idx[enter]
        if rows is not None:
            self._rows[slots] = rows[enter]
        self._n, self._order = n_after, None

    def update(self, index: Any, rows: Any = None) -> Reservoir:
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        new_rows = None
        if rows is not None:
            r = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
            new_rows = r.astype(np.float64, copy=False)
            if len(new_rows) != len(idx):
                raise ValueError(f"{len(idx)} indices but {len(new_rows)} rows")
            if self._rows is not None and new_rows.shape[1:] != self._rows.shape[1:]:
                raise ValueError(f"rows of shape {new_rows.shape[1:]}, the reservoir holds {self._rows.shape[1:]}")
        if (new_rows is None) != (self._rows is None) and (self.seen or self._rows is not None):
            raise ValueError("a reservoir holds rows for all of its items or for none")
        self.seen += len(idx)
        self._offer(priorities(idx, self.seed), idx, new_rows)
        return self

    def merge(self, other: Reservoir) -> Reservoir:
        if (other.size, other.seed) != (self.size, self.seed):
            raise ValueError("cannot merge reservoirs of different size or seed")
        if len(other) and (self._rows is None) != (other._rows is None) and (len(self) or self._rows is not None):
            raise ValueError("cannot merge a reservoir of rows with one of indices only")
        if np.intersect1d(self.index, other.index).size:
            raise ValueError("merged reservoirs share global indices: the same item was counted twice")
        n = other._n
        rows = None if other._rows is None else other._rows[:n]
        if rows is not None and self._rows is not None and rows.shape[1:] != self._rows.shape[1:]:
            raise ValueError("cannot merge reservoirs of rows of different shapes")
        self.seen += other.seen
        if n:
            self._offer(other._priority[:n].copy(), other._index[:n].copy(), rows)
        return self

    def _sorted(self) -> np.ndarray:
        if self._order is None:
            self._order = np.argsort(self._index[: self._n], kind="stable")
        return self._order

    @property
    def priority(self) -> np.ndarray:
        """The kept items' priorities, in global-index order."""
        return self._priority[: self._n][self._sorted()]

    @property
    def index(self) -> np.ndarray:
        """The kept items' global indices, ascending."""
        return self._index[: self._n][self._sorted()]

    @property
    def rows(self) -> np.ndarray | None:
        """The kept rows, in global-index order (None for an index-only reservoir)."""
        return None if self._rows is None else self._rows[: self._n][self._sorted()]

    def state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "seed": self.seed,
            "seen": self.seen,
            "priority": self.priority,
            "index": self.index,
            "rows": self.rows,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Reservoir:
        out = cls(state["size"], state["seed"])
        out.seen = int(state["seen"])
        out._priority = np.array(state["priority"], np.uint64)
        out._index = np.array(state["index"], np.int64)
        out._rows = None if state["rows"] is None else np.array(state["rows"], np.float64)
        out._n = len(out._index)
        return out

    @property
    def values(self) -> np.ndarray | None:
        """The sampled rows, in global-index order (None for an index-only reservoir)."""
        return self.rows

    @property
    def nbytes(self) -> int:
        """Bytes held: the storage of its priorities, indices and rows (at most ``size`` slots)."""
        return sum(a.nbytes for a in (self._priority, self._index, self._rows) if a is not None)

    def __len__(self) -> int:
        return self._n
