"""Study 1 vs the HF original: loss matrix from HF logits; regressions from statsmodels/sklearn run
directly on the HF-derived losses; the typed parts, the metrics derived from them and the per-text
samples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import statsmodels.api as sm
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression

from mechlens import DataError
from mechlens.data import load_texts
from mechlens.encoding import encode
from mechlens.errors import ConfigError
from mechlens.result import SAMPLE_COLUMNS, metrics_of
from mechlens.studies import position

# results.json's schema before the parts refactor (issue #13): every key must stay, with its nesting
METRIC_KEYS = {
    "degenerate",  # issue 28: notes on repeated / train-equal-test texts (empty when there are none)
    "loss_mean_by_position", "loss_std_by_position", "loss_mean_by_position_test",
    "ols.params", "ols.bse", "ols.tvalues", "ols.pvalues", "ols.r2", "ols.r2_adj", "ols.nobs", "ols.summary",
    "sklearn_linear.intercept", "sklearn_linear.slope", "linear_predictions",
    "logistic.config.solver", "logistic.config.C", "logistic.config.tol", "logistic.config.max_iter",
    "logistic.config.random_state", "logistic.classes", "logistic.intercepts", "logistic.slopes",
    "logistic.chance", "logistic.n_iter",
    "logistic_accuracy_train", "logistic_accuracy_test", "accuracy_by_position_train", "accuracy_by_position_test",
    "confusion_train", "confusion_test", "confusion_row_percent_train", "confusion_row_percent_test", "loss_kind",
}  # fmt: skip
# added with corpus scale (issue #16): how the OLS was computed, and which texts each statistic is over
STREAM_KEYS = {"ols.method", "n_texts_train", "n_texts_test", "logistic_sample_texts", "logistic_sample_texts_test",
               "sampled"}  # fmt: skip

# texts whose first tokens split words (GPT-2 BPE: "Unbelievably" is 3 tokens, "coffee-maker's" several)
WORDY = [
    "Unbelievably, the coffee-maker's output tasted burnt again.",
    "Photosynthesis converts sunlight into chemical energy quickly.",
    "She said: 'hello' -- then left the room without a word.",
    "Antidisestablishmentarianism is a notoriously long English word.",
    "The quick brown fox jumps over the lazy dog near the river.",
    "Mr. O'Neill's well-known bakery opens at 7am on weekdays.",
    "Grandmother's recipe uses cardamom, cinnamon and cloves.",
    "Overnight, thunderstorms knocked out power across the valley.",
]


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


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
    lm = position.loss_matrix(m, position.encode_texts(m, texts[:60], cfg), cfg.batch_size)
    batch = lm.batch
    ref, scale = _hf_loss(hf, batch, cfg.seqlen)
    ref = ref[:, 1:] if bos else ref
    assert lm.loss.shape == (60, cfg.seqlen - 1) and lm.kind == "next-token"
    assert (lm.loss - ref).abs().max() <= 1e-5 + 2e-6 * scale
    # position p is the token at text position p (column p, or p + 1 after BOS); its loss is that of p + 1
    first = int(bos)
    assert (lm.column == torch.arange(first, first + cfg.seqlen - 1)).all()
    assert torch.equal(lm.token, batch.tokens[:, first : first + cfg.seqlen - 1])
    assert torch.equal(lm.target, batch.tokens[:, first + 1 : first + cfg.seqlen])
    assert lm.bos == ("prepend" if bos else "none")
    # our analysis run on the HF-derived losses equals statsmodels/sklearn run directly on them
    x = ref.numpy().reshape(-1).astype(np.float64)
    y = np.tile(np.arange(cfg.seqlen - 1), 60)
    ols = position.fit_position_ols(ref)
    logit = position.fit_position_logistic(ref, ref[:40], cfg)
    fit = sm.OLS(y, sm.add_constant(x)).fit()
    np.testing.assert_allclose(ols.params, fit.params, rtol=1e-10)
    np.testing.assert_allclose(ols.bse, fit.bse, rtol=1e-10)
    np.testing.assert_allclose(ols.pvalues, fit.pvalues, rtol=1e-8, atol=1e-300)
    assert abs(ols.r2 - fit.rsquared) <= 1e-12 and ols.nobs == len(y)
    np.testing.assert_allclose(ols.predictions, fit.fittedvalues, rtol=1e-10)
    assert np.array_equal(ols.position, y)
    # sklearn LinearRegression and statsmodels agree to 1e-8 on the same data
    sk = LinearRegression().fit(x[:, None], y)
    assert abs(sk.intercept_ - fit.params[0]) <= 1e-8 and abs(sk.coef_[0] - fit.params[1]) <= 1e-8
    assert abs(ols.sklearn_intercept - fit.params[0]) <= 1e-8
    assert abs(ols.sklearn_slope - fit.params[1]) <= 1e-8
    # the end-to-end run (bridge losses, <= 1e-5 from HF's) gives the same fit to 1e-4
    np.testing.assert_allclose(res.metrics["ols"]["params"], fit.params, atol=1e-4)
    clf = LogisticRegression(solver="lbfgs", C=1.0, tol=1e-6, max_iter=2000, random_state=0).fit(x[:, None], y)
    assert abs(logit.accuracy_train - clf.score(x[:, None], y)) <= 1e-12
    np.testing.assert_allclose(logit.slopes, clf.coef_[:, 0], rtol=1e-6)
    np.testing.assert_allclose(logit.probabilities_test, clf.predict_proba(x[: 40 * (cfg.seqlen - 1), None]),
                               atol=1e-9)  # fmt: skip
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
    lm = position.loss_matrix(m, position.encode_texts(m, texts, cfg), cfg.batch_size)
    ours, batch = lm.loss, lm.batch
    assert ours.shape == (6, 5) and lm.kind == "pseudo-log-likelihood"
    # the loss at p is that of the token at p itself, the text token after <s>
    assert (lm.column == torch.arange(1, 6)).all() and torch.equal(lm.token, lm.target)
    mask = m.tokenizer.mask_token_id
    ref = torch.empty(6, 5)
    scale = 1.0
    with torch.no_grad():
        for i in range(6):
            for p in range(5):
                ids = batch.tokens[i : i + 1].clone()
                col = 1 + p  # after <s>; all texts have exactly seqlen tokens
                original = int(ids[0, col])
                assert original == int(lm.target[i, p])
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


@pytest.fixture(scope="module")
def small_run(tiny_gpt2_pair):
    return position.run(tiny_gpt2_pair.bridge, position.Config(n_train=30, n_test=20))


def test_parts_are_frozen_and_the_metrics_derive_from_them(small_run):
    res = small_run
    parts = res.parts
    assert isinstance(parts, position.PositionResult)
    assert res.metrics == metrics_of(parts)
    assert _keys(res.metrics) == METRIC_KEYS | STREAM_KEYS  # the public schema, no key lost (none leaked from a part)
    for obj, field in ((parts, "loss_kind"), (parts.train, "loss"), (parts.ols, "r2"), (parts.logistic, "chance"),
                       (parts.confusion, "counts_test"), (parts.sklearn_linear, "slope")):  # fmt: skip
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)
    # the metric fields are the parts' numbers
    loss = parts.train.loss.numpy()
    np.testing.assert_array_equal(parts.loss_mean_by_position, loss.mean(0, dtype=np.float64))
    np.testing.assert_array_equal(parts.loss_std_by_position, loss.std(0, dtype=np.float64))
    np.testing.assert_array_equal(parts.loss_mean_by_position_test, parts.test.loss.numpy().mean(0, dtype=np.float64))
    assert parts.linear_predictions is parts.ols.predictions and parts.confusion_test is parts.confusion.counts_test
    assert (parts.sklearn_linear.intercept, parts.sklearn_linear.slope) == (parts.ols.sklearn_intercept,
                                                                             parts.ols.sklearn_slope)  # fmt: skip
    assert list(res.figures) == list(position.FIGURES)
    rows = res.tables["loss_matrix"]
    assert len(rows) == (30 + 20) * 5 and rows[7] == {"split": "train", "text": 1, "position": 2,
                                                     "loss": float(loss[1, 2])}  # fmt: skip


def test_confusion_counts_by_hand(small_run):
    """The confusion matrices and per-position accuracies, counted with numpy from the predictions."""
    fit, conf = small_run.parts.logistic, small_run.parts.confusion
    for split, n_rows in (("train", 30 * 5), ("test", 20 * 5)):
        true, pred = getattr(fit, f"position_{split}"), getattr(fit, f"predicted_{split}")
        assert len(true) == n_rows and np.array_equal(true, np.tile(np.arange(5), n_rows // 5))
        assert np.array_equal(pred, getattr(fit, f"probabilities_{split}").argmax(1))
        counts = np.zeros((5, 5), dtype=np.int64)
        np.add.at(counts, (true, pred), 1)
        np.testing.assert_array_equal(getattr(conf, f"counts_{split}"), counts)
        np.testing.assert_allclose(getattr(conf, f"row_percent_{split}"), 100 * counts / counts.sum(1, keepdims=True),
                                   rtol=1e-15)  # fmt: skip
        np.testing.assert_allclose(getattr(fit, f"accuracy_by_position_{split}"), np.diag(counts) / (n_rows // 5),
                                   rtol=1e-15)  # fmt: skip
        assert getattr(fit, f"accuracy_{split}") == pytest.approx(np.trace(counts) / n_rows, rel=1e-15)


def _word_by_hand(tok, text, ids):
    """The word each token begins, from the decoded tokens: a token begins word w when its first
    non-space character follows whitespace (or starts the text); -1 otherwise."""
    pieces = [tok.decode([i]) for i in ids]
    assert text.startswith("".join(pieces))  # byte-level BPE: the pieces spell the text (ASCII here)
    out, start = [], 0
    for s in pieces:
        a = start + len(s) - len(s.lstrip())
        begins = s.strip() != "" and (a == 0 or text[a - 1].isspace())
        out.append(len(text[:a].split()) if begins else -1)
        start += len(s)
    return out


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-mlm"])
def test_samples_are_the_training_losses_by_text_and_position(request, name):
    m = request.getfixturevalue(name.replace("-", "_") + "_pair").bridge
    cfg = position.Config(n_train=4, n_test=4)
    res = position.run(m, cfg, texts=WORDY)
    df = position.samples(res)
    assert list(df.columns) == list(SAMPLE_COLUMNS)
    assert {c: str(t) for c, t in df.dtypes.items()} == {
        "quantity": "object", "layer": "Int64", "relative_depth": "float64", "position": "Int64", "word": "Int64",
        "unit": "object", "sample": "int64", "value": "float64",
    }  # fmt: skip
    n_pos = len(res.metrics["loss_mean_by_position"])
    assert len(df) == 4 * n_pos and set(df["quantity"]) == {"loss"} and set(df["unit"]) == {"text"}
    assert df["layer"].isna().all() and df["relative_depth"].isna().all()  # no layer: loss is read at the output
    assert np.isfinite(df["value"]).all()
    assert df["sample"].tolist() == np.repeat(np.arange(4), n_pos).tolist()  # text index in the training split
    assert df["position"].tolist() == np.tile(np.arange(n_pos), 4).tolist()
    # the mean over texts is the headline statistic: float64 means of the same fp32 losses (summation order only)
    np.testing.assert_allclose(df.groupby("position")["value"].mean(), res.metrics["loss_mean_by_position"],
                               rtol=1e-12)  # fmt: skip
    # word: the word begun by the token at each text position (the one the prediction reads, for a causal LM)
    lm = res.parts.train
    expect = [_word_by_hand(m.tokenizer, t, lm.token[i].tolist()) for i, t in enumerate(WORDY[:4])]
    got = df["word"].fillna(-1).to_numpy().reshape(4, n_pos).tolist()
    assert got == expect
    flat = [w for row in expect for w in row]
    assert -1 in flat and sum(w >= 1 for w in flat) >= 4  # both cases are exercised
    # token ids: the same losses, no word (no characters to align)
    ids = [m.tokenizer(t, add_special_tokens=False)["input_ids"] for t in WORDY]
    df_ids = position.samples(position.run(m, cfg, texts=ids))
    assert df_ids["word"].isna().all()
    np.testing.assert_array_equal(df_ids["value"], df["value"])


def test_loss_matrix_refuses_rows_of_different_lengths(tiny_gpt2_pair):
    m = tiny_gpt2_pair.bridge
    with pytest.raises(DataError, match="same number of text tokens"):
        position.loss_matrix(m, encode(m, ["Hello world, how are you", "Hi"], bos=False))


def test_causal_lm_needs_two_positions(tiny_gpt2_pair, tiny_mlm_pair):
    with pytest.raises(ConfigError, match="--seqlen"):
        position.Config(seqlen=2).check_model(tiny_gpt2_pair.bridge)
    position.Config(seqlen=2).check_model(tiny_mlm_pair.bridge)  # a masked LM has two positions then


def test_lesson_calls_the_parts_in_the_original_order():
    codes = [s.code for s in position.LESSON]
    for code, part in zip(codes[1:5], ("loss_matrix", "fit_position_ols", "fit_position_logistic", "confusion"),
                          strict=True):  # fmt: skip
        assert f"position.{part}(" in code
    assert "bos=False" in codes[0] and "position.run(model, config)" in codes[-1]
    assert codes[-1].splitlines()[-1] == "result.provenance" and codes[-1].count(".show()") >= 2


def test_causal_and_masked_losses_flagged_incomparable():
    from mechlens.studies import position as study

    assert study.incomparable({"a": {"kind": "causal"}, "b": {"kind": "causal"}}) == {}
    flagged = study.incomparable({"gpt": {"kind": "causal"}, "mlm": {"kind": "masked"}})
    assert set(flagged) == {"loss"} and "pseudo-log-likelihood" in flagged["loss"]
