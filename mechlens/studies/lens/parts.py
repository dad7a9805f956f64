"""The lens study's parts: its options, the readout of one text (masked: parts 1-5; causal), the
laminar sqrt(layer) fit, the corpus lens run, and the typed results they compose into
(:mod:`mechlens.studies.lens`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from mechlens import arch
from mechlens.encoding import TokenBatch, encode
from mechlens.errors import MechlensError
from mechlens.lens import tuned as tuned_lens
from mechlens.lens.corpus import CorpusLens, corpus_lens
from mechlens.lens.readings import (
    TunedComparison,
    card_summary,
    compare_lenses,
    lens_stats,
)
from mechlens.lens.tuned import TunedLens
from mechlens.loading import provenance_of
from mechlens.ops import LensStats
from mechlens.options import MASKED_SPECIALS, Options, check_layer, fail, option
from mechlens.result import not_in_metrics, view
from mechlens.stats import regression

NAME = "lens"


@dataclasses.dataclass
class Config(Options):
    text: str = option(
        "She opened the fridge, took out the eggs, and started cooking breakfast.",
        "the text read out at every layer",
        nonempty=True,
    )
    position: int = option(
        8, "masked LMs: text-token index studied in parts 1-3 (8 = ' eggs' in the default text)", ge=0
    )
    layer: int | None = option(
        None,
        "masked LMs: readout point of parts 1-2, 0 = embeddings (default: the middle "
        "one, (n_layers + 1) // 2, i.e. n_layers // 2 for an even depth; the original read "
        "one fixed layer of roberta-large)",
        ge=0,
    )
    top_k: int = option(5, "top-k predictions kept per layer and position", ge=1)
    bos: bool = option(
        True,
        "causal LMs: prepend BOS, so position 0 predicts the first text token from BOS alone "
        "(HF's GPT-2 tokenizer adds none: --no-bos feeds the text as is); masked LMs always get "
        "<s> ... </s>",
    )
    heatmap_specials: bool = option(
        False,
        "masked LMs: also mask <s> and </s> in turn and include them in the "
        "heatmap and its min-max colour scale, as the original notebook did (default: "
        "text tokens only); the figure title says which",
    )
    batch_size: int = option(64, "sequences per forward pass", ge=1)
    max_chunk_bytes: int = option(128 * 2**20, "memory budget of the vocabulary readout in bytes (>= 1 MiB)", ge=2**20)
    seed: int = option(0, "random seed", ge=0)
    data: str | None = option(
        None,
        "causal LMs: a corpus (a built-in name, a local .txt/.jsonl/.csv/.parquet "
        "file or hf:REPO[:CONFIG]:SPLIT[:COLUMN]) for the corpus lens: per-layer means "
        "over every next-token position of its texts, streamed (default: the one --text)",
        nonempty=True,
    )
    n_texts: int | None = option(None, "corpus lens: the first N texts of --data (default: all of them)", ge=1)
    max_tokens: int = option(128, "corpus lens: text tokens kept per text", ge=1)
    reservoir: int = option(
        10_000,
        "corpus lens: size of the seeded reservoir of texts whose per-text means "
        "give the bootstrap intervals of comparisons (each kept text: 16 + 40 x (layers + 1) "
        "bytes, 16 + 80 x (layers + 1) with a tuned lens)",
        ge=1,
    )
    tuned: str = option(
        "auto",
        "the tuned lens read beside the logit lens: a directory written by 'mechlens "
        "train-lens', an embedded model's name for its shipped lens (tiny-gpt2, tiny-mlm), 'auto' (the "
        "shipped lens of an embedded model, none otherwise) or 'none'",
        nonempty=True,
    )
    mask_prob: float = option(
        0.15,
        "corpus lens of a masked LM: fraction of each text's tokens masked (seeded by --seed and the text's index)",
        gt=0,
        le=1,
    )

    def not_applied(self, kind: str | None) -> dict[str, str]:
        if self.data is None:
            out = dict.fromkeys(
                ("n_texts", "max_tokens", "reservoir", "mask_prob"),
                "it sets the corpus lens, which runs only with --data SOURCE (without it the lens "
                "reads the one --text)",
            )
        else:
            out = dict.fromkeys(
                ("text", "position", "layer", "heatmap_specials", "top_k"),
                "with --data the corpus lens runs: per-layer means over the corpus, no --text, "
                "studied position, readout layer, heatmap or top-k table",
            )
        if kind == "causal":
            for name in ("position", "layer", "heatmap_specials", "mask_prob"):
                out.setdefault(name, "it applies to masked LMs only")
        elif kind == "masked":
            out["bos"] = MASKED_SPECIALS
        return out

    def check_model(self, model) -> None:
        lens = tuned_lens_for(model, self.tuned)  # a missing or foreign lens is refused before any forward
        if self.data is not None:
            if lens is not None:
                tuned_lens.check_for(lens, self.data, self.n_texts)
            room = model.cfg.n_ctx - (2 if arch.kind_of(model) == "masked" else int(self.bos))
            if self.max_tokens > room:
                fail("max_tokens", f"must be <= {room} (the model's context with BOS), got {self.max_tokens}")
            if self.top_k > model.cfg.d_vocab:
                fail("top_k", f"must be <= {model.cfg.d_vocab} (the vocabulary size), got {self.top_k}")
            return
        check_layer("layer", self.layer, model.cfg.n_layers + 1, "readout points")
        n_text = len(model.tokenizer(self.text, add_special_tokens=False)["input_ids"])
        masked = arch.kind_of(model) == "masked"
        if masked and self.position >= n_text:
            fail("position", f"must be in 0..{n_text - 1} (the text has {n_text} tokens), got {self.position}")
        room = model.cfg.n_ctx - (2 if masked else int(self.bos))
        if n_text > room:
            fail("text", f"is {n_text} tokens, more than the {room} that fit the model's context: shorten it")
        if not masked and n_text + int(self.bos) < 2:
            fail("text", "is one token and no BOS is prepended: nothing to predict (pass a longer text or --bos)")
        if self.top_k > model.cfg.d_vocab:
            fail("top_k", f"must be <= {model.cfg.d_vocab} (the vocabulary size), got {self.top_k}")


# -- the tuned lens beside the logit lens ----------------------------------------------------------


def tuned_source(model, spec: str | None) -> str:
    """What ``--tuned spec`` means for ``model``: an embedded model's name applies to that model, and to a
    model that is not embedded (a local checkpoint, e.g. that model exported: the lens is loaded and its
    fingerprint checked, so another model is refused in one line naming ``--tuned``); the other embedded
    models of the run read ``'auto'``, their own shipped lens if any, so ``--tuned tiny-gpt2`` works in a run
    that also reads tiny-mlm. A directory holding a lens, and anything else, as given."""
    from mechlens.zoo import EMBEDDED

    if spec is None:
        return "none"
    mine = provenance_of(model).model
    if spec in EMBEDDED and spec != mine and mine in EMBEDDED and not tuned_lens.holds_lens(spec):
        return "auto"
    return spec


def tuned_lens_for(model, spec: str | None) -> TunedLens | None:
    """The tuned lens ``--tuned`` names for ``model`` (:func:`tuned_source`): ``None`` for ``'none'``; for
    ``'auto'`` the shipped lens of an embedded model when its fingerprint matches (an embedded model loaded
    with other weights, e.g. ``weights="processed"``, gets none), none for any other model; otherwise
    :func:`mechlens.lens.tuned.load_tuned_lens` (a lens of another model is refused)."""
    from mechlens.zoo import EMBEDDED

    spec = tuned_source(model, spec)
    if spec == "none":
        return None
    if spec == "auto":
        name = provenance_of(model).model
        if name not in EMBEDDED or not (EMBEDDED[name].path / tuned_lens.WEIGHTS_FILE).is_file():
            return None
        try:
            return tuned_lens.load_tuned_lens(name, model)
        except tuned_lens.TunedLensError:
            return None
    return tuned_lens.load_tuned_lens(spec, model)


def next_token_targets(batch: TokenBatch) -> torch.Tensor:
    """``targets[b, p] = tokens[b, p+1]`` where both are real tokens, else -1."""
    t = torch.full_like(batch.tokens, -1)
    both = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
    t[:, :-1] = torch.where(both, batch.tokens[:, 1:], t[:, :-1])
    return t


def sliding_mask_batch(model, batch: TokenBatch) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """One variant per text position of ``batch`` (a single sequence) with that position masked.

    Returns the variants, the masked column of each variant, and the original token there
    (:meth:`mechlens.encoding.TokenBatch.mask_each`)."""
    variants, _, cols, originals = batch.mask_each(arch.mask_id(model))
    return variants, cols, originals


def text_batch(model, text: str | Sequence[int], *, bos: bool = True) -> TokenBatch:
    """One text (a string, or its token ids without special tokens) encoded as the study reads it: a
    masked LM gets ``<s> ... </s>``; a causal LM gets BOS prepended iff ``bos``."""
    return encode(model, [text], bos=bos or arch.kind_of(model) == "masked")


def default_layer(model) -> int:
    """The readout point of parts 1-2 when ``--layer`` is not given: the middle one, ``(n_layers + 1) // 2``."""
    return (model.cfg.n_layers + 1) // 2


