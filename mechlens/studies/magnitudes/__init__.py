"""Study 4 -- magnitudes of what attention adds to the residual stream (original: gpt2-large on the
rotten_tomatoes test split).

Part 1 the L2 norm of ``blocks.{l}.hook_attn_out`` at every valid token of every text and layer, with
its statistics by layer and position (means, log-norm histograms and percentiles):
:func:`attn_out_norms`. Part 2 the line of the log mean norm on position, per layer: :func:`position_fit`.
Part 3 the regression of each token's log-norm on its two predecessors' log-norms, per layer:
:func:`previous_norm_fit`. :func:`run` composes the parts into a :class:`MagnitudesResult`;
:func:`samples` gives the per-text statistics of cross-model comparisons (log RMS by layer and position).

Conventions (each switchable): BOS is prepended (``bos=False``, ``--no-bos``; Hugging Face's GPT-2
tokenizer adds none); a masked LM always gets ``<s> ... </s>``, and special tokens are never counted.
Position 0 is excluded from every statistic (``exclude_first=False``, ``--no-exclude-first``): with BOS
it is the attention sink. Texts keep their first ``max_tokens`` = 128 text tokens (``--max-tokens``).
The position fit uses the first ``n_fit_positions`` positions that valid tokens reached: 1..30 by
default (the original's ``arange(n_fit)`` silently dropped its NaN point 0 and fitted 1..29). Norms are
taken on Hugging Face's raw weights (``--weights processed`` centres the writing weights, which changes
them). "Attention output" is ``blocks.{l}.hook_attn_out``: what attention adds to the residual stream in
pre-LN models, but the block's output after the residual add and LayerNorm in post-LN encoders (BERT,
RoBERTa; see :mod:`mechlens.arch`). Across widths compare the log RMS, ``log(norm / sqrt(d_model)) =
log norm - 0.5 log d_model``.

Corpus scale: texts stream from the source (``--data``; :func:`mechlens.data.iter_indexed`) and are
tokenised one mini-batch at a time; only ``blocks.{l}.hook_attn_out`` is cached, and each batch is
reduced at once to float64 sums: per (layer, position) (norm and log-norm means), per layer (histogram,
the previous-norm regression's normal equations, per-text means), and counts of text lengths. Memory
does not grow with the number of texts: the sums have ``n_layers x (max_tokens + 2)`` entries, and two
seeded samples are capped at their sizes: ``token_reservoir`` tokens (200,000) for the log-norm
percentiles, which are exact when the corpus has no more valid tokens and otherwise over that sample (the
metric ``lognorm_percentile_basis`` and the figure say which), and ``reservoir`` texts (2,000) for the
per-text statistics of comparisons, about ``(n_layers + 1) x (max_tokens + 3)`` float64 numbers per text
(2,000 texts of gpt2-large at 128 tokens: 78 MB; lower ``--reservoir`` for longer texts). Both samples keep
items by a hash of their global index, so they are the same whatever the batching or sharding. Under
``torchrun`` each rank streams its share of the texts and the sums and samples are merged over the
ranks: the results equal a single process's up to the order of float64 additions. Statistics key on the
model's position ids and a valid-token mask (padding, and position 0 by default, excluded), so the
padding side does not change them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechlens import arch
from mechlens.axes import block_depth
from mechlens.encoding import Texts
from mechlens.errors import DataError
from mechlens.loading import provenance_of
from mechlens.result import StudyResult, metrics_of, sample_table
from mechlens.studies.magnitudes.figures import (
    compare,
    density_figure,
    figures,
    fits_figure,
    headline,
    heatmap_figure,
    percentile_figure,
)
from mechlens.studies.magnitudes.lesson import (
    LESSON,
)
from mechlens.studies.magnitudes.parts import (
    BETA_NAMES,
    PERCENTILES,
    AttnOutNorms,
    Config,
    MagnitudesResult,
    PositionFit,
    PreviousNormFit,
    attn_out_names,
    compose,
    corpus,
    encode_inputs,
    position_budget,
    position_fit,
    previous_norm_fit,
    word_by_position,
)
from mechlens.studies.magnitudes.streaming import (
    NormStatistics,
    attn_out_norms,
    position_grid,
    previous_norm_equations,
)

# -- the study -----------------------------------------------------------------------------------------


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    """Every part on the first ``cfg.n_texts`` of ``texts`` (default: ``cfg.data``, streamed; strings or
    token ids without special tokens), this rank's share under ``torchrun`` with the statistics merged over
    the ranks. ``result.parts`` is the :class:`MagnitudesResult`; ``result.metrics`` derives from it."""
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    norms = attn_out_norms(
        model,
        corpus(cfg, texts),
        bos=cfg.bos,
        padding_side=cfg.padding_side,
        max_tokens=cfg.max_tokens,
        exclude_first=cfg.exclude_first,
        batch_size=cfg.batch_size,
        hist_bins=cfg.hist_bins,
        hist_range=cfg.hist_range,
        n_token_samples=cfg.token_reservoir,
        n_samples=cfg.reservoir,
        seed=cfg.seed,
        progress_bar=True,
    )
    if norms.n_regression_triplets < 3:  # the previous-norm regression has 3 coefficients
        raise DataError(
            f"--data {cfg.data}: only {norms.n_regression_triplets} tokens have two valid predecessors, and the "
            "previous-norm regression needs at least 3; use more or longer texts (each needs >= 3 tokens after "
            "position 0)"
        )
    fit = position_fit(norms.norm_mean_by_layer_position, norms.norm_count_by_position, cfg.n_fit_positions)
    prev = previous_norm_fit(norms.triplet_xtx, norms.triplet_xty, norms.n_regression_triplets)
    typed = compose(norms, fit, prev)
    bos = "prepend" if cfg.bos else "none"
    prov = provenance_of(model).replace(bos=bos, padding_side=cfg.padding_side, seed=cfg.seed)
    res = StudyResult(
        "magnitudes", prov.model, metrics_of(typed), prov.to_dict(), dataclasses.asdict(cfg), tables(typed), parts=typed
    )
    res.figures = figures(typed)
    return res


def tables(r: MagnitudesResult) -> dict[str, list[dict[str, Any]]]:
    """The CSV tables: ``norm_by_layer_position`` (mean norm and count per layer and position; NaN where
    no valid token was) and ``per_layer`` (log-norm mean, std and percentiles, both fits)."""
    mean_np = r.norms.norm_mean_by_layer_position.numpy()
    count = r.norm_count_by_position
    fit, betas, pct = r.position_fit, r.previous_norm_fit.betas, r.lognorm_percentiles_by_layer
    levels = [f"lognorm_p{q:g}" for q in r.lognorm_percentile_levels]
    return {
        "norm_by_layer_position": [
            {"layer": layer, "position": p, "mean_norm": float(mean_np[layer, p]), "count": int(count[p])}
            for layer in range(len(mean_np))
            for p in range(mean_np.shape[1])
        ],
        "per_layer": [
            {
                "layer": layer,
                "lognorm_mean": r.lognorm_mean_by_layer[layer],
                "lognorm_std": r.lognorm_std_by_layer[layer],
                "fit_intercept": fit.intercept[layer],
                "fit_slope": fit.slope[layer],
                "beta_const": betas[layer][0],
                "beta_t2": betas[layer][1],
                "beta_t1": betas[layer][2],
                **dict(zip(levels, pct[layer], strict=True)),
            }
            for layer in range(len(mean_np))
        ],
    }


# -- per-unit samples for comparisons ------------------------------------------------------------------


def samples(result: StudyResult) -> pd.DataFrame:
    """Per-text statistics of the attention-output norms, for :mod:`mechlens.comparison`, over the seeded
    sample of at most ``reservoir`` texts (``--reservoir``; every text when there are no more; the same
    texts for every model of a run, whatever the sharding).

    Unit ``text`` (``sample`` = the text's global index in the inputs, the same for every model) when there
    are several texts; with one text, unit ``token`` (``sample`` = the token's position). Block ``l`` at
    relative depth ``(l + 1) / L`` (:func:`mechlens.axes.block_depth`). Quantities, at every block:

    * ``log_rms``: a text's mean over its valid tokens of ``log(norm / sqrt(d_model)) = log norm - 0.5
      log d_model`` (position empty). Its mean over texts is ``log_rms_text_mean_by_layer`` (each text
      weighs one); ``lognorm_mean_by_layer - 0.5 log d_model`` (``log_rms_mean_by_layer``) weighs each
      token, and equals it when all texts have the same number of valid tokens;
    * ``log_rms_by_position``: the log RMS of the text's token at position ``p`` (``position`` = p, ``word``
      = the whitespace word that token begins, or empty). Its mean over texts at (block, p) is
      ``lognorm_mean_by_layer_position - 0.5 log d_model``;
    * ``log_norm``: as ``log_rms`` without the width shift (raw norms scale with width: compare models of
      one width only); its mean over texts is ``lognorm_text_mean_by_layer``.

    (The means over texts equal the metrics when the sample holds every text.) Texts without a valid token
    (possible only with ``bos=False`` and one-token texts) give no rows."""
    r: MagnitudesResult = result.parts
    norms = r.norms
    ln, words, index = norms.sample_lognorm, norms.sample_word, norms.sample_text_index
    n_layers = ln.shape[1]
    shift = 0.5 * math.log(r.d_model)
    t, p = np.nonzero(~np.isnan(ln[:, 0, :]))  # every valid token of the sampled texts, in reading order
    tok = ln[t, :, p]  # [token, layer]
    if norms.n_sequences > 1:
        unit = "text"
        keep = np.nonzero(~np.isnan(norms.sample_text_lognorm[:, 0]))[0]
        means = norms.sample_text_lognorm[keep]
        blocks = [
            ("log_rms", means - shift, index[keep], None, None),
            ("log_norm", means, index[keep], None, None),
            ("log_rms_by_position", tok - shift, index[t], p, words[t, p]),
        ]
    else:
        unit = "token"
        blocks = [
            ("log_rms", tok - shift, p, None, None),
            ("log_norm", tok, p, None, None),
            ("log_rms_by_position", tok - shift, p, p, words[t, p]),
        ]
    # columns filled in place, block by block (rows per unit: one per layer): the frame is the only copy
    n = sum(len(values) for _, values, *_ in blocks) * n_layers
    quantity, unit_col = np.empty(n, dtype=object), np.empty(n, dtype=object)
    unit_col[:] = unit  # one shared str (np.full of a str as object makes one per row)
    layer, position, word, sample = (np.full(n, -1, dtype=np.int64) for _ in range(4))
    depth, value = np.empty(n), np.empty(n)
    start = 0
    for name, values, units, positions, word_of in blocks:
        sl = slice(start, start + len(values) * n_layers)
        quantity[sl] = name
        layer[sl] = np.tile(np.arange(n_layers), len(values))
        depth[sl] = np.tile(block_depth(n_layers), len(values))
        sample[sl] = np.repeat(units, n_layers)
        value[sl] = values.reshape(-1)
        if positions is not None:
            position[sl] = np.repeat(positions, n_layers)
            word[sl] = np.repeat(word_of, n_layers)
        start = sl.stop

    return sample_table(
        quantity, value, unit=unit_col, sample=sample, layer=layer, relative_depth=depth, position=position, word=word
    )


def incomparable(provenances: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Quantities of :func:`samples` that are not comparable between these models: every one when the
    attention outputs are different vectors (normalisation placements of different meaning), and the raw
    ``log_norm`` when the widths differ (norms scale with width; ``log_rms`` removes it)."""
    why = arch.attn_out_mismatch(provenances)
    out: dict[str, str] = {}
    if why is not None:
        out = dict.fromkeys(("log_rms", "log_rms_by_position", "log_norm"), why)
    widths = {m: p.get("d_model") for m, p in provenances.items()}
    if len(set(widths.values())) > 1 and "log_norm" not in out:
        out["log_norm"] = (
            "raw norms scale with width ("
            + ", ".join(f"{m}: d_model {w}" for m, w in widths.items())
            + ("): compare log_rms")
        )
    return out


__all__ = [
    "BETA_NAMES",
    "LESSON",
    "PERCENTILES",
    "AttnOutNorms",
    "Config",
    "MagnitudesResult",
    "NormStatistics",
    "PositionFit",
    "PreviousNormFit",
    "attn_out_names",
    "attn_out_norms",
    "compare",
    "compose",
    "corpus",
    "density_figure",
    "encode_inputs",
    "figures",
    "fits_figure",
    "headline",
    "heatmap_figure",
    "incomparable",
    "percentile_figure",
    "position_budget",
    "position_fit",
    "position_grid",
    "previous_norm_equations",
    "previous_norm_fit",
    "run",
    "samples",
    "tables",
    "word_by_position",
]
