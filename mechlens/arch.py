"""Architecture quirks, quarantined: every place where causal and masked LMs (or model families)
differ is decided here and nowhere else.

* which architectures are supported, and whether a model is ``causal`` or ``masked``
  (:func:`model_kind`; ``Gemma3ForConditionalGeneration`` is analysed through its text model,
  :func:`text_model_of`);
* the readout (logit-lens) function, :func:`readout`: the model's own logit map. Causal: final norm +
  unembed + whatever the HF model applies after ``lm_head`` (:func:`logit_map`: Granite divides by
  ``logits_scaling``, Cohere multiplies by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``, Gemma2/3
  soft-cap with ``final_logit_softcapping``). Masked: the full MLM head (dense -> activation ->
  LayerNorm -> decoder). :mod:`mechlens.validate` checks at load that it reproduces the model's logits;
* the residual-stream readout points (after the embeddings and after every block);
* what each family's hook points mean (:data:`FAMILIES`, the table below), and the normalisation
  placement recorded in provenance;
* special tokens: BOS for causal LMs, ``<s> ... </s>`` / ``[CLS] ... [SEP]`` and the mask token for
  masked LMs;
* how a tokenizer must be prepared so the bridge does not try to reload it from the hub.

Hook semantics per family (TransformerLens 4.3 ``TransformerBridge``, raw weights; every row is checked
against the HF modules in ``tests/test_architectures.py``). "Adds" means: the tensor the block adds
to the residual stream, so ``resid_post = resid_pre + hook_attn_out + hook_mlp_out`` for every
pre-LN, sandwich and output-norm family, sequential or parallel:

=========  ===========  ==========  ======================================================================
family     norms        block       ``hook_attn_out`` / ``hook_mlp_out`` equal (HF modules)
=========  ===========  ==========  ======================================================================
GPT-2      pre-LN       sequential  ``attn`` / ``mlp`` outputs (what is added)
GPT-Neo    pre-LN       sequential  ``attn`` / ``mlp`` outputs (what is added)
GPT-J      pre-LN       parallel    ``attn`` / ``mlp`` outputs, both from ``ln_1(resid_pre)``; no ``hook_resid_mid``
GPT-NeoX   pre-LN       parallel    ``attention`` / ``mlp`` outputs (two input LNs); no ``hook_resid_mid``
OPT        pre-LN       sequential  ``self_attn`` / ``fc2`` outputs (``do_layer_norm_before=True``; OPT-350m is post-LN)
Llama,     pre-LN       sequential  ``self_attn`` / ``mlp`` outputs (RMSNorm)
Mistral,
Qwen2/3,
Gemma,
Phi3,
StableLM,
OLMo
Granite    pre-LN       sequential  ``self_attn`` / ``mlp`` outputs times ``residual_multiplier`` (the scaled
                                    contribution, not the raw module output)
Gemma2/3   sandwich     sequential  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` outputs: the
                                    sublayer output *after* its own norm (norms ~ sqrt(d_model) x weight)
OLMo2      output-norm  sequential  ``post_attention_layernorm`` / ``post_feedforward_layernorm`` outputs (no
                                    input norm: attention and MLP read the raw residual stream)
Phi        pre-LN       parallel    ``self_attn`` / ``mlp`` outputs, one shared input LN
Falcon     pre-LN       parallel    ``self_attention`` / ``mlp`` outputs (HF adds them in place: ``mlp_output +=
                                    attention_output``; the hooks hold the separate terms)
Cohere     pre-LN       parallel    ``self_attn`` / ``mlp`` outputs, one shared input LN
BLOOM      pre-LN       sequential  ``self_attention.dense`` / ``mlp.dense_4h_to_h`` outputs: HF's attention and MLP
                                    modules add the residual themselves; the hooks hold only the added term
BERT,      post-LN      sequential  ``hook_attn_out`` is the HF ``*Attention`` module output, i.e. *after* its
RoBERTa                             residual add and LayerNorm; ``hook_mlp_out`` is ``output.dense`` (before the
                                    residual add and LayerNorm); ``hook_resid_pre``/``hook_resid_post`` equal HF
                                    ``hidden_states``. There is no additive decomposition of the residual stream.
=========  ===========  ==========  ======================================================================

``unembed.hook_out`` (alias ``hook_unembed``) is ``lm_head``'s raw output, *before* the model's
post-processing: the model's logits are ``softcap(scale * unembed.hook_out)`` (:func:`logit_map`), so
an intervention there is scaled (Granite: by 1/8) or compressed (Gemma2: soft-capped) on its way to
the logits.

Norm placements (:func:`norm_placement`): ``pre-LN`` normalises each sublayer's input; ``post-LN``
normalises after the residual add; ``sandwich`` both before the sublayer and on its output before the
add; ``output-norm`` only on the sublayer's output before the add. Architectures TransformerBridge
supports but mechlens has not checked get ``"unchecked"``; their readout is still validated at load.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.errors import UnsupportedArchitectureError
from mechlens.ops.lens_reduce import LinearReadout

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge
    from transformers import PreTrainedTokenizerBase

MASKED_ARCHITECTURES = frozenset({"BertForMaskedLM", "RobertaForMaskedLM"})
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# multimodal checkpoints whose text model TransformerBridge loads as a causal LM (see text_model_of)
TEXT_MODEL_OF = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family checked against Hugging Face in ``tests/test_architectures.py``."""

    name: str
    special: str  # what is special about it, for the architecture table


