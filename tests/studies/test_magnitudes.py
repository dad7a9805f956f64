"""Study 4 vs the HF original: attention outputs from ``register_forward_hook`` on each block's
attention module; every statistic recomputed from them with numpy (lstsq for the fits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechlens import encode
from mechlens.data import load_texts
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
