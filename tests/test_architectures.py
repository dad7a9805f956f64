"""The architecture matrix (issue #14): every family mechlens checks, against Hugging Face.

For each family of :data:`arch_matrix.CASES` (a 2-layer, d_model-64 seeded random model with the real
GPT-2 vocabulary and realistic logit sizes, exact parameter count asserted):

* the lens (``lens_reduce`` over :func:`mechlens.arch.readout`, soft-cap and logit scales included) at
  the last readout point equals the model's own log-probs, and at every earlier point equals HF's own
  final norm + head + post-processing applied to ``output_hidden_states[l]``;
* ``hook_attn_out`` / ``hook_mlp_out`` equal what the HF block adds to the residual stream (forward
  hooks on the HF reference copy; BERT/RoBERTa: the documented post-LN semantics);
* the provenance records the norm placement, block layout and readout, and the load-time check passed;
* left and right padding give the same log-probs and activations;
* every applicable study runs.

The HF references are independent of mechlens.arch: the HF modules to hook and the final norm are
named in tests/arch_matrix.py from transformers' modelling code, and the head's post-processing is
whatever HF's own forward does.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from arch_matrix import CASES, LOAD_PATHS, TEXTS, L, build, build_load_path, hf_logits_from, hf_run, module

from mechlens import UnsupportedArchitectureError, arch, encode, load_model, provenance_of, run_cached
from mechlens.lens.readings import lens_stats
from mechlens.studies import lens

# -- tolerances ----------------------------------------------------------------------------------
# Lens vs HF log-probs. Both sides compute fp32 logits from the same residual and weights in a different
# summation order (tiled h @ W_U vs HF's F.linear): dot products of length 64 whose largest logits are
# ~10-60 here carry ~sqrt(64) * 2**-24 relative rounding, ~1e-6 of the largest logit; a log-softmax at
# most doubles it. Allowed: 2e-6 x max|logit| + 5e-5 nats (5e-5 is TransformerLens' own fp32 HF-parity
# floor). Measured worst over the matrix: 1.2e-5 (GPT-J). A missing post-processing step is 50-500 nats
# here (docs/architectures.md), a missing bias or norm far above the bound too.
REL_LOGIT, ABS_LP = 2e-6, 5e-5
# Activations (hook values vs HF module outputs): the same fp32 ops in the same order except where the
# bridge reimplements attention (measured <= 3.4e-8); allowed 5e-5 + 1e-6 x max|value|.
REL_ACT, ABS_ACT = 1e-6, 5e-5
# Additivity (resid_post vs resid_pre + attn + mlp): two fp32 additions in another order, <= 2 ulp of the
# largest |residual| (2 x 2**-24 relative); allowed 1e-6 relative (8 ulp) + 1e-7.
REL_SUM, ABS_SUM = 1e-6, 1e-7
# Left vs right padding: the same rows at other offsets of the padded matrices, so GEMM blocking and
# attention sums run in other orders: TransformerLens measured 5e-6 relative on logits for padded vs
# unpadded GPT-2 (tests/test_hf_crosscheck.py). Allowed 1e-5 x max|logit| + 5e-5 on log-probs
# (x2 for the log-softmax), 1e-5 x max|activation| + 5e-5 on activations.
REL_PAD, ABS_PAD = 1e-5, 5e-5

NAMES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")

# norm placement and block layout per family, written from the transformers modelling code (what
# provenance must record)
EXPECTED_LAYOUT = {
    "gpt-j": ("pre-LN", "parallel"), "gpt-neox": ("pre-LN", "parallel"), "phi": ("pre-LN", "parallel"),
    "falcon": ("pre-LN", "parallel"), "cohere": ("pre-LN", "parallel"), "gemma2": ("sandwich", "sequential"),
    "gemma3": ("sandwich", "sequential"), "olmo2": ("output-norm", "sequential"),
    "bert": ("post-LN", "sequential"), "roberta": ("post-LN", "sequential"),
}  # fmt: skip


class Loaded:
    """A case's HF reference model, the same weights through mechlens, one batch, and both runs."""

    def __init__(self, case, tmp_dir):
        self.case = case
        self.hf, self.tok = build(case, tmp_dir)
        self.model = load_model(copy.deepcopy(self.hf), tokenizer=self.tok)
        m = self.model
        self.batch = encode(m, TEXTS, bos=True)
        self.valid = self.batch.attention_mask.bool()
        names = [f"blocks.{i}.{h}" for i in range(L) for h in NAMES] + ["unembed.hook_out"]
        self.logits, self.acts = run_cached(m, self.batch, names, logits=True)
        self.ref = hf_run(case, self.hf, self.batch.tokens, self.batch.attention_mask)
        self._refs: dict[int, torch.Tensor] = {}

    def ref_logits(self, point: int) -> torch.Tensor:
        """HF's logits read out at ``point`` (0 = embeddings, L = the model's own output), computed once."""
        if point not in self._refs:
            self._refs[point] = (
                self.ref.logits
                if point == L
                else hf_logits_from(
                    self.case, self.hf, self.ref.hidden_states[point], self.batch.tokens, self.batch.attention_mask
                )
            )
        return self._refs[point]


