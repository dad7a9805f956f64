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
* Part functions read **one sequence** (a :class:`~mechlens.encoding.TokenBatch` of one text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mechlens import arch
from mechlens.axes import readout_depth
from mechlens.encoding import word_index
from mechlens.lens.readings import (
    QUANTITIES as CORPUS_QUANTITIES,
)
from mechlens.loading import provenance_of
from mechlens.options import fail
from mechlens.result import StudyResult, metrics_of, sample_table
from mechlens.studies.lens.figures import (
    compare,
    corpus_figures,
    figures,
    headline,
    laminar_figure,
    lens_intervals,
    lens_units,
    rank_figure,
    sliding_heatmap,
    text_heatmap,
    tuned_figures,
)
from mechlens.studies.lens.lesson import LESSON
from mechlens.studies.lens.parts import (
    NAME,
    CausalLens,
    CausalLensResult,
    Config,
    CorpusLensResult,
    LensPoint,
    LineFit,
    MaskedLens,
    MaskedLensResult,
    SlidingMask,
    SqrtLayerFit,
    _run_causal,
    _run_corpus,
    _run_masked,
    causal_lens,
    default_layer,
    masked_lens,
    next_token_targets,
    sliding_mask,
    sliding_mask_batch,
    sqrt_layer_fit,
    text_batch,
    tuned_lens_for,
    tuned_source,
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
    res = StudyResult(
        "lens", prov.model, metrics_of(typed), prov.to_dict(), dataclasses.asdict(cfg), tables(typed), parts=typed
    )
    res.figures = figures(typed)
    return res


def _is_ids(text) -> bool:
    """One text as token ids (a sequence of ints), as opposed to a corpus (a sequence of strings)."""
    return all(isinstance(t, int | np.integer) for t in text)


_MEAN_FIELDS = (
    "target_logprob_by_layer",
    "rank_mean_by_layer",
    "entropy_by_layer",
    "kl_to_final_by_layer",
    "top1_agreement_by_layer",
)  # the by-layer mean of each of CORPUS_QUANTITIES


def _corpus_result(model, cfg: Config, texts) -> StudyResult:
    typed = _run_corpus(model, cfg, texts)
    masked = arch.kind_of(model) == "masked"
    prov = provenance_of(model).replace(
        bos="<s> ... </s>" if masked else "prepend" if cfg.bos else "none", seed=cfg.seed
    )
    rows = []
    for i, d in enumerate(readout_depth(len(typed.target_logprob_by_layer))):
        row = {"layer": i, "relative_depth": float(d)}
        row |= {q: float(getattr(typed, f)[i]) for q, f in zip(CORPUS_QUANTITIES, _MEAN_FIELDS, strict=True)}
        if typed.tuned is not None:
            row |= {
                f"tuned_{q}": float(getattr(typed.tuned, f)[i])
                for q, f in zip(CORPUS_QUANTITIES, _MEAN_FIELDS, strict=True)
            }
        rows.append(row)
    res = StudyResult(
        "lens",
        prov.model,
        metrics_of(typed),
        prov.to_dict(),
        dataclasses.asdict(cfg),
        {"corpus_lens": rows},
        parts=typed,
    )
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
                {
                    "layer": li,
                    "position": p,
                    "token": words[p],
                    "predicted": r.predicted_tokens[li][p],
                    "target_logprob": float(r.sliding_target_logprob[li, p]),
                    "max_logprob": float(r.sliding_max_logprob[li, p]),
                    "rank": int(r.sliding_target_rank[li, p]),
                    "top2_gap": float(r.sliding_top2_gap[li, p]),
                }
                for li in range(n_points)
                for p in range(len(words))
            ],
        } | _tuned_table(r)
    n_pos = r.target_logprob.shape[1]
    out = {
        "lens": [
            {
                "layer": li,
                "position": p,
                "token": r.text_tokens[p],
                "next_token": r.text_tokens[p + 1],
                "predicted": r.predicted_tokens[li][p],
                "target_logprob": float(r.target_logprob[li, p]),
                "rank": int(r.rank[li, p]),
                "entropy": float(r.entropy[li, p]),
                "kl_to_final": float(r.kl_to_final[li, p]),
                "top1_agrees_final": bool(r.top1_agrees_final[li, p]),
            }
            for li in range(n_points)
            for p in range(n_pos)
        ]
    }
    return out | _tuned_table(r)


def _tuned_table(r) -> dict[str, list[dict[str, Any]]]:
    """``tuned_lens`` rows: both lenses' statistics per readout point and cell (empty without a tuned lens)."""
    if r.tuned is None:
        return {}
    a, b = r.tuned.logit.per_cell(), r.tuned.tuned.per_cell()
    n_points, n_cells = a["target_logprob"].shape
    return {
        "tuned_lens": [
            {
                "layer": li,
                "position": p,
                **{f"logit_{q}": float(a[q][li, p]) for q in CORPUS_QUANTITIES},
                **{f"tuned_{q}": float(b[q][li, p]) for q in CORPUS_QUANTITIES},
            }
            for li in range(n_points)
            for p in range(n_cells)
        ]
    }


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
        why = "masked LMs read the masked token itself, causal LMs the next token: " + ", ".join(
            f"{m}: {k}" for m, k in kinds.items()
        )
        return {"target_logprob": why, "tuned_target_logprob": why}
    return {}


__all__ = [
    "LESSON",
    "NAME",
    "CausalLens",
    "CausalLensResult",
    "Config",
    "CorpusLensResult",
    "LensPoint",
    "LineFit",
    "MaskedLens",
    "MaskedLensResult",
    "SlidingMask",
    "SqrtLayerFit",
    "causal_lens",
    "compare",
    "corpus_figures",
    "default_layer",
    "figures",
    "headline",
    "incomparable",
    "laminar_figure",
    "lens_intervals",
    "lens_units",
    "masked_lens",
    "next_token_targets",
    "rank_figure",
    "run",
    "samples",
    "sliding_heatmap",
    "sliding_mask",
    "sliding_mask_batch",
    "sqrt_layer_fit",
    "tables",
    "text_batch",
    "text_heatmap",
    "tuned_figures",
    "tuned_lens_for",
    "tuned_source",
]
