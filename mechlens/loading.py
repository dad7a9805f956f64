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
from mechlens.encoding import tokenizer_signature
from mechlens.errors import MechlensError, ModelNotAvailableError, NonFiniteError, UnsupportedArchitectureError
from mechlens.provenance import Provenance
from mechlens.tokenizer import TOKENIZER_FILES, check_tokenizer
from mechlens.zoo import EMBEDDED

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEIGHTS = ("raw", "processed")
_PROVENANCE_ATTR = "_mechlens_provenance"


def load_model(
    spec: str | os.PathLike | PreTrainedModel,
    *,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str = "raw",
    allow_readout_mismatch: bool = False,
    device_map: str | dict[str, Any] | None = None,
) -> TransformerBridge:
    """Load a causal or masked LM as a ``TransformerBridge`` (eval mode) with a working tokenizer.

    ``weights="raw"`` keeps the HF weights (norms and raw logits equal HF's); ``"processed"`` applies
    TransformerLens' compatibility processing (folded LayerNorm, centred writing weights and unembed:
    log-probs unchanged, norms and raw logits changed). An in-memory ``hf_model`` is adopted by the
    bridge and modified in place: pass a copy if you need the original.
    ``tokenizer``: the model's tokenizer (default: the one saved with it), or the name of one of mechlens'
    offline tokenizers, ``"gpt2-bpe"`` or ``"roberta-bpe"`` (:func:`mechlens.tokenizer.offline_tokenizer`), for
    a checkpoint trained with GPT-2's BPE that has none saved (``mechlens add-tokenizer`` saves it beside it).
    The model carries a :class:`~mechlens.provenance.Provenance` (see :func:`provenance_of`).
    A multimodal Gemma3 is analysed through its text model (:func:`mechlens.arch.text_model_of`).

    Load-time check (:func:`mechlens.validate.validate_readout`): one short probe forward; the lens
    readout of the last residual must equal the model's own log-probs, else
    :class:`~mechlens.errors.UnsupportedArchitectureError`, unless ``allow_readout_mismatch=True``
    (recorded in provenance). Causal LMs: the HF model's own greedy steps on the probe (before the bridge
    adopts it) against ``bridge.generate`` with and without TransformerLens' KV cache
    (:func:`mechlens.validate.check_generate`): generation keeps the cache only where it reproduces them
    (provenance ``generate_kv_cache``), and a model whose generation reproduces them neither way is refused.
    Whatever TransformerBridge refuses to adopt, or cannot process (``weights="processed"``), is one
    :class:`~mechlens.errors.UnsupportedArchitectureError`.

    ``device_map`` (a model larger than one device): passed to Hugging Face's ``from_pretrained``
    (accelerate places the blocks, e.g. ``"auto"``, ``"balanced"`` or a dict of module -> device) for a
    name or a directory; ``device`` is then ignored and the bridge computes where accelerate put each
    block (inputs go to the embedding's device). An in-memory model is dispatched by its owner.
    """
    if weights not in WEIGHTS:
        raise MechlensError(f"--weights {weights} (weights={weights!r}): expected one of {', '.join(WEIGHTS)}")
    device = check_device(device)
    if device_map is not None and not isinstance(spec, str | os.PathLike):
        raise MechlensError(
            "device_map applies when mechlens loads the weights (a name or a directory): dispatch an "
            "in-memory model yourself (from_pretrained(..., device_map=...)) and pass it"
        )
    label, hf_model, tokenizer = _resolve(spec, tokenizer, {"dtype": dtype, "device_map": device_map})
    check_finite_weights(label, hf_model)
    source_architecture = arch.architecture_of(hf_model)
    device_placement = getattr(hf_model, "hf_device_map", None)  # accelerate's, before any text-model extraction
    hf_model = arch.text_model_of(hf_model)
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
    dispatched = device_placement is not None or getattr(hf_model, "hf_device_map", None) is not None
    hf_model = (hf_model if dispatched else hf_model.to(device=device, dtype=dtype)).eval()
    from mechlens import validate

    # the model's own greedy steps, before the bridge adopts (and re-implements parts of) it
    n_ctx = _context_of(hf_model)
    if n_ctx is not None and n_ctx < 2:
        raise UnsupportedArchitectureError(f"{label!r} has a context of {n_ctx} token(s): mechlens needs at least 2")
    probe = _probe_ids(tokenizer, n_ctx)  # cut so that the probe and its greedy steps fit a short context
    steps = validate.GENERATE_PROBE_TOKENS if n_ctx is None else min(validate.GENERATE_PROBE_TOKENS, n_ctx - len(probe))
    greedy = validate.hf_greedy_steps(hf_model, probe, steps) if kind == "causal" else None
    bridge_tokenizer = arch.prepare_tokenizer_for_bridge(tokenizer)
    arch.read_kv_cache_keyword()  # transformers >= 5.24 passes the KV cache as cache=
    try:
        bridge = TransformerBridge.boot_transformers(
            label,
            hf_model=hf_model,
            tokenizer=bridge_tokenizer,
            device=None if dispatched else device,
            dtype=dtype,
        )
    except Exception as e:  # TransformerLens' adapter refuses this configuration (an assertion, a ValueError)
        raise UnsupportedArchitectureError(
            f"TransformerLens {arch.tl_version()}' TransformerBridge cannot adopt {label!r} ({architecture}): "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    if dispatched:
        device = str(bridge.cfg.device)
    if weights == "processed":
        if not getattr(bridge.adapter, "supports_compatibility_mode", True):
            raise UnsupportedArchitectureError(
                f"--weights processed (weights='processed'): TransformerLens {arch.tl_version()} cannot process "
                f"{architecture}'s weights (its adapter does not support compatibility mode): use --weights raw"
            )
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    check = validate.validate_readout(bridge, allow_mismatch=allow_readout_mismatch)
    generate = None if greedy is None else validate.check_generate(bridge, greedy)
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
        tokenizer=tokenizer_signature(bridge.tokenizer),
        source_architecture=None if source_architecture == architecture else source_architecture,
        norm_placement=arch.norm_placement(hf_model.config, architecture),
        block_layout=arch.block_layout(hf_model.config, architecture),
        family_checked=architecture in arch.FAMILIES,
        readout=check.readout,
        readout_max_logprob_diff=check.max_logprob_diff,
        readout_tolerance=check.tolerance,
        readout_mismatch_allowed=allow_readout_mismatch,
        generate_kv_cache=None if generate is None else generate.kv_cache,
        generate_check=None if generate is None else generate.detail,
    )
    object.__setattr__(bridge, _PROVENANCE_ATTR, prov)
    return bridge


