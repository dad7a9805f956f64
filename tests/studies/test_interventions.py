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


@pytest.fixture(scope="module")
def streamed(gpt2):
    """The same 6 pairs in one batch (all kept) and streamed 2 at a time with 3 pairs kept."""
    common = {"n_pairs": 6, "segment_length": 3, "n_resamples": 200}
    one = iv.run(gpt2, iv.Config(batch_size=6, reservoir=6, **common)).parts
    many = iv.run(gpt2, iv.Config(batch_size=2, reservoir=3, **common)).parts
    return one, many


def test_streamed_batches_keep_a_seeded_sample_and_mean_over_every_pair(streamed):
    """Streaming 2 pairs at a time into running means and a 3-slot reservoir gives the means over all 6
    pairs of the one-batch run's per-pair values (numpy), and keeps the 3 pairs of smallest seeded priority
    (stats.streaming.priorities) with their per-pair values. Tolerance: pairs batched differently (fp32
    GEMMs in another blocking order, ~1e-6 of the logits): 1e-4 + 1e-5 x the quantity's largest value.
    Mean and resample ablation read the first batch as reference (2 vs 6 pairs), so only zero is compared."""
    from mechlens.stats.streaming import priorities

    one, many = streamed
    assert (one.n_pairs, many.n_pairs, one.intervals.n_kept, many.intervals.n_kept) == (6, 6, 6, 3)
    want = np.sort(np.argsort(priorities(np.arange(6), 0), kind="stable")[:3])
    kept = many.intervals.pair_index.numpy()
    assert kept.tolist() == want.tolist()

    def close(a, b):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        tol = 1e-4 + 1e-5 * float(torch.nan_to_num(b).abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=tol, equal_nan=True)

    close(many.dla.contribution_mean, one.dla.contribution.numpy().mean(0))
    close(many.dla.contribution, one.dla.contribution[kept])
    close(many.ablation.logprob_drop_mean[0], one.ablation.logprob_drop[0].numpy().mean(-1))
    close(many.ablation.logprob_drop[0], one.ablation.logprob_drop[0][:, kept])
    for g in iv.parts.GRIDS:
        close(many.denoise.dld_mean[g], np.nanmean(one.denoise.dld[g].numpy(), -1))
        close(many.attribution.dld_mean[g], np.nanmean(one.attribution.dld[g].numpy(), -1))
        close(many.noise.dld[g], one.noise.dld[g][..., kept])
    gap = (one.denoise.ld_clean - one.denoise.ld_corrupt).numpy().mean()
    close(many.denoise.head_restored, one.denoise.head_dld.numpy().mean(-1) / gap)
    assert many.dla.identity_error == pytest.approx(one.dla.identity_error, abs=1e-5)
    assert many.attribution.correlation == pytest.approx(one.attribution.correlation, abs=1e-5)
    assert many.attribution.max_abs_error_cells == pytest.approx(one.attribution.max_abs_error_cells, abs=1e-4)
    assert many.attribution.correlation_cells == pytest.approx(one.attribution.correlation_cells, abs=1e-5)


def test_intervals_are_scipy_bootstrap_over_the_pairs(streamed):
    """Each interval is scipy.stats.bootstrap of the per-pair values of that cell alone (the helper batches
    groups of equal size in one call, drawing the same resample indices: equal up to float64 rounding, 1e-9);
    the fraction restored is the paired ratio of means (dld / gap). The headline's top-3 carry them."""
    from scipy.stats import bootstrap

    one, _ = streamed
    ci = one.intervals

    def scipy_ci(data, statistic, paired=False):
        res = bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=200, method="percentile",
                        confidence_level=0.95, random_state=np.random.default_rng(0))  # fmt: skip
        return [float(res.confidence_interval.low), float(res.confidence_interval.high)]

    k = int(np.argmax(np.abs(one.dla.contribution_mean.numpy())))
    x = one.dla.contribution[:, k].double().numpy()
    np.testing.assert_allclose(ci.dla[k], scipy_ci((x,), np.mean), rtol=0, atol=1e-9)
    drop = one.ablation.logprob_drop[2, 0].double().numpy()
    np.testing.assert_allclose(ci.ablation_logprob_drop[2][0], scipy_ci((drop,), np.mean), rtol=0, atol=1e-9)
    layer, head = np.unravel_index(
        np.argmax(np.abs(one.denoise.head_restored.numpy())), one.denoise.head_restored.shape
    )
    d = one.denoise.head_dld[layer, head].double().numpy()
    gap = (one.denoise.ld_clean.double() - one.denoise.ld_corrupt.double()).numpy()  # as the study: in float64

    def ratio(a, b, axis=-1):
        return a.mean(axis) / b.mean(axis)

    want = scipy_ci((d, gap), ratio, paired=True)
    np.testing.assert_allclose(ci.denoise_head_restored[layer][head], want, rtol=0, atol=1e-9)
    lo, hi = want
    assert lo <= float(one.denoise.head_restored[layer, head]) <= hi
    top = one.strongest["patch_head"][0]
    assert (top["layer"], top["head"]) == (layer, head) and top["ci"] == ci.denoise_head_restored[layer][head]