# Every architecture here is in the HF cross-check matrix (tests/test_architectures.py): readout, hook
# semantics, padding and studies are tested against HF on a seeded random model.
FAMILIES: dict[str, Family] = {
    "GPT2LMHeadModel": Family("GPT-2", "learned positions, tied unembed"),
    "GPTNeoForCausalLM": Family("GPT-Neo", "alternating global/local attention, unscaled attention scores"),
    "GPTJForCausalLM": Family("GPT-J", "parallel attention+MLP, partial rotary, lm_head bias, untied"),
    "GPTNeoXForCausalLM": Family("GPT-NeoX", "parallel residual with two input LNs, partial rotary, untied"),
    "OPTForCausalLM": Family("OPT", "learned positions offset by 2, ReLU MLP"),
    "LlamaForCausalLM": Family("Llama", "RMSNorm, gated MLP, grouped-query attention, untied"),
    "MistralForCausalLM": Family("Mistral", "as Llama, sliding-window attention"),
    "Qwen2ForCausalLM": Family("Qwen2", "q/k/v biases, tied"),
    "Qwen3ForCausalLM": Family("Qwen3", "q/k RMSNorm per head, tied"),
    "GemmaForCausalLM": Family("Gemma", "embeddings x sqrt(d_model), RMSNorm weight 1+w, GeGLU"),
    "Gemma2ForCausalLM": Family("Gemma2", "sandwich norms, attention and final-logit soft-capping"),
    "Gemma3ForCausalLM": Family("Gemma3 (text)", "sandwich norms, q/k norm, local/global layers, logit soft-cap"),
    "PhiForCausalLM": Family("Phi", "parallel attention+MLP, partial rotary, lm_head bias, untied"),
    "Phi3ForCausalLM": Family("Phi3", "fused qkv and gate/up projections, untied"),
    # transformers' class; TransformerLens registers it as PhiMoEForCausalLM (bridge_architecture)
    "PhimoeForCausalLM": Family("Phi-MoE", "sparse mixture-of-experts MLP (top-k routing), LayerNorm, untied"),
    "StableLmForCausalLM": Family("StableLM", "LayerNorm, partial rotary, untied"),
    "BloomForCausalLM": Family("BLOOM", "ALiBi, embedding LayerNorm, residual added inside attention/MLP"),
    "FalconForCausalLM": Family("Falcon", "parallel attention+MLP, in-place sum in HF, tied"),
    "OlmoForCausalLM": Family("OLMo", "non-parametric LayerNorm, untied"),
    "Olmo2ForCausalLM": Family("OLMo2", "norms on sublayer outputs only, q/k norm, untied"),
    "GraniteForCausalLM": Family("Granite", "embedding/residual/attention multipliers, logits / logits_scaling"),
    "CohereForCausalLM": Family("Cohere", "parallel attention+MLP, LayerNorm without bias, logits x logit_scale"),
    "BertForMaskedLM": Family("BERT", "post-LN encoder, MLM head dense -> GELU -> LayerNorm -> decoder"),
    "RobertaForMaskedLM": Family("RoBERTa", "post-LN encoder, padding-offset positions, MLM head"),
}