def _decode(model, ids) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids]


def _one_sequence(batch: TokenBatch, part: str) -> None:
    if len(batch) != 1:
        raise MechlensError(
            f"{part} reads one sequence, got a batch of {len(batch)}: pass batch.select(slice(i, i + 1))"
        )


def _masked_column(batch: TokenBatch, position: int) -> int:
    cols = torch.nonzero(batch.text_mask[0]).squeeze(-1)
    if not 0 <= position < len(cols):
        fail("position", f"must be in 0..{len(cols) - 1} (the text has {len(cols)} tokens), got {position}")
    return int(cols[position])


def _variants(model, batch: TokenBatch, specials: bool) -> tuple[TokenBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sliding-mask variants (every text token masked in turn; with ``specials`` every non-padding
    token, ``<s>``/``</s>`` included), their masked columns, original tokens and which are text."""
    if not specials:
        variants, cols, originals = sliding_mask_batch(model, batch)
        return variants, cols, originals, torch.ones(len(cols), dtype=torch.bool)
    every = dataclasses.replace(batch, text_mask=batch.attention_mask.bool())
    variants, cols, originals = sliding_mask_batch(model, every)
    variants = dataclasses.replace(variants, text_mask=batch.text_mask.expand(len(cols), -1).clone())
    return variants, cols, originals, batch.text_mask[0, cols].clone()


def _read_cells(model, rows_batch: TokenBatch, rows, cols, targets, *, k, batch_size, max_chunk_bytes) -> LensStats:
    """The lens at the cells ``(rows[i], cols[i])`` of ``rows_batch`` only, with ``targets[i]`` there."""
    sel = torch.zeros_like(rows_batch.tokens, dtype=torch.bool)
    tgt = torch.full_like(rows_batch.tokens, -1)
    sel[rows, cols] = True
    tgt[rows, cols] = targets
    return lens_stats(
        model,
        rows_batch,
        tgt,
        rows=sel,
        k=k,
        entropy=False,  # the masked parts need no entropy
        batch_size=batch_size,
        max_chunk_bytes=max_chunk_bytes,
    )


def _cells(st: LensStats, rows: torch.Tensor, cols: torch.Tensor, top_k: int) -> dict[str, np.ndarray]:
    """``[layer, n]`` arrays (``[layer, n, k]`` for top-k) at the cells ``(rows[i], cols[i])``."""
    idx = (slice(None), rows, cols)
    topk_lp = st.topk_logprobs[idx]
    return {
        "target_logprob": st.target_logprob[idx].numpy(),
        "max_logprob": st.max_logprob[idx].numpy(),
        "target_rank": st.target_rank[idx].numpy(),
        "topk_ids": st.topk_ids[idx][..., :top_k].numpy(),
        "topk_logprobs": topk_lp[..., :top_k].numpy(),
        "top2_gap": (topk_lp[..., 0] - topk_lp[..., 1]).numpy(),
    }


# -- parts 1-3: one masked position ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LensPoint:
    """One readout point at the studied position: the top-1 token and the original token's log-prob
    and 0-based rank (the number of tokens with a strictly larger logit)."""

    predicted: str
    predicted_logprob: float
    target_logprob: float
    target_rank: int
    predicted_id: int


@dataclasses.dataclass(frozen=True)
class MaskedLens:
    """Parts 1-3 of the masked-LM study at text position ``position`` (model column ``column``):
    every readout point of the text as given (``unmasked_*``, part 1) and with that position replaced
    by the mask token (part 2 at readout point ``layer``; part 3 at every readout point). ``target``
    is the original token; ranks are 0-based; top-k ids are sorted by log-prob."""

    position: int
    column: int
    layer: int
    target_id: int
    target_token: str
    part1_unmasked: LensPoint
    part2_masked: LensPoint
    target_logprob: Float[np.ndarray, " layer"]
    max_logprob: Float[np.ndarray, " layer"]
    target_rank: Int[np.ndarray, " layer"]
    topk_ids: Int[np.ndarray, "layer k"]
    topk_logprobs: Float[np.ndarray, "layer k"]
    unmasked_target_logprob: Float[np.ndarray, " layer"]
    unmasked_max_logprob: Float[np.ndarray, " layer"]
    unmasked_target_rank: Int[np.ndarray, " layer"]
    unmasked_topk_ids: Int[np.ndarray, "layer k"]
    unmasked_topk_logprobs: Float[np.ndarray, "layer k"]
    predicted_tokens: list[str]  # the masked position's top-1 at each readout point, decoded

    @property
    def predicted_ids(self) -> Int[np.ndarray, " layer"]:
        return self.topk_ids[:, 0]


def _masked_lens_of(model, st, rows, col, *, position, layer, target, top_k) -> MaskedLens:
    """:class:`MaskedLens` from a readout holding the unmasked text at ``(rows[0], col)`` and the masked
    variant at ``(rows[1], col)``."""
    c = _cells(st, torch.as_tensor(rows), torch.as_tensor([col, col]), top_k)

    def point(i: int) -> LensPoint:
        pid = int(c["topk_ids"][layer, i, 0])
        return LensPoint(
            predicted=_decode(model, [pid])[0],
            predicted_logprob=float(c["max_logprob"][layer, i]),
            target_logprob=float(c["target_logprob"][layer, i]),
            target_rank=int(c["target_rank"][layer, i]),
            predicted_id=pid,
        )

    return MaskedLens(
        position=position,
        column=col,
        layer=layer,
        target_id=target,
        target_token=_decode(model, [target])[0],
        part1_unmasked=point(0),
        part2_masked=point(1),
        target_logprob=c["target_logprob"][:, 1],
        max_logprob=c["max_logprob"][:, 1],
        target_rank=c["target_rank"][:, 1],
        topk_ids=c["topk_ids"][:, 1],
        topk_logprobs=c["topk_logprobs"][:, 1],
        unmasked_target_logprob=c["target_logprob"][:, 0],
        unmasked_max_logprob=c["max_logprob"][:, 0],
        unmasked_target_rank=c["target_rank"][:, 0],
        unmasked_topk_ids=c["topk_ids"][:, 0],
        unmasked_topk_logprobs=c["topk_logprobs"][:, 0],
        predicted_tokens=_decode(model, c["topk_ids"][:, 1, 0]),
    )


def masked_lens(
    model,
    batch: TokenBatch,
    *,
    position: int,
    layer: int | None = None,
    top_k: int = 5,
    batch_size: int = 64,
    max_chunk_bytes: int = 128 * 2**20,
) -> MaskedLens:
    """Parts 1-3: the masked LM's lens at text position ``position`` of ``batch`` (one ``<s> ... </s>``
    sequence), unmasked and masked, at every readout point (``blocks.0.hook_resid_pre`` and each
    ``blocks.l.hook_resid_post`` through the full MLM head), in one forward of the two sequences.
    ``layer`` (default :func:`default_layer`) is the readout point of parts 1-2.

    :func:`run` reads this and :func:`sliding_mask` out of one batched forward (row 0 the text, rows
    1.. every variant); called alone each part runs its own, equal to run's to fp32 noise (~1e-6)."""
    _one_sequence(batch, "masked_lens")
    check_layer("layer", layer, model.cfg.n_layers + 1, "readout points")
    layer = default_layer(model) if layer is None else layer
    col = _masked_column(batch, position)
    target = int(batch.tokens[0, col])
    tokens = batch.tokens.clone()
    tokens[0, col] = arch.mask_id(model)
    both = TokenBatch.cat([batch, dataclasses.replace(batch, tokens=tokens)], pad_id=arch.pad_id(model))
    st = _read_cells(
        model,
        both,
        torch.tensor([0, 1]),
        torch.tensor([col, col]),
        torch.tensor([target, target]),
        k=max(top_k, 2),
        batch_size=batch_size,
        max_chunk_bytes=max_chunk_bytes,
    )
    return _masked_lens_of(model, st, [0, 1], col, position=position, layer=layer, target=target, top_k=top_k)


