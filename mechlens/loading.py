"""``load_model``: one function from a model spec to a TransformerBridge in eval mode.

Specs: an embedded model name (``"tiny-gpt2"``, ``"tiny-mlm"``), a local directory saved with
``save_pretrained`` (model + tokenizer), a Hugging Face hub name (``"gpt2"``, ``"roberta-large"``),
or an in-memory ``PreTrainedModel`` plus ``tokenizer=``. Weight processing, tokenizer fixes and
provenance are decided here; architecture quirks live in :mod:`mechlens.arch`.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch

from mechlens import arch, hub
from mechlens.errors import MechlensError, ModelNotAvailableError
from mechlens.provenance import Provenance
from mechlens.tokenizer import check_tokenizer
from mechlens.zoo import EMBEDDED

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEIGHTS = ("raw", "processed")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
_PROVENANCE_ATTR = "_mechlens_provenance"


def load_model(
    spec: str | os.PathLike | PreTrainedModel,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str = "raw",
) -> TransformerBridge:
    """Load a causal or masked LM as a ``TransformerBridge`` (eval mode) with a working tokenizer.

    ``weights="raw"`` keeps the HF weights (norms and raw logits equal HF's); ``"processed"`` applies
    TransformerLens' compatibility processing (folded LayerNorm, centred writing weights and unembed:
    log-probs unchanged, norms and raw logits changed). An in-memory ``hf_model`` is adopted by the
    bridge and modified in place: pass a copy if you need the original.
    The model carries a :class:`~mechlens.provenance.Provenance` (see :func:`provenance_of`).
    """
    if weights not in WEIGHTS:
        raise MechlensError(f"weights={weights!r}: expected one of {WEIGHTS}")
    label, hf_model, tokenizer = _resolve(spec, tokenizer, dtype)
    arch.normalize_config(hf_model)
    architecture = arch.architecture_of(hf_model)
    kind = arch.model_kind(architecture)
    check_tokenizer(tokenizer)
    vocab = hf_model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise MechlensError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(tokenizer)} tokens but {label!r} has {vocab} output "
            "rows: pass the tokenizer the model was trained with"
        )
    from transformer_lens import TransformerBridge

    n_params = arch.parameter_count(hf_model)  # before the bridge adopts (and restructures) the model
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bridge = TransformerBridge.boot_transformers(
        label, hf_model=hf_model, tokenizer=arch.prepare_tokenizer_for_bridge(tokenizer), device=device, dtype=dtype
    )
    if weights == "processed":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    prov = Provenance(
        model=label,
        architecture=architecture,
        kind=kind,
        n_params=n_params,
        n_layers=bridge.cfg.n_layers,
        d_model=bridge.cfg.d_model,
        d_vocab=bridge.cfg.d_vocab,
        weights=weights,
        bos="model-default",
        padding_side=bridge.tokenizer.padding_side,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
    )
    object.__setattr__(bridge, _PROVENANCE_ATTR, prov)
    return bridge


def provenance_of(model: TransformerBridge) -> Provenance:
    """The provenance record of a model loaded by :func:`load_model`."""
    try:
        return getattr(model, _PROVENANCE_ATTR)
    except AttributeError:
        raise MechlensError(
            "this model was not loaded with mechlens.load_model: load it with load_model(...)"
        ) from None


def _resolve(spec: Any, tokenizer, dtype) -> tuple[str, PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import PreTrainedModel

    if isinstance(spec, PreTrainedModel):
        if tokenizer is None:
            raise MechlensError("an in-memory model needs its tokenizer: load_model(hf_model, tokenizer=tok)")
        label = getattr(spec.config, "name_or_path", "") or type(spec).__name__
        return label, spec, tokenizer
    if not isinstance(spec, str | os.PathLike):
        raise MechlensError(f"model spec must be a name, a directory or a PreTrainedModel, not {type(spec).__name__}")
    name = os.fspath(spec)
    if name in EMBEDDED:
        return name, *_load_embedded(name, tokenizer, dtype)
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        return name, *_load_dir(path, tokenizer, dtype)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"{name!r} is not a model directory: pass a directory saved with save_pretrained")
    return name, *_load_hub(name, tokenizer, dtype)


def _model_class(architecture: str):
    import transformers

    arch.model_kind(architecture)  # raises for unsupported architectures, before any weights are read
    return getattr(transformers, architecture)


def _load_embedded(name: str, tokenizer, dtype):
    from mechlens import tokenizer as toks

    m = EMBEDDED[name]
    if not (m.path / "model.safetensors").exists():
        raise ModelNotAvailableError(f"embedded model {name!r} has no weights at {m.path}: reinstall mechlens")
    cls = _model_class("GPT2LMHeadModel" if m.kind == "causal" else "RobertaForMaskedLM")
    hf_model = cls.from_pretrained(m.path, dtype=dtype)
    tok = tokenizer or (toks.gpt2_tokenizer() if m.tokenizer == "gpt2" else toks.mlm_tokenizer())
    return hf_model, tok


def _load_dir(path: pathlib.Path, tokenizer, dtype):
    import json

    from transformers import AutoTokenizer

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelNotAvailableError(f"{path} has no config.json: save the model there with model.save_pretrained(dir)")
    archs = json.loads(cfg_file.read_text()).get("architectures") or ["?"]
    cls = _model_class(archs[0])
    if tokenizer is None:
        if not any((path / f).exists() for f in _TOKENIZER_FILES):
            raise ModelNotAvailableError(
                f"{path} holds a model but no tokenizer: save it there with tokenizer.save_pretrained(dir), "
                "or pass load_model(dir, tokenizer=tok)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
    return cls.from_pretrained(path, dtype=dtype), tokenizer


def _load_hub(name: str, tokenizer, dtype):
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig, AutoTokenizer

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    online = hub.reachable()
    if not cached and not online:
        raise ModelNotAvailableError(
            f"model {name!r} is not in the local Hugging Face cache and the hub is unreachable (offline). "
            f"Use an embedded model ({', '.join(EMBEDDED)}), a local directory saved with save_pretrained, "
            "or an in-memory model: load_model(hf_model, tokenizer=tok)."
        )
    kw = {} if online else {"local_files_only": True}
    archs = AutoConfig.from_pretrained(name, **kw).architectures or ["?"]
    cls = _model_class(archs[0])
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    return cls.from_pretrained(name, dtype=dtype, **kw), tokenizer