# masked LMs TransformerBridge 4.3 has no adapter for (named in the refusal)
_UNSUPPORTED_MASKED_HINT = "DistilBERT, ALBERT, ModernBERT, ELECTRA, DeBERTa, XLM-RoBERTa, ..."


def _bridge_architectures() -> dict:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return SUPPORTED_ARCHITECTURES


def bridge_architecture(architecture: str) -> str | None:
    """TransformerBridge's registry key for a class name: the name itself, or the registered name that
    differs from it only in case (TransformerLens registers Phi-MoE as ``PhiMoEForCausalLM`` where
    transformers' class is ``PhimoeForCausalLM``; MPT's hub remote-code class ``MPTForCausalLM`` is
    transformers' ``MptForCausalLM``); ``None`` when TransformerBridge has no adapter for it."""
    supported = _bridge_architectures()
    if architecture in supported:
        return architecture
    return {k.lower(): k for k in supported}.get(architecture.lower())


def _supported_message() -> str:
    checked = ", ".join(f.name for f in FAMILIES.values())
    return (
        f"mechlens analyses the causal LMs (*ForCausalLM / *LMHeadModel) that TransformerLens' TransformerBridge "
        f"supports, Gemma3ForConditionalGeneration (its text model), and the masked LMs "
        f"{', '.join(sorted(MASKED_ARCHITECTURES))}; checked against Hugging Face: {checked}"
    )


def model_kind(architecture: str) -> str:
    """``"causal"`` or ``"masked"``; raises for anything mechlens cannot analyse, naming what is supported."""
    if architecture in MASKED_ARCHITECTURES:
        return "masked"
    if architecture in TEXT_MODEL_OF:
        return "causal"
    registered = bridge_architecture(architecture)
    if architecture.endswith(CAUSAL_SUFFIXES) and architecture != "BertLMHeadModel" and registered:
        return "causal"
    if architecture.endswith("ForMaskedLM"):
        why = (
            f"architecture {architecture!r} is a masked LM that TransformerLens {tl_version()}' TransformerBridge "
            f"does not support (no architecture adapter; unsupported include {_UNSUPPORTED_MASKED_HINT})"
        )
    elif architecture.endswith(CAUSAL_SUFFIXES):
        why = (
            f"architecture {architecture!r} is not supported by TransformerLens {tl_version()}' TransformerBridge "
            "(no architecture adapter)"
        )
    elif registered:
        why = (
            f"architecture {architecture!r} is supported by TransformerBridge but is not a causal or masked "
            "language model mechlens can analyse (encoder-decoder, multimodal, audio or vision)"
        )
    else:
        why = f"architecture {architecture!r} is not supported by mechlens"
    raise UnsupportedArchitectureError(
        f"{why}. {_supported_message()}. Load the model's *ForCausalLM / *ForMaskedLM class (not the bare "
        "encoder or a classification head)."
    )


def tl_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "?"


def text_model_of(hf_model):
    """The causal text model of a multimodal checkpoint (:data:`TEXT_MODEL_OF`); other models as given.

    ``Gemma3ForConditionalGeneration`` -> a ``Gemma3ForCausalLM`` sharing its language model and
    ``lm_head`` (no weights are copied; the vision tower is dropped). HF's multimodal forward applies
    no final-logit soft-cap whatever ``text_config.final_logit_softcapping`` says, so the text model's
    config gets ``final_logit_softcapping=None``: its logits on text equal the multimodal model's
    (tested in ``tests/test_architectures.py``).
    """
    target = TEXT_MODEL_OF.get(architecture_of(hf_model))
    if target is None:
        return hf_model
    import transformers

    cfg = copy.deepcopy(hf_model.config.get_text_config())
    cfg.architectures = [target]
    cfg.final_logit_softcapping = None
    cfg._attn_implementation = hf_model.config.get_text_config()._attn_implementation
    with torch.device("meta"):
        text = getattr(transformers, target)(cfg)
    text.model = hf_model.model.language_model
    text.lm_head = hf_model.lm_head
    text.config.name_or_path = getattr(hf_model.config, "name_or_path", "") or ""
    left = [n for n, p in text.named_parameters() if p.is_meta]
    if left:  # pragma: no cover - a transformers version with another module layout
        raise UnsupportedArchitectureError(f"cannot take the text model of {architecture_of(hf_model)}: {left[:3]}")
    return text.to(next(hf_model.parameters()).dtype).train(hf_model.training)