_LOADED: dict[str, Loaded] = {}


@pytest.fixture(params=list(CASES), scope="module")
def loaded(request, tmp_path_factory):
    name = request.param
    if name not in _LOADED:
        _LOADED.clear()  # one family in memory at a time (the params run in order)
        _LOADED[name] = Loaded(CASES[name], str(tmp_path_factory.mktemp(name)))
    return _LOADED[name]


def _maxdiff(a, b, mask):
    return (a - b).abs()[mask].max().item()


def test_parameter_count_and_provenance(loaded):
    case, m = loaded.case, loaded.model
    p = provenance_of(m)
    assert p.n_params == case.n_params  # build() asserted it on the HF model too
    assert (p.architecture, p.kind, p.n_layers, p.d_model) == (case.model, case.kind, L, 64)
    assert (p.norm_placement, p.block_layout) == EXPECTED_LAYOUT.get(case.name, ("pre-LN", "sequential"))
    assert p.family_checked and not p.readout_mismatch_allowed
    assert p.readout_max_logprob_diff <= p.readout_tolerance
    # the logits are not flat: a lens that skipped a post-processing step would be far off
    lp = loaded.ref.logits.log_softmax(-1)
    entropy = -(lp.exp() * lp).sum(-1)[loaded.valid]
    assert entropy.mean() < 9.0, entropy.mean()  # log(50257) = 10.8


def test_model_logits_equal_hf(loaded):
    z = loaded.ref.logits
    assert _maxdiff(loaded.logits, z, loaded.valid) <= ABS_LP + REL_LOGIT * z.abs().max().item()


def test_unembed_hook_is_lm_head_output_before_post_processing(loaded):
    """``unembed.hook_out`` is lm_head's raw output; the model's logits are HF's post-processing of it
    (written here from the modelling code: Granite divides by logits_scaling, Cohere multiplies by
    logit_scale, Gemma2/3 soft-cap)."""
    cfg, z = loaded.hf.config, loaded.acts["unembed.hook_out"].double()
    if loaded.case.name == "granite":
        z = z / cfg.logits_scaling
    if loaded.case.name == "cohere":
        z = z * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None) if loaded.case.kind == "causal" else None
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    logits = loaded.logits.double()
    assert _maxdiff(z, logits, loaded.valid) <= ABS_LP + REL_LOGIT * logits.abs().max().item()


def test_lens_equals_hf_head_at_every_readout_point(loaded):
    """lens_reduce over arch.readout (tiles, soft-cap, scales) vs HF's own head on hidden_states[l]:
    target log-prob, max log-prob, entropy and KL to the final layer, every point; the last point is
    the model's own log-probs."""
    m, batch, valid = loaded.model, loaded.batch, loaded.valid
    # masked: the input token itself (nothing masked)
    causal = loaded.case.kind == "causal"
    targets = lens.next_token_targets(batch) if causal else batch.tokens.masked_fill(~valid, -1)
    st = lens_stats(m, batch, targets, k=3, kl_to_final=True)
    has = targets >= 0
    refs = [loaded.ref_logits(p) for p in range(L + 1)]
    lp_final = refs[L].double().log_softmax(-1)
    for point, z in enumerate(refs):
        lp = z.double().log_softmax(-1)
        tol = ABS_LP + 2 * REL_LOGIT * z.abs().max().item()
        want_t = lp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        assert _maxdiff(st.target_logprob[point].double(), want_t, has) <= tol, (point, "target")
        assert _maxdiff(st.max_logprob[point].double(), lp.max(-1).values, valid) <= tol, (point, "max")
        ent = -(lp.exp() * lp).sum(-1)
        assert _maxdiff(st.entropy[point].double(), ent, valid) <= 2 * tol, (point, "entropy")
        kl = (lp_final.exp() * (lp_final - lp)).sum(-1)
        kl_tol = 4 * tol + 1e-6 * kl[valid].abs().max().item()
        assert _maxdiff(st.kl_to_final[point].double(), kl, valid) <= kl_tol, (point, "kl")
        # top-1 agrees wherever HF's top two are not within the tolerance of each other
        top2 = lp.topk(2, -1).values
        clear = valid & (top2[..., 0] - top2[..., 1] > 2 * tol)
        assert torch.equal(st.topk_ids[point][..., 0][clear], lp.argmax(-1)[clear])