# -- the laminar fit ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LineFit:
    """``value ~ intercept + slope * sqrt(layer)`` over readout points 0..L."""

    intercept: float
    slope: float
    fitted: Float[np.ndarray, " layer"]


@dataclasses.dataclass(frozen=True)
class SqrtLayerFit:
    """Least-squares fits of a log-prob on sqrt(readout point), one per position:
    ``logprob[l, p] ~ intercepts[p] + slopes[p] * sqrt(l)``, and ``mean``, the fit of the mean over
    positions (its intercept and slope are the means of the per-position ones: the fit is linear in
    the values). With one shared slope instead, the per-position intercepts would be
    ``mean_l logprob[l, p] - mean(slopes) * mean_l sqrt(l)`` (a balanced design)."""

    intercepts: Float[np.ndarray, " pos"]
    slopes: Float[np.ndarray, " pos"]
    fitted: Float[np.ndarray, "layer pos"]
    mean: LineFit

    def at(self, p: int) -> LineFit:
        """Position ``p``'s own fit."""
        return LineFit(float(self.intercepts[p]), float(self.slopes[p]), self.fitted[:, p])


def _line(values: np.ndarray) -> LineFit:
    f = regression.sqrt_line(values)
    return LineFit(f["intercept"], f["slope"], np.asarray(f["fitted"]))


