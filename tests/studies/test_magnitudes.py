"""Study 4 vs the HF original: attention outputs from ``register_forward_hook`` on each block's
attention module; every statistic recomputed from them with numpy (lstsq for the fits)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from mechlens import distributed, encode
from mechlens.data import load_texts
from mechlens.encoding import word_index
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.ops import stack_layers, vector_norm
from mechlens.result import metrics_of
from mechlens.studies import magnitudes as mg

TEXTS = load_texts("reviews")[:24]


def _hf_norms(hf, batch):
    rec = {}
    hs = [
        b.attn.register_forward_hook(lambda m, i, o, l=l: rec.__setitem__(l, o[0]))
        for l, b in enumerate(hf.transformer.h)
    ]
    try:
        with torch.no_grad():
            hf(input_ids=batch.tokens, attention_mask=batch.attention_mask)
    finally:
        for h in hs:
            h.remove()
    return torch.stack([rec[l] for l in range(len(rec))]).norm(dim=-1).double().numpy()  # [layer, batch, pos]


def test_magnitude_statistics_equal_numpy_on_hf_activations(causal_pair):
    m, hf = causal_pair.bridge, causal_pair.hf
    cfg = mg.Config(n_texts=None, batch_size=5, n_fit_positions=10)
    res = mg.run(m, cfg, texts=TEXTS).metrics
    batch = encode(m, TEXTS, bos=True, max_tokens=cfg.max_tokens)
    norms = _hf_norms(hf, batch)
    valid = batch.valid_mask(exclude_first=True).numpy()
    pos = batch.positions.numpy()
    logn = np.log(norms)
    np.testing.assert_allclose(res["lognorm_mean_by_layer"], logn[:, valid].mean(1), atol=1e-5)
    np.testing.assert_allclose(res["lognorm_std_by_layer"], logn[:, valid].std(1), atol=1e-5)
    n_pos = pos.max() + 1
    ref = np.full((len(norms), n_pos), np.nan)
    for p in range(1, n_pos):
        sel = valid & (pos == p)
        if sel.any():
            ref[:, p] = norms[:, sel].mean(1)
    got = np.array(res["norm_mean_by_layer_position"], dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, equal_nan=True)
    # the position fit: the first 10 positions that valid tokens reach, 1..10 (position 0 is excluded)
    assert res["position_fit_positions"] == list(range(1, 11))
    for layer, fit in enumerate(res["position_fit_by_layer"]):
        x = np.arange(1, 11)
        (b0, b1), *_ = np.linalg.lstsq(np.stack([np.ones(10), x], 1), np.log(ref[layer, 1:11]), rcond=None)
        assert abs(fit["intercept"] - b0) <= 1e-5 and abs(fit["slope"] - b1) <= 1e-5
    # previous-token regression: lstsq on explicit (t-2, t-1, t) triplets of valid tokens
    trip = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
    for layer, betas in enumerate(res["previous_norm_betas_by_layer"]):
        y = logn[layer][:, 2:][trip]
        X = np.stack([np.ones_like(y), logn[layer][:, :-2][trip], logn[layer][:, 1:-1][trip]], 1)
        b, *_ = np.linalg.lstsq(X, y, rcond=None)
        np.testing.assert_allclose([betas["const"], betas["t-2"], betas["t-1"]], b, atol=1e-5)
    hist = np.array(res["lognorm_hist_counts"])
    assert (hist.sum(1) == valid.sum()).all()  # every valid token lands in exactly one bin


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_padding_side_and_streaming_do_not_change_results(gpt2_pair, batch_size):
    m = gpt2_pair.bridge
    right = mg.run(m, mg.Config(n_texts=None, batch_size=64), texts=TEXTS).metrics
    other = mg.run(m, mg.Config(n_texts=None, batch_size=batch_size, padding_side="left"), texts=TEXTS).metrics
    for key in ("lognorm_mean_by_layer", "norm_mean_by_layer_position", "lognorm_hist_counts"):
        np.testing.assert_allclose(
            np.array(other[key], dtype=np.float64), np.array(right[key], dtype=np.float64), atol=1e-5, equal_nan=True
        )
    for a, b in zip(other["previous_norm_betas_by_layer"], right["previous_norm_betas_by_layer"], strict=True):
        assert abs(a["t-1"] - b["t-1"]) <= 1e-5


# -- the parts, the typed result and the per-text samples --------------------------------------------------

OLD_METRIC_KEYS = (
    "n_sequences", "n_valid_tokens", "seq_length_counts", "lognorm_mean_by_layer", "lognorm_std_by_layer",
    "lognorm_hist_edges", "lognorm_hist_counts", "norm_mean_by_layer_position", "norm_count_by_position",
    "lognorm_mean_by_layer_position", "norm_mean_by_position", "position_fit_by_layer", "position_fit_positions",
    "previous_norm_betas_by_layer", "n_regression_triplets",
)  # fmt: skip
SAMPLE_COLUMNS = ["quantity", "layer", "relative_depth", "position", "word", "unit", "sample", "value"]


def _hf_attn_out(hf, batch):
    """Each block's attention-module output from plain HF forward hooks, position ids from the mask
    (so left padding is correct), as float64 norms ``[layer, batch, col]``."""
    blocks = hf.transformer.h if hasattr(hf, "transformer") else hf.roberta.encoder.layer
    rec = {}
    hs = [b.attn.register_forward_hook(lambda m, i, o, l=l: rec.__setitem__(l, o[0])) if hasattr(b, "attn") else
          b.attention.register_forward_hook(lambda m, i, o, l=l: rec.__setitem__(l, o[0]))
          for l, b in enumerate(blocks)]  # fmt: skip
    kw = {"position_ids": batch.positions.clamp(min=0)} if hasattr(hf, "transformer") else {}
    try:
        with torch.no_grad():
            hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, **kw)
    finally:
        for h in hs:
            h.remove()
    return torch.stack([rec[l] for l in range(len(rec))]).norm(dim=-1).double().numpy()


def _assert_frozen(obj):
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, dataclasses.fields(obj)[0].name, None)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_attn_out_norms_equal_hf_norms_keyed_by_position(tiny_gpt2_pair, padding_side):
    m, hf = tiny_gpt2_pair.bridge, tiny_gpt2_pair.hf
    batch = encode(m, TEXTS, bos=True, padding_side=padding_side, max_tokens=16)
    norms = mg.attn_out_norms(m, batch, batch_size=5)
    _assert_frozen(norms)
    ref = _hf_attn_out(hf, batch)  # [layer, batch, col]
    valid, pos = batch.valid_mask(exclude_first=True).numpy(), batch.positions.numpy()
    # the text sample holds all 24 texts (n_samples 10,000): their log-norms are keyed on the position id;
    # rebuild them from columns by hand
    assert norms.sample_text_index.tolist() == list(range(len(TEXTS)))
    got = norms.sample_lognorm  # [text, layer, pos]
    want = np.full(got.shape, np.nan)
    for r, c in zip(*np.nonzero(valid), strict=True):
        want[r, :, pos[r, c]] = np.log(ref[:, r, c])
    assert (np.isnan(got) == np.isnan(want)).all()
    # log of fp32 norms of order 1-10: bridge vs HF kernels differ by ~1e-6 relative -> 1e-5 absolute in log
    np.testing.assert_allclose(got, want, atol=1e-5, equal_nan=True)
    logs = np.log(ref[:, valid])  # [layer, n]
    # the token sample holds every valid token: the percentiles are exact
    assert norms.percentiles_exact and len(norms.token_sample) == valid.sum() == norms.n_valid_tokens
    assert norms.percentile_basis == f"all {valid.sum()} valid tokens"
    np.testing.assert_allclose(norms.lognorm_percentiles_by_layer, np.percentile(logs, mg.PERCENTILES, axis=1).T,
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(norms.lognorm_mean_by_layer, logs.mean(1), atol=1e-5)
    np.testing.assert_allclose(norms.lognorm_std_by_layer, logs.std(1), atol=1e-5)
    per_text = np.stack([np.log(ref[:, i, valid[i]]).mean(1) for i in range(len(TEXTS))])
    np.testing.assert_allclose(norms.sample_text_lognorm, per_text, atol=1e-5)
    assert norms.n_sequences == len(TEXTS) and norms.d_model == hf.config.n_embd
    assert norms.text_length_counts.tolist() == np.bincount(batch.text_mask.sum(-1).numpy()).tolist()
    assert norms.hook_names == tuple(f"blocks.{l}.hook_attn_out" for l in range(hf.config.n_layer))
    assert (norms.sample_word == -1).all()  # an encoded batch carries no character offsets


def test_attn_out_norms_of_a_masked_lm_equal_hf(tiny_mlm_pair):
    """RoBERTa's hook_attn_out is the attention block's output after the residual add and LayerNorm: HF's
    ``layer.attention`` output."""
    m, hf = tiny_mlm_pair.bridge, tiny_mlm_pair.hf
    batch = encode(m, TEXTS[:8], bos=True, max_tokens=12)
    norms = mg.attn_out_norms(m, batch, exclude_first=False)
    ref = _hf_attn_out(hf, batch)
    text = batch.text_mask.numpy()
    got = norms.sample_lognorm
    pos = batch.positions.numpy()
    r, c = np.nonzero(text)
    np.testing.assert_allclose(got[r, :, pos[r, c]], np.log(ref[:, r, c]).T, atol=1e-5)
    assert np.isnan(got[:, :, 0]).all()  # <s> is a special token, never counted
    assert np.isnan(got).sum() == got.size - text.sum() * got.shape[1]  # </s> and padding neither


def test_position_fit_recovers_an_exponential_trend():
    """mean norm = exp(a_l + b_l p) exactly: the fit returns (a_l, b_l); position 0 (count 0, NaN mean)
    is skipped and the first n_fit reached positions 1..n_fit are used."""
    a, b = np.array([0.5, -1.0, 2.0]), np.array([-0.02, 0.01, 0.0])
    p = np.arange(40)
    mean = np.exp(a[:, None] + b[:, None] * p)
    mean[:, 0] = np.nan
    count = np.full(40, 7)
    count[0] = 0
    fit = mg.position_fit(torch.from_numpy(mean), torch.from_numpy(count), n_fit=12)
    _assert_frozen(fit)
    assert fit.positions.tolist() == list(range(1, 13))
    # exact data in float64: lstsq recovers the line to ~1e-13
    np.testing.assert_allclose(fit.intercept, a, atol=1e-10)
    np.testing.assert_allclose(fit.slope, b, atol=1e-12)
    np.testing.assert_allclose(fit.log_mean_norm, np.log(mean[:, 1:13]), atol=0)


def test_previous_norm_fit_equals_statsmodels_on_explicit_triplets():
    """Random log-norms with holes in the valid mask: the fit from the normal equations, summed over
    batches of any size, equals statsmodels OLS on the explicit (t-2, t-1, t) triplets."""
    import statsmodels.api as sm

    g = np.random.default_rng(0)
    n_text, n_layer, n_pos = 9, 3, 14
    x = g.normal(size=(n_text, n_layer, n_pos))
    for t in range(2, n_pos):  # an AR(2) dependence so the coefficients are not ~0
        x[:, :, t] += 0.5 * x[:, :, t - 1] - 0.2 * x[:, :, t - 2]
    valid = g.random((n_text, n_pos)) > 0.15
    valid[:, 0] = False
    ln = torch.from_numpy(np.where(valid[:, None, :], x, np.nan).astype(np.float32))
    mask = torch.from_numpy(valid)

    def fit_in_batches(size):
        xtx, xty, n = np.zeros((n_layer, 3, 3)), np.zeros((n_layer, 3)), 0
        for start in range(0, n_text, size):
            a, b, k = mg.previous_norm_equations(ln[start : start + size], mask[start : start + size])
            xtx, xty, n = xtx + a.numpy(), xty + b.numpy(), n + k
        return mg.previous_norm_fit(xtx, xty, n)

    fit = fit_in_batches(n_text)
    _assert_frozen(fit)
    trip = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
    assert fit.n_regression_triplets == trip.sum()
    x32 = ln.double().numpy()
    for layer in range(n_layer):
        X = np.stack([x32[:, layer, :-2][trip], x32[:, layer, 1:-1][trip]], 1)
        ref = sm.OLS(x32[:, layer, 2:][trip], sm.add_constant(X)).fit().params
        # O(1) data, ~100 rows, well conditioned: normal equations vs QR agree to ~1e-12
        np.testing.assert_allclose(fit.betas[layer], ref, atol=1e-10)
    for size in (1, 4, 100):  # batches add up to the same equations, up to float64 summation order
        np.testing.assert_allclose(fit_in_batches(size).betas, fit.betas, atol=1e-12)
    assert list(fit.by_layer()[0]) == ["const", "t-2", "t-1"]
    with pytest.raises(DataError, match="only 2 tokens"):
        mg.previous_norm_fit(np.zeros((n_layer, 3, 3)), np.zeros((n_layer, 3)), 2)


def test_part_fields_are_shape_checked():
    """The jaxtyping annotations are enforced under pytest: a slope per layer must match the intercepts."""
    with pytest.raises(Exception, match=r"slope|layer|shape|Type-check"):
        mg.PositionFit(positions=np.arange(3), log_mean_norm=np.zeros((2, 3)), intercept=np.zeros(2),
                       slope=np.zeros(5))  # fmt: skip


def _equal_length_texts(model, n_tokens, n=12):
    """Texts of at least ``n_tokens`` tokens (cut to ``n_tokens`` by max_tokens: every text equally long)."""
    texts = [t for t in TEXTS if len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) >= n_tokens]
    assert len(texts) >= n
    return texts[:n]


def test_run_composes_the_parts_and_keeps_every_metric(tiny_gpt2_pair):
    m = tiny_gpt2_pair.bridge
    cfg = mg.Config(n_texts=None, batch_size=4, n_fit_positions=6)
    res = mg.run(m, cfg, texts=TEXTS)
    r = res.parts
    assert isinstance(r, mg.MagnitudesResult)
    _assert_frozen(r)
    assert set(OLD_METRIC_KEYS) <= set(res.metrics)
    assert res.metrics == metrics_of(r)
    assert {"norms", "position_fit", "previous_norm_fit"}.isdisjoint(res.metrics)
    # the composed metrics are the parts' numbers; the text sample holds every text, so the regression
    # on its log-norms in one batch is the streamed one
    norms = r.norms
    assert len(norms.sample_text_index) == len(TEXTS) == res.metrics["n_samples"]
    valid = torch.from_numpy(~np.isnan(norms.sample_lognorm[:, 0]))
    xtx, xty, n = mg.previous_norm_equations(torch.from_numpy(norms.sample_lognorm), valid)
    assert n == norms.n_regression_triplets
    again = mg.previous_norm_fit(xtx.numpy(), xty.numpy(), n)
    np.testing.assert_allclose([list(b.values()) for b in res.metrics["previous_norm_betas_by_layer"]], again.betas,
                               atol=1e-10)  # fmt: skip
    fit = mg.position_fit(norms.norm_mean_by_layer_position, norms.norm_count_by_position, 6)
    assert [f["slope"] for f in res.metrics["position_fit_by_layer"]] == fit.slope.tolist()
    shift = 0.5 * np.log(m.cfg.d_model)
    np.testing.assert_allclose(res.metrics["log_rms_mean_by_layer"], norms.lognorm_mean_by_layer - shift, atol=1e-12)
    assert res.metrics["lognorm_percentiles_by_layer"] == norms.lognorm_percentiles_by_layer.tolist()
    assert res.metrics["lognorm_percentile_tokens"] == res.metrics["n_valid_tokens"]
    assert res.metrics["lognorm_percentile_basis"] == f"all {res.metrics['n_valid_tokens']} valid tokens"
    assert "all" in res.figures["lognorm_percentiles"].layout.title.text
    assert set(res.figures) >= {"lognorm_density", "lognorm_percentiles", "norm_heatmap", "fits"}
    assert "lognorm_p50" in res.tables["per_layer"][0]


def test_samples_schema_and_means_equal_the_metrics(tiny_gpt2_pair):
    m = tiny_gpt2_pair.bridge
    texts = _equal_length_texts(m, 8)
    res = mg.run(m, mg.Config(n_texts=None, max_tokens=8, batch_size=5), texts=texts)
    s = mg.samples(res)
    assert list(s.columns) == SAMPLE_COLUMNS
    assert str(s["layer"].dtype) == "Int64" and str(s["position"].dtype) == "Int64" and str(s["word"].dtype) == "Int64"
    assert s["relative_depth"].dtype == np.float64 and s["value"].dtype == np.float64
    assert s["sample"].dtype == np.int64 and np.isfinite(s["value"]).all()
    assert set(s["unit"]) == {"text"} and set(s["quantity"]) == {"log_rms", "log_rms_by_position", "log_norm"}
    n_layers = m.cfg.n_layers
    depth = s.groupby("layer")["relative_depth"].first()
    assert depth.iloc[-1] == 1.0 and depth.iloc[0] == pytest.approx(1 / n_layers)
    per_text = s[s.quantity == "log_rms"]
    assert per_text["position"].isna().all() and sorted(set(per_text["sample"])) == list(range(len(texts)))
    met = res.metrics
    shift = 0.5 * np.log(m.cfg.d_model)
    # every text has 8 valid tokens (BOS at 0, text at positions 1..8): the mean over texts is the token
    # mean of the metrics, up to float64 summation order (values ~1: 1e-12)
    mean = per_text.groupby("layer")["value"].mean().to_numpy()
    np.testing.assert_allclose(mean, np.array(met["lognorm_mean_by_layer"]) - shift, atol=1e-12)
    np.testing.assert_allclose(mean, met["log_rms_text_mean_by_layer"], atol=1e-12)
    raw = s[s.quantity == "log_norm"].groupby("layer")["value"].mean().to_numpy()
    np.testing.assert_allclose(raw, met["lognorm_mean_by_layer"], atol=1e-12)
    by_pos = s[s.quantity == "log_rms_by_position"].groupby(["layer", "position"])["value"].mean()
    want = np.array(met["lognorm_mean_by_layer_position"], dtype=np.float64) - shift
    for (layer, p), v in by_pos.items():
        assert v == pytest.approx(want[layer, p], abs=1e-12)
    assert len(by_pos) == n_layers * 8 and np.isnan(want[:, 0]).all()
    # word: the whitespace word begun by the token at that position (word_index, re-keyed on position)
    words = word_index(m, texts, encode(m, texts, bos=True, max_tokens=8))
    rows = s[s.quantity == "log_rms_by_position"]
    for _, row in rows[rows.layer == 0].iterrows():
        w = int(words[row["sample"], row["position"]])  # right padding, BOS: column == position
        assert (pd.isna(row["word"]) and w == -1) or row["word"] == w
    assert rows["word"].notna().any() and rows["word"].isna().any()  # BPE: some tokens continue a word


def test_samples_means_weigh_texts_equally_when_lengths_differ(gpt2_pair):
    """Texts of different lengths: the mean of per-text samples is the text-weighted metric, computed
    here from the HF norms independently; positions are keyed the same under left padding."""
    m, hf = gpt2_pair.bridge, gpt2_pair.hf
    res = mg.run(m, mg.Config(n_texts=None, max_tokens=20, padding_side="left"), texts=TEXTS)
    s = mg.samples(res)
    batch = encode(m, TEXTS, bos=True, max_tokens=20, padding_side="left")
    logn = np.log(_hf_attn_out(hf, batch)) - 0.5 * np.log(m.cfg.d_model)  # [layer, batch, col]
    valid = batch.valid_mask(exclude_first=True).numpy()
    assert len(set(valid.sum(1))) > 1  # the lengths do differ
    want = np.stack([logn[:, i, valid[i]].mean(1) for i in range(len(TEXTS))])  # [text, layer]
    got = s[s.quantity == "log_rms"].pivot(index="sample", columns="layer", values="value").to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(res.metrics["log_rms_text_mean_by_layer"], want.mean(0), atol=1e-5)
    assert not np.allclose(res.metrics["log_rms_text_mean_by_layer"], res.metrics["log_rms_mean_by_layer"], atol=1e-4)


def test_samples_of_one_text_and_of_token_ids(tiny_gpt2_pair):
    m = tiny_gpt2_pair.bridge
    one = mg.samples(mg.run(m, mg.Config(n_texts=1), texts=TEXTS[:1]))
    assert set(one["unit"]) == {"token"}
    tok = one[one.quantity == "log_rms"]
    assert sorted(set(tok["sample"])) == sorted(set(one.loc[one.quantity == "log_rms_by_position", "position"]))
    ids = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:6]]
    from_ids = mg.samples(mg.run(m, mg.Config(n_texts=None), texts=ids))
    from_text = mg.samples(mg.run(m, mg.Config(n_texts=None), texts=TEXTS[:6]))
    assert from_ids["word"].isna().all()  # token ids carry no character offsets
    np.testing.assert_array_equal(from_ids["value"], from_text["value"])


def test_samples_of_a_masked_lm_reach_depth_one(tiny_mlm_pair):
    res = mg.run(tiny_mlm_pair.bridge, mg.Config(n_texts=8, max_tokens=12), texts=TEXTS)
    s = mg.samples(res)
    assert s["relative_depth"].max() == 1.0 and np.isfinite(s["value"]).all()
    mean = s[s.quantity == "log_norm"].groupby("layer")["value"].mean().to_numpy()
    np.testing.assert_allclose(mean, res.metrics["lognorm_text_mean_by_layer"], atol=1e-12)


def test_incomparable_flags_placements_and_widths():
    pre, post = {"norm_placement": "pre-LN", "d_model": 64}, {"norm_placement": "post-LN", "d_model": 64}
    assert mg.incomparable({"a": pre, "b": dict(pre)}) == {}
    assert set(mg.incomparable({"gpt": pre, "bert": post})) == {"log_rms", "log_rms_by_position", "log_norm"}
    wide = mg.incomparable({"a": pre, "b": {**pre, "d_model": 256}})
    assert list(wide) == ["log_norm"] and "width" in wide["log_norm"]


# -- corpus scale: streaming, samples of constant size, sharding -------------------------------------------

ARRAYS = ("text_length_counts", "norm_count_by_position", "norm_mean_by_layer_position",
          "lognorm_mean_by_layer_position", "lognorm_mean_by_layer", "lognorm_std_by_layer",
          "lognorm_text_mean_by_layer", "lognorm_hist_counts", "lognorm_percentiles_by_layer", "token_sample",
          "token_sample_text", "token_sample_position", "triplet_xtx", "triplet_xty", "sample_text_index",
          "sample_text_lognorm", "sample_lognorm", "sample_word")  # fmt: skip


def _np(x):
    return (x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def _assert_same_norms(a, b, atol):
    """Equal statistics: counts, sample membership and shapes exactly; values within ``atol`` (fp32 norms
    of differently padded batches differ by ~1e-6 relative; float64 sums then in order only)."""
    for f in ("n_sequences", "n_valid_tokens", "n_texts_with_tokens", "n_regression_triplets", "percentiles_exact"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ARRAYS:
        x, y = _np(getattr(a, f)), _np(getattr(b, f))
        assert x.shape == y.shape, f
        if f in ("triplet_xtx", "triplet_xty"):  # sums over ~300 tokens of values ~1-10: scale the tolerance
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=f)
        else:
            np.testing.assert_allclose(x, y, atol=atol, equal_nan=True, err_msg=f)
    for f in ("norm_count_by_position", "lognorm_hist_counts", "text_length_counts", "sample_text_index",
              "token_sample_text", "token_sample_position", "sample_word"):  # fmt: skip
        assert (_np(getattr(a, f)) == _np(getattr(b, f))).all(), f


def test_streaming_in_batches_of_any_size_gives_the_same_statistics(tiny_gpt2_pair):
    """The same 24 texts streamed as strings, as (index, text) pairs and as token ids, in batches of 1, 5
    and 24, and as one encoded TokenBatch: the same statistics and the same token and text samples (their
    members are chosen by a hash of the global index, not by arrival)."""
    m = tiny_gpt2_pair.bridge
    opts = {"max_tokens": 16, "n_token_samples": 150, "n_samples": 10}  # both samples smaller than the corpus
    ref = mg.attn_out_norms(m, TEXTS, batch_size=24, **opts)
    assert not ref.percentiles_exact and len(ref.token_sample) == 150 and len(ref.sample_text_index) == 10
    ids = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    for size in (1, 5):
        _assert_same_norms(mg.attn_out_norms(m, TEXTS, batch_size=size, **opts), ref, atol=1e-5)
    pairs = mg.attn_out_norms(m, iter(list(enumerate(TEXTS))), batch_size=7, padding_side="left", **opts)
    _assert_same_norms(pairs, ref, atol=1e-5)
    from_ids = mg.attn_out_norms(m, (t for t in ids), batch_size=5, **opts)
    assert (from_ids.sample_word == -1).all()  # token ids carry no character offsets
    _assert_same_norms(dataclasses.replace(from_ids, sample_word=ref.sample_word), ref, atol=1e-5)
    # one encoded batch: the same numbers (positions run to the longest sequence, 17 with BOS, either way)
    batch = encode(m, TEXTS, bos=True, max_tokens=16)
    whole = mg.attn_out_norms(m, batch, batch_size=6, **opts)
    _assert_same_norms(dataclasses.replace(whole, sample_word=ref.sample_word), ref, atol=1e-5)
    assert (ref.sample_word >= 0).any()


def test_token_sample_is_a_seeded_sample_of_the_corpus_tokens(tiny_gpt2_pair):
    """With fewer sample slots than valid tokens, the percentiles are those of the sampled tokens' exact
    log-norms (each sampled token's values equal that text's log-norms at that position), the basis says
    so, and they are close to the exact percentiles; another seed samples other tokens."""
    m = tiny_gpt2_pair.bridge
    full = mg.attn_out_norms(m, TEXTS, max_tokens=16)  # every token and text kept: exact
    assert full.percentiles_exact and full.percentile_basis.startswith("all ")
    part = mg.attn_out_norms(m, TEXTS, max_tokens=16, n_token_samples=120)
    assert not part.percentiles_exact and len(part.token_sample) == 120
    assert part.percentile_basis == f"a seeded sample of 120 of the {full.n_valid_tokens} valid tokens"
    want = full.sample_lognorm[part.token_sample_text, :, part.token_sample_position]  # [token, layer]
    np.testing.assert_array_equal(part.token_sample, want)  # the same fp32 values, batch for batch
    np.testing.assert_array_equal(part.lognorm_percentiles_by_layer,
                                  np.percentile(want, mg.PERCENTILES, axis=0).T)  # fmt: skip
    # 120 of ~360 tokens: the quartiles are within a few tenths of the exact ones (log-norms spread ~1)
    np.testing.assert_allclose(part.lognorm_percentiles_by_layer[:, 1:4], full.lognorm_percentiles_by_layer[:, 1:4],
                               atol=0.3)  # fmt: skip
    other = mg.attn_out_norms(m, TEXTS, max_tokens=16, n_token_samples=120, seed=1)
    assert set(zip(other.token_sample_text, other.token_sample_position, strict=True)) != set(
        zip(part.token_sample_text, part.token_sample_position, strict=True)
    )
    # the sums do not depend on the samples
    np.testing.assert_array_equal(part.lognorm_mean_by_layer, full.lognorm_mean_by_layer)


def test_samples_come_from_a_seeded_sample_of_texts(tiny_gpt2_pair):
    """n_samples < texts: samples() holds exactly the rows of the sampled texts, equal to those of the run
    that keeps every text; the metrics do not change."""
    m = tiny_gpt2_pair.bridge
    full = mg.run(m, mg.Config(n_texts=None, max_tokens=16), texts=TEXTS)
    part = mg.run(m, mg.Config(n_texts=None, max_tokens=16, reservoir=5, batch_size=3), texts=TEXTS)
    kept = part.parts.norms.sample_text_index
    assert len(kept) == 5 == part.metrics["n_samples"] and full.metrics["n_samples"] == len(TEXTS)
    a, b = mg.samples(part), mg.samples(full)
    assert set(a["sample"]) == set(kept)
    b = b[b["sample"].isin(kept)]
    key = ["quantity", "sample", "layer", "position"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a["value"], b["value"], atol=1e-5)  # other batches, other padding: fp32 level
    for k in OLD_METRIC_KEYS:
        x, y = (np.array(_flat(r.metrics[k]), dtype=np.float64) for r in (part, full))
        np.testing.assert_allclose(x, y, atol=1e-5, err_msg=k)


def _flat(x):
    if isinstance(x, list) and x and isinstance(x[0], dict):
        return [list(d.values()) for d in x]
    return x


def test_accumulators_do_not_grow_with_the_number_of_texts(tiny_gpt2_pair):
    """40 and 400 texts streamed into part 1's state: the state holds the same number of numbers (sums of
    constant size, the token and text samples capped at their sizes), and the typed results have the
    same shapes (the positions run to the longest sequence: every text here is cut to 10 tokens)."""
    m = tiny_gpt2_pair.bridge
    names = mg.attn_out_names(m)
    texts = [f"Review {i}: the film was {'good' if i % 3 else 'slow'} and the cast {'shone' if i % 2 else 'tried'} "
             f"in scene {i % 7}." for i in range(400)]  # fmt: skip
    stats = [mg.NormStatistics(m.cfg.n_layers, mg.position_budget(m, 10), n_token_samples=64, n_samples=16)
             for _ in range(2)]  # fmt: skip
    for st, n in zip(stats, (40, 400), strict=True):
        for start in range(0, n, 50):
            batch = encode(m, texts[start : min(start + 50, n)], bos=True, max_tokens=10)
            for _, _, acts in iter_cached(m, batch, names):
                norms = vector_norm(stack_layers(acts, names))
                st.update(batch, norms, torch.arange(start, start + len(batch)), batch.valid_mask(True))
    small, large = (st.result(names, m.cfg.d_model) for st in stats)
    assert (small.n_sequences, large.n_sequences) == (40, 400)
    for f in ARRAYS:
        assert _np(getattr(small, f)).shape == _np(getattr(large, f)).shape, f
    assert len(large.token_sample) == 64 and len(large.sample_text_index) == 16 and not large.percentiles_exact
    assert large.sample_lognorm.shape == (16, m.cfg.n_layers, 11)

    def size(st):
        tensors = [*st.norm.state().values(), *st.lognorm.state().values(), *st.text_lognorm.state().values(),
                   st.hist, st.xtx, st.xty, st.counts, st.text_lengths, st.seq_lengths]  # fmt: skip
        pending = sum(r.size for r in st.tokens.rows + st.texts.rows)
        return sum(t.numel() for t in tensors) + st.tokens.reservoir.rows.size + st.texts.reservoir.rows.size + pending

    assert size(stats[0]) == size(stats[1])


def test_python_texts_are_sharded_by_rank(monkeypatch):
    """Texts given in Python form the stream with global index = list index; rank r of w keeps i % w == r
    (disjoint shards whose union is the first n_texts)."""
    texts = [f"text {i}" for i in range(11)]
    cfg = mg.Config(n_texts=9)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 3))
        shards.append(list(mg.corpus(cfg, texts)))
    assert [i for i, _ in shards[1]] == [1, 4, 7]
    assert sorted(p for s in shards for p in s) == list(enumerate(texts[:9]))
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert [i for i, _ in mg.corpus(mg.Config(n_texts=6, data="reviews"))] == [1, 3, 5]


def test_too_short_texts_are_refused_naming_the_data(tiny_gpt2_pair):
    m = tiny_gpt2_pair.bridge
    with pytest.raises(DataError, match=r"--data reviews: only 1 tokens have two valid predecessors"):
        mg.run(m, mg.Config(n_texts=None), texts=["one two", "a b c", "x"])


def test_an_error_inside_the_stream_is_raised_as_itself(tiny_gpt2_pair):
    """A bad text met while streaming (here a token id outside the vocabulary) stops the run with its own
    error (under torchrun: on every rank, before the merge, so no rank waits in a collective)."""
    from mechlens.errors import TokenError

    with pytest.raises(TokenError, match="outside the vocabulary"):
        mg.attn_out_norms(tiny_gpt2_pair.bridge, [[464, 3290, 318], [10**9]], batch_size=1)