def architecture_of(hf_model) -> str:
    return type(hf_model).__name__


def normalize_config(hf_model) -> None:
    """The bridge picks its adapter from ``config.architectures[0]`` by exact name: a freshly constructed
    HF model has ``None`` there (filled in from the model's class), and a class TransformerLens spells
    differently (:func:`bridge_architecture`) gets TransformerLens' spelling."""
    cfg = hf_model.config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [architecture_of(hf_model)]
    registered = bridge_architecture(cfg.architectures[0])
    if registered is not None and registered != cfg.architectures[0]:
        cfg.architectures = [registered]


def kind_of(model: TransformerBridge) -> str:
    return model_kind(model.cfg.architecture)


def prepare_tokenizer_for_bridge(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """TransformerBridge reloads any tokenizer whose init kwargs lack ``add_bos_token`` *by name* from
    the hub (fails offline, or loads a different tokenizer for an in-memory one). mechlens adds BOS
    itself (see :mod:`mechlens.encoding`), so mark a copy as BOS-adding and give it a name."""
    if tokenizer.init_kwargs.get("add_bos_token") is not None and tokenizer.init_kwargs.get("name_or_path"):
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs["add_bos_token"] = True
    tok.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path or "in-memory-tokenizer")
    return tok


# -- the KV-cache keyword (transformers >= 5.24 with TransformerLens 4.3) ------------------------------

_READS_CACHE_KEYWORD = "_mechlens_reads_cache_keyword"


def read_kv_cache_keyword() -> None:
    """Make TransformerLens' attention bridges find the KV cache that transformers >= 5.24 passes as ``cache=``.

    From transformers 5.24, GPT-2- and Llama-style decoder layers (GPT-2, Llama, Mistral, Qwen, Gemma, OPT,
    Phi, ...) call their attention module with ``cache=...``; TransformerLens 4.3's
    ``AttentionBridge._update_kv_cache`` reads only ``past_key_values`` and ``layer_past``, so under the
    bridge every cached decoding step attends to itself alone and ``bridge.generate(use_past_kv_cache=True)``
    silently departs from the model's greedy steps (measured: log-probs off by 0.69 nats on a random GPT-2
    and 25.8 on a random Llama from step 2 on). GPT-NeoX, GPT-J, BLOOM, Falcon and GPT-Neo still pass
    ``layer_past`` and were never affected.

    This wraps that one method: when neither ``past_key_values`` nor ``layer_past`` is given and ``cache``
    is, the cache is passed on as ``past_key_values``; every other call goes through unchanged, so it is a
    no-op on transformers <= 5.23 and for the families that name the cache ``layer_past``; transformers' own
    FutureWarning about ``past_key_values`` (which TransformerLens' generate still passes) is filtered. Idempotent (a
    second call finds the wrapper and returns). :func:`mechlens.load_model` calls it before the bridge
    boots. Retire it when a TransformerLens release reads ``cache`` itself: ``tools/generate_check.py``
    (run by ``tools/deps.py canary`` without this fix) then reports 0 broken checks on transformers >= 5.24.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    # TransformerLens 4.3's generate still calls the HF model with past_key_values=, which transformers >= 5.24
    # answers with a FutureWarning on every cached generate (the load-time check included): the same keyword
    # change, not the user's code, so it is not shown
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
    original = AttentionBridge._update_kv_cache
    if getattr(original, _READS_CACHE_KEYWORD, False):
        return

    @functools.wraps(original)
    def _update_kv_cache(self, k: Tensor, v: Tensor, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            cache = kwargs.get("cache")
            if cache is not None:
                kwargs["past_key_values"] = cache
        return original(self, k, v, **kwargs)

    setattr(_update_kv_cache, _READS_CACHE_KEYWORD, True)
    AttentionBridge._update_kv_cache = _update_kv_cache


# -- special tokens ------------------------------------------------------------------------------


def bos_id(model: TransformerBridge) -> int:
    """The token a causal LM's sequences start with (GPT-2: ``<|endoftext|>``); ``<s>``/``[CLS]`` for
    masked LMs."""
    tok = model.tokenizer
    tid = tok.cls_token_id if kind_of(model) == "masked" and tok.cls_token_id is not None else tok.bos_token_id
    if tid is None:
        raise UnsupportedArchitectureError(f"tokenizer {tok.name_or_path!r} has no BOS/CLS token")
    return int(tid)


def eos_id(model: TransformerBridge) -> int | None:
    """Closing special token of masked LMs (``</s>``/``[SEP]``); causal LMs add none."""
    if kind_of(model) != "masked":
        return None
    tok = model.tokenizer
    return int(tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id)


def pad_id(model: TransformerBridge) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def mask_id(model: TransformerBridge) -> int:
    if kind_of(model) != "masked" or model.tokenizer.mask_token_id is None:
        raise UnsupportedArchitectureError(f"{model.cfg.model_name!r} is not a masked LM: it has no mask token")
    return int(model.tokenizer.mask_token_id)


# -- readout (logit lens) ------------------------------------------------------------------------


def readout_hook_names(model: TransformerBridge) -> list[str]:
    """Residual stream after the embeddings and after every block: ``n_layers + 1`` readout points.

    ``blocks.l.hook_resid_pre`` for each block, then the last block's ``hook_resid_post``. For BERT and
    RoBERTa ``blocks.0.hook_resid_pre`` is the LayerNormed embedding sum (HF ``hidden_states[0]``).
    """
    n = model.cfg.n_layers
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def block_types(model: TransformerBridge) -> list[str] | None:
    """The kind of each block (``"attention"``, ``"mamba"``, ...) of a hybrid model, from its config
    (HF's ``layer_types`` / ``layers_block_type``, else TransformerLens' ``layers_block_type``, which
    calls a Mamba layer ``linear_attention``); ``None`` for a model whose blocks are all alike."""
    hf_cfg = getattr(hf_model_of(model), "config", None)
    for cfg, key in ((hf_cfg, "layer_types"), (hf_cfg, "layers_block_type"), (model.cfg, "layers_block_type")):
        types = getattr(cfg, key, None)
        if isinstance(types, list | tuple) and len(types) == model.cfg.n_layers:
            return [str(t) for t in types]
    return None


def _block_kind(model: TransformerBridge, layer: int) -> str | None:
    """What block ``layer`` is, for a hybrid model: ``"Mamba (state-space)"`` when the bridge block mixes
    tokens with a state-space (Mamba) bridge, else the config's block type; ``None`` if all are alike."""
    types = block_types(model)
    if any("SSM" in type(c).__name__ or "Mamba" in type(c).__name__ for c in model.blocks[layer].children()):
        return "Mamba (state-space)" if types is None else f"Mamba (state-space, {types[layer]})"
    return None if types is None else types[layer]