def sqrt_layer_fit(logprob: Float[np.ndarray, "layer pos"] | Float[np.ndarray, " layer"]) -> SqrtLayerFit:
    """Part 3's laminar fit: the log-prob at each position (a column of ``logprob``, readout points
    0..L down the rows; a 1-d array is one position) regressed on sqrt(readout point), with each
    position's intercept and slope. A NaN refuses the fit (:func:`mechlens.stats.regression.lstsq_line`)."""
    v = np.asarray(logprob)
    v = v[:, None] if v.ndim == 1 else v
    root = np.sqrt(np.arange(v.shape[0], dtype=np.float64))
    per = [regression.lstsq_line(root, v[:, p]) for p in range(v.shape[1])]
    intercepts = np.array([b0 for b0, _ in per], dtype=np.float64).reshape(-1)
    slopes = np.array([b1 for _, b1 in per], dtype=np.float64).reshape(-1)
    return SqrtLayerFit(intercepts, slopes, intercepts[None, :] + slopes[None, :] * root[:, None], _line(v.mean(1)))


# -- parts 4-5: every position masked in turn ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlidingMask:
    """Parts 4-5: each position masked in turn (one variant per position, all in one batched forward),
    read out at that position at every readout point: the original token's log-prob and 0-based rank,
    the top-1 log-prob, the **top-2 gap** (top-1 minus top-2 log-prob, >= 0: how decided the lens is)
    and the top-k. ``columns`` are model columns; ``is_text`` is false for ``<s>``/``</s>`` (present
    only when computed with ``specials=True``); :meth:`text_only` drops them."""

    columns: Int[np.ndarray, " pos"]
    token_ids: Int[np.ndarray, " pos"]
    is_text: Bool[np.ndarray, " pos"]
    target_logprob: Float[np.ndarray, "layer pos"]
    max_logprob: Float[np.ndarray, "layer pos"]
    target_rank: Int[np.ndarray, "layer pos"]
    top2_gap: Float[np.ndarray, "layer pos"]
    topk_ids: Int[np.ndarray, "layer pos k"]
    topk_logprobs: Float[np.ndarray, "layer pos k"]
    tokens: list[str]  # the original tokens, decoded
    predicted_tokens: list[list[str]]  # [layer][pos] top-1, decoded

    @property
    def predicted_ids(self) -> Int[np.ndarray, "layer pos"]:
        return self.topk_ids[..., 0]

    @property
    def has_specials(self) -> bool:
        return not bool(self.is_text.all())

    def text_only(self) -> SlidingMask:
        """The text positions only (``<s>``/``</s>`` dropped): position ``p`` is then text token ``p``."""
        keep = self.is_text
        if keep.all():
            return self
        idx = np.nonzero(keep)[0]
        return SlidingMask(
            columns=self.columns[keep],
            token_ids=self.token_ids[keep],
            is_text=self.is_text[keep],
            target_logprob=self.target_logprob[:, keep],
            max_logprob=self.max_logprob[:, keep],
            target_rank=self.target_rank[:, keep],
            top2_gap=self.top2_gap[:, keep],
            topk_ids=self.topk_ids[:, keep],
            topk_logprobs=self.topk_logprobs[:, keep],
            tokens=[self.tokens[i] for i in idx],
            predicted_tokens=[[row[i] for i in idx] for row in self.predicted_tokens],
        )


