"""Architecture quirks, quarantined: every place where causal and masked LMs (or GPT-2, BERT and
RoBERTa) differ is decided here and nowhere else.

* which architectures are supported, and whether a model is ``causal`` or ``masked``;
* the readout (logit-lens) function: final LayerNorm + unembed for causal LMs; the full MLM head
  (dense -> activation -> LayerNorm -> decoder) for masked LMs;
* the residual-stream readout points (after the embeddings and after every block);
* special tokens: BOS for causal LMs, ``<s> ... </s>`` / ``[CLS] ... [SEP]`` and the mask token for
  masked LMs;
* how a tokenizer must be prepared so the bridge does not try to reload it from the hub.

Known hook semantics (checked in tests/test_hf_crosscheck.py):

* GPT-2 (pre-LN): ``hook_attn_out`` is what attention adds to the residual stream (the HF attention
  module's first output), ``resid_mid = resid_pre + attn_out``, ``resid_post = resid_mid + mlp_out``.
* BERT / RoBERTa (post-LN): ``hook_attn_out`` is the HF ``*Attention`` module's output, i.e. *after*
  its residual add and LayerNorm; ``hook_mlp_out`` is ``output.dense`` (before residual and LayerNorm);
  ``hook_resid_pre``/``hook_resid_post`` equal HF ``hidden_states``. The additive decomposition of the
  residual stream does not hold for post-LN models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechlens.errors import UnsupportedArchitectureError
from mechlens.ops.lens_reduce import LinearReadout

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge
    from transformers import PreTrainedTokenizerBase

MASKED_ARCHITECTURES = frozenset({"BertForMaskedLM", "RobertaForMaskedLM"})
TESTED_CAUSAL = frozenset({"GPT2LMHeadModel"})  # cross-checked against HF in the test suite
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def model_kind(architecture: str) -> str:
    """``"causal"`` or ``"masked"``; raises for anything mechlens cannot analyse."""
    if architecture in MASKED_ARCHITECTURES:
        return "masked"
    if architecture.endswith(CAUSAL_SUFFIXES) and architecture != "BertLMHeadModel":
        from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

        if architecture in SUPPORTED_ARCHITECTURES:
            return "causal"
    raise UnsupportedArchitectureError(
        f"architecture {architecture!r} is not supported by mechlens. Supported: causal LMs that "
        f"TransformerLens' TransformerBridge supports (tested: {', '.join(sorted(TESTED_CAUSAL))}; also "
        f"Pythia/GPT-NeoX, Llama, ...) and masked LMs {', '.join(sorted(MASKED_ARCHITECTURES))}. Load the "
        "model's *ForCausalLM / *ForMaskedLM class (not the bare encoder or a classification head)."
    )


def architecture_of(hf_model) -> str:
    return type(hf_model).__name__


def normalize_config(hf_model) -> None:
    """A freshly constructed HF model has ``config.architectures = None``; the bridge picks its adapter
    from that field, so fill it in from the model's class."""
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [architecture_of(hf_model)]


def kind_of(model: TransformerBridge) -> str:
    return model_kind(model.cfg.architecture)


def prepare_tokenizer_for_bridge(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """TransformerBridge reloads any tokenizer whose init kwargs lack ``add_bos_token`` *by name* from
    the hub (fails offline, or loads a different tokenizer for an in-memory one). mechlens adds BOS
    itself (see :mod:`mechlens.tokens`), so mark a copy as BOS-adding and give it a name."""
    if tokenizer.init_kwargs.get("add_bos_token") is not None and tokenizer.init_kwargs.get("name_or_path"):
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.init_kwargs["add_bos_token"] = True
    tok.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path or "in-memory-tokenizer")
    return tok


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


def _mlm_activation(model: TransformerBridge) -> Callable[[Tensor], Tensor]:
    from transformers.activations import ACT2FN

    if model.cfg.architecture == "RobertaForMaskedLM":
        return ACT2FN["gelu"]  # RobertaLMHead hard-codes gelu whatever config.hidden_act says
    hf_cfg = getattr(model, "original_model", None)
    act = getattr(getattr(hf_cfg, "config", None), "hidden_act", None) or getattr(model.cfg, "act_fn", "gelu")
    return ACT2FN[act]


def readout(model: TransformerBridge) -> LinearReadout:
    """The function from a residual-stream vector to vocabulary logits, as ``pre(x) @ W_U + b_U``.

    Causal: ``pre`` is the model's final LayerNorm (statistics recomputed on the given vector).
    Masked: ``pre`` is the MLM head's dense -> activation -> LayerNorm, and ``W_U``/``b_U`` its decoder.
    Built from the bridge's own components and weights, so it follows ``weights="processed"`` (folded
    LayerNorm, centred unembed) too. The readout of the last point equals the model's logits (tested),
    and ``x @ model.W_U + model.b_U`` equals ``model.unembed(x)`` exactly (tested), which lets
    :func:`mechlens.ops.lens_reduce` tile the decoder over the vocabulary.
    """
    ln = model.ln_final
    if kind_of(model) == "masked":
        dense, act = model.mlm_head, _mlm_activation(model)

        def masked(x: Tensor) -> Tensor:
            return ln(act(dense(x)))

        pre = masked
    else:
        pre = ln
    return LinearReadout(pre=pre, weight=model.W_U, bias=model.b_U)


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
