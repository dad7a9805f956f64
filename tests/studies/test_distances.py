"""Study 5 vs scipy / sklearn and the HF original (forward hooks on each block's attention and MLP)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from sklearn.feature_selection import mutual_info_regression
from sklearn.metrics import mutual_info_score

from mechlens import DataError, TokenError, encode
from mechlens.data import load_texts
from mechlens.result import metrics_of
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


# -- the typed parts -----------------------------------------------------------------------------------

# every results.json key path of the study before the parts refactor (list indices dropped): a public schema
METRIC_KEYS = {
    "synthetic", "synthetic.mi_histogram_bits_by_bins", "synthetic.mi_knn_nats", "synthetic.pearson_r",
    "synthetic.minkowski_demo", "synthetic.minkowski_demo.L1", "synthetic.minkowski_demo.L2",
    "target", "target.string", "target.id", "target.occurrences", "target_positions", "layer",
    "distance_matrices", "position_distance", "kendall_tau", "kendall_tau_by_layer", "kendall_p_by_layer",
    "mean_normalised_distance_by_layer", "context_norms", "interlayer_mi", "interlayer_mi_by_gap",
    *(f"{key}.{k}" for key in ("context_norms", "interlayer_mi", "interlayer_mi_by_gap") for k in ("attn", "mlp")),
    *(f"{key}.{k}.{m}" for key in ("distance_matrices", "kendall_tau", "kendall_tau_by_layer", "kendall_p_by_layer",
                                   "mean_normalised_distance_by_layer")
      for k in ("attn", "mlp") for m in ("MI", "L1", "L2")),
    *(f"{key}.{k}" for key in ("distance_matrices", "kendall_tau", "kendall_tau_by_layer", "kendall_p_by_layer",
                               "mean_normalised_distance_by_layer") for k in ("attn", "mlp")),
    *(f"kendall_tau.{k}.{m}.{s}" for k in ("attn", "mlp") for m in ("MI", "L1", "L2") for s in ("tau", "p")),
}  # fmt: skip
SMALL = {"n_synthetic": 100, "mi_bins": (4, 8)}


def _key_paths(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path
            if not (prefix.endswith("mi_histogram_bits_by_bins")):
                yield from _key_paths(v, path)


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2_pair):
    return ds.run(tiny_gpt2_pair.bridge, ds.Config(**SMALL))


def _fake_outputs(rng, n_layers=3, n=9, d=40, positions=None):
    pos = np.array(positions if positions is not None else np.sort(rng.choice(200, n, replace=False)), np.int64)
    acts = {k: rng.normal(size=(n_layers, len(pos), d)) for k in ds.KINDS}
    return ds.TargetOutputs(target=ds.TargetInfo(" x", 1, len(pos)), columns=pos.copy(), positions=pos, outputs=acts)


def _assert_frozen(obj):
    field = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)


def test_run_keeps_every_metric_key_and_derives_metrics_from_the_typed_result(tiny_run):
    keys = set(_key_paths(tiny_run.metrics))
    assert keys >= METRIC_KEYS, sorted(METRIC_KEYS - keys)
    assert tiny_run.metrics == metrics_of(tiny_run.parts)
    assert isinstance(tiny_run.parts, ds.DistancesResult)
    for part in (tiny_run.parts, tiny_run.parts.outputs, tiny_run.parts.pairwise, tiny_run.parts.sweep,
                 tiny_run.parts.interlayer, tiny_run.parts.synthetic):  # fmt: skip
        _assert_frozen(part)
    assert set(tiny_run.figures) == {"mi_by_bins", "pairs", "pairs_normalised", "layer_sweep", "interlayer_mi"}
    assert {"pairs", "layer_sweep"} == set(tiny_run.tables)


def test_synthetic_mi_part_against_sklearn_scipy_numpy():
    syn = ds.synthetic_mi(300, (4, 10), seed=3)
    _assert_frozen(syn)
    rng = np.random.default_rng(3)  # the documented draw, independently
    x = rng.uniform(-2, 2, 300)
    y = x**2 + rng.normal(0, 0.3, 300)
    np.testing.assert_array_equal(syn.x, x)
    np.testing.assert_array_equal(syn.y, y)
    assert syn.mi_knn_nats == mutual_info_regression(x[:, None], y, random_state=3)[0]
    assert syn.pearson_r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    for bins in (4, 10):  # plug-in MI of the joint histogram (numpy), in bits
        joint = np.histogram2d(x, y, bins)[0] / 300
        outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        nz = joint > 0
        assert syn.mi_histogram_bits_by_bins[bins] == pytest.approx((joint[nz] * np.log2(joint[nz] / outer[nz])).sum(),
                                                                    abs=1e-12)  # fmt: skip
    for p in (1, 2):  # float64 sums of 10 terms of size ~2: 1e-12
        ref = scipy.spatial.distance.minkowski(x[:10], y[:10], p)
        assert syn.minkowski_demo[f"L{p}"] == pytest.approx(ref, abs=1e-12) and syn.minkowski_scipy[f"L{p}"] == ref


def test_target_outputs_part_equals_hf_hooks(tiny_gpt2_pair):
    m, hf = tiny_gpt2_pair.bridge, tiny_gpt2_pair.hf
    (text,) = load_texts("coffee")
    batch = ds.document_batch(m, text, bos=True)
    out = ds.target_outputs(m, batch, " coffee", 6)
    _assert_frozen(out)
    ids = batch.tokens[0].tolist()
    cols = [i for i, t in enumerate(ids) if t == 6891][:6]  # BOS at 0, no padding: columns are positions
    assert out.columns.tolist() == out.positions.tolist() == cols
    assert out.target == ds.TargetInfo(" coffee", 6891, ids.count(6891))
    ref = _hf_outputs(hf, batch.tokens, torch.tensor(cols))
    for k in ds.KINDS:
        # fp32 forward through 6 blocks vs HF eager (measured 4e-7 of the scale): 1e-5 of the activation scale
        scale = np.abs(ref[k]).max()
        np.testing.assert_allclose(out.outputs[k], ref[k], rtol=0, atol=1e-5 * scale)
    short = ds.document_batch(m, "A coffee and a coffee.", bos=True)
    by_id = ds.target_outputs(m, short, 6891, 2)  # an id works as the target
    assert by_id.target == ds.TargetInfo(" coffee", 6891, 2) and by_id.positions.tolist() == [2, 5]


def test_pairwise_measures_part_against_scipy_and_sklearn():
    rng = np.random.default_rng(4)
    outs = _fake_outputs(rng)
    pw = ds.pairwise_measures(outs, 1, seed=2)
    _assert_frozen(pw)
    pos = outs.positions
    pd_ref = np.abs(np.subtract.outer(pos, pos)).astype(float)
    np.testing.assert_array_equal(pw.position_distance, pd_ref)
    iu = np.triu_indices(len(pos), 1)
    for k in ds.KINDS:
        a = outs.outputs[k][1]
        for p in (1, 2):  # float64 distances of 40-dim N(0,1) vectors (~10-40): 1e-12
            ref = scipy.spatial.distance.cdist(a, a, "minkowski", p=p)
            np.testing.assert_allclose(pw.distance_matrices[k][f"L{p}"], ref, rtol=0, atol=1e-12)
            t = scipy.stats.kendalltau(ref[iu], pd_ref[iu])
            assert pw.kendall_tau[k][f"L{p}"].tau == pytest.approx(t.statistic, abs=1e-12)
            assert pw.kendall_tau[k][f"L{p}"].p == pytest.approx(t.pvalue, rel=1e-9)
        for i, j in [(0, 1), (2, 7), (3, 8)]:  # the vectorised KSG equals sklearn to the last bit (tested above)
            mi = mutual_info_regression(a[i][:, None], a[j], random_state=2)[0]
            assert pw.distance_matrices[k]["MI"][i, j] == pw.distance_matrices[k]["MI"][j, i] == mi


def test_rowwise_kendall_tau_equals_scipy_row_by_row_with_ties():
    rng = np.random.default_rng(5)
    pos = np.array([0, 4, 8, 12, 13, 30, 31, 50])  # equidistant neighbours: ties in token distance
    x = np.abs(np.subtract.outer(pos, pos)).astype(float)
    y = rng.normal(size=(8, 8))
    y = np.round(y + y.T, 1)  # symmetric, with ties among distances
    y[3] = y[:, 3] = 0.7  # row 3 constant off the diagonal: tau undefined there
    got = ds.rowwise_kendall_tau(x, y)
    for i in range(8):
        keep = np.arange(8) != i
        ref = scipy.stats.kendalltau(x[i, keep], y[i, keep]).statistic
        if np.isnan(ref):
            assert np.isnan(got[i])
        else:  # sums of +-1 over 21 pairs, one division: exact up to rounding
            assert got[i] == pytest.approx(ref, abs=1e-12)
    assert np.isnan(got[3]) and np.isfinite(np.delete(got, 3)).all()


def test_kendall_by_layer_part_pooled_and_rowwise_against_scipy():
    rng = np.random.default_rng(6)
    outs = _fake_outputs(rng, n_layers=3, positions=[1, 5, 9, 13, 20, 22, 40, 41])
    outs.outputs["mlp"][2] = 1.0  # identical outputs at every occurrence: every L2 distance 0, tau undefined
    sw = ds.kendall_by_layer(outs, seed=0)
    _assert_frozen(sw)
    pos = outs.positions
    pdist = np.abs(np.subtract.outer(pos, pos)).astype(float)
    iu = np.triu_indices(len(pos), 1)
    for k in ds.KINDS:
        for li in range(3):
            a = outs.outputs[k][li]
            d = scipy.spatial.distance.cdist(a, a)
            pooled = scipy.stats.kendalltau(d[iu], pdist[iu]).statistic
            rows = np.array([scipy.stats.kendalltau(pdist[i, np.arange(8) != i], d[i, np.arange(8) != i]).statistic
                             for i in range(8)])  # fmt: skip
            got_rows = sw.occurrence_tau[k]["L2"][li]
            if k == "mlp" and li == 2:
                assert np.isnan(pooled) and np.isnan(rows).all() and np.isnan(got_rows).all()
                assert np.isnan(sw.kendall_tau_rowwise_by_layer[k]["L2"][li])
                continue
            assert sw.kendall_tau_by_layer[k]["L2"][li] == pytest.approx(pooled, abs=1e-12)
            np.testing.assert_allclose(got_rows, rows, rtol=0, atol=1e-12)
            assert sw.kendall_tau_rowwise_by_layer[k]["L2"][li] == pytest.approx(rows.mean(), abs=1e-12)
            assert sw.kendall_tau_rowwise_by_layer[k]["L2"][li] != pytest.approx(pooled, abs=1e-3)  # not the same
            # mean of the per-occurrence normalised distances == the mean over pairs (symmetric matrix)
            norm = d[iu] / d[iu].max()
            assert sw.mean_normalised_distance_by_layer[k]["L2"][li] == pytest.approx(norm.mean(), abs=1e-12)
            assert sw.occurrence_normalised[k]["L2"][li].mean() == pytest.approx(norm.mean(), abs=1e-12)
            l1 = scipy.spatial.distance.cdist(a, a, "cityblock")
            np.testing.assert_allclose(sw.distance_matrices_by_layer[k]["L1"][li], l1, rtol=0, atol=1e-12)
    assert metrics_of(sw)["kendall_tau_rowwise_by_layer"]["mlp"]["L2"][2] is None  # undefined: None, not NaN


def test_interlayer_mi_part_on_padded_contexts_equals_hf_per_context(tiny_gpt2_pair):
    """Contexts are encode(..., specials_included=True) batches cut from the encoded document; with a long
    n_context the first is shorter (padded) and starts with BOS. Norms equal one unpadded HF forward per
    context; the MI matrix equals sklearn pair by pair."""
    m, hf = tiny_gpt2_pair.bridge, tiny_gpt2_pair.hf
    (text,) = load_texts("coffee")
    batch = ds.document_batch(m, text, bos=True)
    outs = ds.target_outputs(m, batch, " coffee", 6)
    ctx = ds.contexts_ending_at(m, batch, outs.columns, 40)
    lengths = ctx.lengths.tolist()
    assert lengths[0] == outs.columns[0] + 1 < 40 and set(lengths[1:]) == {40}  # the first is padded
    assert ctx.tokens[0, 0] == 50256 and not ctx.text_mask[0, 0] and ctx.text_mask[1].all()  # BOS is no text
    assert not ctx.bos  # not every context starts with BOS
    inter = ds.interlayer_mi(m, ctx, seed=1)
    _assert_frozen(inter)
    for t, c in enumerate(outs.columns.tolist()):
        start = max(0, c - 40 + 1)
        assert ctx.tokens[t, : lengths[t]].tolist() == batch.tokens[0, start : c + 1].tolist()
        ref = _hf_outputs(hf, batch.tokens[:, start : c + 1], torch.tensor([c - start]))
        for k in ds.KINDS:  # fp32 norms of ~|1-10| vectors, padded vs unpadded forward: 1e-5 relative
            np.testing.assert_allclose(inter.context_norms[k][:, t], np.linalg.norm(ref[k][:, 0], axis=-1), rtol=1e-5)
    for k in ds.KINDS:
        v = inter.context_norms[k]
        for i, j in [(0, 1), (1, 4), (2, 5)]:
            assert inter.interlayer_mi[k][i, j] == mutual_info_regression(v[i][:, None], v[j], random_state=1)[0]
        gaps = np.abs(np.subtract.outer(np.arange(6), np.arange(6)))
        iu = np.triu_indices(6, 1)
        for g in range(1, 6):
            ref = inter.interlayer_mi[k][iu][gaps[iu] == g].mean()
            assert inter.interlayer_mi_by_gap[k][g - 1] == pytest.approx(ref, abs=1e-15)


def test_contexts_match_the_former_hand_built_batch_on_a_masked_lm(tiny_mlm_pair):
    """encode(specials_included=True) pads with <pad> where the hand-built batch padded with <s>: the
    norms at the targets are the same to the last bit (padding is masked)."""
    m = tiny_mlm_pair.bridge
    (text,) = load_texts("coffee")
    batch = ds.document_batch(m, text, bos=True)
    assert batch.tokens[0, 0] == 0 and batch.tokens[0, -1] == 2  # <s> ... </s>
    outs = ds.target_outputs(m, batch, " coffee", 5)
    ctx = ds.contexts_ending_at(m, batch, outs.columns, 40)
    old = ctx.tokens.clone()
    old[ctx.attention_mask == 0] = 0  # the former padding id (<s>)
    hand = dataclasses.replace(ctx, tokens=old, text_mask=ctx.attention_mask.bool(), bos=False)
    assert (ctx.attention_mask == 0).any() and not torch.equal(ctx.tokens, hand.tokens)
    a, b = ds.interlayer_mi(m, ctx), ds.interlayer_mi(m, hand)
    for k in ds.KINDS:
        np.testing.assert_array_equal(a.context_norms[k], b.context_norms[k])


def test_samples_schema_and_means_equal_the_metrics(tiny_run):
    s = ds.samples(tiny_run)
    assert list(s.columns) == ["quantity", "layer", "relative_depth", "position", "word", "unit", "sample", "value"]
    assert str(s["layer"].dtype) == str(s["position"].dtype) == str(s["word"].dtype) == "Int64"
    assert s["relative_depth"].dtype == s["value"].dtype == np.float64 and s["sample"].dtype == np.int64
    assert s["position"].isna().all() and s["word"].isna().all() and (s["unit"] == "occurrence").all()
    assert np.isfinite(s["value"].to_numpy()).all()
    n, n_layers = len(tiny_run.metrics["target_positions"]), 6
    assert set(s["quantity"]) == {"tau_attn", "tau_mlp", "mean_normalised_l2_attn", "mean_normalised_l2_mlp"}
    assert len(s) == 4 * n_layers * n and set(s["sample"]) == set(range(n))
    depth = s.groupby("layer")["relative_depth"].first()
    assert depth.iloc[0] == pytest.approx(1 / n_layers) and depth.iloc[-1] == 1.0
    means = s.groupby(["quantity", "layer"])["value"].mean()
    m = tiny_run.metrics
    for k in ("attn", "mlp"):
        for li in range(n_layers):  # means of <= 10 float64 values in [-1, 1]: 1e-12
            assert means[(f"tau_{k}", li)] == pytest.approx(m["kendall_tau_rowwise_by_layer"][k]["L2"][li], abs=1e-12)
            assert means[(f"mean_normalised_l2_{k}", li)] == pytest.approx(
                m["mean_normalised_distance_by_layer"][k]["L2"][li], abs=1e-12
            )
    # the per-occurrence taus, independently: scipy on L2 distances of the cached outputs (scipy cdist)
    pos = np.array(m["target_positions"])
    pdist = np.abs(np.subtract.outer(pos, pos)).astype(float)
    for k in ("attn", "mlp"):
        a = tiny_run.parts.outputs.outputs[k][3]
        d = scipy.spatial.distance.cdist(a, a)
        ref = [scipy.stats.kendalltau(pdist[i, np.arange(n) != i], d[i, np.arange(n) != i]).statistic for i in range(n)]
        got = s[(s["quantity"] == f"tau_{k}") & (s["layer"] == 3)].sort_values("sample")["value"].to_numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_samples_on_a_masked_lm_and_ids_give_the_same_sample_ids(tiny_mlm_pair):
    m = tiny_mlm_pair.bridge
    (text,) = load_texts("coffee")
    a = ds.run(m, ds.Config(**SMALL), texts=[text])
    ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
    b = ds.run(m, ds.Config(**SMALL), texts=[ids])
    sa, sb = ds.samples(a), ds.samples(b)
    pd.testing.assert_frame_equal(sa, sb)
    assert sa["relative_depth"].max() == 1.0
    assert (a.parts.target_words >= 0).all() and (b.parts.target_words == -1).all()  # words only from strings


def test_attention_quantities_flagged_across_normalisation_placements():
    assert ds.incomparable({"a": {"norm_placement": "pre-LN"}, "b": {"norm_placement": "pre-LN"}}) == {}
    flagged = ds.incomparable({"gpt": {"norm_placement": "pre-LN"}, "bert": {"norm_placement": "post-LN"}})
    assert set(flagged) == {"tau_attn", "mean_normalised_l2_attn"} and "LayerNorm" in flagged["tau_attn"]
