"""Cross-model comparison (mechlens.comparison): the shared depth axis, word-aligned positions, bootstrap
intervals, paired differences, flags for quantities that are not comparable, and comparison.csv written
by ``mechlens run`` and rebuilt by ``mechlens compare``.

The models: the embedded tiny-gpt2 (2 layers) and a seeded random 3-layer GPT-NeoX saved as a directory
(a different family and depth, same GPT-2 tokenizer), and tiny-mlm (post-LN, another tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mechlens.cli import main
from mechlens.comparison import COLUMNS, comparison_frame

NEOX_PARAMS = 6_499_968 + 33_472  # the 2-layer matrix case (tests/arch_matrix.py) plus one layer of d_model 64


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    import transformers

    from mechlens.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=50257, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=1024, rotary_pct=0.25,
                                     bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)  # fmt: skip
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    assert sum(p.numel() for p in hf.parameters()) == NEOX_PARAMS
    path = tmp_path_factory.mktemp("neox3")
    hf.save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path


# -- the frame on synthetic samples: intervals, pairing, alignment -----------------------------------


def _samples(values: np.ndarray, n_layers: int, word=None) -> pd.DataFrame:
    """values [n_layers, n_units]: one per-unit statistic per block layer."""
    rows = [
        {"quantity": "q", "layer": layer, "relative_depth": (layer + 1) / n_layers, "position": pd.NA,
         "word": pd.NA, "unit": "text", "sample": t, "value": float(v)}
        for layer in range(n_layers) for t, v in enumerate(values[layer])
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_intervals_cover_the_full_mean_and_shrink_with_more_texts():
    """The percentile bootstrap interval of a mean covers the mean of all units and its width falls like
    1/sqrt(n): 16x the units, ~1/4 the width (0.15..0.4 allows the bootstrap's own noise)."""
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 800):
        vals = rng.normal(2.0, 1.0, (1, n))
        f = comparison_frame("magnitudes", {"m": _samples(vals, 1)})
        row = f.iloc[0]
        assert row["ci_low"] < vals.mean() < row["ci_high"]
        assert row["value"] == pytest.approx(vals.mean(), rel=1e-12)
        widths.append(row["ci_high"] - row["ci_low"])
    assert 0.15 < widths[1] / widths[0] < 0.4
    # a 95% interval of the mean of N(2, 1) over 800 units is 2 * 1.96 / sqrt(800) = 0.139 wide
    assert widths[1] == pytest.approx(2 * 1.96 / np.sqrt(800), rel=0.15)


def test_paired_difference_on_shared_depths_only():
    """A 2-layer and a 4-layer model share relative depths 0.5 and 1.0: difference rows exist there
    only; the paired interval of b - a (b = a + 0.3 + small noise) is narrow around 0.3 although each
    model's own interval is wide (the texts' spread cancels in pairs)."""
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, (2, 60))
    b = np.stack([a[0], a[0], a[1], a[1]]) + 0.3 + rng.normal(0, 0.01, (4, 60))
    f = comparison_frame("magnitudes", {"a": _samples(a, 2), "b": _samples(b, 4)})
    assert list(f.columns) == COLUMNS
    diffs = f[f["reference"] == "a"]
    assert sorted(diffs["relative_depth"]) == [0.5, 1.0]
    assert (diffs["ci_low"] > 0.29).all() and (diffs["ci_high"] < 0.31).all()
    own = f[f["reference"].isna() & (f["model"] == "b")]
    assert (own["ci_high"] - own["ci_low"] > 0.3).all()
    for model, n_layers in (("a", 2), ("b", 4)):
        depths = f[(f["model"] == model) & f["reference"].isna()]["relative_depth"]
        assert depths.max() == 1.0 and len(depths) == n_layers
    # one kind of NA for what is missing: reference.notna() selects the difference rows, and only them
    assert f["reference"].notna().sum() == len(diffs) == 2
    for c in ("reference", "layer", "position", "position_axis", "note"):
        missing = f.loc[f[c].isna(), c]
        assert all(v is pd.NA for v in missing), c
    assert f["position"].isna().all() and f["position_axis"].isna().all() and f["note"].isna().any()
    assert "" not in set(f["reference"].dropna()) | set(f["position_axis"].dropna()) | set(f["note"].dropna())