def _sliding_of(model, st, rows, cols, originals, is_text, top_k) -> SlidingMask:
    c = _cells(st, rows, cols, top_k)
    return SlidingMask(
        columns=cols.numpy(),
        token_ids=originals.numpy(),
        is_text=is_text.numpy(),
        target_logprob=c["target_logprob"],
        max_logprob=c["max_logprob"],
        target_rank=c["target_rank"],
        top2_gap=c["top2_gap"],
        topk_ids=c["topk_ids"],
        topk_logprobs=c["topk_logprobs"],
        tokens=_decode(model, originals),
        predicted_tokens=[_decode(model, row) for row in c["topk_ids"][..., 0]],
    )


def sliding_mask(
    model,
    batch: TokenBatch,
    *,
    specials: bool = False,
    top_k: int = 5,
    batch_size: int = 64,
    max_chunk_bytes: int = 128 * 2**20,
) -> SlidingMask:
    """Parts 4-5: every text position of ``batch`` (one ``<s> ... </s>`` sequence) replaced by the
    mask token in turn (``specials=True``: ``<s>`` and ``</s>`` too, as the original notebook did),
    all variants in one batched forward; each variant read out at its masked position at every
    readout point (``blocks.0.hook_resid_pre``, each ``blocks.l.hook_resid_post``, full MLM head)."""
    _one_sequence(batch, "sliding_mask")
    variants, cols, originals, is_text = _variants(model, batch, specials)
    rows = torch.arange(len(cols))
    st = _read_cells(
        model, variants, rows, cols, originals, k=max(top_k, 2), batch_size=batch_size, max_chunk_bytes=max_chunk_bytes
    )
    return _sliding_of(model, st, rows, cols, originals, is_text, top_k)


# -- the causal lens --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CausalLens:
    """The causal lens of one sequence: at each readout point ``layer`` (``blocks.0.hook_resid_pre``,
    each ``blocks.l.hook_resid_post``, read out by the final norm with recomputed statistics +
    unembedding) and each position ``p`` that has a next token, the next token's log-prob and 0-based
    rank, the top-1 log-prob, the entropy and KL(final readout || this readout) in nats, whether the
    top-1 equals the final readout's top-1, and the top-k. ``token_ids`` is the whole input (BOS, when
    prepended, at 0); ``target_ids[p] = token_ids[p + 1]``."""

    token_ids: Int[np.ndarray, " tok"]
    target_ids: Int[np.ndarray, " pos"]
    target_logprob: Float[np.ndarray, "layer pos"]
    max_logprob: Float[np.ndarray, "layer pos"]
    rank: Int[np.ndarray, "layer pos"]
    entropy: Float[np.ndarray, "layer pos"]
    kl_to_final: Float[np.ndarray, "layer pos"]
    top1_agrees_final: Bool[np.ndarray, "layer pos"]
    topk_ids: Int[np.ndarray, "layer pos k"]
    topk_logprobs: Float[np.ndarray, "layer pos k"]
    tokens: list[str]  # token_ids, decoded
    predicted_tokens: list[list[str]]  # [layer][pos] top-1, decoded
    topk_tokens: list[list[list[str]]]  # [layer][pos][k], decoded

    @property
    def predicted_ids(self) -> Int[np.ndarray, "layer pos"]:
        return self.topk_ids[..., 0]


