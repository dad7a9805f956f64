"""Study 5 vs scipy / sklearn and the HF original (forward hooks on each block's attention and MLP)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from sklearn.feature_selection import mutual_info_regression
from sklearn.metrics import mutual_info_score

from mechlens import DataError, TokenError, encode
from mechlens.data import load_texts
from mechlens.stats.distance import minkowski, pairwise_minkowski
from mechlens.stats.information import mi_histogram, mi_knn, mi_knn_many, pairwise_mi
from mechlens.studies import distances as ds


@pytest.mark.parametrize("p", [1, 2])
def test_minkowski_equals_scipy(p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 33))
    assert (
        abs(minkowski(torch.tensor(x[0]), torch.tensor(x[1]), p) - scipy.spatial.distance.minkowski(x[0], x[1], p))
        <= 1e-12
    )
    np.testing.assert_allclose(pairwise_minkowski(torch.tensor(x), p).numpy(),
                               scipy.spatial.distance.cdist(x, x, "minkowski", p=p), atol=1e-12)  # fmt: skip


def test_mutual_information_estimators():
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, 1500)
    y = x**2 + rng.normal(0, 0.3, 1500)
    # histogram MI == sklearn's mutual_info_score on the same bins, converted to bits
    for bins in (4, 10, 24):
        ex, ey = np.histogram_bin_edges(x, bins), np.histogram_bin_edges(y, bins)
        lx, ly = np.clip(np.digitize(x, ex[1:-1]), 0, bins - 1), np.clip(np.digitize(y, ey[1:-1]), 0, bins - 1)
        assert abs(mi_histogram(x, y, bins) - mutual_info_score(lx, ly) / np.log(2)) <= 1e-9
    assert mi_knn(x, y, 0) == mutual_info_regression(x[:, None], y, random_state=0)[0]
    assert abs(scipy.stats.pearsonr(x, y)[0]) < 0.1 < mi_knn(x, y, 0)  # dependence Pearson misses


@pytest.mark.parametrize("n", [4, 10, 128, 500])
def test_vectorised_knn_mi_equals_sklearn_pair_by_pair(n):
    """mi_knn_many (dense distances, all pairs at once) reproduces sklearn's mutual_info_regression
    to the last bit (measured: identical), including a constant row and tied values."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(12, n))
    y = x * rng.uniform(0, 2, (12, 1)) + rng.normal(size=(12, n)) * rng.uniform(0.1, 3, (12, 1))
    x[3] = 5.0
    y[5] = np.round(y[5])
    ref = [mutual_info_regression(x[p][:, None], y[p], random_state=7)[0] for p in range(12)]
    np.testing.assert_array_equal(mi_knn_many(x, y, 7), ref)
    rows = rng.normal(size=(5, n))
    pm = pairwise_mi(rows, 0)
    for i, j in [(0, 1), (1, 3), (2, 4)]:
        assert pm[i, j] == pm[j, i] == mutual_info_regression(rows[i][:, None], rows[j], random_state=0)[0]
    with pytest.raises(ValueError, match="too few"):
        mi_knn_many(x[:, :3], y[:, :3])


def test_pairwise_mi_on_long_rows_uses_sklearn_serially_or_in_parallel():
    rows = np.random.default_rng(2).normal(size=(3, 2100))
    serial, parallel = pairwise_mi(rows, 0, 1), pairwise_mi(rows, 0, 2)
    np.testing.assert_array_equal(serial, parallel)
    assert serial[0, 2] == mutual_info_regression(rows[0][:, None], rows[2], random_state=0)[0]


def _hf_outputs(hf, tokens, cols):
    rec = {}
    hs = []
    for layer, b in enumerate(hf.transformer.h):
        hs.append(b.attn.register_forward_hook(lambda m, i, o, l=layer: rec.__setitem__(("attn", l), o[0])))
        hs.append(b.mlp.register_forward_hook(lambda m, i, o, l=layer: rec.__setitem__(("mlp", l), o)))
    try:
        with torch.no_grad():
            hf(input_ids=tokens)
    finally:
        for h in hs:
            h.remove()
    n = len(hf.transformer.h)
    return {k: torch.stack([rec[(k, l)][0, cols] for l in range(n)]).double().numpy() for k in ("attn", "mlp")}