_HOOK_MEANING = {"hook_attn_out": "attention output", "hook_mlp_out": "MLP output"}


def missing_hooks(model: TransformerBridge, names: Sequence[str]) -> str | None:
    """Why ``model`` lacks hook points among ``names``, in words (``"layer 0 is a mamba block: it has no
    attention output (blocks.0.hook_attn_out)"``), or ``None`` when it has them all."""
    missing = [n for n in dict.fromkeys(names) if n not in model.hook_dict]
    if not missing:
        return None
    why = []
    for name in missing[:3]:
        parts = name.split(".")
        layer = int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None
        what = _HOOK_MEANING.get(parts[-1], "hook point")
        kind = None if layer is None or layer >= model.cfg.n_layers else _block_kind(model, layer)
        if kind is not None:
            why.append(
                f"layer {layer} is a{'n' if kind[:1] in 'aeiou' else ''} {kind} block: it has no {what} ({name})"
            )
        else:
            why.append(f"{model.cfg.architecture} has no {what} {name}")
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    return "; ".join(why) + more


def _mlm_activation(model: TransformerBridge) -> Callable[[Tensor], Tensor]:
    from transformers.activations import ACT2FN

    if model.cfg.architecture == "RobertaForMaskedLM":
        return ACT2FN["gelu"]  # RobertaLMHead hard-codes gelu whatever config.hidden_act says
    hf_cfg = getattr(model, "original_model", None)
    act = getattr(getattr(hf_cfg, "config", None), "hidden_act", None) or getattr(model.cfg, "act_fn", "gelu")
    return ACT2FN[act]


