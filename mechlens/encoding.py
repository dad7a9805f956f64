"""Tokens and masks: the one module that owns BOS policy, padding side, attention masks, the mask of
valid positions and target-token lookup.

Conventions
-----------
* Text is tokenised without the tokenizer's own special tokens; mechlens adds them explicitly:
  causal LMs get BOS prepended iff ``bos=True``; masked LMs always get ``<s> ... </s>``
  (``[CLS] ... [SEP]``), which they need.
* A token's **position** is its index in the unpadded model input (BOS, when present, is 0). It is
  the model's position id, and it is what every "by position" statistic is keyed on, so left- and
  right-padded batches give identical statistics.
* ``text_mask`` marks text tokens (not padding, not special tokens); ``valid_mask`` is that, with
  position 0 optionally excluded (attention sink / massive activations live there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechlens import arch
from mechlens.errors import DataError, MechlensError, TokenError

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge

PADDING_SIDES = ("right", "left")

# study inputs: texts, or token ids exactly as another tool fed them (text tokens only: mechlens adds
# the special tokens, as for a string)
Texts = Sequence[str] | Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    text_mask: Bool[Tensor, "batch pos"]
    bos: bool
    padding_side: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def positions(self) -> Int[Tensor, "batch pos"]:
        """Position of each token in its unpadded sequence (the model's position id); -1 on padding."""
        pos = self.attention_mask.cumsum(-1) - 1
        return torch.where(self.attention_mask.bool(), pos, torch.full_like(pos, -1))

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of non-padding tokens per sequence (special tokens included)."""
        return self.attention_mask.sum(-1)

    @property
    def max_position(self) -> int:
        return int(self.lengths.max()) - 1

    def valid_mask(self, exclude_first: bool = False) -> Bool[Tensor, "batch pos"]:
        """Text tokens, optionally without position 0."""
        m = self.text_mask
        return m & (self.positions != 0) if exclude_first else m

    def select(self, rows: slice | Tensor) -> TokenBatch:
        return dataclasses.replace(
            self, tokens=self.tokens[rows], attention_mask=self.attention_mask[rows], text_mask=self.text_mask[rows]
        )

    def to(self, device: str | torch.device) -> TokenBatch:
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device),
            attention_mask=self.attention_mask.to(device),
            text_mask=self.text_mask.to(device),
        )

    def bos_policy(self) -> str:
        return "prepend" if self.bos else "none"

    @classmethod
    def cat(cls, batches: Sequence[TokenBatch], pad_id: int = 0) -> TokenBatch:
        """Rows of several batches as one batch (same BOS policy and padding side), padded on that side
        to the widest with ``pad_id`` (padding is masked out, so its id only has to be in the
        vocabulary: pass ``mechlens.arch.pad_id(model)``)."""
        if not batches:
            raise MechlensError("TokenBatch.cat needs at least one batch")
        first = batches[0]
        if any(b.bos != first.bos or b.padding_side != first.padding_side for b in batches):
            raise MechlensError("TokenBatch.cat: batches differ in BOS policy or padding side")
        width = max(b.tokens.shape[1] for b in batches)

        def widen(x: Tensor, fill: int | bool) -> Tensor:
            extra = width - x.shape[1]
            pad = torch.full((x.shape[0], extra), fill, dtype=x.dtype, device=x.device)
            return torch.cat([x, pad] if first.padding_side == "right" else [pad, x], dim=1)

        return cls(
            tokens=torch.cat([widen(b.tokens, pad_id) for b in batches]),
            attention_mask=torch.cat([widen(b.attention_mask, 0) for b in batches]),
            text_mask=torch.cat([widen(b.text_mask, False) for b in batches]),
            bos=first.bos,
            padding_side=first.padding_side,
        )

    def mask_each(self, mask_id: int) -> tuple[TokenBatch, Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
        """One variant per text token of every sequence, with that token replaced by ``mask_id`` (the
        sliding mask of masked-LM studies). Returns the variants (in reading order, sequence by
        sequence), and for each variant its source row, its masked column and the original token."""
        rows, cols = torch.nonzero(self.text_mask, as_tuple=True)
        variants = self.select(rows)
        tokens = variants.tokens.clone()
        n = torch.arange(len(rows))
        originals = tokens[n, cols].clone()
        tokens[n, cols] = mask_id
        return dataclasses.replace(variants, tokens=tokens), rows, cols, originals


def encode(
    model: TransformerBridge,
    texts: Sequence[str] | Sequence[Sequence[int]],
    *,
    bos: bool,
    padding_side: str = "right",
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    fix: str | None = None,
    specials_included: bool = False,
) -> TokenBatch:
    """Tokenise ``texts`` (strings, or lists of token ids) into a padded :class:`TokenBatch`.

    ``max_tokens`` keeps the first ``max_tokens`` text tokens of each text; ``min_tokens`` refuses
    texts with fewer text tokens (naming them). ``bos`` is the BOS policy for causal LMs; masked LMs
    always get their ``<s> ... </s>`` and need ``bos=True``. ``fix``: what the error for a sequence
    longer than the model's context tells the user to do (e.g. "lower --max-tokens").

    ``specials_included=True``: ``texts`` are token ids that already carry their special tokens (e.g.
    contexts cut from an encoded text, or another tool's exact inputs); they are padded as given, and
    ``text_mask`` marks every token that is not one of the model's special tokens (BOS/EOS/``<s>``...).
    ``bos`` then records whether the sequences start with BOS; ``max_tokens``/``min_tokens`` count all
    tokens.
    """
    if padding_side not in PADDING_SIDES:
        raise MechlensError(f"padding_side={padding_side!r}: expected 'right' or 'left'")
    if len(texts) == 0:
        raise DataError("no texts to encode: pass at least one text")
    kind = arch.kind_of(model)
    if kind == "masked" and not bos and not specials_included:
        raise MechlensError("masked LMs need their special tokens (<s> ... </s>): use --bos (bos=True in Python)")
    if isinstance(texts[0], str):
        if specials_included:
            raise MechlensError("specials_included=True takes token ids, not strings")
        ids = model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    else:
        ids = [list(map(int, t)) for t in texts]
        bad = [i for t in ids for i in t if not 0 <= i < model.cfg.d_vocab]
        if bad:
            raise TokenError(f"token id {bad[0]} is outside the vocabulary (0..{model.cfg.d_vocab - 1})")
    if max_tokens is not None:
        ids = [t[:max_tokens] for t in ids]
    if min_tokens is not None:
        short = [i for i, t in enumerate(ids) if len(t) < min_tokens]
        if short:
            raise DataError(
                f"{len(short)} of {len(ids)} texts have fewer than {min_tokens} tokens (first: #{short[0]} "
                f"{texts[short[0]]!r}): {fix or 'drop them or lower the length'}"
            )
    if any(len(t) == 0 for t in ids):
        raise DataError("an empty text cannot be encoded: drop empty texts")
    if specials_included:
        special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
        seqs = ids
        is_text = [[i not in special for i in t] for t in ids]
    else:
        head = [arch.bos_id(model)] if bos else []
        tail = [arch.eos_id(model)] if kind == "masked" else []
        seqs = [head + t + tail for t in ids]
        is_text = [[False] * len(head) + [True] * len(t) + [False] * len(tail) for t in ids]
    width = max(map(len, seqs))
    if width > model.cfg.n_ctx:
        raise DataError(
            f"a sequence of {width} tokens (special tokens included) exceeds the model's context of "
            f"{model.cfg.n_ctx}: {fix or 'pass shorter texts (max_tokens=... in Python)'}"
        )
    pad = arch.pad_id(model)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    text = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, is_text, strict=True)):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        tokens[i, cols] = torch.tensor(s)
        attn[i, cols] = 1
        text[i, cols] = torch.tensor(m)
    return TokenBatch(tokens=tokens, attention_mask=attn, text_mask=text, bos=bos, padding_side=padding_side)


_PROBE = "The coffee is hot, said Ana. Cafés open at 7:30; naïve tourists order 2 lattes!"


def tokenizer_signature(tokenizer) -> str:
    """A short fingerprint of how a tokenizer encodes text: its size and a hash of the ids of a probe
    sentence. Two models with equal signatures see the same token ids for the same text (so token
    positions align); otherwise comparisons align on words (:func:`word_index`)."""
    import hashlib

    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    return f"{len(tokenizer)}:{hashlib.sha1(str(ids).encode()).hexdigest()[:12]}"


def single_token_id(model: TransformerBridge, token: str | int, *, flag: str = "--target") -> int:
    """The id of a string that is exactly one token (e.g. ``" coffee"``); a clear error otherwise."""
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise TokenError(f"{flag} {token}: token id outside the vocabulary (0..{model.cfg.d_vocab - 1})")
        return token
    ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        hint = " (GPT-2-style tokenizers fold the leading space into the word: try ' " + token.strip() + "')"
        raise TokenError(
            f"{flag} {token!r} is {len(ids)} tokens {pieces}, not one: pass a string that is a single token"
            + (hint if not token.startswith(" ") else "")
        )
    return int(ids[0])


def target_positions(batch: TokenBatch, token_id: int) -> Int[Tensor, "n 2"]:
    """(row, column) of every text occurrence of ``token_id``, in reading order."""
    return torch.nonzero((batch.tokens == token_id) & batch.text_mask)


def word_index(model: TransformerBridge, texts: Sequence[str], batch: TokenBatch) -> Int[Tensor, "batch pos"]:
    """For each token of ``batch`` (encoded from the strings ``texts``), the index of the whitespace
    word it begins, or -1 (a token inside a word, a special token, padding).

    This is the text-aligned position axis of cross-model comparisons when tokenizers differ: word
    ``w`` is the ``w``-th run of non-whitespace characters of the text (``str.split()``), and the token
    that begins it is the one whose character span (the tokenizer's offset mapping, leading
    whitespace skipped) starts where the word starts. Needs a fast tokenizer (offset mappings)."""
    if len(texts) != len(batch):
        raise MechlensError(f"word_index: {len(texts)} texts for a batch of {len(batch)} sequences")
    out = torch.full(batch.tokens.shape, -1, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise MechlensError("word_index needs the texts as strings (token ids carry no character offsets)")
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts, pos, in_word = {}, 0, False
        for i, ch in enumerate(text):
            if not ch.isspace() and not in_word:
                starts[i], pos = pos, pos + 1
            in_word = not ch.isspace()
        cols = torch.nonzero(batch.text_mask[row]).squeeze(-1).tolist()
        for col, tok_id, (a, b) in zip(cols, enc["input_ids"], enc["offset_mapping"], strict=False):
            if int(batch.tokens[row, col]) != tok_id:
                raise MechlensError(f"word_index: text {row} does not encode to the batch's tokens")
            while a < b and text[a].isspace():
                a += 1
            if a < b and a in starts:  # a token of whitespace only begins no word
                out[row, col] = starts[a]
                del starts[a]  # a word is begun by its first token only
    return out
