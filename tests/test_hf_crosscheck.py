"""The HF cross-check harness: TransformerLens hook values through mechlens vs the same quantities
from plain ``transformers`` (``register_forward_hook`` / ``output_hidden_states``) on the same weights
and tokens. Random-init GPT-2 / BERT / RoBERTa fixtures and both embedded models.

Tolerances (fp32, eager attention): logits and activations <= 5e-5 absolute (TransformerLens' own
HF-parity floor); log-probs <= 1e-5 where computed from identical logits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEXTS

from mechlens import arch, encode, next_token_loss, readout, readout_hook_names, run_cached
from mechlens.ops import vector_norm

TOL = 5e-5
HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def _hf_blocks(hf):
    if hasattr(hf, "transformer"):  # GPT-2
        return [(b, b.attn, b.mlp) for b in hf.transformer.h]
    base = hf.bert if hasattr(hf, "bert") else hf.roberta
    return [(layer, layer.attention, layer.output.dense) for layer in base.encoder.layer]


def hf_run(pair, batch):
    """HF forward with forward hooks on every block, its attention module and its MLP."""
    rec, handles = {}, []

    def first(o):
        return o[0] if isinstance(o, tuple) else o

    for layer, (block, attn, mlp) in enumerate(_hf_blocks(pair.hf)):
        handles.append(
            block.register_forward_hook(lambda m, i, o, layer=layer: rec.__setitem__(("post", layer), first(o)))
        )
        handles.append(
            attn.register_forward_hook(lambda m, i, o, layer=layer: rec.__setitem__(("attn", layer), first(o)))
        )
        handles.append(
            mlp.register_forward_hook(lambda m, i, o, layer=layer: rec.__setitem__(("mlp", layer), first(o)))
        )
    try:
        with torch.no_grad():
            out = pair.hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, rec


def _names(n_layers):
    return [f"blocks.{layer}.{h}" for layer in range(n_layers) for h in HOOKS]


def _maxdiff(a, b, mask=None):
    d = (a - b).abs()
    if mask is not None:
        d = d[mask]
    return d.max().item()


def test_logits_and_hook_values_equal_hf(any_pair):
    m = any_pair.bridge
    batch = encode(m, TEXTS, bos=True)
    logits, acts = run_cached(m, batch, _names(m.cfg.n_layers), logits=True)
    out, rec = hf_run(any_pair, batch)
    valid = batch.attention_mask.bool()
    assert _maxdiff(logits, out.logits, valid) <= TOL
    causal = arch.kind_of(m) == "causal"
    for layer in range(m.cfg.n_layers):
        pre, mid, post = (acts[f"blocks.{layer}.{h}"] for h in HOOKS[:3])
        attn, mlp = acts[f"blocks.{layer}.hook_attn_out"], acts[f"blocks.{layer}.hook_mlp_out"]
        assert _maxdiff(pre, out.hidden_states[layer], valid) <= TOL
        assert _maxdiff(post, rec[("post", layer)], valid) <= TOL
        assert _maxdiff(attn, rec[("attn", layer)], valid) <= TOL  # = the HF attention module's output
        assert _maxdiff(mlp, rec[("mlp", layer)], valid) <= TOL
        if causal:  # pre-LN: the residual stream is a sum of what each sublayer writes
            assert _maxdiff(mid, out.hidden_states[layer] + rec[("attn", layer)], valid) <= TOL
            assert _maxdiff(post, mid + rec[("mlp", layer)], valid) <= TOL
        else:  # post-LN: block output is HF's next hidden state
            assert _maxdiff(post, out.hidden_states[layer + 1], valid) <= TOL


def test_readout_on_intermediate_layers_equals_hf_head(any_pair):
    """The lens readout at every point equals HF's own head applied to ``hidden_states``; the causal
    case must not apply ``ln_f`` twice to HF's last hidden state, which already has it."""
    m, hf = any_pair.bridge, any_pair.hf
    batch = encode(m, TEXTS[:2], bos=True)
    names = readout_hook_names(m)
    logits, acts = run_cached(m, batch, names, logits=True)
    out, _ = hf_run(any_pair, batch)
    r = readout(m)
    valid = batch.attention_mask.bool()
    n = m.cfg.n_layers
    with torch.no_grad():
        # the lens tiles the decoder as pre(x) @ W_U + b_U: exactly the bridge's own unembed
        h = r.pre(acts[names[1]])
        assert torch.equal(r(acts[names[1]]), m.unembed(h))
        for layer, name in enumerate(names):
            hs = out.hidden_states[layer]
            if arch.kind_of(m) == "causal":
                ref = out.logits if layer == n else hf.lm_head(hf.transformer.ln_f(hs))
            else:
                head = hf.lm_head if hasattr(hf, "lm_head") else hf.cls
                ref = head(hs)
            # early-layer readouts reach |logit| ~100 (tiny-gpt2): 5e-5 absolute + 1e-6 relative;
            # measured worst 4.6e-5
            got = r(acts[name])
            excess = ((got - ref).abs() - (TOL + 1e-6 * ref.abs()))[valid]
            assert excess.max() <= 0, (any_pair.name, layer, excess.max().item())
        assert _maxdiff(r(acts[names[-1]]), logits, valid) <= TOL  # last readout = the model's logits
        if arch.final_resid_is_normalized(hf):
            # HF's last hidden state is ln_f(resid_post): reading it out again would be wrong
            assert _maxdiff(out.hidden_states[n], m.ln_final(acts[names[-1]]), valid) <= TOL
            assert _maxdiff(r(out.hidden_states[n]), logits, valid) > 1e-3