GPU_INSTALL = (
    "install a CUDA build of torch first (README, 'GPU users': pip install torch --index-url "
    "https://download.pytorch.org/whl/cu126) or use --device cpu"
)


def check_device(device: str | torch.device) -> str:
    """A torch device this machine has, as a string; a clear error (naming ``--device``) otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MechlensError(f"--device {device}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no usable CUDA GPU"
            raise MechlensError(f"--device {device}: this torch ({torch.__version__}) has {build}: {GPU_INSTALL}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MechlensError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MechlensError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise MechlensError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda or mps")
    return str(dev)


def check_finite_weights(label: str, hf_model: torch.nn.Module) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such parameter."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise NonFiniteError(
                    f"model {label!r} has NaN or infinite weights in {name}: the checkpoint is broken; "
                    "re-save or re-download it"
                )


def provenance_of(model: TransformerBridge) -> Provenance:
    """The provenance record of a model loaded by :func:`load_model`."""
    try:
        return getattr(model, _PROVENANCE_ATTR)
    except AttributeError:
        raise MechlensError(
            "this model was not loaded with mechlens.load_model: load it with load_model(...)"
        ) from None


def _resolve(spec: Any, tokenizer, load_kw: dict) -> tuple[str, PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a spec, read without transformers' own progress bars (mechlens shows
    one bar per long step; reading a checkpoint is not one)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        kw = {k: v for k, v in load_kw.items() if v is not None}
        return _resolve_spec(spec, tokenizer, kw)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _resolve_spec(spec: Any, tokenizer, kw: dict) -> tuple[str, PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import PreTrainedModel

    if isinstance(tokenizer, str):  # one of mechlens' offline tokenizers by name: "gpt2-bpe", "roberta-bpe"
        from mechlens.tokenizer import offline_tokenizer

        tokenizer = offline_tokenizer(tokenizer)
    if isinstance(spec, PreTrainedModel):
        if tokenizer is None:
            raise MechlensError("an in-memory model needs its tokenizer: load_model(hf_model, tokenizer=tok)")
        label = getattr(spec.config, "name_or_path", "") or type(spec).__name__
        return label, spec, tokenizer
    if not isinstance(spec, str | os.PathLike):
        raise MechlensError(f"model spec must be a name, a directory or a PreTrainedModel, not {type(spec).__name__}")
    name = os.fspath(spec)
    if name in EMBEDDED:
        return name, *_load_embedded(name, tokenizer, kw)
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        return name, *_load_dir(path, tokenizer, kw)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotAvailableError(f"{name!r} is not a model directory: pass a directory saved with save_pretrained")
    return name, *_load_hub(name, tokenizer, kw)


def _probe_ids(tokenizer, n_ctx: int | None = None) -> list[int]:
    """The load probe's token ids (the tokenizer's own special tokens, as for any string), cut to leave
    room for the generate check's greedy steps in a context of ``n_ctx`` positions (at least one token)."""
    from mechlens.validate import GENERATE_PROBE_TOKENS, PROBE_TEXT

    ids = list(tokenizer(PROBE_TEXT)["input_ids"])
    return ids if n_ctx is None else ids[: max(1, n_ctx - GENERATE_PROBE_TOKENS)]


