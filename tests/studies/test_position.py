"""Study 1 vs the HF original: loss matrix from HF logits; regressions from statsmodels/sklearn run
directly on the HF-derived losses."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression

from mechlens import DataError
from mechlens.data import load_texts
from mechlens.studies import position


def _hf_loss(hf, batch, seqlen):
    """HF's per-token next-token loss, and the largest |logit| (the scale of its fp32 rounding)."""
    with torch.no_grad():
        logits = hf(input_ids=batch.tokens).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -lp.gather(-1, batch.tokens[:, 1:, None])[..., 0], logits.abs().max().item()


@pytest.mark.parametrize("bos", [False, True])
def test_position_study_matches_hf_and_reference_regressions(causal_pair, bos):
    m, hf = causal_pair.bridge, causal_pair.hf
    cfg = position.Config(n_train=60, n_test=40, bos=bos)
    texts = load_texts("contexts")
    res = position.run(m, cfg, texts=texts)
    # loss matrix vs HF logits: the same fp32 logits from different kernels differ by a few ulps of the
    # logit scale (ulp(16) = 1.9e-6), and log-softmax adds its logsumexp's share: 1e-5 + 2e-6 x max|logit|
    # (measured 1.1e-5 on tiny-gpt2, max|logit| ~17, with ATEN_CPU_CAPABILITY=default)
    ours, batch = position.loss_matrix(m, texts[:60], cfg)
    ref, scale = _hf_loss(hf, batch, cfg.seqlen)
    ref = ref[:, 1:] if bos else ref
    assert ours.shape == (60, cfg.seqlen - 1)
    assert (ours - ref).abs().max() <= 1e-5 + 2e-6 * scale
    # our analysis run on the HF-derived losses equals statsmodels/sklearn run directly on them
    x = ref.numpy().reshape(-1).astype(np.float64)
    y = np.tile(np.arange(cfg.seqlen - 1), 60)
    on_hf = position.analyse(ref.numpy(), ref.numpy()[:40], cfg)
    fit = sm.OLS(y, sm.add_constant(x)).fit()
    np.testing.assert_allclose(on_hf["ols"]["params"], fit.params, rtol=1e-10)
    np.testing.assert_allclose(on_hf["ols"]["bse"], fit.bse, rtol=1e-10)
    assert abs(on_hf["ols"]["r2"] - fit.rsquared) <= 1e-12
    # sklearn LinearRegression and statsmodels agree to 1e-8 on the same data
    sk = LinearRegression().fit(x[:, None], y)
    assert abs(sk.intercept_ - fit.params[0]) <= 1e-8 and abs(sk.coef_[0] - fit.params[1]) <= 1e-8
    assert abs(on_hf["sklearn_linear"]["intercept"] - fit.params[0]) <= 1e-8
    assert abs(on_hf["sklearn_linear"]["slope"] - fit.params[1]) <= 1e-8
    # the end-to-end run (bridge losses, <= 1e-5 from HF's) gives the same fit to 1e-4
    np.testing.assert_allclose(res.metrics["ols"]["params"], fit.params, atol=1e-4)
    clf = LogisticRegression(solver="lbfgs", C=1.0, tol=1e-6, max_iter=2000, random_state=0).fit(x[:, None], y)
    assert abs(on_hf["logistic_accuracy_train"] - clf.score(x[:, None], y)) <= 1e-12
    np.testing.assert_allclose(on_hf["logistic"]["slopes"], clf.coef_[:, 0], rtol=1e-6)
    assert abs(res.metrics["logistic_accuracy_train"] - clf.score(x[:, None], y)) <= 2 / len(y)
    conf = np.array(res.metrics["confusion_test"])
    assert conf.sum() == 40 * (cfg.seqlen - 1) and conf.shape == (cfg.seqlen - 1,) * 2
    assert np.allclose(np.array(res.metrics["confusion_row_percent_test"]).sum(1), 100)
    probs = np.array([[r[f"p{c}"] for c in range(cfg.seqlen - 1)] for r in res.tables["test_predictions"]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)
    assert res.provenance["bos"] == ("prepend" if bos else "none")


def test_position_study_refuses_too_few_texts(gpt2_pair):
    with pytest.raises(DataError, match="only 310"):
        position.run(gpt2_pair.bridge, position.Config(n_train=500, n_test=500))


def test_trained_model_predicts_position_above_chance(tiny_gpt2_pair):
    res = position.run(tiny_gpt2_pair.bridge, position.Config())
    m = res.metrics
    assert m["logistic_accuracy_test"] > 2 * m["logistic"]["chance"]  # measured 0.63 vs chance 0.20
    assert m["loss_mean_by_position"][0] > np.mean(m["loss_mean_by_position"][3:5])


@pytest.mark.parametrize("masked_name", ["roberta", "tiny-mlm"])
def test_masked_lm_pseudo_log_likelihood_equals_hf_one_mask_at_a_time(request, masked_name):
    """Masked LMs: the loss at a position is -log p(token | text with that token masked). Reference: the
    HF model run once per (text, position) with that one token masked."""
    pair = request.getfixturevalue({"roberta": "roberta_pair", "tiny-mlm": "tiny_mlm_pair"}[masked_name])
    m, hf = pair.bridge, pair.hf
    cfg = position.Config(seqlen=5, batch_size=7)  # 7 variants per forward: mini-batches cut across texts
    texts = load_texts("contexts")[:6]
    ours, batch = position.loss_matrix(m, texts, cfg)
    assert ours.shape == (6, 5)
    mask = m.tokenizer.mask_token_id
    ref = torch.empty(6, 5)
    scale = 1.0
    with torch.no_grad():
        for i in range(6):
            for p in range(5):
                ids = batch.tokens[i : i + 1].clone()
                col = 1 + p  # after <s>; all texts have exactly seqlen tokens
                original = int(ids[0, col])
                ids[0, col] = mask
                logits = hf(input_ids=ids, attention_mask=batch.attention_mask[i : i + 1]).logits[0, col]
                ref[i, p] = -torch.log_softmax(logits.float(), -1)[original]
                scale = max(scale, logits.abs().max().item())
    # the bridge vs HF eager in fp32: rounding in different kernels, amplified through post-LN layers and
    # the MLM head, reaches ~1.2e-5 of the largest |logit| on tiny-mlm (2.6e-4 at |logit| 21 with
    # AVX-512, see test_hf_crosscheck's padding test); log-softmax inherits it: 5e-5 of that scale
    assert (ours - ref).abs().max() <= 5e-5 * scale
    res = position.run(m, position.Config(seqlen=5, n_train=30, n_test=30)).metrics
    assert res["loss_kind"] == "pseudo-log-likelihood" and len(res["loss_mean_by_position"]) == 5