def test_per_token_loss_equals_hf(causal_pair):
    m, hf = causal_pair.bridge, causal_pair.hf
    batch = encode(m, TEXTS, bos=False, padding_side="right")
    logits, _ = run_cached(m, batch, [], logits=True)
    loss = next_token_loss(logits, batch.tokens, batch.valid_mask())
    with torch.no_grad():
        hf_logits = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        ref = -torch.log_softmax(hf_logits[:, :-1].float(), -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
        labels = batch.tokens.masked_fill(~batch.attention_mask.bool(), -100)
        hf_loss = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask, labels=labels).loss
    finite = torch.isfinite(loss)
    assert finite.sum() == (batch.lengths - 1).sum()  # NaN exactly where a pad is involved
    assert _maxdiff(loss, ref, finite) <= 1e-5
    assert abs(loss[finite].mean().item() - hf_loss.item()) <= 1e-5


# Padded vs unpadded runs multiply matrices of different shapes, so fp32 sums run in a different order
# (and, by CPU instruction set, in different blocks). The difference is rounding, amplified through the
# layers: relative to the largest |value| of the unpadded run it measured 1.2e-5 on tiny-mlm's logits
# with AVX-512 (2.6e-4 at |logit| 21; post-LN layers and the MLM head amplify it), 4.7e-6 with AVX2,
# 5.8e-6 with ATEN_CPU_CAPABILITY=default, and under 1e-6 on GPT-2. Tolerance: 5e-5 of that scale
# (4x the worst measured). A real padding bug (a pad token attended to, or position ids not derived
# from the mask) moves logits by O(1) (0.86 measured on GPT-2, see pitfalls), 40x above the tolerance.
PADDING_REL = 5e-5


def _pad_tol(ref: torch.Tensor) -> float:
    return PADDING_REL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded_runs(any_pair, side):
    m = any_pair.bridge
    names = ["blocks.0.hook_attn_out", f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"]
    batch = encode(m, TEXTS, bos=True, padding_side=side)
    logits, acts = run_cached(m, batch, names, logits=True)
    for i, text in enumerate(TEXTS):
        single = encode(m, [text], bos=True)
        l1, a1 = run_cached(m, single, names, logits=True)
        cols = batch.attention_mask[i].bool()
        assert _maxdiff(logits[i, cols], l1[0]) <= _pad_tol(l1[0])
        for n in names:
            assert _maxdiff(acts[n][i, cols], a1[n][0]) <= max(TOL, _pad_tol(a1[n][0]))


def test_padding_changes_no_masked_statistic(gpt2_pair):
    """Attention-output norms by position: right padding, left padding and extra padding columns give
    the same per-position statistics."""
    m = gpt2_pair.bridge
    name = "blocks.1.hook_attn_out"
    results = []
    for side in ("right", "left"):
        batch = encode(m, TEXTS, bos=True, padding_side=side)
        _, acts = run_cached(m, batch, [name])
        norms = vector_norm(acts[name])
        results.append(_stats_by_position(norms, batch.positions, batch.valid_mask(exclude_first=True)))
        # three more padding columns
        pad = torch.full((len(batch), 3), arch.pad_id(m))
        zeros = torch.zeros((len(batch), 3), dtype=torch.long)
        cat = (lambda a, b: torch.cat([a, b], 1)) if side == "right" else (lambda a, b: torch.cat([b, a], 1))
        wider = type(batch)(
            tokens=cat(batch.tokens, pad),
            attention_mask=cat(batch.attention_mask, zeros),
            text_mask=cat(batch.text_mask, zeros.bool()),
            bos=True,
            padding_side=side,
        )
        _, acts = run_cached(m, wider, [name])
        results.append(_stats_by_position(vector_norm(acts[name]), wider.positions, wider.valid_mask(True)))
    ref = results[0]
    for r in results[1:]:
        pd.testing.assert_series_equal(r["count"], ref["count"])
        np.testing.assert_allclose(r["mean"], ref["mean"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(r["std"], ref["std"], atol=1e-5, rtol=0)


def _stats_by_position(norms, positions, valid) -> pd.DataFrame:
    """Count, mean and population std of the valid tokens' values by position id (pandas, float64)."""
    frame = pd.DataFrame({"position": positions[valid].numpy(), "value": norms[valid].double().numpy()})
    return frame.groupby("position")["value"].agg(count="count", mean="mean", std=lambda v: v.std(ddof=0))


def test_processed_weights_keep_logprobs_and_change_norms():
    """``weights="processed"`` (TL compatibility mode): log-probs equal the raw model's (<= 1e-4),
    attention outputs lose their mean over d_model (centred writing weights), so norms differ."""
    import copy

    from conftest import make_gpt2

    from mechlens import load_model, provenance_of

    hf, tok = make_gpt2()
    raw = load_model(copy.deepcopy(hf), tokenizer=tok)
    proc = load_model(copy.deepcopy(hf), tokenizer=tok, weights="processed")
    assert provenance_of(proc).weights == "processed" and provenance_of(raw).weights == "raw"
    batch = encode(raw, TEXTS[:2], bos=True)
    name = "blocks.0.hook_attn_out"
    l_raw, a_raw = run_cached(raw, batch, [name], logits=True)
    l_proc, a_proc = run_cached(proc, batch, [name], logits=True)
    valid = batch.attention_mask.bool()
    assert _maxdiff(l_raw.log_softmax(-1), l_proc.log_softmax(-1), valid) <= 1e-4
    assert a_proc[name][valid].mean(-1).abs().max() <= 1e-5
    assert a_raw[name][valid].mean(-1).abs().max() > 1e-3
    # the lens' linear readout follows the processed (centred) unembed exactly
    x = torch.randn(3, proc.cfg.d_model)
    with torch.no_grad():
        assert torch.equal(readout(proc)(x), proc.unembed(proc.ln_final(x)))