def test_words_replace_positions_when_tokenizers_differ():
    """Different tokenizer signatures: positions become word indices, tokens beginning no word drop."""
    base = {"quantity": "q", "layer": pd.NA, "relative_depth": np.nan, "unit": "text", "value": 1.0}
    a = pd.DataFrame([base | {"position": p, "word": w, "sample": 0} for p, w in ((0, 0), (1, pd.NA), (2, 1))])
    b = pd.DataFrame([base | {"position": p, "word": w, "sample": 0} for p, w in ((0, 0), (1, 1))])
    same = comparison_frame("position", {"a": a, "b": b}, {"a": {"tokenizer": "x"}, "b": {"tokenizer": "x"}})
    assert set(same["position_axis"]) == {"token"} and sorted(same[same.model == "a"]["position"]) == [0, 1, 2]
    diff = comparison_frame("position", {"a": a, "b": b}, {"a": {"tokenizer": "x"}, "b": {"tokenizer": "y"}})
    assert set(diff["position_axis"]) == {"word"} and sorted(diff[diff.model == "a"]["position"]) == [0, 1]


def test_word_index_by_hand(tiny_gpt2_pair, bert_pair):
    """The token that begins each whitespace word, for a BPE and a word-level tokenizer, by hand."""
    from mechlens.encoding import encode, word_index

    text = "I like oat milk in my coffee, every morning."
    # GPT-2: I | ' like' | ' o' 'at' | ' milk' | ' in' | ' my' | ' coffee' ',' | ' every' | ' morning' '.'
    gpt2 = tiny_gpt2_pair.bridge
    batch = encode(gpt2, [text], bos=True)
    assert [gpt2.tokenizer.decode([int(t)]) for t in batch.tokens[0, 1:5]] == ["I", " like", " o", "at"]
    assert word_index(gpt2, [text], batch)[0].tolist() == [-1, 0, 1, 2, -1, 3, 4, 5, 6, -1, 7, 8, -1]
    # a line break is a token of its own, which begins no word: the next line's first token does
    lines = "Hello there.\nThe cat sat."  # Hello | ' there' '.' | '\n' | The | ' cat' | ' sat' '.'
    batch = encode(gpt2, [lines], bos=False)
    assert [gpt2.tokenizer.decode([int(t)]) for t in batch.tokens[0, 3:5]] == ["\n", "The"]
    assert word_index(gpt2, [lines], batch)[0].tolist() == [0, 1, -1, -1, 2, 3, 4, -1]
    # BERT (word-level, lower-cased): [CLS] i like oat milk in my coffee , every morning . [SEP]
    bert = bert_pair.bridge
    batch = encode(bert, [text], bos=True)
    assert word_index(bert, [text], batch)[0].tolist() == [-1, 0, 1, 2, 3, 4, 5, 6, -1, 7, 8, -1, -1]


# -- end to end: mechlens run writes comparison.csv; mechlens compare rebuilds it --------------------


def _run(study: str, models: list[str], out, *extra: str) -> pd.DataFrame:
    argv = ["run", study, *[a for m in models for a in ("--model", m)], "--out", str(out), "--quiet", *extra]
    assert main(argv) == 0
    return pd.read_csv(out / "comparison.csv")