def test_readout_equals_hf_head_on_hidden_states(loaded):
    """arch.readout applied to the bridge's residual hook points, materialised, vs HF's head."""
    r, acts = arch.readout(loaded.model), loaded.acts
    points = [acts[f"blocks.{i}.hook_resid_pre"] for i in range(L)] + [acts[f"blocks.{L - 1}.hook_resid_post"]]
    with torch.no_grad():
        for point, x in enumerate(points):
            z = loaded.ref_logits(point)
            got = r(x).log_softmax(-1)
            tol = ABS_LP + 2 * REL_LOGIT * z.abs().max().item()
            assert _maxdiff(got, z.log_softmax(-1), loaded.valid) <= tol, point


def test_hook_outputs_are_what_the_block_adds(loaded):
    case, acts, ref, valid = loaded.case, loaded.acts, loaded.ref, loaded.valid
    for i in range(L):
        pre, attn, mlp, post = (acts[f"blocks.{i}.{h}"] for h in NAMES)
        for got, want in (
            (pre, ref.hidden_states[i]),
            (attn, ref.attn[i]),
            (mlp, ref.mlp[i]),
            (post, ref.block_out[i]),
        ):
            assert _maxdiff(got, want, valid) <= ABS_ACT + REL_ACT * want.abs().max().item(), (i, case.name)
        if case.post_ln:
            # documented: no additive decomposition; the block output is HF's next hidden state
            if i + 1 < L:
                assert _maxdiff(post, ref.hidden_states[i + 1], valid) <= ABS_ACT
            continue
        # the HF modules named in arch_matrix are what HF adds (checks the reference itself) ...
        tol = ABS_SUM + REL_SUM * ref.block_out[i].abs().max().item()
        assert _maxdiff(ref.hidden_states[i] + ref.attn[i] + ref.mlp[i], ref.block_out[i], valid) <= tol
        # ... and the bridge's residual stream is the sum of its hooks
        assert _maxdiff(pre + attn + mlp, post, valid) <= tol
        mid = f"blocks.{i}.hook_resid_mid"
        if mid in loaded.model.hook_dict:  # sequential blocks only
            _, a = run_cached(loaded.model, loaded.batch, [mid])
            assert _maxdiff(a[mid], pre + attn, valid) <= tol


def test_left_and_right_padding_agree(loaded):
    m = loaded.model
    names = ["blocks.0.hook_attn_out", f"blocks.{L - 1}.hook_mlp_out"]
    runs = {}
    for side in ("right", "left"):
        b = encode(m, TEXTS, bos=True, padding_side=side)
        logits, acts = run_cached(m, b, names, logits=True)
        runs[side] = (b.attention_mask.bool(), logits.log_softmax(-1), acts, logits.abs().max().item())
    (mr, lr, ar, zr), (ml, ll, al, _) = runs["right"], runs["left"]
    for row in range(len(TEXTS)):
        assert mr[row].sum() == ml[row].sum()
        tol = ABS_PAD + 2 * REL_PAD * zr
        assert (lr[row][mr[row]] - ll[row][ml[row]]).abs().max() <= tol, row
        for n in names:
            a, b = ar[n][row][mr[row]], al[n][row][ml[row]]
            assert (a - b).abs().max() <= ABS_PAD + REL_PAD * a.abs().max(), (row, n)


