"""Study 3 -- the logit lens, for masked LMs (the original study used roberta-large) and causal LMs.

The residual stream after the embeddings and after every block (``n_layers + 1`` readout points,
:func:`mechlens.arch.readout_hook_names`: ``blocks.0.hook_resid_pre``, then each
``blocks.l.hook_resid_post``) is read out with the model's own head (:func:`mechlens.arch.readout`) and
reduced over the vocabulary in chunks (:func:`mechlens.ops.lens_reduce`): ``[layer, batch, pos,
d_vocab]`` logits are never held.

Masked LMs, in the original notebook's order: :func:`masked_lens` (parts 1-2: one readout point, the
text unmasked then the studied position replaced by the mask token; part 3: the masked position at
every readout point), :func:`sqrt_layer_fit` (the laminar fit of the log-prob on sqrt(layer), one per
position, intercepts and slopes), :func:`sliding_mask` (parts 4-5: every text position masked in turn,
the original token's log-prob and the top-1 minus top-2 gap per readout point and position) and the
text heatmap (part 6). Causal LMs: :func:`causal_lens` (per readout point and position: the next
token's log-prob and rank, entropy, KL to the final readout, top-1 agreement with the final readout).
:func:`run` composes the parts; :func:`samples` gives the per-token values behind the by-layer means.

Conventions (each one switchable):

* **Readout** = the model's own final norm + unembedding: causal LMs apply the final LayerNorm/RMSNorm
  with its statistics recomputed on each readout point's vector, then the unembedding and the
  family's post-processing (Gemma2 soft-cap, Granite/Cohere scales); masked LMs apply the full MLM
  head (dense -> activation -> LayerNorm -> decoder). The last readout point equals the model's logits.
* **Layer of parts 1-2** (``--layer``): by default the middle readout point, ``(n_layers + 1) // 2``
  (``n_layers // 2`` for an even number of blocks, e.g. 12 of roberta-large's 0..24); the original
  notebook read one fixed layer of roberta-large. 0 = the embeddings.
* **BOS for causal LMs** (``--bos/--no-bos``): prepended by default, so position 0 predicts the first
  text token from BOS alone (HF's GPT-2 tokenizer adds none: ``--no-bos`` feeds the text as is and
  the first prediction is made from the first text token). Masked LMs always get ``<s> ... </s>``.
* **Positions**: the masked parts key positions by text-token index (0 = the first token after
  ``<s>``, as ``--position``); the causal lens by the token's position in the model input (0 = BOS
  when prepended; position ``p`` predicts token ``p + 1``).
* **Heatmap colour** (``--heatmap-specials``): min-max scaled over the text tokens only by default;
  the original notebook also masked ``<s>`` and ``</s>`` in turn and scaled over them too. The
  figure title says which.
* Part functions read **one sequence** (a :class:`~mechlens.tokens.TokenBatch` of one text).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int

from mechlens import arch
from mechlens.axes import readout_depth
from mechlens.errors import MechlensError
from mechlens.lens import tuned as tuned_lens
from mechlens.lens.corpus import CorpusLens, corpus_lens
from mechlens.lens.readings import (
    QUANTITIES as CORPUS_QUANTITIES,
)
from mechlens.lens.readings import (
    TunedComparison,
    card_summary,
    compare_lenses,
    first_depth_below,
    lens_stats,
)
from mechlens.lens.tuned import TunedLens
from mechlens.loading import provenance_of
from mechlens.ops import LensStats
from mechlens.options import Options, check_layer, fail, option
from mechlens.result import StudyResult, format_values, metrics_of, not_in_metrics, sample_table
from mechlens.stats import regression
from mechlens.studies import Step
from mechlens.tokens import TokenBatch, encode, word_index

NAME = "lens"


@dataclasses.dataclass
class Config(Options):
    text: str = option("She opened the fridge, took out the eggs, and started cooking breakfast.",
                       "the text read out at every layer", nonempty=True)  # fmt: skip
    position: int = option(8, "masked LMs: text-token index studied in parts 1-3 (8 = ' eggs' in the default text)",
                           ge=0)  # fmt: skip
    layer: int | None = option(None, "masked LMs: readout point of parts 1-2, 0 = embeddings (default: the middle "
                               "one, (n_layers + 1) // 2, i.e. n_layers // 2 for an even depth; the original read "
                               "one fixed layer of roberta-large)", ge=0)  # fmt: skip
    top_k: int = option(5, "top-k predictions kept per layer and position", ge=1)
    bos: bool = option(True, "causal LMs: prepend BOS, so position 0 predicts the first text token from BOS alone "
                       "(HF's GPT-2 tokenizer adds none: --no-bos feeds the text as is); masked LMs always get "
                       "<s> ... </s>")  # fmt: skip
    heatmap_specials: bool = option(False, "masked LMs: also mask <s> and </s> in turn and include them in the "
                                    "heatmap and its min-max colour scale, as the original notebook did (default: "
                                    "text tokens only); the figure title says which")  # fmt: skip
    batch_size: int = option(64, "sequences per forward pass", ge=1)
    max_chunk_bytes: int = option(128 * 2**20, "memory budget of the vocabulary readout in bytes (>= 1 MiB)",
                                  ge=2**20)  # fmt: skip
    seed: int = option(0, "random seed", ge=0)
    data: str | None = option(None, "causal LMs: a corpus (a built-in name, a local .txt/.jsonl/.csv/.parquet "
                              "file or hf:REPO[:CONFIG]:SPLIT[:COLUMN]) for the corpus lens: per-layer means "
                              "over every next-token position of its texts, streamed (default: the one --text)",
                              nonempty=True)  # fmt: skip
    n_texts: int | None = option(None, "corpus lens: the first N texts of --data (default: all of them)", ge=1)
    max_tokens: int = option(128, "corpus lens: text tokens kept per text", ge=1)
    reservoir: int = option(10_000, "corpus lens: size of the seeded reservoir of texts whose per-text means "
                            "give the bootstrap intervals of comparisons", ge=1)  # fmt: skip
    tuned: str = option("auto", "the tuned lens read beside the logit lens: a directory written by 'mechlens "
                        "train-lens', an embedded model's name for its shipped lens (tiny-gpt2, tiny-mlm), 'auto' (the "
                        "shipped lens of an embedded model, none otherwise) or 'none'", nonempty=True)  # fmt: skip
    mask_prob: float = option(0.15, "corpus lens of a masked LM: fraction of each text's tokens masked (seeded by "
                              "--seed and the text's index)", gt=0, le=1)  # fmt: skip

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
    """What ``--tuned spec`` means for ``model``: an embedded model's name applies to that model only (other
    models of the run read ``'auto'``, their own shipped lens if any), so ``--tuned tiny-gpt2`` works in a
    run that also reads tiny-mlm; anything else as given."""
    from mechlens.zoo import EMBEDDED

    if spec is None:
        return "none"
    if spec in EMBEDDED and spec != provenance_of(model).model and not pathlib.Path(spec).exists():
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
    (:meth:`mechlens.tokens.TokenBatch.mask_each`)."""
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
    return lens_stats(model, rows_batch, tgt, rows=sel, k=k, entropy=False,  # the masked parts need no entropy
                      batch_size=batch_size, max_chunk_bytes=max_chunk_bytes)  # fmt: skip


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
    st = _read_cells(model, both, torch.tensor([0, 1]), torch.tensor([col, col]), torch.tensor([target, target]),
                     k=max(top_k, 2), batch_size=batch_size, max_chunk_bytes=max_chunk_bytes)  # fmt: skip
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
            columns=self.columns[keep], token_ids=self.token_ids[keep], is_text=self.is_text[keep],
            target_logprob=self.target_logprob[:, keep], max_logprob=self.max_logprob[:, keep],
            target_rank=self.target_rank[:, keep], top2_gap=self.top2_gap[:, keep], topk_ids=self.topk_ids[:, keep],
            topk_logprobs=self.topk_logprobs[:, keep], tokens=[self.tokens[i] for i in idx],
            predicted_tokens=[[row[i] for i in idx] for row in self.predicted_tokens],
        )  # fmt: skip


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
    st = _read_cells(model, variants, rows, cols, originals, k=max(top_k, 2), batch_size=batch_size,
                     max_chunk_bytes=max_chunk_bytes)  # fmt: skip
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
    st = lens_stats(model, batch, next_token_targets(batch), k=top_k, kl_to_final=True, batch_size=batch_size,
                    max_chunk_bytes=max_chunk_bytes)  # fmt: skip
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
class CorpusLensResult(CorpusLens):
    """``run`` on a corpus (``--data``): the corpus lens (its fields, inherited) and the sqrt(layer) fit
    of its mean log-prob; ``lensed`` says which positions were read (next-token or masked), ``tuned_source``
    and ``tuned_note`` which tuned lens was read and how the texts relate to its training split."""

    kind: str
    data: str
    sqrt_layer_fit: LineFit
    bos: bool
    lensed: str = "next-token positions"
    tuned_source: str | None = None
    tuned_note: str | None = None
    tuned_card: dict[str, Any] | None = None