@dataclasses.dataclass(frozen=True)
class LogitMap:
    """What the HF model applies to ``lm_head``'s output: ``logits = softcap(scale * (h @ W_U + b_U))``
    with ``softcap(z) = c * tanh(z / c)`` (no cap when ``softcap`` is None)."""

    scale: float = 1.0
    softcap: float | None = None
    source: str = ""  # the HF attribute(s) the values come from

    def describe(self) -> str:
        steps = []
        if self.scale != 1.0:
            steps.append(f"x {self.scale:.6g}")
        if self.softcap is not None:
            steps.append(f"softcap {self.softcap:g}")
        return " then ".join(steps) + (f" ({self.source})" if self.source else "") if steps else "none"


def _granite(hf) -> LogitMap:
    return LogitMap(scale=1.0 / float(hf.config.logits_scaling), source="config.logits_scaling (divides)")


def _cohere(hf) -> LogitMap:
    # the module attribute, not the config: TransformerLens' processed weights fold the scale into W_U and
    # set the attribute to 1.0, which is then what HF's forward multiplies by
    return LogitMap(scale=float(hf.logit_scale), source="logit_scale (multiplies)")


def _falcon_h1(hf) -> LogitMap:
    return LogitMap(scale=float(hf.model.lm_head_multiplier), source="model.lm_head_multiplier (multiplies)")


def _final_softcap(hf) -> LogitMap:
    cap = getattr(hf.config, "final_logit_softcapping", None)
    return LogitMap(softcap=None if cap is None else float(cap), source="config.final_logit_softcapping")


def _recurrent_gemma(hf) -> LogitMap:
    return LogitMap(softcap=float(hf.config.logits_soft_cap), source="config.logits_soft_cap")


# What each *ForCausalLM.forward of transformers 5.x does after ``logits = self.lm_head(hidden_states)``,
# read from the modelling code of every causal architecture TransformerBridge 4.3 supports. Every other
# supported causal LM applies nothing after lm_head (casts such as Mamba's ``.float()`` change no value
# in fp32). A family missing here is still caught at load: mechlens.validate compares the readout with
# the model's own logits and refuses a mismatch.
_LOGIT_MAPS: dict[str, Callable[[torch.nn.Module], LogitMap]] = {
    "GraniteForCausalLM": _granite,
    "GraniteMoeForCausalLM": _granite,
    "GraniteMoeHybridForCausalLM": _granite,
    "CohereForCausalLM": _cohere,
    "Cohere2ForCausalLM": _cohere,
    "FalconH1ForCausalLM": _falcon_h1,
    "Gemma2ForCausalLM": _final_softcap,
    "Gemma3ForCausalLM": _final_softcap,
    "Gemma4ForCausalLM": _final_softcap,
    "VaultGemmaForCausalLM": _final_softcap,
    "NanoChatForCausalLM": _final_softcap,
    "RecurrentGemmaForCausalLM": _recurrent_gemma,
}


def hf_model_of(model: TransformerBridge) -> torch.nn.Module:
    """The HF model the bridge wraps (modified in place by the bridge)."""
    return model.original_model


def logit_map(model: TransformerBridge) -> LogitMap:
    """The post-``lm_head`` step of ``model`` (identity for masked LMs and most causal LMs)."""
    fn = _LOGIT_MAPS.get(model.cfg.architecture)
    return LogitMap() if fn is None else fn(hf_model_of(model))


def readout(model: TransformerBridge) -> LinearReadout:
    """The function from a residual-stream vector to vocabulary logits: the model's own logit map.

    Causal: ``softcap(scale * (ln_final(x) @ W_U + b_U))``: the model's final norm (statistics
    recomputed on the given vector), its unembedding (tied or untied, with its bias if any) and the
    post-``lm_head`` step of :func:`logit_map`. A scale is folded into ``pre`` and ``b_U``
    (``(s h) @ W_U + s b_U``: no copy of the ``[d_model, d_vocab]`` unembedding is made); a soft-cap
    is :class:`LinearReadout`'s ``softcap``, applied by :func:`mechlens.ops.lens_reduce` to every
    vocabulary tile before any softmax statistic.
    Masked: ``pre`` is the MLM head's dense -> activation -> LayerNorm, and ``W_U``/``b_U`` its decoder.
    Built from the bridge's own components and weights, so it follows ``weights="processed"`` (folded
    LayerNorm, centred unembed) too. The readout of the last point equals the model's logits (checked at
    load by :mod:`mechlens.validate`, and tested for every family in :data:`FAMILIES`); with scale 1,
    ``pre(x) @ model.W_U + model.b_U`` equals ``model.unembed(pre(x))`` exactly (tested).
    """
    ln = model.ln_final
    if kind_of(model) == "masked":
        dense, act = model.mlm_head, _mlm_activation(model)

        def masked(x: Tensor) -> Tensor:
            return ln(act(dense(x)))

        return LinearReadout(pre=masked, weight=model.W_U, bias=model.b_U)
    lm = logit_map(model)
    pre, bias = ln, model.b_U
    if lm.scale != 1.0:
        scale = lm.scale

        def scaled(x: Tensor) -> Tensor:
            return ln(x) * scale

        pre = scaled
        bias = None if bias is None else bias * scale
    return LinearReadout(pre=pre, weight=model.W_U, bias=bias, softcap=lm.softcap)