COFFEE = " ".join(["I like oat milk in my coffee every morning."] * 6)


def _study_config(case, name):
    from mechlens.studies import distances, interventions, logits, magnitudes, position

    return {
        "lens": lens.Config(text="the cat sat on the warm windowsill .", position=2)
        if case.name == "bert"  # the word-level test vocabulary
        else lens.Config(),
        "magnitudes": magnitudes.Config(n_texts=8, max_tokens=12, n_fit_positions=8),
        "distances": distances.Config(n_targets=4, n_synthetic=20, mi_bins=(4,), n_context=4),
        "position": position.Config(seqlen=4, n_train=8, n_test=4, max_iter=100),
        "logits": logits.Config(n_samples=10, n_new_tokens=1),
        "interventions": interventions.Config(n_pairs=2, segment_length=2),
    }[name]


def test_every_applicable_study_runs(loaded):
    import importlib

    case, m = loaded.case, loaded.model
    for name in case.studies:
        study = importlib.import_module(f"mechlens.studies.{name}")
        cfg = _study_config(case, name)
        # the 128-token context holds only 3 " coffee" of the default coffee article: a denser text
        res = study.run(m, cfg, texts=[COFFEE]) if name == "distances" else study.run(m, cfg)
        assert res.metrics, name
        assert res.provenance["architecture"] == case.model
        if name == "lens" and case.kind == "causal":
            # the study's own last readout point is the model's log-probs of the next token
            batch = encode(m, [lens.Config().text], bos=True)
            with torch.no_grad():
                lp = loaded.hf(input_ids=batch.tokens).logits.double().log_softmax(-1)[0]
            n = batch.tokens.shape[1] - 1
            want = lp[:n].gather(-1, batch.tokens[0, 1:, None])[..., 0]
            got = torch.tensor(res.metrics["target_logprob"][-1], dtype=torch.float64)
            assert (got - want).abs().max() <= ABS_LP + 2 * REL_LOGIT * lp.abs().max().item()


# -- readout post-processing under processed weights, refusal and override ------------------------


@pytest.mark.parametrize("name", ["gemma2", "granite", "cohere"])
def test_post_processing_survives_processed_weights(name, tmp_path):
    """weights="processed": TransformerLens folds Cohere's logit_scale into W_U (and sets the HF
    attribute to 1), disables centring under a soft-cap; the readout follows the live model."""
    case = CASES[name]
    hf, tok = build(case, str(tmp_path))
    m = load_model(copy.deepcopy(hf), tokenizer=tok, weights="processed")
    batch = encode(m, TEXTS, bos=True)
    last = f"blocks.{L - 1}.hook_resid_post"
    _, acts = run_cached(m, batch, [last])
    with torch.no_grad():
        z = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        got = arch.readout(m)(acts[last]).log_softmax(-1)
    # processed weights (folded LayerNorm) reorder more fp32 sums: TransformerLens documents <= 2e-6 on
    # log-softmax for GPT-2; we allow the lens tolerance x 4
    tol = 4 * (ABS_LP + 2 * REL_LOGIT * z.abs().max().item())
    assert _maxdiff(got, z.log_softmax(-1), batch.attention_mask.bool()) <= tol


@pytest.mark.parametrize(
    ("name", "gap"), [("granite", "are 0.125 x the readout"), ("gemma2", "soft-caps its logits at ~30")]
)
def test_unreproduced_readout_is_refused_unless_overridden(name, gap, tmp_path, monkeypatch):
    """A family whose post-lm_head step mechlens did not know is refused at load, naming the gap;
    the explicit override loads it and provenance records it."""
    case = CASES[name]
    hf, tok = build(case, str(tmp_path))
    monkeypatch.delitem(arch._LOGIT_MAPS, case.model)  # as if mechlens had never read this family's code
    with pytest.raises(UnsupportedArchitectureError, match="allow_readout_mismatch") as e:
        load_model(copy.deepcopy(hf), tokenizer=tok)
    assert gap in str(e.value) and case.model in str(e.value)
    m = load_model(copy.deepcopy(hf), tokenizer=tok, allow_readout_mismatch=True)
    p = provenance_of(m)
    assert p.readout_mismatch_allowed and p.readout_max_logprob_diff > 10 * p.readout_tolerance
    assert p.readout_max_logprob_diff > 1.0  # tens of nats, as the issue measured


