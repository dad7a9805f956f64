"""Study 4 vs the HF original: attention outputs from ``register_forward_hook`` on each block's
attention module; every statistic recomputed from them with numpy (lstsq for the fits)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from mechlens import encode
from mechlens.data import load_texts
from mechlens.studies import magnitudes as mg
from mechlens.studies.result import metrics_of
from mechlens.tokens import word_index

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
    # the per-token tensor is keyed on the position id: rebuild it from columns by hand
    want = np.full(norms.lognorm.shape, np.nan)
    for r, c in zip(*np.nonzero(valid), strict=True):
        want[r, :, pos[r, c]] = np.log(ref[:, r, c])
    got = norms.lognorm.double().numpy()
    assert (np.isnan(got) == np.isnan(want)).all() and (norms.valid.numpy() == ~np.isnan(want[:, 0])).all()
    # log of fp32 norms of order 1-10: bridge vs HF kernels differ by ~1e-6 relative -> 1e-5 absolute in log
    np.testing.assert_allclose(got, want, atol=1e-5, equal_nan=True)
    logs = np.log(ref[:, valid])  # [layer, n]
    np.testing.assert_allclose(norms.lognorm_percentiles_by_layer, np.percentile(logs, mg.PERCENTILES, axis=1).T,
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(norms.lognorm_mean_by_layer, logs.mean(1), atol=1e-5)
    np.testing.assert_allclose(norms.lognorm_std_by_layer, logs.std(1), atol=1e-5)
    assert norms.n_valid_tokens == valid.sum() and norms.d_model == hf.config.n_embd
    assert norms.hook_names == tuple(f"blocks.{l}.hook_attn_out" for l in range(hf.config.n_layer))
    assert norms.lognorm.dtype == torch.float32


def test_attn_out_norms_of_a_masked_lm_equal_hf(tiny_mlm_pair):
    """RoBERTa's hook_attn_out is the attention block's output after the residual add and LayerNorm: HF's
    ``layer.attention`` output."""
    m, hf = tiny_mlm_pair.bridge, tiny_mlm_pair.hf
    batch = encode(m, TEXTS[:8], bos=True, max_tokens=12)
    norms = mg.attn_out_norms(m, batch, exclude_first=False)
    ref = _hf_attn_out(hf, batch)
    text = batch.text_mask.numpy()
    got = norms.lognorm.double().numpy()
    pos = batch.positions.numpy()
    r, c = np.nonzero(text)
    np.testing.assert_allclose(got[r, :, pos[r, c]], np.log(ref[:, r, c]).T, atol=1e-5)
    assert not norms.valid[:, 0].any()  # <s> is a special token, never counted


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
    """Random log-norms with holes in the valid mask: the fit equals statsmodels OLS on the explicit
    (t-2, t-1, t) triplets, whatever the chunking."""
    import statsmodels.api as sm

    g = np.random.default_rng(0)
    n_text, n_layer, n_pos = 9, 3, 14
    x = g.normal(size=(n_text, n_layer, n_pos))
    for t in range(2, n_pos):  # an AR(2) dependence so the coefficients are not ~0
        x[:, :, t] += 0.5 * x[:, :, t - 1] - 0.2 * x[:, :, t - 2]
    valid = g.random((n_text, n_pos)) > 0.15
    valid[:, 0] = False
    ln = torch.from_numpy(np.where(valid[:, None, :], x, np.nan).astype(np.float32))
    fit = mg.previous_norm_fit(ln, torch.from_numpy(valid))
    _assert_frozen(fit)
    trip = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
    assert fit.n_regression_triplets == trip.sum()
    x32 = ln.double().numpy()
    for layer in range(n_layer):
        X = np.stack([x32[:, layer, :-2][trip], x32[:, layer, 1:-1][trip]], 1)
        ref = sm.OLS(x32[:, layer, 2:][trip], sm.add_constant(X)).fit().params
        # O(1) data, ~100 rows, well conditioned: normal equations vs QR agree to ~1e-12
        np.testing.assert_allclose(fit.betas[layer], ref, atol=1e-10)
    for chunk in (1, 4, 100):
        np.testing.assert_allclose(mg.previous_norm_fit(ln, torch.from_numpy(valid), chunk=chunk).betas, fit.betas,
                                   atol=1e-12)  # fmt: skip
    assert list(fit.by_layer()[0]) == ["const", "t-2", "t-1"]


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
    assert {"norms", "position_fit", "previous_norm_fit", "word_by_position"}.isdisjoint(res.metrics)
    # the composed metrics are the parts' numbers
    norms = r.norms
    again = mg.previous_norm_fit(norms.lognorm, norms.valid, chunk=1000)
    np.testing.assert_allclose([list(b.values()) for b in res.metrics["previous_norm_betas_by_layer"]], again.betas,
                               atol=1e-10)  # fmt: skip
    fit = mg.position_fit(norms.norm_mean_by_layer_position, norms.norm_count_by_position, 6)
    assert [f["slope"] for f in res.metrics["position_fit_by_layer"]] == fit.slope.tolist()
    shift = 0.5 * np.log(m.cfg.d_model)
    np.testing.assert_allclose(res.metrics["log_rms_mean_by_layer"], norms.lognorm_mean_by_layer - shift, atol=1e-12)
    assert res.metrics["lognorm_percentiles_by_layer"] == norms.lognorm_percentiles_by_layer.tolist()
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
