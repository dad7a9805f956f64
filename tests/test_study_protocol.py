"""The study protocol: a sixth study is one module plus one registry line. A dummy study defined here
runs through ``mechlens run`` (its Config as flags, checked), appears in the report with its findings
and in ``mechlens compare``; nothing outside this file names it."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from mechlens.cli import main
from mechlens.options import Options, option
from mechlens.studies import STUDIES, StudyInfo

MODULE = "mechlens_test_dummy_study"


def _dummy_module() -> types.ModuleType:
    from mechlens import encode, provenance_of, run_cached
    from mechlens.result import StudyResult

    mod = types.ModuleType(MODULE)

    @dataclasses.dataclass
    class Config(Options):
        text: str = option("Hello world", "the text", nonempty=True)
        scale: float = option(2.0, "a factor applied to the norm", gt=0)
        seed: int = option(0, "random seed", ge=0)

    def run(model, cfg: Config | None = None) -> StudyResult:
        cfg = cfg or Config()
        batch = encode(model, [cfg.text], bos=True)
        _, acts = run_cached(model, batch, ["blocks.0.hook_resid_pre"])
        value = cfg.scale * float(acts["blocks.0.hook_resid_pre"][0].norm(dim=-1).sum())
        prov = provenance_of(model).replace(bos=batch.bos_policy(), seed=cfg.seed)
        res = StudyResult("dummy", prov.model, {"value": value, "ids": batch.tokens[0].tolist()}, prov.to_dict(),
                          dataclasses.asdict(cfg), {"rows": [{"value": value}]})  # fmt: skip
        res.figures = {"value": go.Figure(go.Bar(y=[value]))}
        return res

    def headline(m) -> list[str]:
        return [f"dummy value {m['value']:.4f}", f"The summed embedding norm, scaled, is {m['value']:.4f}."]

    def compare(entries) -> dict[str, go.Figure]:
        return {"comparison": go.Figure(go.Bar(x=list(entries), y=[e["metrics"]["value"] for e in entries.values()]))}

    mod.Config, mod.run, mod.headline, mod.compare = Config, run, headline, compare
    return mod


@pytest.fixture
def dummy_study(monkeypatch):
    monkeypatch.setitem(sys.modules, MODULE, _dummy_module())
    monkeypatch.setitem(STUDIES, "dummy", StudyInfo("dummy", "6. A dummy study", frozenset({"causal"}), ("tiny-gpt2",),
                                                    MODULE))  # fmt: skip
    return MODULE


def test_a_sixth_study_runs_reports_and_compares(dummy_study, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", "dummy", "--scale", "3", "--out", str(a)]) == 0
    assert main(["run", "--text", "Good morning", "dummy", "--out", str(b)]) == 0
    assert "dummy value" in capsys.readouterr().out
    doc = json.loads((a / "results.json").read_text())
    e = doc["dummy"]["tiny-gpt2"]
    # the number, independently: token + position embeddings of the HF model
    from transformers import GPT2LMHeadModel

    from mechlens.zoo import EMBEDDED

    ref_model = GPT2LMHeadModel.from_pretrained(EMBEDDED["tiny-gpt2"].path, dtype=torch.float32)
    ids = torch.tensor(e["metrics"]["ids"])
    with torch.no_grad():
        emb = ref_model.transformer.wte(ids) + ref_model.transformer.wpe(torch.arange(len(ids)))
    # a sum of ~3 norms of ~|5| in fp32: 1e-5 relative
    assert e["metrics"]["value"] == pytest.approx(3 * float(emb.norm(dim=-1).sum()), rel=1e-5)
    html = (a / "report.html").read_text()
    assert "6. A dummy study" in html and "The summed embedding norm, scaled, is" in html
    assert (a / "dummy__tiny-gpt2__rows.csv").exists()
    assert main(["run", "dummy", "--scale", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--scale (scale) must be > 0" in capsys.readouterr().err
    cmp = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(cmp)]) == 0
    merged = json.loads((cmp / "results.json").read_text())
    assert len(merged["dummy"]) == 2 and "comparison across runs" in (cmp / "report.html").read_text()
    assert main(["run", "dummy", "--model", "tiny-mlm", "--out", str(tmp_path / "d")]) == 2  # it declared causal only


def test_run_all_runs_every_study_in_its_masked_form_and_skips_what_does_not_apply(dummy_study, tmp_path):
    """On a masked LM every built-in study runs (position: pseudo-log-likelihood; logits: fill-mask);
    the dummy, declared causal-only, is skipped and the run says so."""
    out = tmp_path / "mlm"
    argv = ["run", "all", "--model", "tiny-mlm", "--n-texts", "8", "--n-synthetic", "200", "--mi-bins", "4",
            "--n-train", "20", "--n-test", "20", "--n-samples", "20", "--n-new-tokens", "2", "--n-pairs", "2",
            "--segment-length", "2",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc) == ["position", "logits", "lens", "magnitudes", "distances", "interventions", "_notes", "_run"]
    assert doc["_notes"] == [
        "dummy: skipped for tiny-mlm (it applies to causal LMs only)",
        "lens on tiny-mlm: --n-texts not applied: it sets the corpus lens, which runs only with --data SOURCE "
        "(without it the lens reads the one --text)",  # magnitudes reads 8 texts; the lens reads no --data
    ]
    assert doc["position"]["tiny-mlm"]["metrics"]["loss_kind"] == "pseudo-log-likelihood"
    assert doc["logits"]["tiny-mlm"]["metrics"]["prediction"] == "fill-mask"
    assert "dummy: skipped for tiny-mlm" in (out / "report.html").read_text()


def test_comparisons_share_one_depth_axis_ending_at_one():
    """Models of 2 and 6 blocks: readout points at i/L (embeddings 0, last block 1), block outputs at
    (l+1)/L, in every comparison figure."""
    from mechlens.studies import distances, lens, magnitudes

    def entries(key, n2, n6, extra=None):
        return {name: {"metrics": {key: extra(n) if extra else [0.0] * n, "kind": "causal"}} for name, n in
                (("two", n2), ("six", n6))}  # fmt: skip

    taus = lambda n: {k: {"L2": [0.0] * n} for k in ("attn", "mlp")}  # noqa: E731
    figs = [
        lens.compare(entries("target_logprob_by_layer", 3, 7)),
        magnitudes.compare(entries("lognorm_mean_by_layer", 2, 6)),
        distances.compare(entries("kendall_tau_by_layer", 2, 6, taus)),
    ]
    for f in figs:
        for trace in f["comparison"].data:
            assert trace.x[-1] == 1.0
    lens_x = [list(t.x) for t in figs[0]["comparison"].data]
    assert lens_x[0] == [0.0, 0.5, 1.0] and lens_x[1][0] == 0.0
    block_x = [list(t.x) for t in figs[1]["comparison"].data]
    assert block_x[0] == [0.5, 1.0] and block_x[1][0] == pytest.approx(1 / 6)


def test_norm_comparison_uses_rms_and_flags_different_normalisation_placements():
    from mechlens.studies import magnitudes

    def entry(d_model, placement):
        return {"metrics": {"lognorm_mean_by_layer": [1.0, 2.0]},
                "provenance": {"d_model": d_model, "norm_placement": placement}}  # fmt: skip

    same = magnitudes.compare({"a": entry(64, "pre-LN"), "b": entry(256, "pre-LN")})["comparison"]
    ya, yb = (list(t.y) for t in same.data)
    assert ya == pytest.approx([1 - 0.5 * np.log(64), 2 - 0.5 * np.log(64)])  # log(norm / sqrt(d_model))
    assert yb[0] - ya[0] == pytest.approx(-0.5 * np.log(4))
    assert "NOT COMPARABLE" not in same.layout.title.text
    mixed = magnitudes.compare({"gpt": entry(64, "pre-LN"), "bert": entry(64, "post-LN")})["comparison"]
    assert (
        "NOT COMPARABLE" in mixed.layout.title.text
        and "after the residual add and LayerNorm" in mixed.layout.title.text
    )
    assert [t.name for t in mixed.data] == ["gpt [pre-LN]", "bert [post-LN]"]


def test_position_comparison_says_when_tokenizers_differ():
    from mechlens.studies import position

    def entry(d_vocab):
        return {"metrics": {"loss_mean_by_position": [5.0, 4.0]}, "provenance": {"d_vocab": d_vocab}}

    assert (
        "different tokenizers"
        not in position.compare({"a": entry(50257), "b": entry(50257)})["comparison"].layout.title.text
    )
    assert (
        "different tokenizers"
        in position.compare({"a": entry(50257), "b": entry(32000)})["comparison"].layout.title.text
    )


def test_every_study_accepts_token_ids_as_well_as_texts(tmp_path):
    """The same inputs as token ids (text tokens only, as another tool fed them) give the same numbers."""
    from mechlens import load_model
    from mechlens.data import load_texts
    from mechlens.errors import TokenError
    from mechlens.studies import distances, lens, logits, magnitudes, position

    m = load_model("tiny-gpt2")
    tok = m.tokenizer

    def ids(texts):
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    texts = load_texts("reviews")[:12]
    a = magnitudes.run(m, magnitudes.Config(n_texts=None), texts=texts).metrics
    b = magnitudes.run(m, magnitudes.Config(n_texts=None), texts=ids(texts)).metrics
    assert a["lognorm_mean_by_layer"] == b["lognorm_mean_by_layer"]
    ctx = load_texts("contexts")[:40]
    cfg = position.Config(n_train=20, n_test=20)
    assert (
        position.run(m, cfg, texts=ctx).metrics["loss_mean_by_position"]
        == (position.run(m, cfg, texts=ids(ctx)).metrics["loss_mean_by_position"])
    )
    cfg = lens.Config()
    assert (
        lens.run(m, cfg).metrics["target_logprob"]
        == lens.run(m, cfg, text=ids([cfg.text])[0]).metrics["target_logprob"]
    )
    cfg = logits.Config(n_samples=10, n_new_tokens=2)
    x, y = logits.run(m, cfg).metrics, logits.run(m, cfg, prompt=ids([cfg.prompt])[0]).metrics
    assert (x["target_logprob"], x["greedy_tokens"]) == (y["target_logprob"], y["greedy_tokens"])
    doc = load_texts("coffee")
    cfg = distances.Config(n_synthetic=100, mi_bins=(4,))
    assert (
        distances.run(m, cfg, texts=doc).metrics["kendall_tau_by_layer"]
        == (distances.run(m, cfg, texts=ids(doc)).metrics["kendall_tau_by_layer"])
    )
    with pytest.raises(TokenError, match="outside the vocabulary"):
        lens.run(m, cfg=lens.Config(), text=[1, 2, 50257])


def test_report_shows_metrics_as_a_readable_table():
    from mechlens.report import metrics_table

    html = metrics_table(
        {"ols": {"r2": 0.123456789, "summary": "line one\nline two"}, "short": [1.0, 2.5], "long": list(range(50))}
    )
    assert "<td>ols.r2</td><td>0.123457</td>" in html
    assert "<pre>line one\nline two</pre>" in html  # the OLS summary as printed, not one line with \\n
    assert "<td>short</td><td>[1, 2.5]</td>" in html and "50 values: in results.json" in html