def causal_lens(
    model,
    batch: TokenBatch,
    *,
    top_k: int = 5,
    batch_size: int | None = None,
    max_chunk_bytes: int = 128 * 2**20,
) -> CausalLens:
    """The causal lens of ``batch`` (one sequence, encoded with the BOS policy of your choice): one
    forward caching the ``n_layers + 1`` readout points, each read out at every position and reduced
    over the vocabulary (next-token log-prob and rank, entropy, KL to the final readout, top-k)."""
    _one_sequence(batch, "causal_lens")
    if int(batch.attention_mask.sum()) != batch.tokens.shape[1]:
        raise MechlensError("causal_lens reads one unpadded sequence: encode the text alone")
    st = lens_stats(
        model,
        batch,
        next_token_targets(batch),
        k=top_k,
        kl_to_final=True,
        batch_size=batch_size,
        max_chunk_bytes=max_chunk_bytes,
    )
    n_pos = int(batch.lengths[0]) - 1  # positions with a next token
    if n_pos < 1:
        raise MechlensError("causal_lens needs at least two tokens (BOS included): nothing to predict")
    sl = (slice(None), 0, slice(0, n_pos))
    pred = st.predicted[sl].numpy()
    ids = batch.tokens[0].numpy()
    topk_ids = st.topk_ids[sl].numpy()
    return CausalLens(
        token_ids=ids,
        target_ids=ids[1 : n_pos + 1],
        target_logprob=st.target_logprob[sl].numpy(),
        max_logprob=st.max_logprob[sl].numpy(),
        rank=st.target_rank[sl].numpy(),
        entropy=st.entropy[sl].numpy(),
        kl_to_final=st.kl_to_final[sl].numpy(),
        top1_agrees_final=pred == pred[-1:],
        topk_ids=topk_ids,
        topk_logprobs=st.topk_logprobs[sl].numpy(),
        tokens=_decode(model, ids),
        predicted_tokens=[_decode(model, row) for row in pred],
        topk_tokens=[[_decode(model, ks) for ks in row] for row in topk_ids],
    )


# -- the corpus lens (streamed, data-parallel): mechlens.lens.corpus ---------------------------------


@dataclasses.dataclass(frozen=True)
class CorpusLensResult:
    """``run`` on a corpus (``--data``): the corpus lens (``corpus``, its statistics under their flat
    ``results.json`` names, declared below as views) and the sqrt(layer) fit of its mean log-prob; ``lensed``
    says which positions were read (next-token or masked), ``tuned_source`` and ``tuned_note`` which tuned
    lens was read and how the texts relate to its training split."""

    kind: str
    data: str
    sqrt_layer_fit: LineFit
    bos: bool
    lensed: str = "next-token positions"
    tuned_source: str | None = None
    tuned_note: str | None = None
    tuned_card: dict[str, Any] | None = None
    corpus: CorpusLens | None = not_in_metrics(default=None)

    n_texts = view("corpus.n_texts")
    n_predictions = view("corpus.n_predictions")
    target_logprob_by_layer = view("corpus.target_logprob_by_layer")
    rank_mean_by_layer = view("corpus.rank_mean_by_layer")
    entropy_by_layer = view("corpus.entropy_by_layer")
    kl_to_final_by_layer = view("corpus.kl_to_final_by_layer")
    top1_agreement_by_layer = view("corpus.top1_agreement_by_layer")
    std_by_layer = view("corpus.std_by_layer")
    n_samples = view("corpus.n_samples")
    tuned = view("corpus.tuned")

    @property
    def sample_text_index(self) -> Int[np.ndarray, " sample"]:
        return self.corpus.sample_text_index

    @property
    def per_text(self) -> Float[np.ndarray, "sample quantity layer"]:
        return self.corpus.per_text


def _run_corpus(model, cfg: Config, texts=None) -> CorpusLensResult:
    from mechlens.data import shard

    lens = tuned_lens_for(model, cfg.tuned)
    n_texts, note = cfg.n_texts, None
    if lens is not None:
        n_texts, note = tuned_lens.check_for(lens, cfg.data if texts is None else texts, cfg.n_texts)
    stream = shard(cfg.data if texts is None else texts, n_texts)  # this rank's share, keyed by global index
    c = corpus_lens(
        model,
        stream,
        bos=cfg.bos,
        max_tokens=cfg.max_tokens,
        batch_size=cfg.batch_size,
        max_chunk_bytes=cfg.max_chunk_bytes,
        n_samples=cfg.reservoir,
        seed=cfg.seed,
        tuned=lens,
        mask_prob=cfg.mask_prob,
    )
    masked = arch.kind_of(model) == "masked"
    return CorpusLensResult(
        corpus=c,
        kind="corpus",
        data=cfg.data or "(texts given in Python)",
        sqrt_layer_fit=_line(c.target_logprob_by_layer),
        bos=cfg.bos,
        lensed=f"masked positions (mask_prob {cfg.mask_prob}, seed {cfg.seed})" if masked else "next-token positions",
        tuned_source=None if lens is None else tuned_source(model, cfg.tuned),
        tuned_note=note,
        tuned_card=None if lens is None else card_summary(lens),
    )