@pytest.mark.parametrize(
    ("study", "extra"),
    [("magnitudes", ("--n-texts", "24")), ("lens", ()), ("distances", ())],
)
def test_run_writes_comparison_csv(study, extra, neox_dir, tmp_path):
    frame = _run(study, ["tiny-gpt2", str(neox_dir)], tmp_path / "out", *extra)
    assert list(frame.columns) == COLUMNS
    own = frame[frame["reference"].isna()]
    assert set(own["model"]) == {"tiny-gpt2", str(neox_dir)}
    layered = own.dropna(subset=["relative_depth"])
    assert not layered.empty
    for _model, g in layered.groupby("model"):
        assert g["relative_depth"].max() == pytest.approx(1.0)  # both models' last layers line up
    with_ci = own[own["n"] >= 2]
    assert not with_ci.empty and with_ci[["ci_low", "ci_high"]].notna().all().all()
    assert (with_ci["ci_low"] <= with_ci["value"] + 1e-12).all() and (
        with_ci["value"] <= with_ci["ci_high"] + 1e-12
    ).all()
    diffs = frame[frame["reference"].notna()]
    assert not diffs.empty and set(diffs["reference"]) == {"tiny-gpt2"}
    assert set(diffs["relative_depth"].dropna().round(9)) <= set(layered["relative_depth"].round(9))
    # mechlens compare rebuilds the same table from the saved per-unit samples
    single = []
    for i, model in enumerate(["tiny-gpt2", str(neox_dir)]):
        d = tmp_path / f"single{i}"
        assert main(["run", study, "--model", model, "--out", str(d), "--quiet", *extra]) == 0
        assert not (d / "comparison.csv").exists()
        single.append(str(d))
    assert main(["compare", *single, "--out", str(tmp_path / "cmp")]) == 0
    rebuilt = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    key = ["quantity", "layer", "position", "reference"]
    left = frame.assign(reference=frame["reference"].notna()).sort_values([*key, "model"])
    right = rebuilt.assign(reference=rebuilt["reference"].notna()).sort_values([*key, "model"])
    np.testing.assert_allclose(left["value"].to_numpy(), right["value"].to_numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(left["ci_low"].to_numpy(), right["ci_low"].to_numpy(), rtol=1e-9, atol=1e-12)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "Across models" in report and "relative depth" in report
    # the report states the study's conventions, and every figure has a one-line caption
    assert "Conventions" in report and report.count('class="caption"') >= report.count('class="plotly-graph-div"')


def test_post_ln_against_pre_ln_is_flagged(tmp_path):
    """tiny-mlm (post-LN: its attention 'output' is taken after LayerNorm) against tiny-gpt2 (pre-LN): the
    magnitudes quantities are flagged NOT COMPARABLE and get no difference rows; the tokenizers differ,
    so positions are words."""
    frame = _run("magnitudes", ["tiny-gpt2", "tiny-mlm"], tmp_path / "out", "--n-texts", "16",
                 "--allow-different-tokenizers")  # fmt: skip
    own = frame[frame["reference"].isna()]
    assert own["note"].fillna("").str.contains("post-LN").all()
    assert frame["reference"].isna().all()
    assert set(own["position_axis"].dropna()) == {"word"}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["magnitudes"]["tiny-mlm"]["samples_csv"].endswith("__samples.csv")


def test_token_units_pair_by_word_when_tokenizers_differ():
    """Per-token units (one text): with different tokenizers, a token is paired with the other model's
    token that begins the same word; tokens that begin no word are left out."""
    base = {"quantity": "q", "layer": pd.NA, "relative_depth": np.nan, "position": pd.NA, "unit": "token"}
    a = pd.DataFrame(
        [
            base | {"word": w, "sample": i, "value": v}
            for i, (w, v) in enumerate([(0, 1.0), (pd.NA, 9.0), (1, 2.0), (2, 3.0)])
        ]
    )
    b = pd.DataFrame(
        [base | {"word": w, "sample": i, "value": v} for i, (w, v) in enumerate([(0, 1.5), (1, 2.5), (2, 3.5)])]
    )
    f = comparison_frame("lens", {"a": a, "b": b}, {"a": {"tokenizer": "x"}, "b": {"tokenizer": "y"}})
    own = f[(f.model == "a") & f.reference.isna()]
    assert own["value"].item() == pytest.approx(3.75) and own["n"].item() == 4  # a model's own mean: every token
    diff = f[f.reference == "a"]
    assert diff["value"].item() == pytest.approx(0.5) and diff["n"].item() == 3  # pairs: word-initial tokens


def test_runs_on_different_inputs_get_no_differences():
    rng = np.random.default_rng(3)
    f = comparison_frame("magnitudes", {"a": _samples(rng.normal(0, 1, (2, 20)), 2),
                                         "b": _samples(rng.normal(0, 1, (2, 20)), 2)},
                         unpaired="runs read different inputs: data reviews vs contexts")  # fmt: skip
    assert f["reference"].isna().all() and f["note"].str.contains("different inputs").all()


def test_intervals_on_real_texts_cover_the_all_texts_value_and_shrink(neox_dir):
    """mechlens.compare on tiny-gpt2 and the 3-layer NeoX (magnitudes, built-in reviews): the interval of
    each model's per-layer log RMS from 16 texts covers the value from all 64 texts at most layers (a
    95% interval may miss now and then: at least 80% of the 5 layers here), and the 64-text intervals are
    narrower than the 16-text ones (about 1/2: the width falls like 1/sqrt(n))."""
    import mechlens
    from mechlens.studies import magnitudes

    models = {"tiny-gpt2": mechlens.load_model("tiny-gpt2"), "neox3": mechlens.load_model(neox_dir)}
    few = mechlens.compare("magnitudes", models, cfg=magnitudes.Config(n_texts=16))
    all_ = mechlens.compare("magnitudes", models, cfg=magnitudes.Config(n_texts=64))
    key = ["model", "reference", "quantity", "layer"]
    sel = lambda f: f[(f["quantity"] == "log_rms")].set_index(key)  # noqa: E731
    a, b = sel(few), sel(all_)
    own = a.index.get_level_values("reference").isna()
    covered = (a["ci_low"] <= b["value"]) & (b["value"] <= a["ci_high"])
    assert covered[own].mean() >= 0.8
    width_few, width_all = (a["ci_high"] - a["ci_low"])[own], (b["ci_high"] - b["ci_low"])[own]
    ratio = (width_all / width_few).median()
    assert 0.3 < ratio < 0.75, ratio
    assert set(a.index.get_level_values("model")) == {"tiny-gpt2", "neox3"}
