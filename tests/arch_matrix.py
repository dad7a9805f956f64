"""The architecture matrix: tiny seeded random models of every family mechlens checks against HF.

Each case builds a 2-layer, d_model-64 model from the family's real config class (eager attention),
with the real GPT-2 vocabulary (50257; BERT: the 128-word test vocabulary, RoBERTa: 50262), asserts
its exact parameter count and shape, and scales the unembedding so that logits have realistic sizes
(std ~3-8, final entropies mostly 0.5-3 nats rather than a flat ~10.8): at those sizes a missing
post-processing step moves log-probs by tens of nats. Granite's and Cohere's unembeddings are scaled
up by their ``logits_scaling`` / ``1/logit_scale`` so that their *final* logits are realistic too.

The HF-side references here are written from transformers' modelling code, independently of
:mod:`mechlens.arch`: which HF module's output is what a block adds to the residual stream, and which
module is the final norm (the intermediate-readout reference feeds ``hidden_states[l]`` into it and
lets HF's own forward do the head and its post-processing).

``python tests/arch_matrix.py`` prints the measured table of ``docs/architectures.md``.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

V, D, L, H, FF, CTX = 50257, 64, 2, 4, 128, 128
EOS = 50256  # GPT-2's <|endoftext|>: bos = eos = pad
# one short batch: two sentences and a two-token text (so padding matters)
TEXTS = [
    "I like oat milk in my coffee every morning.",
    "The cat sat on the warm windowsill and watched the rain.",
    "Hello world",
]


def _ids() -> dict:
    return dict(bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)


def _llama_like(**kw) -> dict:
    return dict(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
        intermediate_size=FF, max_position_embeddings=CTX, **_ids(), **kw,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    kwargs: dict
    n_params: int  # exact: a misspelled config key builds a different model
    w_std: float  # std the unembedding is scaled to (logit size)
    final_norm: str  # HF module the residual enters for the readout (masked: the MLM head)
    blocks: str  # HF module list of the blocks
    attn: str  # per block: the module whose output is what attention adds to the residual stream
    mlp: str  # per block: the same for the MLP
    kind: str = "causal"
    post_ln: bool = False  # BERT/RoBERTa: hook_attn_out is after the residual add and LayerNorm
    multiplier: str | None = None  # config attribute scaling both additions (Granite residual_multiplier)

    @property
    def studies(self) -> tuple[str, ...]:
        """Every study the registry applies to this kind of model."""
        from mechlens.studies import STUDIES

        return tuple(name for name, info in STUDIES.items() if info.applies_to(self.kind))


LL = dict(blocks="model.layers", attn="self_attn", mlp="mlp", final_norm="model.norm")
SANDWICH = dict(LL, attn="post_attention_layernorm", mlp="post_feedforward_layernorm")
GPT = dict(blocks="transformer.h", attn="attn", mlp="mlp", final_norm="transformer.ln_f")

# n_params measured once from the config and then fixed: 2 layers x d_model 64 x vocab 50257
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("gpt2", "GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=H, n_inner=FF, bos_token_id=EOS,
                  eos_token_id=EOS), 3291712, 0.3, **GPT),
        Case("gpt-neo", "GPTNeoConfig", "GPTNeoForCausalLM",
             dict(vocab_size=V, max_position_embeddings=CTX, hidden_size=D, num_layers=L, num_heads=H,
                  intermediate_size=FF, attention_types=[[["global", "local"], 1]], window_size=16,
                  bos_token_id=EOS, eos_token_id=EOS), 3291328, 0.3, **GPT),
        Case("gpt-j", "GPTJConfig", "GPTJForCausalLM",
             dict(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=H, n_inner=FF, rotary_dim=8,
                  bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=False), 6549457, 1.0, **GPT),
        Case("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
             dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
                  max_position_embeddings=CTX, rotary_pct=0.25, **_ids()), 6499968, 1.0,
             blocks="gpt_neox.layers", attn="attention", mlp="mlp", final_norm="gpt_neox.final_layer_norm"),
        Case("opt", "OPTConfig", "OPTForCausalLM",
             dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, ffn_dim=FF,
                  max_position_embeddings=CTX, word_embed_proj_dim=D, **_ids()), 3291840, 0.3,
             blocks="model.decoder.layers", attn="self_attn", mlp="fc2", final_norm="model.decoder.final_layer_norm"),
        Case("llama", "LlamaConfig", "LlamaForCausalLM", _llama_like(), 6506944, 1.0, **LL),
        Case("mistral", "MistralConfig", "MistralForCausalLM", _llama_like(sliding_window=16), 6506944, 1.0, **LL),
        Case("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _llama_like(tie_word_embeddings=True), 3290752, 0.3, **LL),
        Case("qwen3", "Qwen3Config", "Qwen3ForCausalLM", _llama_like(head_dim=16, tie_word_embeddings=True),
             3290560, 0.3, **LL),
        Case("gemma", "GemmaConfig", "GemmaForCausalLM", _llama_like(head_dim=16), 3290496, 0.3, **LL),
        Case("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
             _llama_like(head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=16,
                         query_pre_attn_scalar=16), 3290752, 1.0, **SANDWICH),
        Case("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
             _llama_like(head_dim=16, sliding_window=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0),
             3290816, 1.0, **SANDWICH),
        Case("phi", "PhiConfig", "PhiForCausalLM",
             dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
                  max_position_embeddings=CTX, partial_rotary_factor=0.5, **_ids()), 6549969, 1.0,
             **dict(LL, final_norm="model.final_layernorm")),
        Case("phi3", "Phi3Config", "Phi3ForCausalLM", _llama_like(), 6506944, 1.0, **LL),
        # 2 experts, top-1 routing: the block's MLP output is the routed experts' weighted sum
        Case("phi-moe", "PhimoeConfig", "PhimoeForCausalLM", _llama_like(num_local_experts=2, num_experts_per_tok=1),
             6556672, 1.0, **LL),
        Case("stablelm", "StableLmConfig", "StableLmForCausalLM", _llama_like(partial_rotary_factor=0.25),
             6507264, 1.0, **LL),
        Case("bloom", "BloomConfig", "BloomForCausalLM",
             dict(vocab_size=V, hidden_size=D, n_layer=L, n_head=H, **_ids()), 3316672, 0.25,
             **dict(GPT, attn="self_attention.dense", mlp="mlp.dense_4h_to_h")),
        Case("falcon", "FalconConfig", "FalconForCausalLM",
             dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_kv_heads=H,
                  max_position_embeddings=CTX, **_ids()), 3302848, 0.25, **dict(GPT, attn="self_attention")),
        Case("olmo", "OlmoConfig", "OlmoForCausalLM", _llama_like(), 6506624, 1.0, **LL),
        Case("olmo2", "Olmo2Config", "Olmo2ForCausalLM", _llama_like(), 6507136, 1.0, **SANDWICH),
        # Granite 3.x multipliers; logits are divided by 8, so the unembedding is 8x larger
        Case("granite", "GraniteConfig", "GraniteForCausalLM",
             _llama_like(logits_scaling=8.0, residual_multiplier=0.22, embedding_multiplier=12.0,
                         attention_multiplier=0.015625, tie_word_embeddings=True), 3290496, 8 * 0.3,
             multiplier="residual_multiplier", **LL),
        # Cohere multiplies logits by 1/16, so the unembedding is 16x larger
        Case("cohere", "CohereConfig", "CohereForCausalLM", _llama_like(logit_scale=0.0625), 3290368, 16 * 0.3,
             **LL),
        Case("bert", "BertConfig", "BertForMaskedLM", {}, 116928, 1.0, kind="masked", post_ln=True,
             blocks="bert.encoder.layer", attn="attention", mlp="output.dense", final_norm="cls"),
        Case("roberta", "RobertaConfig", "RobertaForMaskedLM", {}, 3379798, 1.0, kind="masked", post_ln=True,
             blocks="roberta.encoder.layer", attn="attention", mlp="output.dense", final_norm="lm_head"),
    ]
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoadPath:
    """A family outside :data:`CASES` and how mechlens must load it: refuse in one line naming the cause
    (``refusal``: a regular expression the message must match), or load and validate it. ``saved_as``:
    the model is saved to a directory whose config.json names that class (a hub remote-code name), and
    loaded from there. ``refused_studies``: studies refused up front, with the expected reason."""

    name: str
    config: str
    model: str
    kwargs: dict
    n_params: int
    load_kw: dict = dataclasses.field(default_factory=dict)
    saved_as: str | None = None
    saved_model_type: str | None = None  # and model_type (else the config's own)
    refusal: str | None = None
    loaded_as: str | None = None  # the class mechlens resolves (provenance architecture)
    refused_studies: tuple[tuple[str, str], ...] = ()


_MAMBA = r"layer 0 is a Mamba \(state-space, linear_attention\) block: it has no {} \(blocks\.0\.{}\)"

# found by a probe of families outside the matrix (issue 21); parameter counts fixed as for CASES
LOAD_PATHS: dict[str, LoadPath] = {
    lp.name: lp
    for lp in [
        # TransformerLens' adapter asserts multi_query=True
        LoadPath("gpt-bigcode-mha", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                 dict(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=H, n_inner=FF, multi_query=False,
                      bos_token_id=EOS, eos_token_id=EOS), 3291712,
                 refusal=r"TransformerBridge cannot adopt .*GPTBigCodeForCausalLM.*AssertionError: "
                         r"GPTBigCodeArchitectureAdapter only supports multi_query=True"),
        # the adapter declares no compatibility mode; raw weights load and validate
        LoadPath("vaultgemma-processed", "VaultGemmaConfig", "VaultGemmaForCausalLM", _llama_like(head_dim=16),
                 3290496, load_kw=dict(weights="processed"),
                 refusal=r"--weights processed .*cannot process VaultGemmaForCausalLM's weights .*use --weights raw"),
        LoadPath("vaultgemma-raw", "VaultGemmaConfig", "VaultGemmaForCausalLM", _llama_like(head_dim=16), 3290496,
                 loaded_as="VaultGemmaForCausalLM"),
        # config.json naming the hub's remote-code classes: resolved to transformers' own classes
        LoadPath("mpt-remote-code-name", "MptConfig", "MptForCausalLM",
                 dict(vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=CTX, expansion_ratio=2), 3315072,
                 saved_as="MPTForCausalLM", loaded_as="MptForCausalLM"),
        LoadPath("phi-moe-remote-code-name", "PhimoeConfig", "PhimoeForCausalLM",
                 _llama_like(num_local_experts=2, num_experts_per_tok=1), 6556672, saved_as="PhiMoEForCausalLM",
                 loaded_as="PhimoeForCausalLM"),
        # a class transformers does not have, resolved through the auto-mapping of the config's model_type
        LoadPath("remote-class-known-model-type", "LlamaConfig", "LlamaForCausalLM", _llama_like(), 6506944,
                 saved_as="MyRemoteLlamaForCausalLM", loaded_as="LlamaForCausalLM"),
        LoadPath("unknown-class-name", "LlamaConfig", "LlamaForCausalLM", _llama_like(), 6506944,
                 saved_as="NoSuchRemoteForCausalLM", saved_model_type="no-such-remote",
                 refusal=r"the config names the class 'NoSuchRemoteForCausalLM' \(model_type 'no-such-remote'\), "
                         r"which transformers .* does not have"),
        # Mamba (state-space) layers have no attention output: the studies that read one are refused up front
        LoadPath("granite-moe-hybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                 _llama_like(layer_types=["mamba", "attention"], num_local_experts=2, num_experts_per_tok=1,
                             mamba_d_state=16, mamba_n_heads=4, mamba_d_head=32, mamba_expand=2,
                             position_embedding_type="nope"), 6965100,
                 loaded_as="GraniteMoeHybridForCausalLM",
                 refused_studies=(("magnitudes", _MAMBA.format("attention output", "hook_attn_out")),
                                  ("distances", _MAMBA.format("attention output", "hook_attn_out")),
                                  ("interventions", _MAMBA.format("attention output", "hook_attn_out")))),
    ]
}  # fmt: skip


def build_load_path(lp: LoadPath, tmp_dir: str, seed: int = 0):
    """``(spec, tokenizer)`` for :func:`mechlens.load_model`: the seeded random model in memory, or the
    directory it was saved to with ``config.json`` naming ``lp.saved_as``."""
    import json
    import pathlib

    import transformers

    from mechlens.tokenizer import gpt2_tokenizer

    torch.manual_seed(seed)
    cfg = getattr(transformers, lp.config)(**lp.kwargs)
    cfg._attn_implementation = "eager"
    hf = getattr(transformers, lp.model)(cfg).eval()
    assert tuple(hf.get_input_embeddings().weight.shape) == (V, D)
    assert _param_count(hf) == lp.n_params, (lp.name, _param_count(hf))
    tok = gpt2_tokenizer()
    if lp.saved_as is None:
        return hf, tok
    d = pathlib.Path(tmp_dir) / lp.name
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = [lp.saved_as]
    if lp.saved_model_type is not None:
        config["model_type"] = lp.saved_model_type
    (d / "config.json").write_text(json.dumps(config))
    return str(d), None


def module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _param_count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build(case: Case, tmp_dir: str, seed: int = 0):
    """``(hf_model, tokenizer)``: the seeded random model in eval mode (eager attention)."""
    import transformers

    from mechlens.tokenizer import gpt2_tokenizer

    if case.kind == "masked":
        import conftest

        hf, tok = conftest.make_bert(tmp_dir, seed) if case.name == "bert" else conftest.make_roberta(seed)
    else:
        torch.manual_seed(seed)
        cfg = getattr(transformers, case.config)(**case.kwargs)
        cfg._attn_implementation = "eager"
        hf = getattr(transformers, case.model)(cfg).eval()
        tok = gpt2_tokenizer()
        emb = hf.get_input_embeddings().weight
        assert tuple(emb.shape) == (V, D), emb.shape  # misspelled size keys fall back to full-size defaults
        assert len(module(hf, case.blocks)) == L
    with torch.no_grad():
        w = hf.get_output_embeddings().weight
        w.mul_(case.w_std / w.std())
    assert _param_count(hf) == case.n_params, (case.name, _param_count(hf))
    return hf, tok


@dataclasses.dataclass
class HFRun:
    """One HF forward of the reference copy, with what each block adds captured by forward hooks."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    attn: list[torch.Tensor]  # what attention adds, per layer (BERT/RoBERTa: the attention module output)
    mlp: list[torch.Tensor]
    block_out: list[torch.Tensor]


