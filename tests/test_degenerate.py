"""Degenerate statistics are named, never reported as findings (issue 28): refused in one line, or marked in
results.json and the headline (mechlens.stats.degenerate); short-context models load and are refused by flag;
empty inputs to every study's ``run`` are the same DataError; the tuned-lens held-out guard compares the
identity of the texts, not the spelling of their path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import statsmodels.api as sm

from mechlens.errors import ConfigError, DataError, NonFiniteError
from mechlens.stats.degenerate import check_regression, repeated_rows, require_finite
from mechlens.studies import position


def test_zero_variance_regressor_is_refused_where_statsmodels_reports_a_confident_slope():
    losses = np.full((20, 5), 3.25)
    # the defect: statsmodels' pseudo-inverse gives a "significant" slope on a constant regressor
    x = losses.reshape(-1)
    y = np.tile(np.arange(5), 20).astype(float)
    fit = sm.OLS(y, sm.add_constant(x, has_constant="add")).fit()
    assert np.isfinite(fit.pvalues).all()  # no error from statsmodels itself: only the check tells
    with pytest.raises(DataError, match=r"the regressor \(loss\) has the same value at all 100 points"):
        position.fit_position_ols(losses)
    with pytest.raises(DataError, match="the training loss has the same value"):
        position.fit_position_logistic(losses, losses)


def test_one_position_and_too_few_points_are_refused_and_nan_is_named():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=r"the response \(position\) has the same value"):
        position.fit_position_ols(rng.normal(size=(30, 1)))  # one position: r2 was NaN
    with pytest.raises(DataError, match="2 points for 2 parameters"):
        position.fit_position_ols(rng.normal(size=(1, 2)))
    with pytest.raises(DataError, match=">= 2 positions"):
        position.fit_position_logistic(rng.normal(size=(30, 1)), rng.normal(size=(30, 1)))
    bad = rng.normal(size=(10, 4))
    bad[3, 2] = np.nan
    with pytest.raises(NonFiniteError, match="fit_position_ols: the loss matrix is NaN or infinite"):
        position.fit_position_ols(bad)
    with pytest.raises(NonFiniteError, match="the test loss matrix"):
        position.fit_position_logistic(rng.normal(size=(10, 4)), bad)


def test_a_sound_fit_is_unchanged_and_matches_statsmodels():
    # independent reference: statsmodels directly; the two are the same float64 computation (1e-10)
    rng = np.random.default_rng(1)
    losses = rng.normal(size=(40, 5)) + np.arange(5) * 0.3
    fit = position.fit_position_ols(losses)
    ref = sm.OLS(np.tile(np.arange(5), 40).astype(float), sm.add_constant(losses.reshape(-1))).fit()
    np.testing.assert_allclose(fit.params, ref.params, rtol=1e-10)
    np.testing.assert_allclose(fit.pvalues, ref.pvalues, rtol=1e-8, atol=1e-300)


def test_helpers():
    check_regression([0.0, 1.0, 2.0], [1.0, 0.0, 2.0], n_params=2, what="w", x_name="x", y_name="y", fix="f")
    with pytest.raises(DataError, match="w: the regressor"):
        check_regression([1.0] * 4, [1.0, 2.0, 3.0, 4.0], n_params=2, what="w", x_name="x", y_name="y", fix="f")
    with pytest.raises(NonFiniteError, match="q: b is NaN"):
        require_finite("q", {"a": [1.0], "b": [0.0, float("inf")]})
    # 3 training rows, one a repeat; test rows: one equal to a training row, one new
    assert repeated_rows([[1, 2], [3, 4], [1, 2]], [[3, 4], [5, 6]]) == (1, 1)


def test_identical_texts_are_marked_in_results_and_headline(tmp_path, monkeypatch, capsys):
    from mechlens.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "same.txt").write_text("The cat sat on the warm windowsill and watched the rain.\n" * 200)
    assert main(["run", "position", "--model", "tiny-gpt2", "--data", "same.txt", "--quiet", "--out", "r"]) == 0
    out = capsys.readouterr().out
    entry = json.loads((tmp_path / "r" / "results.json").read_text())["position"]["tiny-gpt2"]
    marks = entry["metrics"]["degenerate"]
    assert marks == [
        "99 of 100 training texts repeat an earlier one (as tokens): the OLS p-values count them as independent",
        "100 of 100 test texts are identical (as tokens) to a training text: the test accuracy is not on fresh texts",
    ]
    assert "DEGENERATE (99 of 100 training texts repeat" in out.splitlines()[0]
    assert "DEGENERATE" in (tmp_path / "r" / "report.html").read_text()


def test_distinct_texts_are_not_marked(tiny_gpt2_pair):
    from mechlens.studies.position import Config, run

    texts = [f"Text number {i} is about a different {w} today." for i, w in enumerate(["cat", "dog", "cup", "sun"] * 3)]
    r = run(tiny_gpt2_pair.bridge, Config(seqlen=5), texts=texts)
    assert r.metrics["degenerate"] == []
    assert not position.headline(r.metrics)[0].startswith("DEGENERATE")


@pytest.mark.parametrize("study", ["position", "logits", "lens", "magnitudes", "distances"])
@pytest.mark.parametrize("empty", [[], ""], ids=["empty-list", "empty-string"])
def test_empty_input_to_every_study_run_is_a_data_error(tiny_gpt2_pair, study, empty):
    from mechlens.studies import STUDIES

    module = STUDIES[study].module
    with pytest.raises(DataError):
        module.run(tiny_gpt2_pair.bridge, module.Config(), empty)


@pytest.mark.parametrize("n_positions", [16, 32])
def test_short_context_models_load_and_refuse_by_flag(n_positions):
    from conftest import make_short_gpt2

    from mechlens import load_model
    from mechlens.studies import logits

    hf, tok = make_short_gpt2(n_positions)  # asserts its parameter count
    model = load_model(hf, tokenizer=tok)  # the load probe and its greedy steps fit the context
    assert model.cfg.n_ctx == n_positions
    assert "greedy steps" in model._mechlens_provenance.generate_check
    cfg = logits.Config(n_new_tokens=n_positions)
    with pytest.raises(ConfigError, match=r"--n-new-tokens \(n_new_tokens\) must be <= "):
        cfg.check_model(model)
    batch = logits.prompt_batch(model, cfg.prompt, bos=cfg.bos)
    room = n_positions - batch.tokens.shape[1]
    if room >= 1:
        logits.Config(n_new_tokens=room).check_model(model)  # the largest length that fits passes
        r = logits.run(model, logits.Config(n_new_tokens=room, n_samples=10))
        assert len(r.parts.greedy_tokens) == room


def test_heldout_guard_compares_identity_and_the_card_records_the_fingerprint(tiny_gpt2_pair, tmp_path, monkeypatch):
    from mechlens.data.identity import fingerprint
    from mechlens.lens import training, tuned

    monkeypatch.chdir(tmp_path)
    texts = [f"Held-out or training text {i} about coffee, rain and the sea." for i in range(6)]
    (tmp_path / "fx").mkdir()
    (tmp_path / "fx" / "t.txt").write_text("\n".join(texts) + "\n")
    cfg = training.TrainConfig(data="fx/t.txt", heldout=2, steps=2, batch_size=2, max_tokens=8, evaluate=False)
    lens = training.train_tuned_lens(tiny_gpt2_pair.bridge, cfg=cfg)
    card = lens.card
    assert card.data_path == str((tmp_path / "fx" / "t.txt").resolve())
    assert card.data_fingerprint == fingerprint(texts[:3], 3) and card.data_fingerprint_texts == 3
    shutil.copy(tmp_path / "fx" / "t.txt", tmp_path / "copy.txt")
    (tmp_path / "other.txt").write_text("\n".join(texts[3:]) + "\n")
    for spelling in ("fx/t.txt", "fx/../fx/t.txt", str(tmp_path / "fx" / "t.txt"), "copy.txt"):
        n, note = tuned.check_for(lens, spelling, None)
        assert n == 2 and "held out from the tuned lens' training" in note, spelling
        with pytest.raises(ConfigError, match="--n-texts must be <= 2"):
            tuned.check_for(lens, spelling, 3)
    n, note = tuned.check_for(lens, "other.txt", None)
    assert n is None and "not the tuned lens' training data" in note
    n, note = tuned.check_for(lens, texts, None)  # the same texts given in Python
    assert n == 2
    saved = tmp_path / "saved"
    lens.save(saved)
    assert json.loads((saved / "tuned_lens.json").read_text())["data_fingerprint"] == card.data_fingerprint


def test_kendall_of_a_constant_measure_is_refused_naming_it():
    from scipy import stats

    from mechlens.studies import distances

    pos = np.array([1, 4, 9, 16])
    pos_dist = np.abs(pos[:, None] - pos[None, :]).astype(float)
    rng = np.random.default_rng(0)
    m = rng.random((4, 4))
    m = m + m.T
    tau, p = distances.kendall(m, pos_dist, "L1 of the attn outputs")
    iu = np.triu_indices(4, 1)
    ref = stats.kendalltau(m[iu], pos_dist[iu])  # independent: scipy on the same upper triangles
    assert (tau, p) == (pytest.approx(ref.statistic, abs=1e-12), pytest.approx(ref.pvalue, abs=1e-12))
    with pytest.raises(NonFiniteError, match="MI of the mlp outputs has the same value at all 6 pairs"):
        distances.kendall(np.ones((4, 4)), pos_dist, "MI of the mlp outputs")