def _run_corpus(model, cfg: Config, texts=None) -> CorpusLensResult:
    from mechlens.data import shard

    lens = tuned_lens_for(model, cfg.tuned)
    n_texts, note = cfg.n_texts, None
    if lens is not None:
        n_texts, note = tuned_lens.check_for(lens, cfg.data if texts is None else None, cfg.n_texts)
    stream = shard(cfg.data if texts is None else texts, n_texts)  # this rank's share, keyed by global index
    c = corpus_lens(model, stream, bos=cfg.bos, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                    max_chunk_bytes=cfg.max_chunk_bytes, n_samples=cfg.reservoir, seed=cfg.seed, tuned=lens,
                    mask_prob=cfg.mask_prob)  # fmt: skip
    masked = arch.kind_of(model) == "masked"
    return CorpusLensResult(
        **{f.name: getattr(c, f.name) for f in dataclasses.fields(c)},
        kind="corpus",
        data=cfg.data or "(texts given in Python)",
        sqrt_layer_fit=_line(c.target_logprob_by_layer),
        bos=cfg.bos,
        lensed=f"masked positions (mask_prob {cfg.mask_prob}, seed {cfg.seed})" if masked else "next-token positions",
        tuned_source=None if lens is None else tuned_source(model, cfg.tuned),
        tuned_note=note,
        tuned_card=None if lens is None else card_summary(lens),
    )


def corpus_figures(r: CorpusLensResult) -> dict[str, go.Figure]:
    depth = readout_depth(len(r.target_logprob_by_layer))
    titles = {"target_logprob": "next-token log-prob", "rank": "rank of the next token (mean, 0-based)",
              "entropy": "entropy (nats)", "kl_to_final": "KL to the final readout (nats)",
              "top1_agrees_final": "top-1 agreement with the final readout"}  # fmt: skip
    means = dict(zip(CORPUS_QUANTITIES, (r.target_logprob_by_layer, r.rank_mean_by_layer, r.entropy_by_layer,
                                         r.kl_to_final_by_layer, r.top1_agreement_by_layer), strict=True))  # fmt: skip
    figs = {}
    for q, y in means.items():
        sd = r.std_by_layer[q]
        f = go.Figure(go.Scatter(x=np.arange(len(y)), y=y, mode="lines+markers", name="mean",
                                 error_y={"array": sd, "visible": True}))  # fmt: skip
        f.update_layout(title=f"Corpus lens: {titles[q]} by readout point<br><sup>{r.n_texts} texts, "
                              f"{r.n_predictions} next-token positions; bars: ±1 std over positions</sup>",
                        xaxis_title="readout point (0 = embeddings)", yaxis_title=titles[q])  # fmt: skip
        f.update_xaxes(tickvals=np.arange(len(y)), ticktext=[f"{i} ({d:.2f})" for i, d in enumerate(depth)])
        figs[f"corpus_{q}"] = f
    return figs


# -- run: the parts composed ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskedLensResult:
    """The masked-LM study. Fields are ``results.json``'s metrics (names kept from earlier versions);
    the parts themselves (``masked``, ``sliding``, the fits) and the word index are kept alongside.
    ``sliding_*`` arrays are ``[readout point][text position]``."""

    kind: str
    text_tokens: list[str]
    position: int
    position_token: str
    layer: int
    part1_unmasked: LensPoint
    part2_masked: LensPoint
    predicted_by_layer_masked: list[str]
    target_logprob_by_layer: Float[np.ndarray, " layer"]
    max_logprob_by_layer: Float[np.ndarray, " layer"]
    target_rank_by_layer: Int[np.ndarray, " layer"]
    target_logprob_by_layer_unmasked: Float[np.ndarray, " layer"]
    sqrt_layer_fit: LineFit
    sqrt_layer_fit_max: LineFit
    predicted_tokens: list[list[str]]
    sliding_target_logprob: Float[np.ndarray, "layer pos"]
    sliding_max_logprob: Float[np.ndarray, "layer pos"]
    sliding_target_rank: Int[np.ndarray, "layer pos"]
    slopes_by_position: dict[str, Float[np.ndarray, " pos"]]
    final_top1_accuracy_sliding: float
    # added with the typed parts
    text_token_ids: Int[np.ndarray, " pos"]
    sliding_top2_gap: Float[np.ndarray, "layer pos"]
    sliding_target_logprob_by_layer: Float[np.ndarray, " layer"]  # mean over text positions
    intercepts_by_position: dict[str, Float[np.ndarray, " pos"]]
    heatmap_specials: bool
    masked: MaskedLens = not_in_metrics()
    # with <s>/</s> when heatmap_specials (metrics: text only)
    sliding: SlidingMask = not_in_metrics()
    # of the sliding target log-prob, per text position
    fit: SqrtLayerFit = not_in_metrics()
    fit_max: SqrtLayerFit = not_in_metrics()
    # word begun by each text token, -1 if none
    word: Int[np.ndarray, " pos"] = not_in_metrics()
    tuned: TunedComparison | None = None  # the tuned lens beside the logit lens, every position masked in turn