@torch.no_grad()
def hf_run(case: Case, hf, tokens, attention_mask) -> HFRun:
    rec: dict = {}
    handles = []

    def keep(key):
        # clone: Falcon adds attention into the MLP output in place after the hook has run
        def hook(_m, _i, o):
            rec[key] = (o[0] if isinstance(o, tuple) else o).detach().clone()

        return hook

    for layer, block in enumerate(module(hf, case.blocks)):
        handles.append(module(block, case.attn).register_forward_hook(keep(("attn", layer))))
        handles.append(module(block, case.mlp).register_forward_hook(keep(("mlp", layer))))
        handles.append(block.register_forward_hook(keep(("block", layer))))
    try:
        out = hf(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    shape = out.hidden_states[0].shape
    mult = getattr(hf.config, case.multiplier) if case.multiplier else 1.0
    return HFRun(
        logits=out.logits,
        hidden_states=out.hidden_states,
        attn=[rec[("attn", i)].reshape(shape) * mult for i in range(L)],  # OPT's fc2 sees [batch*pos, d]
        mlp=[rec[("mlp", i)].reshape(shape) * mult for i in range(L)],
        block_out=[rec[("block", i)].reshape(shape) for i in range(L)],
    )


@torch.no_grad()
def hf_logits_from(case: Case, hf, hidden: torch.Tensor, tokens, attention_mask) -> torch.Tensor:
    """HF's own final norm + head + post-processing applied to ``hidden`` (a residual-stream tensor of
    the same shape as the last one): a forward pre-hook feeds it into the final norm (masked: into
    the MLM head) in place of the model's own last residual, and HF's forward does the rest."""

    def swap(_m, args, kwargs):
        return (hidden, *args[1:]), kwargs

    h = module(hf, case.final_norm).register_forward_pre_hook(swap, with_kwargs=True)
    try:
        return hf(input_ids=tokens, attention_mask=attention_mask).logits
    finally:
        h.remove()


def _table() -> None:  # pragma: no cover - the docs table generator
    """Measure every case and print the markdown table of docs/architectures.md."""
    import copy
    import tempfile

    import conftest  # noqa: F401  (sets HF_HUB_OFFLINE, thread count)

    from mechlens import LinearReadout, arch, encode, load_model, provenance_of, run_cached
    from mechlens.lens.readings import lens_stats
    from mechlens.studies import lens

    rows = []
    for case in CASES.values():
        hf, tok = build(case, tempfile.mkdtemp())
        m = load_model(copy.deepcopy(hf), tokenizer=tok)
        p = provenance_of(m)
        batch = encode(m, TEXTS, bos=True)
        names = arch.readout_hook_names(m) + [
            f"blocks.{i}.{h}" for i in range(L) for h in ("hook_attn_out", "hook_mlp_out")
        ]
        _, acts = run_cached(m, batch, names)
        ref = hf_run(case, hf, batch.tokens, batch.attention_mask)
        v = batch.attention_mask.bool()
        targets = lens.next_token_targets(batch) if case.kind == "causal" else batch.tokens.masked_fill(~v, -1)
        st = lens_stats(m, batch, targets, k=1)
        lp = ref.logits.double().log_softmax(-1)
        entropy = -(lp.exp() * lp).sum(-1)[v].mean().item()
        lens_diff = 0.0
        for layer in range(L + 1):
            ref_l = lp if layer == L else hf_logits_from(case, hf, ref.hidden_states[layer], batch.tokens,
                                                         batch.attention_mask).double().log_softmax(-1)  # fmt: skip
            t = targets.clamp(min=0)
            want = ref_l.gather(-1, t[..., None])[..., 0]
            ok = targets >= 0
            lens_diff = max(lens_diff, (st.target_logprob[layer].double() - want).abs()[ok].max().item())
        # what the lens would be off by without the post-lm_head step
        naive = LinearReadout(pre=m.ln_final, weight=m.W_U, bias=m.b_U) if case.kind == "causal" else None
        naive_diff = (
            (naive(acts[names[L]]).double().log_softmax(-1) - lp).abs()[v].max().item() if naive is not None else 0.0
        )
        am = max(
            max((acts[f"blocks.{i}.hook_attn_out"] - ref.attn[i]).abs()[v].max().item() for i in range(L)),
            max((acts[f"blocks.{i}.hook_mlp_out"] - ref.mlp[i]).abs()[v].max().item() for i in range(L)),
        )
        rows.append((arch.FAMILIES[p.architecture].name, p.architecture, p.norm_placement, p.block_layout,
                     p.readout.replace("ln_final(x) @ W_U + b_U", "norm+unembed"), case.n_params, lens_diff,
                     naive_diff, am, ", ".join(case.studies), entropy))  # fmt: skip
    print("| family | architecture | norms | block | readout | params | final entropy (nats) "
          "| lens vs HF log-probs (max abs, nats) | without post-processing | attn/mlp out vs HF (max abs) "
          "| studies run |")  # fmt: skip
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | `{r[1]}` | {r[2]} | {r[3]} | {r[4]} | {r[5]:,} | {r[10]:.2f} | {r[6]:.1e} | "
              f"{r[7]:.3g} | {r[8]:.1e} | {r[9]} |")  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(2)
    _table()
