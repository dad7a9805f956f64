"""Write an embedded model out as a plain Hugging Face checkpoint: ``mechlens export NAME DIR``.

The directory holds what ``save_pretrained`` writes for the model (``config.json``,
``model.safetensors``, for tiny-gpt2 ``generation_config.json``) and for its tokenizer
(``tokenizer.json``, ``tokenizer_config.json``), the model card as ``README.md`` (the Hugging Face
convention) with ``card.json`` (its metrics), and mechlens' output marker, so it loads with
``AutoModelForCausalLM`` / ``AutoModelForMaskedLM`` and ``AutoTokenizer`` without mechlens, and with
``mechlens.load_model(DIR)``.

* **Weights are fp32.** The package stores fp16 (storage only); mechlens computes in fp32 by
  default. The upcast is exact (every fp16 value is an fp32 value), so the exported model is the
  model mechlens analyses, bit for bit, and a plain ``from_pretrained(DIR)`` computes in fp32
  without any ``dtype=`` argument. The price is twice the file size (about 31 MB per model).
* **The GPT-2 tokenizer adds nothing** (like the hub's ``gpt2``): ``tok(" coffee")`` is
  ``[6891]``; prepend ``<|endoftext|>`` (50256) yourself where you want a BOS. mechlens' in-memory
  tokenizer is marked BOS-adding for TransformerBridge (see :func:`mechlens.tokenizer.gpt2_tokenizer`);
  saving that one would make every ``AutoTokenizer`` call silently prepend 50256.
* **The masked-LM tokenizer is RoBERTa's standard**: ``tok(text)`` is ``<s> ... </s>`` (ids 0 and 2),
  ``add_special_tokens=False`` gives the bare ids, and ``" <mask>"`` is one token (50261).
* ``model_max_length`` is the model's context: 1024 positions for ``tiny-gpt2``, 512 tokens for
  ``tiny-mlm`` (514 position rows, RoBERTa's offset of 2).

``DIR`` follows mechlens' output rules (:mod:`mechlens.outputs`): a new directory, or an earlier
export or run that mechlens wrote, which is replaced; anything else is refused before any work.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib

from mechlens.errors import MechlensError, ModelNotAvailableError
from mechlens.zoo import EMBEDDED, EmbeddedModel

_PIPELINE = {"causal": "text-generation", "masked": "fill-mask"}


def export_model(name: str, out: str | os.PathLike) -> pathlib.Path:
    """Write embedded model ``name`` (``tiny-gpt2`` or ``tiny-mlm``) into the directory ``out`` as a
    plain ``save_pretrained`` checkpoint with its tokenizer and model card (see the module docstring).

    Returns the directory. Raises :class:`~mechlens.errors.MechlensError` for an unknown name and
    :class:`~mechlens.errors.OutputError` for a destination mechlens may not write (nothing is
    written then).
    """
    if name not in EMBEDDED:
        raise MechlensError(
            f"unknown embedded model {name!r}: mechlens export writes one of {', '.join(EMBEDDED)} (other models "
            "are already Hugging Face checkpoints: save them with model.save_pretrained(dir) and "
            "tokenizer.save_pretrained(dir))"
        )
    m = EMBEDDED[name]
    if not (m.path / "model.safetensors").exists():
        raise ModelNotAvailableError(f"embedded model {name!r} has no weights at {m.path}: reinstall mechlens")
    from mechlens.outputs import prepare_output

    dest = prepare_output(out, what="export directory")
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # reading and writing 30 MB is not a long step: no bars
    try:
        with dest.writing() as tmp:
            _write(m, tmp)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return dest.out


def export_tokenizer(name: str):
    """The tokenizer :func:`export_model` saves for embedded model ``name`` (see the module docstring)."""
    from transformers import AutoConfig

    from mechlens import tokenizer as toks

    m = EMBEDDED[name]
    config = AutoConfig.from_pretrained(m.path)
    if m.tokenizer == "gpt2":
        tok = toks.gpt2_tokenizer(add_bos_token=False)
        tok.model_max_length = config.n_positions
    else:
        tok = toks.mlm_tokenizer()
        tok.model_max_length = config.max_position_embeddings - 2  # RoBERTa's positions start at pad_id + 1
    return tok


def _write(m: EmbeddedModel, tmp: pathlib.Path) -> None:
    import torch
    import transformers

    cls = getattr(transformers, m.architecture)
    model = cls.from_pretrained(m.path, dtype=torch.float32)
    model.save_pretrained(tmp)
    export_tokenizer(m.name).save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(m), encoding="utf-8")
    card = m.path / "card.json"
    if card.exists():
        (tmp / "card.json").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")
    # transformers writes model.safetensors owner-only (0600); give every file the mode the umask gives
    # an ordinary new file, as README.md got, so the export can be shared like any other directory
    mode = (tmp / "README.md").stat().st_mode & 0o777
    for f in tmp.iterdir():
        f.chmod(mode)


def model_card(m: EmbeddedModel) -> str:
    """``README.md`` of an export: how to load it, then the model card shipped beside the weights."""
    auto = "AutoModelForCausalLM" if m.kind == "causal" else "AutoModelForMaskedLM"
    if m.kind == "causal":
        example = (
            'tok(" coffee")["input_ids"]  # [6891]: nothing is prepended; add <|endoftext|> (50256) yourself for a BOS'
        )
    else:
        example = 'tok(" my <mask>.")["input_ids"]  # [0, 620, 50261, 17, 2]: <s> ... </s> as in RoBERTa'
    shipped = (m.path / "MODEL_CARD.md").read_text(encoding="utf-8").splitlines()
    if shipped and shipped[0].startswith("# "):
        shipped = shipped[1:]
    meta = {"library_name": "transformers", "pipeline_tag": _PIPELINE[m.kind], "tags": ["mechlens"]}
    lines = [
        "---",
        *(f"{k}: {json.dumps(v)}" for k, v in meta.items()),
        "---",
        f"# {m.name}",
        "",
        f"Written by `mechlens export {m.name} DIR` (mechlens {_version()}): a plain `save_pretrained` "
        f"{m.architecture} with its tokenizer. Weights are fp32, the shipped fp16 values upcast exactly, so this "
        "is the model mechlens analyses, bit for bit.",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("DIR")',
        'tok = AutoTokenizer.from_pretrained("DIR")',
        example,
        "```",
        "",
        "mechlens encodes text with `add_special_tokens=False` and adds special tokens itself, so "
        '`tok(text, add_special_tokens=False)` gives exactly its ids; `mechlens.load_model("DIR")` loads this '
        "directory too.",
        *shipped,
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _version() -> str:
    try:
        return importlib.metadata.version("mechlens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "(source tree)"
