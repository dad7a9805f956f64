"""Streaming accumulators against independent whole-data computations (numpy, statsmodels), in batches
and merged from pieces in any grouping, with stated tolerances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import statsmodels.api as sm
import torch

from mechlens.errors import DataError
from mechlens.stats.streaming import Histogram, Moments, NormalEquations, Reservoir, priorities, splitmix64


def _pieces(n: int, rng: np.random.Generator, k: int = 5) -> list[slice]:
    """``k`` contiguous pieces of ``range(n)`` of random sizes (some empty)."""
    cuts = np.sort(rng.integers(0, n + 1, k - 1))
    bounds = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


# ------------------------------------------------------------------------------------------------ Moments


def test_moments_match_numpy_with_padding_masks():
    """Per-[layer, position] mean and population std of activations with ragged lengths (padding masked,
    and NaN in the padding, which must not leak). mean/std ~ 100 here; float64 sums of 4,000 terms and
    the sumsq - mean² cancellation (a factor mean²/var = 1e4) give ~1e-11 relative: tolerance 1e-9."""
    rng = np.random.default_rng(0)
    n, layers, pos = 4000, 3, 7
    x = 100.0 + rng.normal(size=(n, layers, pos)) * np.array([1.0, 2.0, 0.5])[:, None]
    lengths = rng.integers(1, pos + 1, n)
    mask = np.arange(pos)[None, :] < lengths[:, None]  # (n, pos): True = a real token
    x[~np.broadcast_to(mask[:, None, :], x.shape)] = np.nan
    acc = Moments((layers, pos))
    for sl in _pieces(n, rng, 9):
        acc.update(torch.from_numpy(x[sl]), mask[sl, None, :])  # mask broadcast over layers
    xm = np.ma.masked_array(x, ~np.broadcast_to(mask[:, None, :], x.shape))
    np.testing.assert_array_equal(acc.count.numpy(), np.broadcast_to(mask.sum(0), (layers, pos)))
    np.testing.assert_allclose(acc.mean, xm.mean(0).filled(np.nan), rtol=1e-12)
    np.testing.assert_allclose(acc.std, xm.std(0, ddof=0).filled(np.nan), rtol=1e-9)


def test_moments_merge_is_associative_and_empty_keys_are_nan():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 4))
    parts = [Moments(4).update(x[sl]) for sl in _pieces(600, rng, 4)]
    left = Moments(4).merge(parts[0]).merge(parts[1]).merge(parts[2]).merge(parts[3])
    right = Moments(4).merge(parts[3].__class__.from_state(parts[3].state()))
    right = Moments(4).merge(parts[0]).merge(Moments(4).merge(parts[1]).merge(Moments(4).merge(parts[2]).merge(right)))
    whole = Moments(4).update(x)
    for a in (left, right):
        np.testing.assert_allclose(a.mean, x.mean(0), rtol=1e-12, atol=1e-15)  # sums regrouped: last-ulp changes
        np.testing.assert_allclose(a.std, whole.std, rtol=1e-12)
    empty = Moments(2).update(np.ones((3, 2)), mask=np.array([[True, False]] * 3))
    assert empty.mean[0] == 1.0 and np.isnan(empty.mean[1]) and np.isnan(empty.std[1])
    with pytest.raises(ValueError, match="expected"):
        Moments(3).update(np.ones((2, 4)))


# ------------------------------------------------------------------------------------------------ OLS


@pytest.mark.parametrize("k", [1, 3])
def test_normal_equations_match_statsmodels(k):
    """Well-conditioned data (x ~ N(0, 1) and a position-like regressor 0..63, noise sd 1): everything in
    statsmodels' OLS table to 1e-10 relative (the equilibrated solve is good to ~cond * 1e-16 ~ 1e-13;
    SSR = y'y - b'X'y loses y'y/SSR ~ 10). p-values to 1e-8: d log p / dt ~ t, so a 1e-12 relative error
    in t costs t² * 1e-12 in p."""
    rng = np.random.default_rng(k)
    n = 5000
    x = np.column_stack([np.arange(n) % 64, rng.normal(size=(n, k - 1))]) if k > 1 else (np.arange(n) % 64)[:, None]
    y = 0.5 + x @ np.linspace(0.02, 0.3, k) + rng.normal(size=n)
    acc = NormalEquations(k)
    for sl in _pieces(n, rng, 7):
        acc.update(x[sl] if k > 1 else torch.from_numpy(x[sl, 0]), y[sl])
    got = acc.fit()
    fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
    for name, want in [
        ("params", fit.params), ("bse", fit.bse), ("tvalues", fit.tvalues), ("r2", fit.rsquared),
        ("r2_adj", fit.rsquared_adj), ("ssr", fit.ssr), ("ess", fit.ess), ("centered_tss", fit.centered_tss),
        ("fvalue", fit.fvalue), ("llf", fit.llf), ("aic", fit.aic), ("bic", fit.bic),
        ("cov_params", fit.cov_params()), ("df_resid", fit.df_resid), ("df_model", fit.df_model),
    ]:  # fmt: skip
        np.testing.assert_allclose(got[name], want, rtol=1e-10, err_msg=name)
    np.testing.assert_allclose(got["pvalues"], fit.pvalues, rtol=1e-8)
    np.testing.assert_allclose(got["f_pvalue"], fit.f_pvalue, rtol=1e-8, atol=1e-300)
    assert got["nobs"] == n
    np.testing.assert_allclose(
        acc.predict(x[:10]), fit.predict(sm.add_constant(x, has_constant="add")[:10]), rtol=1e-10
    )


def test_normal_equations_mask_merge_and_errors():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=300), rng.normal(size=300)
    keep = rng.random(300) < 0.7
    a = NormalEquations().update(x[:100], y[:100], keep[:100])
    b = NormalEquations.from_state(NormalEquations().update(x[100:], y[100:], keep[100:]).state())
    fit = sm.OLS(y[keep], sm.add_constant(x[keep])).fit()
    np.testing.assert_allclose(a.merge(b).fit()["params"], fit.params, rtol=1e-10)
    with pytest.raises(DataError, match="collinear"):
        NormalEquations(2).update(np.column_stack([x, 2 * x]), y).fit()
    with pytest.raises(DataError, match="more than 2 points"):
        NormalEquations().update(x[:2], y[:2]).fit()


# ------------------------------------------------------------------------------------------------ Histogram


def test_histogram_matches_numpy_per_key():
    rng = np.random.default_rng(2)
    edges = np.linspace(-2, 2, 9)
    x = rng.normal(size=(1000, 3)) * 1.5
    x[:5] = 2.0  # the last edge belongs to the last bin, as in numpy
    x[5:8] = np.nan
    mask = rng.random((1000, 3)) < 0.8
    h = Histogram(edges, 3)
    for sl in _pieces(1000, rng):
        h.update(x[sl], mask[sl])
    for j in range(3):
        v = x[mask[:, j], j]
        finite = v[~np.isnan(v)]
        np.testing.assert_array_equal(h.counts[j].numpy(), np.histogram(finite, edges)[0])
        assert h.below[j] == (finite < -2).sum() and h.above[j] == (finite > 2).sum()
        assert h.nan[j] == np.isnan(v).sum()
        assert h.counts[j].sum() + h.below[j] + h.above[j] + h.nan[j] == mask[:, j].sum()  # nothing lost


# ------------------------------------------------------------------------------------------------ Reservoir


def test_splitmix64_is_the_reference_generator():
    """SplitMix64 seeded with 0 outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, ... (its published first
    values; the k-th output is the finaliser of k * golden gamma); checked also against plain Python ints."""

    def ref(z: int) -> int:
        m = (1 << 64) - 1
        z = (z + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    gamma = 0x9E3779B97F4A7C15
    states = np.array([(k * gamma) & ((1 << 64) - 1) for k in range(2)], dtype=np.uint64)
    assert [int(v) for v in splitmix64(states)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    xs = np.random.default_rng(0).integers(0, 2**63, 50, dtype=np.int64)
    assert [int(v) for v in splitmix64(xs.astype(np.uint64))] == [ref(int(v)) for v in xs]


def _stream(n: int, d: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(10 * n)[:n].astype(np.int64)  # sparse global indices, in stream order
    return idx, rng.normal(size=(n, d))


def test_reservoir_is_the_smallest_priorities_whatever_the_batches_and_shards():
    idx, rows = _stream(5000)
    size, seed = 100, 7
    # independent definition: the `size` items of smallest hash priority, computed over everything at once
    want = np.sort(idx[np.argsort(priorities(idx, seed), kind="stable")[:size]])
    single = Reservoir(size, seed)
    for sl in _pieces(len(idx), np.random.default_rng(1), 11):
        single.update(idx[sl], rows[sl])
    np.testing.assert_array_equal(single.index, want)
    row_of = {int(i): r for i, r in zip(idx, rows, strict=True)}
    np.testing.assert_array_equal(single.values, np.array([row_of[int(i)] for i in want]))
    # shards: round robin (the data sharding) and contiguous pieces, merged in either grouping
    for world in (2, 3):
        shards = [Reservoir(size, seed).update(idx[r::world], rows[r::world]) for r in range(world)]
        merged = Reservoir(size, seed)
        for s in shards:
            merged.merge(Reservoir.from_state(s.state()))
        np.testing.assert_array_equal(merged.index, single.index)
        np.testing.assert_array_equal(merged.values, single.values)  # exactly: the same floats
        assert merged.seen == len(idx)
    a, b, c = (
        Reservoir(size, seed).update(idx[sl], rows[sl]) for sl in (slice(0, 1000), slice(1000, 1100), slice(1100, None))
    )
    ab_c = Reservoir.from_state(a.state()).merge(b).merge(c)
    a_bc = a.merge(Reservoir.from_state(b.state()).merge(c))
    np.testing.assert_array_equal(ab_c.index, a_bc.index)
    np.testing.assert_array_equal(ab_c.index, single.index)


def test_reservoir_small_streams_index_only_and_guards():
    r = Reservoir(10, 0).update([5, 3, 9])
    assert r.index.tolist() == [3, 5, 9] and r.values is None and len(r) == 3
    with pytest.raises(ValueError, match="share global indices"):
        Reservoir(10, 0).update([1, 2]).merge(Reservoir(10, 0).update([2, 3]))
    with pytest.raises(ValueError, match="different size or seed"):
        Reservoir(10, 0).merge(Reservoir(10, 1))
    assert Reservoir(4, 3).update(np.arange(10), torch.arange(20.0).reshape(10, 2)).values.shape == (4, 2)


def test_reservoir_memory_is_its_kept_items_whatever_the_stream_length():
    """A reservoir holds 16 + 8 * width bytes per kept item (priority, index, float64 row), ``size`` items
    after any longer stream, and an update of a full reservoir allocates no copy of the kept rows: re-copying
    them every batch fragmented the heap until the corpus lens' RSS grew ~9x the kept bytes (issue 32).
    Bound on an update's traced peak: the batch's rows a few times plus the selection over the kept
    priorities (concatenation, partition, candidates, order: ~7 arrays of 8 bytes per item) -- 64 bytes
    per item, under a sixth of one copy of the kept rows (width 48: 384 bytes per item)."""
    import tracemalloc

    size, width, batch = 2_000, 48, 64
    res = Reservoir(size, seed=0)
    rows = np.random.default_rng(0).normal(size=(batch, width))
    for b in range(4 * size // batch):  # four times its size: full after the first quarter
        res.update(np.arange(b * batch, (b + 1) * batch), rows)
    assert len(res) == size and res.nbytes == size * (16 + 8 * width)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for b in range(4 * size // batch, 5 * size // batch):
            res.update(np.arange(b * batch, (b + 1) * batch), rows)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert res.nbytes == size * (16 + 8 * width) and res.seen == 5 * size // batch * batch
    assert peak < 64 * size + 4 * rows.nbytes, (peak, size * 8 * width)


def test_reservoir_sample_is_uniform():
    """Over 2,000 seeds, each of 400 items is kept with probability 50/400: its inclusion count is
    Binomial(2000, 1/8) (mean 250, sd 14.8). All 400 within 5 sd fails by chance with probability ~2e-4;
    a hash that favoured some indices (e.g. no mixing of the seed) fails it outright."""
    counts = np.zeros(400)
    for seed in range(2000):
        counts[Reservoir(50, seed).update(np.arange(400)).index] += 1
    assert counts.sum() == 2000 * 50
    assert np.abs(counts - 250).max() < 5 * np.sqrt(2000 * (1 / 8) * (7 / 8))