@dataclasses.dataclass(frozen=True)
class CausalLensResult:
    """The causal-LM study. Fields are ``results.json``'s metrics (names kept from earlier versions);
    the lens part, the fits and the word index are kept alongside. ``[layer][pos]`` arrays are per
    readout point and input position (``p`` predicts token ``p + 1``); by-layer values are means over
    positions except ``rank_by_layer`` (the median; ``rank_mean_by_layer`` the mean)."""

    kind: str
    text_tokens: list[str]
    predicted_tokens: list[list[str]]
    topk_by_layer: list[list[list[str]]]
    target_logprob: Float[np.ndarray, "layer pos"]
    rank: Int[np.ndarray, "layer pos"]
    entropy: Float[np.ndarray, "layer pos"]
    kl_to_final: Float[np.ndarray, "layer pos"]
    target_logprob_by_layer: Float[np.ndarray, " layer"]
    max_logprob_by_layer: Float[np.ndarray, " layer"]
    rank_by_layer: Float[np.ndarray, " layer"]
    entropy_by_layer: Float[np.ndarray, " layer"]
    kl_to_final_by_layer: Float[np.ndarray, " layer"]
    sqrt_layer_fit: LineFit
    slopes_by_position: dict[str, Float[np.ndarray, " pos"]]
    final_top1_accuracy: float
    # added with the typed parts
    token_ids: Int[np.ndarray, " tok"]
    bos: bool
    top1_agrees_final: Bool[np.ndarray, "layer pos"]
    top1_agreement_by_layer: Float[np.ndarray, " layer"]
    rank_mean_by_layer: Float[np.ndarray, " layer"]
    intercepts_by_position: dict[str, Float[np.ndarray, " pos"]]
    lens: CausalLens = not_in_metrics()
    fit: SqrtLayerFit = not_in_metrics()
    fit_max: SqrtLayerFit = not_in_metrics()
    # word begun by each position's TARGET token, -1 if none
    word: Int[np.ndarray, " pos"] = not_in_metrics()
    tuned: TunedComparison | None = None  # the tuned lens beside the logit lens at every next-token position


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
    st = _read_cells(model, both, rows, torch.cat([torch.tensor([col]), vcols]),
                     torch.cat([torch.tensor([target]), originals]), k=max(cfg.top_k, 2), batch_size=cfg.batch_size,
                     max_chunk_bytes=cfg.max_chunk_bytes)  # fmt: skip
    studied = 1 + int(torch.nonzero(vcols == col)[0, 0])
    masked = _masked_lens_of(model, st, [0, studied], col, position=cfg.position, layer=layer, target=target,
                             top_k=cfg.top_k)  # fmt: skip
    sliding = _sliding_of(model, st, 1 + torch.arange(n), vcols, originals, is_text, cfg.top_k)
    text = sliding.text_only()
    fit, fit_max = sqrt_layer_fit(text.target_logprob), sqrt_layer_fit(text.max_logprob)
    return MaskedLensResult(
        kind="masked",
        text_tokens=text.tokens,
        position=cfg.position,
        position_token=masked.target_token,
        layer=layer,
        part1_unmasked=masked.part1_unmasked,
        part2_masked=masked.part2_masked,
        predicted_by_layer_masked=masked.predicted_tokens,
        target_logprob_by_layer=masked.target_logprob,
        max_logprob_by_layer=masked.max_logprob,
        target_rank_by_layer=masked.target_rank,
        target_logprob_by_layer_unmasked=masked.unmasked_target_logprob,
        sqrt_layer_fit=fit.at(cfg.position),
        sqrt_layer_fit_max=fit_max.at(cfg.position),
        predicted_tokens=text.predicted_tokens,
        sliding_target_logprob=text.target_logprob,
        sliding_max_logprob=text.max_logprob,
        sliding_target_rank=text.target_rank,
        slopes_by_position={"target": fit.slopes, "max": fit_max.slopes},
        final_top1_accuracy_sliding=float((text.predicted_ids[-1] == text.token_ids).mean()),
        text_token_ids=text.token_ids,
        sliding_top2_gap=text.top2_gap,
        sliding_target_logprob_by_layer=text.target_logprob.astype(np.float64).mean(1),
        intercepts_by_position={"target": fit.intercepts, "max": fit_max.intercepts},
        heatmap_specials=cfg.heatmap_specials,
        masked=masked,
        sliding=sliding,
        fit=fit,
        fit_max=fit_max,
        word=words[torch.as_tensor(text.columns)].numpy(),
        tuned=_tuned_masked(model, cfg, batch),
    )


def _single_text_note(lens: TunedLens) -> str:
    return (f"one text: the tuned lens was trained on {lens.card.data} (its first {lens.card.heldout} texts held "
            "out); whether this text is among its training texts is not checked (use --data for a held-out "
            "evaluation)")  # fmt: skip


def _tuned_masked(model, cfg: Config, batch: TokenBatch) -> TunedComparison | None:
    """Both lenses with every text position masked in turn, each variant read at its masked position."""
    lens = tuned_lens_for(model, cfg.tuned)
    if lens is None:
        return None
    variants, cols, originals = sliding_mask_batch(model, batch)
    rows = torch.arange(len(cols))
    targets = torch.full_like(variants.tokens, -1)
    targets[rows, cols] = originals
    return compare_lenses(model, variants, targets, rows, cols, lens, source=tuned_source(model, cfg.tuned),
                          note=_single_text_note(lens),
                          batch_size=cfg.batch_size, max_chunk_bytes=cfg.max_chunk_bytes)  # fmt: skip


def _tuned_causal(model, cfg: Config, batch: TokenBatch, n_pos: int) -> TunedComparison | None:
    """Both lenses at every next-token position of the text."""
    lens = tuned_lens_for(model, cfg.tuned)
    if lens is None:
        return None
    cols = torch.arange(n_pos)
    note, source = _single_text_note(lens), tuned_source(model, cfg.tuned)
    return compare_lenses(model, batch, next_token_targets(batch), torch.zeros_like(cols), cols, lens,
                          source=source, note=note, max_chunk_bytes=cfg.max_chunk_bytes)  # fmt: skip