def readout_description(model: TransformerBridge) -> str:
    """One line for provenance: the readout mechlens applies to a residual vector."""
    if kind_of(model) == "masked":
        return "MLM head: LayerNorm(act(dense(x))) @ W_U + b_U"
    lm = logit_map(model)
    post = "" if lm.describe() == "none" else f"; then {lm.describe()}"
    return f"ln_final(x) @ W_U + b_U{post}"


# what ``hook_attn_out`` holds, by normalisation placement: comparable across models only within a group
_ATTN_OUT_MEANING = {
    "pre-LN": "what attention adds to the residual stream",
    "output-norm": "what attention adds, after a norm on its output",
    "sandwich": "what attention adds, after a norm on its output",
    "post-LN": "the attention block's output after the residual add and LayerNorm",
}


def attn_out_mismatch(provenances) -> str | None:
    """``None`` if every model's ``hook_attn_out`` is the same kind of vector (from each provenance's
    ``norm_placement``); otherwise a sentence naming each model's placement and what its hook holds."""
    placements = {m: p.get("norm_placement", "unchecked") for m, p in provenances.items()}
    meanings = {m: _ATTN_OUT_MEANING.get(pl, "unchecked") for m, pl in placements.items()}
    if len(set(meanings.values())) <= 1:
        return None
    return "attention outputs differ in meaning: " + "; ".join(
        f"{m} ({placements[m]}): {meanings[m]}" for m in placements
    )


def norm_placement(hf_config, architecture: str) -> str:
    """``"pre-LN"``, ``"post-LN"``, ``"sandwich"``, ``"output-norm"`` (see the module docstring) for the
    families in :data:`FAMILIES`, from the config where it decides; ``"unchecked"`` otherwise."""
    if architecture not in FAMILIES:
        return "unchecked"
    if architecture in MASKED_ARCHITECTURES:
        return "post-LN"
    if architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return "sandwich"
    if architecture == "Olmo2ForCausalLM":
        return "output-norm"
    if architecture == "OPTForCausalLM" and not getattr(hf_config, "do_layer_norm_before", True):
        return "post-LN"  # OPT-350m
    if architecture == "BloomForCausalLM" and getattr(hf_config, "apply_residual_connection_post_layernorm", False):
        return "unchecked"  # the residual branch starts from the LayerNorm output: not in the matrix
    return "pre-LN"


def block_layout(hf_config, architecture: str) -> str:
    """``"parallel"`` (attention and MLP read the same input and are added together) or
    ``"sequential"`` for the families in :data:`FAMILIES`; ``"unchecked"`` otherwise."""
    if architecture not in FAMILIES:
        return "unchecked"
    parallel = {
        "GPTJForCausalLM": True,
        "PhiForCausalLM": True,
        "CohereForCausalLM": True,
        "GPTNeoXForCausalLM": getattr(hf_config, "use_parallel_residual", True),
        "StableLmForCausalLM": getattr(hf_config, "use_parallel_residual", False),
        "FalconForCausalLM": getattr(hf_config, "parallel_attn", True)
        or getattr(hf_config, "new_decoder_architecture", False),
    }.get(architecture, False)
    return "parallel" if parallel else "sequential"


def final_resid_is_normalized(hf_model) -> bool:
    """HF quirk, for cross-checks: GPT-2's last ``hidden_states`` entry already has ``ln_f`` applied;
    BERT/RoBERTa apply no final norm to the residual stream (their LayerNorm lives in the MLM head)."""
    return architecture_of(hf_model) not in MASKED_ARCHITECTURES


@torch.no_grad()
def parameter_count(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
