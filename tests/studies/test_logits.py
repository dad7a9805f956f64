"""Study 2 vs the HF original: top-k, rank, greedy generation, and the intervention done with an HF
``register_forward_hook`` on ``lm_head``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mechlens.result import metrics_of
from mechlens.studies import logits as study


def test_logits_study_matches_hf(causal_pair):
    m, hf = causal_pair.bridge, causal_pair.hf
    cfg = study.Config(n_new_tokens=6)
    res = study.run(m, cfg)
    r = res.metrics
    tokens = torch.tensor([r["prompt_tokens"]])
    with torch.no_grad():
        hf_logits = hf(tokens).logits[0, -1]
    assert [t["id"] for t in r["topk"]] == torch.topk(hf_logits, cfg.top_k).indices.tolist()
    target = r["target"]["id"]
    assert r["target"]["id"] == 6891
    order = torch.argsort(hf_logits, descending=True)
    assert r["target_rank"] == (order == target).nonzero().item()
    assert abs(r["target_logprob"] - torch.log_softmax(hf_logits, -1)[target].item()) <= 1e-5
    # greedy: manual loop == bridge.generate == HF generate
    with torch.no_grad():
        # eos_token_id=-1: HF would otherwise stop at <|endoftext|>, which tiny-gpt2 emits; the
        # bridge's generate(stop_at_eos=False) and the manual loop continue past it
        # and an explicit mask: inferred from pad_token_id (= BOS = 50256) it would hide the BOS token
        hf_gen = hf.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=50256,
            eos_token_id=-1,
        )
        hf_gen = hf_gen[0, tokens.shape[1] :]
    assert r["greedy_tokens"] == r["generate_tokens"] == hf_gen.tolist()

    # intervention: the HF lm_head forward hook doing the same edit gives the same logits
    def hf_hook(module, inputs, output):
        last = output[:, -1]
        last[:, target] = last.max(-1).values + cfg.delta
        return output

    h = hf.lm_head.register_forward_hook(hf_hook)
    try:
        with torch.no_grad():
            hf_int = hf(tokens).logits[0, -1]
    finally:
        h.remove()
    with torch.no_grad():
        tl_int = m.run_with_hooks(tokens, fwd_hooks=[(study.HOOK, study.lift_hook(target, cfg.delta))])[0, -1]
    assert (tl_int - hf_int).abs().max() <= 5e-5
    assert hf_int.argmax() == target and r["intervention_argmax_is_target"]
    assert r["intervention_exactly_one_logit_changed"] and r["logits_restored_after_hooks"]
    assert r["greedy_equals_generate"]


def test_softmax_forms():
    x = torch.tensor([1.0, 2.0, 3.0, 900.0])
    assert not torch.isfinite(study.naive_softmax(x)).all()  # exp(900) overflows fp32
    torch.testing.assert_close(study.stable_softmax(x), torch.softmax(x, -1))
    small = torch.randn(50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(study.naive_softmax(small), torch.softmax(small, -1))


def test_steering_generates_the_target_every_step(tiny_gpt2_pair):
    res = study.run(tiny_gpt2_pair.bridge, study.Config(n_new_tokens=5))
    assert res.metrics["steered_tokens"] == [6891] * 5
    assert res.metrics["greedy_equals_generate"]


def test_masked_lm_fill_mask_matches_hf(tiny_mlm_pair):
    """Masked LMs: the logits at a <mask> after the prompt, and greedy left-to-right filling, against the
    HF model on the same ids (one mask filled per forward, a new one inserted before </s>)."""
    m, hf = tiny_mlm_pair.bridge, tiny_mlm_pair.hf
    cfg = study.Config(prompt="I like oat milk in my", target=" coffee", n_new_tokens=3, n_samples=50)
    res = study.run(m, cfg).metrics
    ids = torch.tensor([res["prompt_tokens"]])
    mask = m.tokenizer.mask_token_id
    assert ids[0, -2] == mask and ids[0, -1] == m.tokenizer.sep_token_id and ids[0, 0] == m.tokenizer.cls_token_id
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0, -2].float()
        # greedy filling by hand
        out, greedy = ids, []
        for _ in range(cfg.n_new_tokens):
            nxt = int(hf(input_ids=out).logits[0, -2].argmax())
            greedy.append(nxt)
            out = torch.cat([out[:, :-2], torch.tensor([[nxt, mask]]), out[:, -1:]], 1)
    target = m.tokenizer(" coffee", add_special_tokens=False)["input_ids"][0]
    # tiny-mlm's logits reach |~20|; the bridge vs HF eager: 5e-5 of that scale (see the position study)
    tol = 5e-5 * max(1.0, ref.abs().max().item())
    assert abs(res["target_logit"] - ref[target].item()) <= tol
    assert res["target_rank"] == int((ref > ref[target]).sum())
    assert [t["id"] for t in res["topk"][:3]] == ref.topk(3).indices.tolist()
    assert res["greedy_tokens"] == greedy
    assert res["generate_tokens"] is None and res["greedy_equals_generate"] is None
    assert res["prediction"] == "fill-mask" and res["intervention_exactly_one_logit_changed"]
    assert res["logits_restored_after_hooks"] and res["intervention_argmax_is_target"]


# -- the parts (issue #13) and the per-token samples (issue #15) ------------------------------------

# Every metric key results.json had before the parts existed: a public schema (add keys, never drop one).
METRIC_KEYS = [
    "prompt_tokens", "logits_max", "logits_mean", "softmax_naive_vs_stable_max_abs_diff",
    "log_softmax_vs_log_of_softmax_max_abs_diff", "overflow_scale", "naive_softmax_finite_on_scaled_logits",
    "stable_softmax_finite_on_scaled_logits", "log_softmax_finite_on_scaled_logits", "topk", "target",
    "target_rank", "target_logit", "target_prob", "target_logprob", "sample_counts_top",
    "sample_freq_vs_prob_max_abs_diff_topk", "greedy_tokens", "greedy_text", "generate_tokens",
    "greedy_equals_generate", "prediction", "sampled_text", "intervention_delta", "intervention_argmax_is_target",
    "intervention_changed_logits", "intervention_exactly_one_logit_changed", "logits_restored_after_hooks",
    "steered_text", "steered_tokens",
]  # fmt: skip
TOPK_KEYS = ["rank", "id", "token", "logit", "prob"]


def _tol(ref: torch.Tensor) -> float:
    """Bridge vs HF eager logits: TransformerLens' fp32 parity floor 5e-5, relative to the logit scale
    (measured 1.1e-5 on tiny-gpt2, logits up to |17|, and 3e-7 on the random GPT-2; CPU instruction sets
    move fp32 by ~1e-6 relative)."""
    return 5e-5 * max(1.0, ref.abs().max().item())


def _hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=tokens).logits[0].float()


def _frozen(obj) -> None:
    name = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, None)


def test_next_token_keeps_logits_at_every_position(causal_pair):
    m, hf = causal_pair.bridge, causal_pair.hf
    batch = study.prompt_batch(m, "I like oat milk in my", bos=True)
    nt = study.next_token(m, batch, " coffee", top_k=5)
    _frozen(nt)
    ref = _hf_logits(hf, batch.tokens)
    assert nt.logits.shape == ref.shape == (7 + 1, m.cfg.d_vocab) and nt.column == 7
    assert (nt.logits - ref).abs().max() <= _tol(ref)
    torch.testing.assert_close(nt.prediction_logits, nt.logits[-1], rtol=0, atol=0)
    # softmax / log-softmax at the prediction column; log_softmax moves by <= 2 max|delta logit|
    ref_lp = torch.log_softmax(ref[-1].double(), -1)
    assert (nt.logprobs.double() - ref_lp).abs().max() <= 2 * _tol(ref)
    assert (nt.probs.double() - ref_lp.exp()).abs().max() <= 2 * _tol(ref)  # p <= 1: |dp| <= p |dlogp|
    assert nt.topk_ids.tolist() == ref[-1].topk(5).indices.tolist() == [r.id for r in nt.topk]
    assert [r.rank for r in nt.topk] == list(range(5))
    np.testing.assert_allclose([r.logprob for r in nt.topk], ref_lp[nt.topk_ids].numpy(), rtol=0, atol=2 * _tol(ref))
    assert nt.target == study.Target(" coffee", 6891)
    assert nt.target_rank == int((ref[-1] > ref[-1, 6891]).sum())
    assert nt.prediction == "next-token" and nt.prompt_text == "I like oat milk in my"
    # the prompt's own tokens: positions 1..7 (the predicted tokens), from the logits one position earlier
    assert nt.next_token_positions.tolist() == list(range(1, 8))
    ref_own = torch.log_softmax(ref[:-1].double(), -1).gather(-1, batch.tokens[0, 1:, None])[:, 0]
    assert (nt.next_token_logprobs.double() - ref_own).abs().max() <= 2 * _tol(ref)
    assert nt.next_token_logprob_mean == pytest.approx(ref_own.mean().item(), abs=2 * _tol(ref))


def test_next_token_without_bos_predicts_from_the_first_token(tiny_gpt2_pair):
    m, hf = tiny_gpt2_pair.bridge, tiny_gpt2_pair.hf
    batch = study.prompt_batch(m, "I like oat milk in my", bos=False)
    nt = study.next_token(m, batch, " coffee")
    assert batch.tokens[0].tolist() == [40, 588, 267, 265, 7545, 287, 616]
    assert nt.next_token_positions.tolist() == list(range(1, 7))  # position 0 has no predecessor
    ref = _hf_logits(hf, batch.tokens)
    ref_own = torch.log_softmax(ref[:-1].double(), -1).gather(-1, batch.tokens[0, 1:, None])[:, 0]
    assert (nt.next_token_logprobs.double() - ref_own).abs().max() <= 2 * _tol(ref)


def test_sample_counts_follow_the_probabilities(tiny_gpt2_pair):
    m, hf = tiny_gpt2_pair.bridge, tiny_gpt2_pair.hf
    batch = study.prompt_batch(m, "I like oat milk in my")
    p = torch.softmax(_hf_logits(hf, batch.tokens)[-1].double(), -1)
    n = 2000
    s = study.sample(m, batch, study.last_logits(m, batch.tokens), n_samples=n, seed=3, top_k=10, n_new_tokens=3)
    _frozen(s)
    assert int(s.counts.sum()) == n and s.draws.shape == (n,)
    assert torch.equal(s.counts, torch.bincount(s.draws, minlength=m.cfg.d_vocab))
    assert s.topk_ids.tolist() == p.topk(10).indices.tolist()
    # the seed fixes the draws; a binomial count stays within 5 standard deviations of n p
    sd = (p[s.topk_ids] * (1 - p[s.topk_ids]) / n).sqrt()
    assert ((s.topk_freqs.double() - p[s.topk_ids]).abs() <= 5 * sd + 1e-12).all()
    assert torch.equal(s.topk_freqs, (s.counts[s.topk_ids] / n).float())
    assert s.sample_freq_vs_prob_max_abs_diff_topk == pytest.approx(
        (s.topk_freqs.double() - p[s.topk_ids]).abs().max().item(), abs=1e-5
    )
    again = study.sample(m, batch, study.last_logits(m, batch.tokens), n_samples=n, seed=3, top_k=10, n_new_tokens=3)
    assert torch.equal(again.draws, s.draws) and torch.equal(again.sampled_tokens, s.sampled_tokens)
    assert len(s.sampled_tokens) == 3 and s.sampled_text == m.tokenizer.decode(s.sampled_tokens.tolist())


def test_greedy_vs_generate_part(tiny_gpt2_pair, tiny_mlm_pair):
    m, hf = tiny_gpt2_pair.bridge, tiny_gpt2_pair.hf
    batch = study.prompt_batch(m, "I like oat milk in my")
    g = study.greedy_vs_generate(m, batch, 4)
    _frozen(g)
    out, ref = batch.tokens, []
    for _ in range(4):  # HF greedy by hand
        ref.append(int(_hf_logits(hf, out)[-1].argmax()))
        out = torch.cat([out, torch.tensor([[ref[-1]]])], 1)
    assert g.greedy_tokens.tolist() == g.generate_tokens.tolist() == ref and g.greedy_equals_generate
    gm = study.greedy_vs_generate(tiny_mlm_pair.bridge, study.prompt_batch(tiny_mlm_pair.bridge, "I like oat"), 2)
    assert gm.generate_tokens is None and gm.greedy_equals_generate is None and len(gm.greedy_tokens) == 2


def test_force_token_keeps_the_logits_before_and_after(causal_pair):
    m, hf = causal_pair.bridge, causal_pair.hf
    batch = study.prompt_batch(m, "I like oat milk in my")
    f = study.force_token(m, batch, " coffee", delta=2.0, n_new_tokens=3)
    _frozen(f)
    ref = _hf_logits(hf, batch.tokens)
    assert (f.logits_before - ref).abs().max() <= _tol(ref)
    # after: HF logits with the same edit (independently: max + delta at the last position)
    edited = ref.clone()
    edited[-1, 6891] = ref[-1].max() + 2.0
    assert (f.logits_after - edited).abs().max() <= 2 * _tol(ref)
    moved = torch.nonzero(f.logits_after != f.logits_before).tolist()
    assert moved == [[f.column, 6891]]  # one logit, at the prediction column; earlier positions untouched
    assert f.intervention_changed_logits.tolist() == [6891] and f.intervention_exactly_one_logit_changed
    assert f.intervention_argmax_is_target and f.logits_restored_after_hooks
    assert f.steered_tokens.tolist() == [6891] * 3 and f.target.id == 6891
    assert f.shown_ids[0] == 6891 and len(f.shown_strings) == 20


def test_masked_next_token_at_the_mask(tiny_mlm_pair):
    m, hf = tiny_mlm_pair.bridge, tiny_mlm_pair.hf
    batch = study.prompt_batch(m, "I like oat milk in my")
    assert batch.tokens[0, -2] == m.tokenizer.mask_token_id and not batch.text_mask[0, -2]
    nt = study.next_token(m, batch, " coffee")
    ref = _hf_logits(hf, batch.tokens)
    assert (nt.logits - ref).abs().max() <= _tol(ref)
    assert nt.column == batch.tokens.shape[1] - 2 and nt.prediction == "fill-mask"
    assert nt.next_token_logprobs is None and nt.next_token_logprob_mean is None


def test_run_keeps_every_metric_and_composes_the_parts(tiny_gpt2_pair):
    res = study.run(tiny_gpt2_pair.bridge, study.Config(n_new_tokens=3, n_samples=100))
    p = res.parts
    _frozen(p)
    assert res.metrics == metrics_of(p)
    assert set(METRIC_KEYS) <= set(res.metrics) and list(res.metrics["target"]) == ["string", "id"]
    assert all(set(TOPK_KEYS) <= set(row) for row in res.metrics["topk"])
    assert res.metrics["target_logprob"] == p.next.target_logprob and res.metrics["steered_tokens"] == [6891] * 3
    assert torch.equal(p.forced.logits_before, p.next.logits)  # the same forward, bit for bit
    assert set(res.figures) == {"logits", "softmax_vs_log_softmax", "intervention"}
    assert [r["position"] for r in res.tables["next_token_logprob"]] == list(range(1, 8))
    json.dumps(res.to_json())  # results.json stays serialisable


def _check_schema(df) -> None:
    assert list(df.columns) == ["quantity", "layer", "relative_depth", "position", "word", "unit", "sample", "value"]
    assert {c: str(df[c].dtype) for c in ("layer", "position", "word")} == dict.fromkeys(
        ("layer", "position", "word"), "Int64"
    )
    assert df["relative_depth"].dtype == np.float64 and df["value"].dtype == np.float64
    assert df["sample"].dtype == np.int64


def test_samples_are_the_prompt_tokens_logprobs(causal_pair):
    """samples(): log-prob of each actual next token, against HF log_softmax on the same weights; their
    means equal the metrics they summarise; no layer (the model's output)."""
    m, hf = causal_pair.bridge, causal_pair.hf
    res = study.run(m, study.Config(n_new_tokens=2, n_samples=50))
    df = study.samples(res)
    _check_schema(df)
    assert set(df["quantity"]) == {"next_token_logprob", "next_token_logprob_pooled"} and set(df["unit"]) == {"token"}
    assert df["layer"].isna().all() and df["relative_depth"].isna().all() and np.isfinite(df["value"]).all()
    tokens = torch.tensor([res.metrics["prompt_tokens"]])
    ref_logits = _hf_logits(hf, tokens)
    ref = torch.log_softmax(ref_logits[:-1].double(), -1).gather(-1, tokens[0, 1:, None])[:, 0].numpy()
    per = df[df["quantity"] == "next_token_logprob"]
    assert per["position"].tolist() == per["sample"].tolist() == list(range(1, 8))
    np.testing.assert_allclose(per["value"].to_numpy(), ref, rtol=0, atol=2 * _tol(ref_logits))
    # words of "I like oat milk in my" (GPT-2: "I", " like", " o", "at", " milk", " in", " my"): "at" begins none
    assert per["word"].tolist() == [0, 1, 2, pd.NA, 3, 4, 5]
    pooled = df[df["quantity"] == "next_token_logprob_pooled"]
    assert pooled["position"].isna().all() and pooled["word"].isna().all()
    assert pooled["sample"].tolist() == per["sample"].tolist()
    # the means the comparison takes are the metrics (mean over tokens; per position, the value itself)
    assert pooled["value"].mean() == pytest.approx(res.metrics["next_token_logprob_mean"], abs=1e-9)
    np.testing.assert_allclose(per["value"].to_numpy(), res.metrics["next_token_logprobs"], rtol=0, atol=1e-7)


def test_samples_from_token_ids_have_no_words(tiny_gpt2_pair):
    m = tiny_gpt2_pair.bridge
    cfg = study.Config(n_new_tokens=1, n_samples=10)
    by_text = study.samples(study.run(m, cfg))
    by_ids = study.samples(study.run(m, cfg, [40, 588, 267, 265, 7545, 287, 616]))
    _check_schema(by_ids)
    assert by_ids["word"].isna().all()
    assert by_ids[["quantity", "position", "sample", "value"]].equals(
        by_text[["quantity", "position", "sample", "value"]]
    )


def test_masked_samples_are_empty_with_the_schema(tiny_mlm_pair):
    """A masked LM sees every prompt token and predicts at a <mask> that has no original token: no
    per-token log-prob is defined, so the frame is empty (with the columns and dtypes)."""
    res = study.run(tiny_mlm_pair.bridge, study.Config(n_new_tokens=1, n_samples=10))
    df = study.samples(res)
    assert df.empty
    _check_schema(df)
    assert res.metrics["next_token_logprobs"] is None and res.metrics["next_token_logprob_mean"] is None