def _run_causal(model, cfg: Config, batch: TokenBatch, words: torch.Tensor) -> CausalLensResult:
    lens = causal_lens(model, batch, top_k=cfg.top_k, max_chunk_bytes=cfg.max_chunk_bytes)
    n_pos = len(lens.target_ids)
    fit, fit_max = sqrt_layer_fit(lens.target_logprob), sqrt_layer_fit(lens.max_logprob)
    return CausalLensResult(
        kind="causal",
        text_tokens=lens.tokens[: n_pos + 1],
        predicted_tokens=lens.predicted_tokens,
        topk_by_layer=lens.topk_tokens,
        target_logprob=lens.target_logprob,
        rank=lens.rank,
        entropy=lens.entropy,
        kl_to_final=lens.kl_to_final,
        target_logprob_by_layer=lens.target_logprob.mean(1),
        max_logprob_by_layer=lens.max_logprob.mean(1),
        rank_by_layer=np.median(lens.rank, 1),
        entropy_by_layer=torch.from_numpy(lens.entropy).mean(1).numpy(),
        kl_to_final_by_layer=torch.from_numpy(lens.kl_to_final).mean(1).numpy(),
        sqrt_layer_fit=fit.mean,
        slopes_by_position={"target": fit.slopes, "max": fit_max.slopes},
        final_top1_accuracy=float((lens.predicted_ids[-1] == lens.target_ids).mean()),
        token_ids=lens.token_ids,
        bos=batch.bos,
        top1_agrees_final=lens.top1_agrees_final,
        top1_agreement_by_layer=lens.top1_agrees_final.mean(1, dtype=np.float64),
        rank_mean_by_layer=lens.rank.mean(1, dtype=np.float64),
        intercepts_by_position={"target": fit.intercepts, "max": fit_max.intercepts},
        lens=lens,
        fit=fit,
        fit_max=fit_max,
        word=words[1 : n_pos + 1].numpy(),
        tuned=_tuned_causal(model, cfg, batch, n_pos),
    )


def run(model, cfg: Config | None = None, text: str | Sequence[int] | Sequence[str] | None = None) -> StudyResult:
    """The lens on ``cfg.text``, or on ``text``: a string, or the text's token ids exactly as another
    tool fed them (without special tokens: mechlens adds ``<s> ... </s>``, or BOS per ``cfg.bos``, as
    for a string). A list of strings, or ``cfg.data``, is a corpus: the corpus lens (causal LMs,
    :func:`corpus_lens`). ``result.parts`` is a :class:`MaskedLensResult`, :class:`CausalLensResult` or
    :class:`CorpusLensResult`; ``result.metrics`` is derived from it."""
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    masked = arch.kind_of(model) == "masked"
    if cfg.data is not None or (text is not None and not isinstance(text, str) and text and not _is_ids(text)):
        return _corpus_result(model, cfg, None if cfg.data is not None else text)
    source = cfg.text if text is None else text
    batch = text_batch(model, source, bos=cfg.bos)
    if isinstance(source, str) and getattr(model.tokenizer, "is_fast", False):
        words = word_index(model, [source], batch)[0]
    else:  # token ids carry no characters, a slow (Python) tokenizer no character offsets: no words
        words = torch.full(batch.tokens.shape[1:], -1, dtype=torch.long)
    if not masked and int(batch.lengths[0]) < 2:
        fail("text", "is one token and no BOS is prepended: nothing to predict (pass a longer text or --bos)")
    typed = (_run_masked if masked else _run_causal)(model, cfg, batch, words)
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    res = StudyResult("lens", prov.model, metrics_of(typed), prov.to_dict(), dataclasses.asdict(cfg), tables(typed),
                      parts=typed)  # fmt: skip
    res.figures = figures(typed)
    return res


def _is_ids(text) -> bool:
    """One text as token ids (a sequence of ints), as opposed to a corpus (a sequence of strings)."""
    return all(isinstance(t, int | np.integer) for t in text)


_MEAN_FIELDS = ("target_logprob_by_layer", "rank_mean_by_layer", "entropy_by_layer", "kl_to_final_by_layer",
                "top1_agreement_by_layer")  # the by-layer mean of each of CORPUS_QUANTITIES  # fmt: skip


def _corpus_result(model, cfg: Config, texts) -> StudyResult:
    typed = _run_corpus(model, cfg, texts)
    masked = arch.kind_of(model) == "masked"
    prov = provenance_of(model).replace(bos="<s> ... </s>" if masked else "prepend" if cfg.bos else "none",
                                        seed=cfg.seed)  # fmt: skip
    rows = []
    for i, d in enumerate(readout_depth(len(typed.target_logprob_by_layer))):
        row = {"layer": i, "relative_depth": float(d)}
        row |= {q: float(getattr(typed, f)[i]) for q, f in zip(CORPUS_QUANTITIES, _MEAN_FIELDS, strict=True)}
        if typed.tuned is not None:
            row |= {f"tuned_{q}": float(getattr(typed.tuned, f)[i])
                    for q, f in zip(CORPUS_QUANTITIES, _MEAN_FIELDS, strict=True)}  # fmt: skip
        rows.append(row)
    res = StudyResult("lens", prov.model, metrics_of(typed), prov.to_dict(), dataclasses.asdict(cfg),
                      {"corpus_lens": rows}, parts=typed)  # fmt: skip
    res.figures = figures(typed)
    return res


# -- tables, figures, findings ---------------------------------------------------------------------


def tables(r: MaskedLensResult | CausalLensResult) -> dict[str, list[dict[str, Any]]]:
    """The tidy CSV rows: ``sliding`` (masked: readout point x text position) or ``lens`` (causal)."""
    n_points = len(r.target_logprob_by_layer)
    if isinstance(r, MaskedLensResult):
        words = r.text_tokens
        return {
            "sliding": [
                {"layer": li, "position": p, "token": words[p], "predicted": r.predicted_tokens[li][p],
                 "target_logprob": float(r.sliding_target_logprob[li, p]),
                 "max_logprob": float(r.sliding_max_logprob[li, p]), "rank": int(r.sliding_target_rank[li, p]),
                 "top2_gap": float(r.sliding_top2_gap[li, p])}
                for li in range(n_points) for p in range(len(words))
            ],
        } | _tuned_table(r)  # fmt: skip
    n_pos = r.target_logprob.shape[1]
    out = {
        "lens": [
            {"layer": li, "position": p, "token": r.text_tokens[p], "next_token": r.text_tokens[p + 1],
             "predicted": r.predicted_tokens[li][p], "target_logprob": float(r.target_logprob[li, p]),
             "rank": int(r.rank[li, p]), "entropy": float(r.entropy[li, p]),
             "kl_to_final": float(r.kl_to_final[li, p]), "top1_agrees_final": bool(r.top1_agrees_final[li, p])}
            for li in range(n_points) for p in range(n_pos)
        ]
    }  # fmt: skip
    return out | _tuned_table(r)


