"""Study 2 vs the HF original: top-k, rank, greedy generation, and the intervention done with an HF
``register_forward_hook`` on ``lm_head``."""

from __future__ import annotations

import torch

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
