"""Study 6 (interventions) on the embedded models: the command line, a two-model comparison with
intervals, batched patching equal to one-row-per-forward patching, attribution patching's reported error
recomputed independently, and the pairs read from a file. The cross-checks against plain Hugging Face
(register_forward_hook) and DLA's sum identity on every family are in tests/test_architectures.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mechlens import load_model
from mechlens.cli import main
from mechlens.studies import interventions as iv

SMALL = iv.Config(n_pairs=4, segment_length=3)


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


def test_cli_runs_on_both_embedded_models_and_compares_them_with_intervals(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "interventions", "--model", "tiny-gpt2", "--model", "tiny-mlm", "--n-pairs", "4",
            "--segment-length", "3", "--allow-different-tokenizers", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())["interventions"]
    g, m = doc["tiny-gpt2"]["metrics"], doc["tiny-mlm"]["metrics"]
    assert g["dla_refusal"] is None and m["dla_refusal"].startswith("direct logit attribution refused: a post-LN")
    assert g["dla"]["identity_error"] < 1e-4 and m["dla"] is None
    cmp = pd.read_csv(out / "comparison.csv")
    rows = cmp[(cmp.study == "interventions") & (cmp.quantity == "patch_resid_answer")]
    assert set(rows.model) == {"tiny-gpt2", "tiny-mlm"}
    assert rows.relative_depth.min() == 0.0 and rows.ci_low.notna().all()  # depth-aligned, with intervals
    diffs = rows[rows.reference.notna() & (rows.reference != "")]
    assert len(diffs) > 0  # paired differences over the same pairs
    html = (out / "report.html").read_text()
    assert "6. Interventions" in html and "Attribution vs exact patching" in html


def test_batched_patching_equals_one_row_per_forward(gpt2):
    """Many patched rows per forward give what fewer rows per forward give (fp32 batched GEMMs: another
    blocking order, ~1e-6 of the logits; allowed 1e-4 + 1e-5 x max |LD|)."""
    pairs = iv.load_pairs(gpt2, SMALL)
    names = iv.all_hooks(gpt2)
    clean, corrupt = iv.activations(gpt2, pairs.clean, names), iv.activations(gpt2, pairs.corrupt, names)
    many = iv.activation_patching(gpt2, pairs, clean, corrupt, "denoise", rows_per_forward=4096)
    few = iv.activation_patching(gpt2, pairs, clean, corrupt, "denoise", rows_per_forward=8 * len(pairs))
    assert many.n_forwards == 3 and few.n_forwards == 2 + -(-many.n_rows // (8 * len(pairs)))
    scale = float(many.ld_clean.abs().max())
    for g in iv.parts.GRIDS:
        torch.testing.assert_close(many.dld[g], few.dld[g], rtol=0, atol=1e-4 + 1e-5 * scale, equal_nan=True)
    torch.testing.assert_close(many.head_dld, few.head_dld, rtol=0, atol=1e-4 + 1e-5 * scale)


def test_patching_the_whole_clean_stream_restores_everything_and_noise_mirrors_it(gpt2):
    """Closed form: patching the clean residual stream at every position of block 0 (resid_pre) gives the
    clean run exactly, so the restored fraction is 1; the cell at the answer column of the last block's
    input restores exactly the part that flows through that position only."""
    pairs = iv.load_pairs(gpt2, SMALL)
    names = iv.all_hooks(gpt2)
    clean = iv.activations(gpt2, pairs.clean, names)
    x = iv.parts.run_edits(gpt2, pairs.corrupt, pairs.answer, [iv.parts.Edit("blocks.0.hook_resid_pre")], clean)[0]
    ld = iv.parts.logit_diff(gpt2, x, pairs)
    base = iv.parts.run_edits(gpt2, pairs.clean, pairs.answer, [iv.parts.Edit(None)], {})[0]
    torch.testing.assert_close(ld, iv.parts.logit_diff(gpt2, base, pairs), rtol=0, atol=1e-4)


def test_attribution_error_is_what_numpy_says(gpt2):
    r = iv.run(gpt2, SMALL).parts
    a = np.concatenate([np.nanmean(r.attribution.dld[g].numpy(), -1).ravel() for g in iv.parts.GRIDS]
                       + [r.attribution.head_dld.mean(-1).numpy().ravel()])  # fmt: skip
    e = np.concatenate([np.nanmean(r.denoise.dld[g].numpy(), -1).ravel() for g in iv.parts.GRIDS]
                       + [r.denoise.head_dld.mean(-1).numpy().ravel()])  # fmt: skip
    assert r.attribution.correlation == pytest.approx(np.corrcoef(a, e)[0, 1], abs=1e-6)
    assert r.attribution.max_abs_error == pytest.approx(np.abs(a - e).max(), rel=1e-5)
    # the estimate is exact where LD is linear in the activation: nowhere here, but at block 0's residual
    # input at columns the answer does not read through attention (BOS: equal in both prompts) it is 0 = exact
    assert r.attribution.dld["resid_pre"][0, 0].abs().max() == 0 and r.denoise.dld["resid_pre"][0, 0].abs().max() == 0


def test_pairs_from_a_file_match_the_same_pairs_given_in_python(gpt2, tmp_path):
    rows = [{"clean": " red blue green red blue", "corrupt": " cat dog sun red blue", "target": " green",
             "foil": " sun"}] * 2  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = iv.run(gpt2, iv.Config(data=str(path), n_pairs=2)).metrics
    b = iv.run(gpt2, iv.Config(), pairs=[iv.RawPair(**r) for r in rows]).metrics
    assert a["denoise"]["restored"] == b["denoise"]["restored"] and a["n_pairs"] == 2