def _tuned_table(r) -> dict[str, list[dict[str, Any]]]:
    """``tuned_lens`` rows: both lenses' statistics per readout point and cell (empty without a tuned lens)."""
    if r.tuned is None:
        return {}
    a, b = r.tuned.logit.per_cell(), r.tuned.tuned.per_cell()
    n_points, n_cells = a["target_logprob"].shape
    return {
        "tuned_lens": [
            {"layer": li, "position": p, **{f"logit_{q}": float(a[q][li, p]) for q in CORPUS_QUANTITIES},
             **{f"tuned_{q}": float(b[q][li, p]) for q in CORPUS_QUANTITIES}}
            for li in range(n_points) for p in range(n_cells)
        ]
    }  # fmt: skip


def figures(r: MaskedLensResult | CausalLensResult | CorpusLensResult) -> dict[str, go.Figure]:
    """``laminar`` and ``heatmap`` (and, causal, ``rank_trajectories``) from a typed result; the corpus
    lens' per-layer figures (:func:`corpus_figures`) from a corpus result."""
    if isinstance(r, CorpusLensResult):
        return corpus_figures(r) | tuned_figures(r)
    if isinstance(r, MaskedLensResult):
        where = f"masked position {r.position} ({r.position_token!r})"
        return {
            "laminar": laminar_figure(r.target_logprob_by_layer, r.max_logprob_by_layer, r.sqrt_layer_fit, where),
            "heatmap": sliding_heatmap(r.sliding),
        } | tuned_figures(r)
    shown = r.text_tokens[:-1]
    where = "mean over positions" + (" (BOS at position 0)" if r.bos else "")
    return {
        "laminar": laminar_figure(r.target_logprob_by_layer, r.max_logprob_by_layer, r.sqrt_layer_fit, where),
        "heatmap": text_heatmap(r.predicted_tokens, r.lens.max_logprob, r.target_logprob, r.rank, shown,
                                "Causal lens", scale_note="every position shown" + (", BOS included" if r.bos else "")),
        "rank_trajectories": rank_figure(r.rank, r.text_tokens[1:]),
    } | tuned_figures(r)  # fmt: skip


_TITLES = {"target_logprob": "target log-prob (nats)", "rank": "rank of the target (mean, 0-based)",
           "entropy": "entropy (nats)", "kl_to_final": "KL to the final readout (nats)",
           "top1_agrees_final": "top-1 agreement with the final readout"}  # fmt: skip


def lens_units(r) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str] | None:
    """Per-unit values of both lenses, ``quantity -> (logit [unit, layer], tuned [unit, layer])``, and the
    unit (``text``: the corpus reservoir's per-text means; ``token``: the cells of one text); None without
    a tuned lens."""
    if isinstance(r, CorpusLensResult):
        if r.tuned is None:
            return None
        return {q: (r.per_text[:, i], r.tuned.per_text[:, i]) for i, q in enumerate(CORPUS_QUANTITIES)}, "text"
    if getattr(r, "tuned", None) is None:
        return None
    a, b = r.tuned.logit.per_cell(), r.tuned.tuned.per_cell()
    return {q: (np.asarray(a[q], np.float64).T, np.asarray(b[q], np.float64).T) for q in CORPUS_QUANTITIES}, "token"