# -- what TransformerBridge loads, and what it does not ------------------------------------------


def test_gemma3_multimodal_is_analysed_through_its_text_model():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from mechlens.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    text = dict(CASES["gemma3"].kwargs, final_logit_softcapping=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=50255)
    cfg._attn_implementation = "eager"
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        w = hf.lm_head.weight
        w.mul_(1.0 / w.std())
    # the text model of the gemma3 case (3,290,816; the soft-cap has no parameters) + a 1-layer SigLIP tower:
    # patch embedding 32*3*8*8+32, 16 positions x 32, one layer (2 LNs, q/k/v/o with bias, fc1, fc2),
    # post-LayerNorm, pooling head (probe, in_proj 96x32+96, out_proj, LN, MLP) + projector (32x64 + norm)
    layer = 2 * 64 + 4 * (32 * 32 + 32) + (64 * 32 + 64) + (32 * 64 + 32)
    head = 32 + (96 * 32 + 96) + (32 * 32 + 32) + 64 + (64 * 32 + 64) + (32 * 64 + 32)
    vision_params = (32 * 3 * 8 * 8 + 32) + 16 * 32 + layer + 64 + head + (32 * 64 + 32)  # 25,888
    assert sum(p.numel() for p in hf.parameters()) == CASES["gemma3"].n_params + vision_params
    tok = gpt2_tokenizer()
    m = load_model(copy.deepcopy(hf), tokenizer=tok)
    p = provenance_of(m)
    assert (p.architecture, p.source_architecture, p.norm_placement) == (
        "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "sandwich",
    )  # fmt: skip
    assert p.n_params == CASES["gemma3"].n_params  # the text model only
    batch = encode(m, TEXTS, bos=True)
    last = f"blocks.{L - 1}.hook_resid_post"
    logits, acts = run_cached(m, batch, [last], logits=True)
    with torch.no_grad():
        z = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        got = arch.readout(m)(acts[last]).log_softmax(-1)
    valid = batch.attention_mask.bool()
    tol = ABS_LP + 2 * REL_LOGIT * z.abs().max().item()
    assert _maxdiff(logits, z, valid) <= tol
    assert _maxdiff(got, z.log_softmax(-1), valid) <= tol


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize(
    ("config", "model", "kwargs"),
    [
        ("DistilBertConfig", "DistilBertForMaskedLM", dict(dim=32, hidden_dim=64, n_layers=1, n_heads=2)),
        (
            "AlbertConfig",
            "AlbertForMaskedLM",
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, embedding_size=16),
        ),
        (
            "ModernBertConfig",
            "ModernBertForMaskedLM",
            dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        ),
    ],
)
def test_masked_lms_transformer_bridge_does_not_support_are_refused(config, model, kwargs):
    import transformers

    from mechlens.tokenizer import mlm_tokenizer

    ids = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2)
    hf = getattr(transformers, model)(getattr(transformers, config)(vocab_size=128, **ids, **kwargs))
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(hf, tokenizer=mlm_tokenizer())
    msg = str(e.value)
    assert model in msg and "TransformerBridge" in msg and "does not support" in msg
    assert "BertForMaskedLM" in msg and "RobertaForMaskedLM" in msg and "Gemma2" in msg  # what is supported


def test_every_family_in_the_matrix_is_declared_in_arch():
    assert {c.model for c in CASES.values()} == set(arch.FAMILIES)
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    # TransformerLens spells Phi-MoE PhiMoEForCausalLM; bridge_architecture matches it case-insensitively
    assert arch.bridge_architecture("PhimoeForCausalLM") == "PhiMoEForCausalLM"
    assert {arch.bridge_architecture(a) for a in arch.FAMILIES} <= set(SUPPORTED_ARCHITECTURES)


# -- load paths outside the matrix (issue 21): one line and exit 2, or loaded and validated ---------