def test_distance_study_equals_recomputation_from_hf(causal_pair):
    m, hf = causal_pair.bridge, causal_pair.hf
    cfg = ds.Config(n_targets=8)
    res = ds.run(m, cfg).metrics
    (text,) = load_texts("coffee")
    batch = encode(m, [text], bos=True)
    cols = torch.tensor(res["target_positions"])  # no padding, BOS at 0: positions are columns
    assert (batch.tokens[0, cols] == 6891).all()
    hf_acts = _hf_outputs(hf, batch.tokens, cols)
    pos_dist = np.abs(cols[:, None] - cols[None, :]).numpy().astype(float)
    iu = np.triu_indices(len(cols), 1)
    layer = res["layer"]
    for k in ("attn", "mlp"):
        a = hf_acts[k][layer]
        for p, name in ((1, "L1"), (2, "L2")):
            ref = scipy.spatial.distance.cdist(a, a, "minkowski", p=p)
            got = np.array(res["distance_matrices"][k][name])
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
            tau = scipy.stats.kendalltau(ref[iu], pos_dist[iu]).statistic
            assert abs(res["kendall_tau"][k][name]["tau"] - tau) <= 1e-9 or np.isclose(
                res["kendall_tau"][k][name]["tau"], tau, atol=0.05
            )  # equal unless a near-tie among distances flips (|d| noise 1e-6)
        # MI: sklearn's kNN estimate on HF activations; kNN MI jumps with 1e-6 input changes, so compare
        # the matrices on average (pitfalls note: tolerance ~0.02)
        mi_ref = np.array([[mutual_info_regression(a[i][:, None], a[j], random_state=0)[0] if i != j else 0.0
                            for j in range(len(a))] for i in range(len(a))])  # fmt: skip
        assert np.abs(np.array(res["distance_matrices"][k]["MI"]) - mi_ref)[iu].mean() <= 0.02
    # layer sweep: tau per layer on L2 equals scipy on HF activations
    for li in range(len(hf_acts["attn"])):
        a = hf_acts["mlp"][li]
        tau = scipy.stats.kendalltau(scipy.spatial.distance.pdist(a, "minkowski", p=2), pos_dist[iu]).statistic
        assert abs(res["kendall_tau_by_layer"]["mlp"]["L2"][li] - tau) <= 0.05
    # part 7: norms at the target of each n_context-token context, one HF forward per context
    norms = np.array(res["context_norms"]["attn"])  # [layer, n_targets]
    for t, c in enumerate(cols.tolist()):
        start = max(0, c - cfg.n_context + 1)
        ctx = batch.tokens[:, start : c + 1]
        out = _hf_outputs(hf, ctx, torch.tensor([ctx.shape[1] - 1]))
        np.testing.assert_allclose(norms[:, t], np.linalg.norm(out["attn"][:, 0], axis=-1), rtol=1e-4)
    mi_layers = np.array(res["interlayer_mi"]["attn"])
    assert np.allclose(mi_layers, mi_layers.T) and mi_layers.shape == (len(norms),) * 2


def test_distance_study_errors(gpt2_pair):
    with pytest.raises(TokenError, match="occurs 0"):
        ds.run(gpt2_pair.bridge, ds.Config(target=" piano"))
    with pytest.raises(DataError, match="--n-targets"):
        ds.run(gpt2_pair.bridge, ds.Config(n_targets=50))
    with pytest.raises(TokenError, match="not one"):
        ds.run(gpt2_pair.bridge, ds.Config(target=" coffee beans"))


def test_trained_model_distance_tracks_position_in_early_layers(tiny_gpt2_pair):
    res = ds.run(tiny_gpt2_pair.bridge).metrics
    assert res["kendall_tau_by_layer"]["attn"]["L2"][0] > 0.3  # measured 0.67


def test_distance_study_fits_a_masked_lm_context_with_its_special_tokens(roberta_pair):
    """A long document is cut so that <s> + text + </s> fits the masked LM's positions (it used to
    count only one special token: "130 tokens exceed 129" here, "513 exceed 512" on roberta-large)."""
    m = roberta_pair.bridge
    text = "We drink coffee in the morning. " * 100  # ~700 tokens, cut to fit
    res = ds.run(m, ds.Config(n_targets=10, n_synthetic=100, mi_bins=(4,)), texts=[text]).metrics
    assert res["target"]["occurrences"] >= 18  # every occurrence within the 126 text positions
    assert max(res["target_positions"]) <= m.cfg.n_ctx - 2  # the last text position before </s>
    assert len(res["kendall_tau_by_layer"]["attn"]["L2"]) == m.cfg.n_layers