def lens_intervals(units: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over units per readout point and its 95% percentile bootstrap interval (2,000 resamples, seed 0:
    :mod:`mechlens.comparison`'s settings); with fewer than 2 units the interval is the mean itself."""
    from mechlens.stats.bootstrap import mean_intervals

    mean = units.mean(0)
    ci = mean_intervals([units[:, j] for j in range(units.shape[1])], 0.95, 2000, "percentile", seed)
    lo = np.array([m if c[0] is None else c[0] for m, c in zip(mean, ci, strict=True)])
    hi = np.array([m if c[1] is None else c[1] for m, c in zip(mean, ci, strict=True)])
    return mean, lo, hi


def tuned_figures(r) -> dict[str, go.Figure]:
    """One figure per lens statistic with the logit lens and the tuned lens by readout point, each with its
    bootstrap band (over texts for a corpus, over the text's cells for one text); none without a tuned lens."""
    got = lens_units(r)
    if got is None:
        return {}
    units, unit = got
    figs = {}
    for q, pair in units.items():
        f = go.Figure()
        for name, u, colour in (("logit lens", pair[0], "31,119,180"), ("tuned lens", pair[1], "214,39,40")):
            mean, lo, hi = lens_intervals(u)
            x = np.arange(len(mean))
            f.add_scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([hi, lo[::-1]]), fill="toself",
                          fillcolor=f"rgba({colour},0.2)", line={"width": 0}, hoverinfo="skip",
                          name=f"{name} 95% CI", showlegend=True)  # fmt: skip
            f.add_scatter(x=x, y=mean, mode="lines+markers", name=name, line={"color": f"rgb({colour})"})
        n = pair[0].shape[0]
        f.update_layout(title=f"Logit lens vs tuned lens: {_TITLES[q]} by readout point<br><sup>mean over {n} "
                              f"{unit}s{' (per-text means)' if unit == 'text' else ''}; bands: 95% percentile "
                              f"bootstrap over {unit}s (2,000 resamples, seed 0)</sup>",
                        xaxis_title="readout point (0 = embeddings)", yaxis_title=_TITLES[q])  # fmt: skip
        figs[f"tuned_{q}"] = f
    return figs


def laminar_figure(target_logprob, max_logprob, fit: LineFit, where: str = "") -> go.Figure:
    """Target and top-1 log-prob by readout point, with the sqrt(layer) fit of the target."""
    y = np.asarray(target_logprob)
    x = np.arange(len(y))
    f = go.Figure()
    f.add_scatter(x=x, y=y, mode="lines+markers", name="target log-prob")
    f.add_scatter(x=x, y=np.asarray(max_logprob), mode="lines+markers", name="max log-prob")
    f.add_scatter(x=x, y=np.asarray(fit.fitted), mode="lines", line_dash="dash",
                  name=f"{fit.intercept:.2f} + {fit.slope:.2f}·sqrt(layer)")  # fmt: skip
    title = "Log-prob by layer" + (
        f"<br><sup>{where}; the model's own head at every readout point</sup>" if where else ""
    )
    f.update_layout(title=title, xaxis_title="readout point (0 = embeddings)", yaxis_title="log-prob (nats)")
    return f


def rank_figure(rank, next_tokens: Sequence[str]) -> go.Figure:
    """Causal lens: each position's next-token rank by readout point (log axis, 1 = top)."""
    rank = np.asarray(rank)
    x = list(range(rank.shape[0]))
    f = go.Figure([go.Scatter(x=x, y=np.maximum(rank[:, p], 0) + 1, name=f"{p}: {next_tokens[p]!r}",
                              mode="lines+markers") for p in range(rank.shape[1])])  # fmt: skip
    f.update_layout(title="Rank of the next token by layer (1 = top)", xaxis_title="readout point (0 = embeddings)",
                    yaxis_type="log", yaxis_title="rank + 1", legend_title_text="position: next token")  # fmt: skip
    return f


def sliding_heatmap(s: SlidingMask) -> go.Figure:
    """Part 6: the sliding mask as a text heatmap (readout point x masked position), coloured by the
    top-1 log-prob min-max scaled over the positions ``s`` holds: text tokens only, or with
    ``<s>``/``</s>`` when it was computed with ``specials=True`` (the title says which)."""
    labels = [f"{i}:{w}" for i, w in enumerate(s.text_only().tokens)]
    it = iter(labels)
    x = [next(it) if t else f"[{w}]" for t, w in zip(s.is_text, s.tokens, strict=True)]
    note = "text tokens and <s>/</s> (as the original)" if s.has_specials else "text tokens only (<s>/</s> not shown)"
    return text_heatmap(s.predicted_tokens, s.max_logprob, s.target_logprob, s.target_rank, x, "Masked-LM lens",
                        scale_note=note, top2_gap=s.top2_gap, labelled=True)  # fmt: skip


def text_heatmap(predicted, max_lp, target_lp, rank, words, title, *, scale_note: str = "these cells",
                 top2_gap=None, labelled: bool = False) -> go.Figure:  # fmt: skip
    """Layers x positions of predicted tokens, coloured by the max log-prob min-max scaled over the
    cells shown (``scale_note`` says which, in the title)."""
    z = np.asarray(max_lp, dtype=np.float64)
    scaled = (z - np.nanmin(z)) / max(np.nanmax(z) - np.nanmin(z), 1e-12)
    gap = np.full_like(z, np.nan) if top2_gap is None else np.asarray(top2_gap, dtype=np.float64)
    custom = np.stack([np.asarray(target_lp), np.asarray(rank), z, gap], -1)
    shown = [[t if len(t) <= 9 else t[:8] + "…" for t in row] for row in predicted]  # cells stay legible
    hover = ("layer %{y}, %{x}<br>predicted %{customdata[4]} (log-prob %{customdata[2]:.2f})"
             "<br>original token log-prob %{customdata[0]:.2f}, rank %{customdata[1]}")  # fmt: skip
    if top2_gap is not None:
        hover += "<br>top-1 minus top-2 log-prob %{customdata[3]:.2f}"
    f = go.Figure(
        go.Heatmap(
            z=scaled,
            x=list(words) if labelled else [f"{i}:{w}" for i, w in enumerate(words)],
            y=list(range(len(z))),
            text=shown,
            texttemplate="%{text}",
            textfont={"size": 11},
            customdata=np.concatenate([custom.astype(object), np.asarray(predicted, dtype=object)[..., None]], -1),
            colorscale="Viridis",
            colorbar={"title": "scaled"},
            hovertemplate=hover + "<extra></extra>",
        )
    )
    f.update_layout(title=f"{title}: predicted tokens<br><sup>colour: max log-prob, min-max scaled over "
                          f"{scale_note}</sup>",
                    yaxis_title="readout point (0 = embeddings)", xaxis_title="position: original token",
                    width=max(800, 80 * len(words) + 200), height=max(400, 45 * len(z) + 200),
                    xaxis={"tickangle": -45})  # fmt: skip
    return f


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    fit = m["sqrt_layer_fit"]
    lp = m["target_logprob_by_layer"]
    if m["kind"] == "corpus":
        kl, agree = m["kl_to_final_by_layer"], m["top1_agreement_by_layer"]
        return _with_tuned(
            m,
            [
                f"corpus lens over {m['n_texts']} texts ({m['n_predictions']} predictions): log-prob by layer "
                f"{format_values(lp)}",
                f"Over {m['n_predictions']} {m.get('lensed', 'next-token positions')} of {m['n_texts']} texts of "
                f"{m['data']}, the target token's mean log-prob goes from {lp[0]:.2f} at the embeddings to "
                f"{lp[-1]:.2f} at the last layer (sqrt(layer) slope {fit['slope']:.2f}).",
                f"KL to the final layer falls from {kl[0]:.2f} nats at the embeddings to {kl[-2]:.2f} one layer "
                f"before the last; the lens' top-1 agrees with the final layer's at {100 * agree[0]:.0f}% and "
                f"{100 * agree[-2]:.0f}% of positions there.",
            ],
        )
    lines = [
        f"{m['kind']} lens: target log-prob by layer {format_values(lp)}; sqrt(layer) slope {fit['slope']:.3f}",
        f"The target's log-prob goes from {lp[0]:.2f} at the embeddings to {lp[-1]:.2f} at the last layer; "
        f"a fit on sqrt(layer) has slope {fit['slope']:.2f} per sqrt(layer).",
    ]
    if m["kind"] == "masked":
        lines.append(
            f"With every position masked in turn, the last layer recovers the original token at "
            f"{100 * m['final_top1_accuracy_sliding']:.0f}% of positions."
        )
        u, k = m["part1_unmasked"], m["part2_masked"]
        lines.append(
            f"At readout point {m['layer']} (parts 1-2) the original token {m['position_token']!r} has log-prob "
            f"{u['target_logprob']:.2f} (rank {u['target_rank']}) unmasked and {k['target_logprob']:.2f} "
            f"(rank {k['target_rank']}) masked."
        )
        if "sliding_top2_gap" in m:
            gap = np.asarray(m["sliding_top2_gap"], dtype=np.float64).mean(1)
            lines.append(
                f"The top-1 leads the top-2 by {gap[0]:.2f} nats on average over positions at the embeddings "
                f"and by {gap[-1]:.2f} at the last layer."
            )
    else:
        kl = m["kl_to_final_by_layer"]
        lines.append(
            f"The last layer predicts the next token at {100 * m['final_top1_accuracy']:.0f}% of positions; KL "
            f"to the final layer falls from {kl[0]:.2f} nats at the embeddings to {kl[-2]:.2f} one layer before it."
        )
        if "top1_agreement_by_layer" in m:
            agree = m["top1_agreement_by_layer"]
            lines.append(
                f"The lens' top-1 agrees with the final layer's at {100 * agree[0]:.0f}% of positions at the "
                f"embeddings and {100 * agree[-2]:.0f}% one layer before the last."
            )
    return _with_tuned(m, lines)


def _with_tuned(m: Mapping[str, Any], lines: list[str]) -> list[str]:
    """``lines`` and, with a tuned lens, where each lens' mean KL to the final readout first drops below
    1 nat and the KL of both by readout point."""
    t = m.get("tuned")
    if not t:
        return lines
    if m["kind"] == "corpus":
        logit, tuned = m["kl_to_final_by_layer"], t["kl_to_final_by_layer"]
        where = f"over {m['n_predictions']} {m.get('lensed', 'positions')} of {m['n_texts']} texts"
        if m.get("tuned_note"):
            where += f" ({m['tuned_note']})"
    else:
        logit, tuned = t["logit"]["kl_to_final_by_layer"], t["tuned"]["kl_to_final_by_layer"]
        where = "over the text's positions" + (" (each masked in turn)" if m["kind"] == "masked" else "")

    def depth(kl) -> str:
        d = first_depth_below(kl)
        n = len(kl) - 1
        if d is None or d == n:  # the last point reads the model's own output: KL 0 by construction
            return "only at the last readout point"
        return f"first at readout point {d} of 0..{n} (depth {d / n:.2f})"

    return [
        *lines,
        f"Mean KL to the final readout {where}: below 1 nat {depth(logit)} for the logit lens, {depth(tuned)} for "
        "the tuned lens.",
        f"KL to final by readout point, logit lens {format_values(logit)}, tuned lens {format_values(tuned)} nats.",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same text)."""
    f = go.Figure()
    for model, e in entries.items():
        y = e["metrics"]["target_logprob_by_layer"]
        f.add_scatter(x=readout_depth(len(y)), y=y, name=f"{model} ({e['metrics']['kind']})", mode="lines+markers")
    f.update_layout(title="Lens: target log-prob by relative depth", yaxis_title="log-prob",
                    xaxis_title="relative depth (readout point i of L+1 at i/L)")  # fmt: skip
    return {"comparison": f}


# -- per-unit samples ------------------------------------------------------------------------------


def samples(result: StudyResult):
    """Per-token values for cross-model comparison (:mod:`mechlens.comparison`): one row per quantity,
    readout point and token, ``unit = "token"`` (the study reads one text), ``sample`` = the token's
    index as the study keys it and ``position`` empty (the tokens are the resampled units, so the mean
    over units is the by-layer statistic). ``layer`` is the readout point ``i`` (0 = embeddings) at
    relative depth ``readout_depth(L + 1)[i]``.

    * causal: ``target_logprob``, ``entropy``, ``kl_to_final``, ``rank`` (0-based, as a float) and
      ``top1_agrees_final`` (0/1) per input position ``p`` (predicting token ``p + 1``); ``word`` is the
      word that the *predicted* token begins (so models with different tokenizers meet where both
      predict the start of the same word). Means over units: ``target_logprob_by_layer``,
      ``entropy_by_layer``, ``kl_to_final_by_layer``, ``rank_mean_by_layer`` (not the median
      ``rank_by_layer``), ``top1_agreement_by_layer``.
    * masked: ``target_logprob``, the sliding-mask log-prob of the original token per text position
      ``p``; ``word`` the word that token begins. Mean over units: ``sliding_target_logprob_by_layer``.

    ``word`` is empty where the token begins no word (it continues one, or is BOS), and everywhere when
    the inputs were token ids or the tokenizer is a slow one (no character offsets).
    """
    import pandas as pd

    r = result.parts
    if isinstance(r, CorpusLensResult):
        c = r
        n_s, n_points = c.per_text.shape[0], c.per_text.shape[2]
        layer = np.tile(np.arange(n_points), n_s)
        return pd.concat(
            [
                sample_table(
                    lens_prefix + q,
                    src.per_text[:, qi, :].reshape(-1),
                    unit="text",
                    sample=np.repeat(c.sample_text_index, n_points),
                    layer=layer,
                    relative_depth=readout_depth(n_points)[layer],
                )
                for lens_prefix, src in (("", c), ("tuned_", c.tuned))
                if src is not None
                for qi, q in enumerate(CORPUS_QUANTITIES)
            ],
            ignore_index=True,
        )
    if isinstance(r, MaskedLensResult):
        quantities = {"target_logprob": r.sliding_target_logprob}
        if r.tuned is not None:  # the logit lens' other statistics at the same cells
            quantities |= {q: v for q, v in r.tuned.logit.per_cell().items() if q != "target_logprob"}
    else:
        quantities = {
            "target_logprob": r.target_logprob,
            "entropy": r.entropy,
            "kl_to_final": r.kl_to_final,
            "rank": r.rank,
            "top1_agrees_final": r.top1_agrees_final,
        }
    if r.tuned is not None:
        quantities |= {f"tuned_{q}": v for q, v in r.tuned.tuned.per_cell().items()}
    n_points, n_pos = r.target_logprob_by_layer.shape[0], len(r.word)
    depth = readout_depth(n_points)
    layer = np.repeat(np.arange(n_points), n_pos)
    sample = np.tile(np.arange(n_pos), n_points)
    word = np.asarray(r.word, dtype=np.int64)[sample]  # negative: the token begins no word
    frames = [
        sample_table(
            q,
            np.asarray(v, dtype=np.float64).reshape(-1),
            unit="token",
            sample=sample,
            layer=layer,
            relative_depth=depth[layer],
            word=word,
        )
        for q, v in quantities.items()
    ]
    return pd.concat(frames, ignore_index=True)


def incomparable(provenances: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Quantities of :func:`samples` that are not comparable between these models: ``target_logprob``
    when masked and causal LMs are compared (a masked token's log-prob with its own position hidden vs
    the next token's log-prob from the tokens before it)."""
    kinds = {m: p.get("kind") for m, p in provenances.items()}
    if len(set(kinds.values())) > 1:
        why = ("masked LMs read the masked token itself, causal LMs the next token: "
               + ", ".join(f"{m}: {k}" for m, k in kinds.items()))  # fmt: skip
        return {"target_logprob": why, "tuned_target_logprob": why}
    return {}


# -- the lesson ----------------------------------------------------------------------------------

LESSON = (
    Step(
        "Setup: config, models, the text",
        "The study reads one text. Conventions that differ from the original notebook, each a `Config` "
        "field: parts 1-2 read readout point `layer` (default the middle one, `(n_layers + 1) // 2`, i.e. "
        "`n_layers // 2` for an even depth; the original read one fixed layer of roberta-large); a causal LM "
        "gets BOS prepended (`bos=True`; HF's GPT-2 tokenizer adds none, `bos=False` feeds the text as is); "
        "the heatmap's colour is min-max scaled over text tokens only (`heatmap_specials=True` also masks "
        "`<s>`/`</s>` and scales over them, as the original did). The readout is the model's own final norm "
        "and unembedding (the full MLM head for a masked LM) at every readout point: 0 = the embeddings "
        "(`blocks.0.hook_resid_pre`), `l + 1` = the output of block `l` (`blocks.l.hook_resid_post`).",
        "config = lens.Config()  # position=8 (' eggs'), layer=None (the middle one), bos=True\n"
        'model = load_model("tiny-mlm")  # or "roberta-large" online\n'
        "batch = lens.text_batch(model, config.text)  # <s> ... </s>\n"
        "print(model.tokenizer.convert_ids_to_tokens(batch.tokens[0].tolist()))\n"
        "print('parts 1-2 read readout point', lens.default_layer(model), 'of 0 ..', model.cfg.n_layers)",
    ),
    Step(
        "Parts 1-2: one layer, unmasked then masked",
        "`masked_lens` reads the studied position (text token `config.position`) through the MLM head at "
        "every readout point, once in the text as given and once with that position replaced by `<mask>` "
        "(one forward of both sequences). `part1_unmasked` and `part2_masked` are readout point `layer`: "
        "unmasked, the model sees the token and copies it; masked, it has to infer it from the context. "
        "Look at the gap between the two log-probs of the original token.",
        "masked = lens.masked_lens(model, batch, position=config.position, layer=config.layer, top_k=config.top_k)\n"
        "print('target', repr(masked.target_token), 'at readout point', masked.layer)\n"
        "print('unmasked:', masked.part1_unmasked)\n"
        "print('masked:  ', masked.part2_masked)",
    ),
    Step(
        "Part 3: the laminar view and the sqrt(layer) fit",
        "The masked position at every readout point: the original token's log-prob and rank, the top-1 "
        "log-prob, and a least-squares fit `log-prob ~ intercept + slope * sqrt(layer)` (`sqrt_layer_fit`; "
        "on a 2-d array it fits every position and exposes each one's intercept and slope). In a trained "
        "model the target's log-prob rises with depth, fastest in the last layers.",
        "fit = lens.sqrt_layer_fit(masked.target_logprob)\n"
        "print('log-prob by layer', masked.target_logprob.round(2), 'rank', masked.target_rank)\n"
        "print('top-1 by layer', masked.predicted_tokens)\n"
        "print(f'intercept {fit.mean.intercept:.2f}, slope {fit.mean.slope:.2f} per sqrt(layer)')\n"
        "lens.laminar_figure(masked.target_logprob, masked.max_logprob, fit.mean, 'the masked position').show()",
    ),
    Step(
        "Parts 4-5: every position masked in turn",
        "`sliding_mask` builds one variant per text position with that position masked and runs them all "
        "in one batched forward; each is read out at its masked position. Per readout point and position: "
        "the original token's log-prob and rank, and the top-2 gap (top-1 minus top-2 log-prob: how "
        "decided the lens is). The per-position fits give each position's intercept and slope; look for "
        "positions the last layer recovers (rank 0) and for where the gap opens.",
        "sliding = lens.sliding_mask(model, batch, top_k=config.top_k)\n"
        "per_position = lens.sqrt_layer_fit(sliding.target_logprob)\n"
        "for p, tok in enumerate(sliding.tokens):\n"
        "    print(f'{p:2d} {tok!r:>12} final rank {sliding.target_rank[-1, p]:5d}  '\n"
        "          f'top-2 gap {sliding.top2_gap[-1, p]:.2f}  intercept {per_position.intercepts[p]:6.2f}  '\n"
        "          f'slope {per_position.slopes[p]:.2f}')",
    ),
    Step(
        "Part 6: the text heatmap",
        "The sliding mask as a heatmap: rows are readout points, columns the masked positions, each cell "
        "the lens' top-1 token, coloured by its log-prob min-max scaled over the cells shown (text tokens "
        "only by default; `sliding_mask(..., specials=True)` adds `<s>`/`</s>` as the original did, and the "
        "title says which). Hover for the original token's log-prob, rank and the top-2 gap.",
        "lens.sliding_heatmap(sliding).show()",
    ),
    Step(
        "The causal lens",
        "A causal LM read out the same way (final LayerNorm with its statistics recomputed at each readout "
        "point, then the unembedding): at every position the log-prob and rank of the next token, the "
        "entropy, the KL divergence from the final readout, and whether the top-1 already agrees with the "
        "final one. KL falls to 0 at the last readout point by construction.",
        'causal_model = load_model("tiny-gpt2")  # or "gpt2" online\n'
        "cbatch = lens.text_batch(causal_model, config.text, bos=config.bos)  # BOS prepended by default\n"
        "causal = lens.causal_lens(causal_model, cbatch, top_k=config.top_k)\n"
        "print('next-token log-prob by layer', causal.target_logprob.mean(1).round(2))\n"
        "print('KL to final by layer', causal.kl_to_final.mean(1).round(2))\n"
        "print('top-1 agrees with final', causal.top1_agrees_final.mean(1).round(2))\n"
        "lens.rank_figure(causal.rank, causal.tokens[1:]).show()",
    ),
    Step(
        "The tuned lens",
        "The logit lens assumes every layer speaks the final layer's basis. The tuned lens (Belrose et al. "
        "2023) learns one affine translator per readout point (`d_model x d_model` + bias, starting at the "
        "identity, the last one kept the identity), trained to minimise KL(final || translated readout) on "
        "streamed texts (`mechlens train-lens --model M --data SOURCE --out DIR`, or "
        "`tuned_lens.train_tuned_lens`). The embedded models ship one (`tuned='auto'` reads it); "
        "`Config(tuned=DIR)` reads your own, `tuned='none'` none. Both lenses are read from the same forward, "
        "at the same positions: compare where each one's KL to the final readout falls below 1 nat. A single "
        "text may be among the lens' training texts: for a held-out evaluation pass "
        "`data=` (the lens' own training source is then read on its held-out texts only).",
        'tuned = lens.tuned_lens_for(causal_model, "tiny-gpt2")  # the shipped tuned lens of tiny-gpt2\n'
        "print('trained on', tuned.card.data, 'for', tuned.card.steps, 'steps; held out: the first',\n"
        "      tuned.card.heldout, 'texts')\n"
        'compared = lens.run(causal_model, lens.Config(tuned="tiny-gpt2"))\n'
        "print('KL to final, logit lens', compared.parts.tuned.logit.kl_to_final_by_layer.round(2))\n"
        "print('KL to final, tuned lens', compared.parts.tuned.tuned.kl_to_final_by_layer.round(2))\n"
        'compared.figures["tuned_kl_to_final"].show()',
    ),
    Step(
        "The whole study",
        "`run` composes the parts (the masked parts from one batched forward) into a typed result "
        "(`result.parts`), from which `results.json`'s metrics, the CSV tables and the figures are derived; "
        "`samples(result)` gives the per-token values behind the by-layer means, for comparisons across "
        "models with bootstrap intervals.",
        "result = lens.run(model, config)\n"
        'result.figures["laminar"].show()\n'
        'result.figures["heatmap"].show()\n'
        "causal_result = lens.run(causal_model, config)\n"
        'causal_result.figures["heatmap"].show()\n'
        "print(lens.samples(causal_result).groupby(['quantity', 'layer'])['value'].mean().unstack())\n"
        "result.provenance",
    ),
)