# -- run: the parts composed ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskedLensResult:
    """The masked-LM study: its parts (``masked``: parts 1-3 at the studied position; ``sliding``: parts
    4-5, with ``<s>``/``</s>`` when ``heatmap_specials``; the sqrt(layer) fits of the sliding target and top-1
    log-probs per text position), the word begun by each text token (-1 if none) and the tuned lens beside
    the logit lens (every position masked in turn). The flat ``results.json`` names are views of the parts,
    declared below (nothing is stored twice); ``sliding_*`` arrays are ``[readout point][text position]``."""

    kind: str
    heatmap_specials: bool
    masked: MaskedLens = not_in_metrics()
    sliding: SlidingMask = not_in_metrics()
    fit: SqrtLayerFit = not_in_metrics()
    fit_max: SqrtLayerFit = not_in_metrics()
    word: Int[np.ndarray, " pos"] = not_in_metrics()
    tuned: TunedComparison | None = None

    @functools.cached_property
    def text(self) -> SlidingMask:
        """The sliding mask at the text positions only (what the metrics report)."""
        return self.sliding.text_only()

    text_tokens = view("text.tokens")
    position = view("masked.position")
    position_token = view("masked.target_token")
    layer = view("masked.layer")
    part1_unmasked = view("masked.part1_unmasked")
    part2_masked = view("masked.part2_masked")
    predicted_by_layer_masked = view("masked.predicted_tokens")
    target_logprob_by_layer = view("masked.target_logprob")
    max_logprob_by_layer = view("masked.max_logprob")
    target_rank_by_layer = view("masked.target_rank")
    target_logprob_by_layer_unmasked = view("masked.unmasked_target_logprob")
    sqrt_layer_fit = view(lambda r: r.fit.at(r.masked.position))
    sqrt_layer_fit_max = view(lambda r: r.fit_max.at(r.masked.position))
    predicted_tokens = view("text.predicted_tokens")
    sliding_target_logprob = view("text.target_logprob")
    sliding_max_logprob = view("text.max_logprob")
    sliding_target_rank = view("text.target_rank")
    slopes_by_position = view(lambda r: {"target": r.fit.slopes, "max": r.fit_max.slopes})
    final_top1_accuracy_sliding = view(lambda r: float((r.text.predicted_ids[-1] == r.text.token_ids).mean()))
    text_token_ids = view("text.token_ids")
    sliding_top2_gap = view("text.top2_gap")
    sliding_target_logprob_by_layer = view(lambda r: r.text.target_logprob.astype(np.float64).mean(1))
    intercepts_by_position = view(lambda r: {"target": r.fit.intercepts, "max": r.fit_max.intercepts})


@dataclasses.dataclass(frozen=True)
class CausalLensResult:
    """The causal-LM study: its parts (``lens``: every readout point at every next-token position; the
    sqrt(layer) fits of the target and top-1 log-probs), the word begun by each position's TARGET token (-1
    if none) and the tuned lens beside the logit lens. The flat ``results.json`` names are views of the
    parts, declared below (nothing is stored twice). ``[layer][pos]`` arrays are per readout point and input
    position (``p`` predicts token ``p + 1``); by-layer values are means over positions except
    ``rank_by_layer`` (the median; ``rank_mean_by_layer`` the mean)."""

    kind: str
    bos: bool
    lens: CausalLens = not_in_metrics()
    fit: SqrtLayerFit = not_in_metrics()
    fit_max: SqrtLayerFit = not_in_metrics()
    word: Int[np.ndarray, " pos"] = not_in_metrics()
    tuned: TunedComparison | None = None

    text_tokens = view(lambda r: r.lens.tokens[: len(r.lens.target_ids) + 1])
    predicted_tokens = view("lens.predicted_tokens")
    topk_by_layer = view("lens.topk_tokens")
    target_logprob = view("lens.target_logprob")
    rank = view("lens.rank")
    entropy = view("lens.entropy")
    kl_to_final = view("lens.kl_to_final")
    target_logprob_by_layer = view(lambda r: r.lens.target_logprob.mean(1))
    max_logprob_by_layer = view(lambda r: r.lens.max_logprob.mean(1))
    rank_by_layer = view(lambda r: np.median(r.lens.rank, 1))
    entropy_by_layer = view(lambda r: torch.from_numpy(r.lens.entropy).mean(1).numpy())
    kl_to_final_by_layer = view(lambda r: torch.from_numpy(r.lens.kl_to_final).mean(1).numpy())
    sqrt_layer_fit = view("fit.mean")
    slopes_by_position = view(lambda r: {"target": r.fit.slopes, "max": r.fit_max.slopes})
    final_top1_accuracy = view(lambda r: float((r.lens.predicted_ids[-1] == r.lens.target_ids).mean()))
    token_ids = view("lens.token_ids")
    top1_agrees_final = view("lens.top1_agrees_final")
    top1_agreement_by_layer = view(lambda r: r.lens.top1_agrees_final.mean(1, dtype=np.float64))
    rank_mean_by_layer = view(lambda r: r.lens.rank.mean(1, dtype=np.float64))
    intercepts_by_position = view(lambda r: {"target": r.fit.intercepts, "max": r.fit_max.intercepts})