def _context_of(hf_model) -> int | None:
    """The model's context length from its config (``n_positions``, ``max_position_embeddings``...), or None."""
    config = hf_model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


_HEADS = (*arch.CAUSAL_SUFFIXES, "ForMaskedLM")


def _class_name(architecture: str, model_type: str | None) -> str:
    """transformers' class for a config's ``architectures[0]``: the name itself; the class whose name
    differs only in case (a hub remote-code name such as ``MPTForCausalLM`` for ``MptForCausalLM``);
    else the auto-mapping's class for the config's ``model_type`` with the same kind of head."""
    import transformers
    from transformers.models.auto import modeling_auto

    if hasattr(transformers, architecture):
        return architecture
    folded = {n.lower(): n for n in dir(transformers) if n.endswith(_HEADS)}
    if architecture.lower() in folded:
        return folded[architecture.lower()]
    mapping = (
        modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        if architecture.endswith("ForMaskedLM")
        else modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    mapped = mapping.get(model_type or "")
    if mapped and hasattr(transformers, mapped):
        return mapped
    raise UnsupportedArchitectureError(
        f"the config names the class {architecture!r} (model_type {model_type!r}), which transformers "
        f"{transformers.__version__} does not have (hub remote code is not run): save the model with a "
        "transformers class (e.g. load it with trust_remote_code, then save_pretrained a transformers model)"
    )


def _model_class(architecture: str, model_type: str | None = None):
    import transformers

    name = _class_name(architecture, model_type)
    arch.model_kind(name)  # raises for unsupported architectures, before any weights are read
    return getattr(transformers, name)


def _load_embedded(name: str, tokenizer, load_kw: dict):
    from mechlens import tokenizer as toks

    m = EMBEDDED[name]
    if not (m.path / "model.safetensors").exists():
        raise ModelNotAvailableError(f"embedded model {name!r} has no weights at {m.path}: reinstall mechlens")
    cls = _model_class("GPT2LMHeadModel" if m.kind == "causal" else "RobertaForMaskedLM")
    hf_model = cls.from_pretrained(m.path, **load_kw)
    tok = tokenizer or (toks.gpt2_tokenizer() if m.tokenizer == "gpt2" else toks.mlm_tokenizer())
    return hf_model, tok


def _load_dir(path: pathlib.Path, tokenizer, load_kw: dict):
    import json

    from transformers import AutoTokenizer

    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelNotAvailableError(f"{path} has no config.json: save the model there with model.save_pretrained(dir)")
    try:
        config = json.loads(cfg_file.read_text())
        archs = config.get("architectures") or ["?"]
    except (OSError, ValueError, AttributeError) as e:
        raise ModelNotAvailableError(
            f"{cfg_file} cannot be read as a model config ({e}): save the model again"
        ) from None
    cls = _model_class(archs[0], config.get("model_type"))
    if tokenizer is None:
        if not any((path / f).exists() for f in TOKENIZER_FILES):
            raise ModelNotAvailableError(
                f"{path} holds a model but no tokenizer: save it there with tokenizer.save_pretrained(dir), or, "
                f"for GPT-2's BPE, 'mechlens add-tokenizer gpt2-bpe {path}' (roberta-bpe for a RoBERTa-style "
                "masked LM; in Python: load_model(dir, tokenizer='gpt2-bpe' or a tokenizer)"
            )
        tokenizer = _read(path, lambda: AutoTokenizer.from_pretrained(path), "its tokenizer files")
    return _read(path, lambda: cls.from_pretrained(path, **load_kw), "its weights"), tokenizer


def _read(path: pathlib.Path, load, what: str):
    """``load()``, turning unreadable or corrupt files under ``path`` into a one-line error."""
    from safetensors import SafetensorError

    try:
        return load()
    except PermissionError as e:
        raise ModelNotAvailableError(f"{path}: cannot read {e.filename or what} (permission denied)") from None
    except (SafetensorError, OSError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotAvailableError(
            f"{path}: {what} are corrupt or truncated ({first[:160]}): save the model again with save_pretrained"
        ) from None


def _load_hub(name: str, tokenizer, load_kw: dict):
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
    config = AutoConfig.from_pretrained(name, **kw)
    cls = _model_class((config.architectures or ["?"])[0], config.model_type)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    return cls.from_pretrained(name, **load_kw, **kw), tokenizer