@pytest.mark.parametrize("name", list(LOAD_PATHS))
def test_load_path_refuses_in_one_line_or_loads_validated(name, tmp_path):
    """Each row either ends in one UnsupportedArchitectureError line matching its expected message, or
    loads as the expected transformers class with the readout and generate checks passed, logits equal to
    an untouched HF copy's, and the studies that read hook points the model lacks refused up front."""
    import transformers

    from mechlens.errors import NotApplicableError
    from mechlens.plan import check_applicable
    from mechlens.studies import STUDIES

    lp = LOAD_PATHS[name]
    spec, tok = build_load_path(lp, str(tmp_path))
    if lp.refusal is not None:
        with pytest.raises(UnsupportedArchitectureError) as e:
            load_model(spec, tokenizer=tok, **lp.load_kw)
        msg = str(e.value)
        assert "\n" not in msg and re.search(lp.refusal, msg), msg
        return
    ref = getattr(transformers, lp.model).from_pretrained(spec) if lp.saved_as else copy.deepcopy(spec)
    m = load_model(spec, tokenizer=tok, **lp.load_kw)
    p = provenance_of(m)
    assert p.architecture == lp.loaded_as
    assert p.readout_max_logprob_diff <= p.readout_tolerance
    assert p.generate_kv_cache is True and "== the model's greedy steps" in p.generate_check
    batch = encode(m, TEXTS, bos=True)
    valid = batch.attention_mask.bool()
    logits, _ = run_cached(m, batch, [], logits=True)
    with torch.no_grad():
        z = ref.eval()(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    # the same fp32 model on both sides (tolerance as for the matrix's logits)
    assert _maxdiff(logits.log_softmax(-1), z.log_softmax(-1), valid) <= ABS_LP + 2 * REL_LOGIT * z.abs().max().item()
    refused = dict(lp.refused_studies)
    for study, info in STUDIES.items():
        if study not in refused:
            assert info.unmet(m) is None, (study, info.unmet(m))
            continue
        with pytest.raises(NotApplicableError) as e:
            check_applicable(info, {name: m})
        msg = str(e.value)
        assert "\n" not in msg and re.search(refused[study], msg), msg
    if refused:  # the studies that read only the residual stream run on it (results checked finite)
        from mechlens.runner import run_study

        assert run_study("logits", {name: m})[0].metrics["greedy_equals_generate"] is True
        run_study("lens", {name: m})


def test_load_path_refusals_exit_2_with_one_line_in_the_cli(tmp_path):
    """From the command line: a saved config naming a class transformers does not have, and a study that
    reads attention outputs on a model whose layer 0 is a Mamba block, end in exit 2 and one stderr line,
    before any study output is written."""
    import os
    import subprocess
    import sys

    unknown, _ = build_load_path(LOAD_PATHS["unknown-class-name"], str(tmp_path))
    hybrid, tok = build_load_path(LOAD_PATHS["granite-moe-hybrid"], str(tmp_path))
    hybrid.save_pretrained(tmp_path / "hybrid")
    tok.save_pretrained(tmp_path / "hybrid")
    exe = os.path.join(os.path.dirname(sys.executable), "mechlens")
    for model, study, expected in (
        (unknown, "lens", "names the class 'NoSuchRemoteForCausalLM'"),
        (tmp_path / "hybrid", "magnitudes", "layer 0 is a Mamba (state-space, linear_attention) block"),
    ):
        out = tmp_path / f"out-{study}"
        r = subprocess.run([exe, "run", study, "--model", str(model), "--out", str(out)], capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        lines = [line for line in r.stderr.splitlines() if line.startswith("mechlens: error:")]
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr
        assert "Traceback" not in r.stderr and not out.exists()


def test_a_bridge_that_cannot_run_or_read_out_is_refused_in_one_line(monkeypatch, tmp_path):
    """The load-time probe turns a failing bridge forward or missing readout hook points into
    UnsupportedArchitectureError (exit 2 in the CLI) naming the architecture, not a traceback."""
    from mechlens import validate

    hf, tok = build(CASES["llama"], str(tmp_path))
    m = load_model(hf, tokenizer=tok)

    def broken(*args, **kwargs):
        raise ValueError("`get_seq_length` can only be called on Attention layers")

    with monkeypatch.context() as mp:
        mp.setattr(m, "run_with_cache", broken)
        with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM here: its probe forward fails"):
            validate.check_readout(m)
    with monkeypatch.context() as mp:
        mp.setattr(arch, "readout_hook_names", lambda model: ["blocks.0.hook_resid_pre", "blocks.9.hook_resid_post"])
        with pytest.raises(UnsupportedArchitectureError, match=r"no residual-stream hook point blocks\.9"):
            validate.check_readout(m)


# -- study 6 (interventions) against Hugging Face --------------------------------------------------------

# HF module whose *input* is the heads' concatenated z (attn.hook_z flattened), per family checked
Z_INPUT = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj", "gpt-neox": "attention.dense",
           "bert": "attention.output.dense"}  # fmt: skip


def _pairs(m, n: int = 3, k: int = 3):
    """Seeded pairs of token ids inside every family's vocabulary (BERT's is 128 words)."""
    from mechlens.studies.interventions import RawPair, parts

    special = set(m.tokenizer.all_special_ids)
    pool = [i for i in range(5, min(m.cfg.d_vocab, 2000)) if i not in special]
    g = torch.Generator().manual_seed(0)
    tail = (arch.mask_id(m),) if arch.kind_of(m) == "masked" else ()
    raw = []
    for _ in range(n):
        d = [pool[i] for i in torch.randperm(len(pool), generator=g)[: 2 * k].tolist()]
        s, s2 = d[:k], d[k:]
        raw.append(RawPair(tuple(s + s[:-1]) + tail, tuple(s2 + s[:-1]) + tail, s[-1], s2[-1]))
    return parts.encode_pairs(m, raw, "test")


def test_interventions_dla_sum_identity_or_refusal(loaded):
    """Where the readout is linear in the residual stream (every causal family without a logit soft-cap)
    the direct contributions + readout bias add up to the model's own logit difference, and the hooks
    leave nothing unaccounted; elsewhere the part is refused in one line. Tolerance: ~2L+2 fp32 terms of
    dot products of length 64 whose size is that of the logits (|LD| and the terms up to ~60 here):
    1e-5 x (sum |terms| + |LD|) + 1e-5."""
    from mechlens.studies.interventions import direct_logit_attribution, dla_refusal

    case, m = loaded.case, loaded.model
    refusal = dla_refusal(m)
    if case.kind == "masked" or arch.logit_map(m).softcap is not None:
        assert refusal is not None and "\n" not in refusal, case.name
        return
    if case.name == "olmo":  # its non-parametric final LayerNorm bridge cannot be called on its own
        assert refusal is not None and "frozen scale" in refusal and "\n" not in refusal
        return
    assert refusal is None, (case.name, refusal)
    d = direct_logit_attribution(m, _pairs(m))
    scale = float(d.contribution.abs().sum(1).max() + d.logit_diff.abs().max())
    assert d.identity_error <= 1e-5 * scale + 1e-5, (case.name, d.identity_error, scale)
    assert d.remainder_max <= 1e-5 * scale + 1e-5, (case.name, d.remainder_max)
    if d.head is not None:  # heads + b_O add up to the attention output's contribution
        total = d.head.sum(-1) + d.head_bias
        torch.testing.assert_close(total, d.contribution[:, 1::2], rtol=0, atol=1e-5 * scale + 1e-5)


@pytest.mark.parametrize("name", list(Z_INPUT))
def test_interventions_patching_and_ablation_equal_hf_forward_hooks(name, tmp_path):
    """Exact patching (denoising: every cell of the resid_pre / attn_out / mlp_out grids and every head)
    and zero/mean/resample ablation (resample: the same seeded donor choice) redone on the HF model with
    plain register_forward_hook / register_forward_pre_hook on the modules of tests/arch_matrix.py.
    Tolerance: the same fp32 model on both sides, rows batched differently (another GEMM blocking order:
    ~1e-6 of the logits, as for padding): LD within 1e-4 + 1e-5 x max|logit|; log-prob drops and KL within 2x that."""
    from mechlens.studies.interventions import ablation, activation_patching, activations, all_hooks, parts

    case = CASES[name]
    hf, tok = build(case, str(tmp_path))
    m = load_model(copy.deepcopy(hf), tokenizer=tok)
    pp = _pairs(m)
    names = all_hooks(m)
    clean, corrupt = activations(m, pp.clean, names), activations(m, pp.corrupt, names)
    den = activation_patching(m, pp, clean, corrupt, "denoise")
    r = torch.arange(len(pp))
    blocks = module(hf, case.blocks)

    def hf_logits(tokens, hooks=()):
        handles = [h() for h in hooks]
        try:
            with torch.no_grad():
                return hf(input_ids=tokens, attention_mask=pp.clean.attention_mask).logits[r, pp.answer]
        finally:
            for h in handles:
                h.remove()

    def ld(z):
        return z[r, pp.target] - z[r, pp.foil]

    def record(mod, pre=False):
        out = {}
        if pre:
            h = mod.register_forward_pre_hook(lambda _m, args: out.__setitem__("x", args[0].detach().clone()))
        else:
            h = mod.register_forward_hook(lambda _m, _i, o: out.__setitem__("x", (o[0] if isinstance(o, tuple) else o)
                                                                          .detach().clone()))  # fmt: skip
        with torch.no_grad():
            hf(input_ids=pp.clean.tokens, attention_mask=pp.clean.attention_mask)
        h.remove()
        return out["x"]

    def replace_output(mod, value, col=None):
        def hook(_m, _i, o):
            x = o[0] if isinstance(o, tuple) else o
            x = x.clone()
            x[:, slice(None) if col is None else col] = value if col is None else value[:, col]
            return (x, *o[1:]) if isinstance(o, tuple) else x

        return lambda: mod.register_forward_hook(hook)

    def replace_input(mod, value, col=None, cols_of=None):
        def hook(_m, args):
            x = args[0].clone()
            sl = slice(None) if col is None else col
            if cols_of is None:
                x[:, sl] = value[:, sl]
            else:
                x[:, sl, cols_of] = value[:, sl, cols_of]
            return (x, *args[1:])

        return lambda: mod.register_forward_pre_hook(hook)

    z0 = hf_logits(pp.corrupt.tokens)
    scale = float(z0.abs().max())
    tol = 1e-4 + 1e-5 * scale
    base = ld(z0)
    width = pp.clean.tokens.shape[1]
    for layer, block in enumerate(blocks):
        resid = record(block, pre=True) if layer else None
        attn, mlp = record(module(block, case.attn)), record(module(block, case.mlp))
        for col in range(width):
            cells = [("attn_out", replace_output(module(block, case.attn), attn, col)),
                     ("mlp_out", replace_output(module(block, case.mlp), mlp, col))]  # fmt: skip
            if layer:
                cells.append(("resid_pre", replace_input(block, resid, col)))
            for grid, h in cells:
                want = ld(hf_logits(pp.corrupt.tokens, [h])) - base
                got = den.dld[grid][layer, col]
                assert (got - want).abs().max() <= tol, (name, grid, layer, col, got, want)
        z_mod = module(block, Z_INPUT[name])
        zin = record(z_mod, pre=True)
        d_head = zin.shape[-1] // m.cfg.n_heads
        for head in range(m.cfg.n_heads):
            h = replace_input(z_mod, zin, None, slice(head * d_head, (head + 1) * d_head))
            want = ld(hf_logits(pp.corrupt.tokens, [h])) - base
            assert (den.head_dld[layer, head] - want).abs().max() <= tol, (name, layer, head)
    abl = ablation(m, pp, clean, seed=3)
    ref = hf_logits(pp.clean.tokens).log_softmax(-1)
    text = pp.clean.text_mask
    donor = torch.as_tensor(parts.donors(np.arange(len(pp)), len(pp), 3))
    assert not (donor == torch.arange(len(pp))).any()
    for layer, block in enumerate(blocks):
        for j, which in enumerate((case.attn, case.mlp)):
            mod = module(block, which)
            act = record(mod)
            mean = act[text].mean(0).expand_as(act)
            # resample: the donor pair of parts.donors (a seeded hash of the pair index, never the pair
            # itself), its activation where it has a text token, the mean elsewhere
            has = text[donor].reshape(*text.shape, 1)
            resample = torch.where(has, act[donor], mean)
            for i, value in ((0, torch.zeros_like(act)), (1, mean), (2, resample)):
                lp = hf_logits(pp.clean.tokens, [replace_output(mod, value)]).log_softmax(-1)
                drop = ref[r, pp.target] - lp[r, pp.target]
                kl = (ref.exp() * (ref - lp)).sum(-1)
                assert (abl.logprob_drop[i, 2 * layer + j] - drop).abs().max() <= 2 * tol, (name, which, i)
                assert (abl.kl[i, 2 * layer + j] - kl).abs().max() <= 2 * tol, (name, which, i)