def _run_masked(model, cfg: Config, batch: TokenBatch, words: torch.Tensor) -> MaskedLensResult:
    col = _masked_column(batch, cfg.position)
    check_layer("layer", cfg.layer, model.cfg.n_layers + 1, "readout points")
    layer = default_layer(model) if cfg.layer is None else cfg.layer
    target = int(batch.tokens[0, col])
    # one forward: row 0 the unmasked text (part 1), rows 1.. every position masked in turn (parts 2-5;
    # the studied position's variant is part 2's); only the studied cells are read out
    variants, vcols, originals, is_text = _variants(model, batch, cfg.heatmap_specials)
    n = len(vcols)
    both = TokenBatch.cat([batch, variants], pad_id=arch.pad_id(model))
    rows = torch.cat([torch.tensor([0]), 1 + torch.arange(n)])
    st = _read_cells(
        model,
        both,
        rows,
        torch.cat([torch.tensor([col]), vcols]),
        torch.cat([torch.tensor([target]), originals]),
        k=max(cfg.top_k, 2),
        batch_size=cfg.batch_size,
        max_chunk_bytes=cfg.max_chunk_bytes,
    )
    studied = 1 + int(torch.nonzero(vcols == col)[0, 0])
    masked = _masked_lens_of(
        model, st, [0, studied], col, position=cfg.position, layer=layer, target=target, top_k=cfg.top_k
    )
    sliding = _sliding_of(model, st, 1 + torch.arange(n), vcols, originals, is_text, cfg.top_k)
    text = sliding.text_only()
    fit, fit_max = sqrt_layer_fit(text.target_logprob), sqrt_layer_fit(text.max_logprob)
    return MaskedLensResult(
        kind="masked",
        heatmap_specials=cfg.heatmap_specials,
        masked=masked,
        sliding=sliding,
        fit=fit,
        fit_max=fit_max,
        word=words[torch.as_tensor(text.columns)].numpy(),
        tuned=_tuned_masked(model, cfg, batch),
    )


def _single_text_note(lens: TunedLens) -> str:
    return (
        f"one text: the tuned lens was trained on {lens.card.data} (its first {lens.card.heldout} texts held "
        "out); whether this text is among its training texts is not checked (use --data for a held-out "
        "evaluation)"
    )


def _tuned_masked(model, cfg: Config, batch: TokenBatch) -> TunedComparison | None:
    """Both lenses with every text position masked in turn, each variant read at its masked position."""
    lens = tuned_lens_for(model, cfg.tuned)
    if lens is None:
        return None
    variants, cols, originals = sliding_mask_batch(model, batch)
    rows = torch.arange(len(cols))
    targets = torch.full_like(variants.tokens, -1)
    targets[rows, cols] = originals
    return compare_lenses(
        model,
        variants,
        targets,
        rows,
        cols,
        lens,
        source=tuned_source(model, cfg.tuned),
        note=_single_text_note(lens),
        batch_size=cfg.batch_size,
        max_chunk_bytes=cfg.max_chunk_bytes,
    )


def _tuned_causal(model, cfg: Config, batch: TokenBatch, n_pos: int) -> TunedComparison | None:
    """Both lenses at every next-token position of the text."""
    lens = tuned_lens_for(model, cfg.tuned)
    if lens is None:
        return None
    cols = torch.arange(n_pos)
    note, source = _single_text_note(lens), tuned_source(model, cfg.tuned)
    return compare_lenses(
        model,
        batch,
        next_token_targets(batch),
        torch.zeros_like(cols),
        cols,
        lens,
        source=source,
        note=note,
        max_chunk_bytes=cfg.max_chunk_bytes,
    )


def _run_causal(model, cfg: Config, batch: TokenBatch, words: torch.Tensor) -> CausalLensResult:
    lens = causal_lens(model, batch, top_k=cfg.top_k, max_chunk_bytes=cfg.max_chunk_bytes)
    n_pos = len(lens.target_ids)
    fit, fit_max = sqrt_layer_fit(lens.target_logprob), sqrt_layer_fit(lens.max_logprob)
    return CausalLensResult(
        kind="causal",
        bos=batch.bos,
        lens=lens,
        fit=fit,
        fit_max=fit_max,
        word=words[1 : n_pos + 1].numpy(),
        tuned=_tuned_causal(model, cfg, batch, n_pos),
    )
