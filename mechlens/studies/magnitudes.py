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

Memory: only ``blocks.{l}.hook_attn_out`` is cached, one mini-batch at a time; the activations are
reduced at once to running sums per (layer, position), fixed-bin histograms and the per-token log-norms
(float32, ``n_layers`` numbers per token: 1/``d_model`` of the activations). Statistics key on the
model's position ids and a valid-token mask (padding, and position 0 by default, excluded), so the
padding side does not change them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import einops
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechlens import arch
from mechlens.axes import block_depth
from mechlens.data import load_texts
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.loading import provenance_of
from mechlens.ops import RunningPositionStats, stack_layers, vector_norm
from mechlens.options import Options, fail, option
from mechlens.stats.regression import lstsq_line
from mechlens.studies import Step
from mechlens.studies.result import StudyResult, format_values, metrics_of, none_where, not_in_metrics
from mechlens.tokens import Texts, TokenBatch, encode, word_index

PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
BETA_NAMES = ("const", "t-2", "t-1")  # the previous-norm regression's coefficients, in column order


@dataclasses.dataclass
class Config(Options):
    data: str = option("reviews", "text source: a built-in name, a local file or an online dataset (mechlens list)",
                       nonempty=True)  # fmt: skip
    n_texts: int | None = option(64, "texts taken from the source (None in Python: all of them)", ge=1)
    padding_side: str = option("right", "side on which batches are padded (statistics do not depend on it)",
                               choices=("right", "left"))  # fmt: skip
    bos: bool = option(True, "prepend BOS")
    exclude_first: bool = option(True, "exclude position 0 (BOS: the attention sink) from every statistic")
    max_tokens: int | None = option(128, "text tokens kept per text (None in Python: all that fit the context)", ge=1)
    batch_size: int = option(16, "texts per forward pass", ge=1)
    n_fit_positions: int = option(30, "positions used by the fit of log mean norm on position", ge=2)
    hist_bins: int = option(60, "bins of the log-norm histograms", ge=1)
    hist_range: tuple[float, float] = option((-4.0, 8.0), "LOW HIGH: log-norm range of the histograms")
    seed: int = option(0, "random seed", ge=0)

    def check(self) -> None:
        lo, hi = self.hist_range
        if not lo < hi:
            fail("hist_range", f"must be LOW HIGH with LOW < HIGH, got {lo:g} {hi:g}")

    def check_model(self, model) -> None:
        room = model.cfg.n_ctx - int(self.bos) - (1 if arch.kind_of(model) == "masked" else 0)
        if self.max_tokens is not None and self.max_tokens > room:
            fail("max_tokens", f"must be <= {room} (the model's context is {model.cfg.n_ctx} tokens with its "
                               f"special tokens), got {self.max_tokens}")  # fmt: skip


def attn_out_names(model) -> list[str]:
    return [f"blocks.{layer}.hook_attn_out" for layer in range(model.cfg.n_layers)]


# -- typed results -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttnOutNorms:
    """Part 1: L2 norms (over ``d_model``, float32) of ``blocks.{l}.hook_attn_out`` at the valid tokens
    (text tokens, without position 0 when it is excluded), and their statistics. ``pos`` indexes the
    token position (the model's position id), not the batch column, so the padding side changes nothing.

    * ``lognorm[text, layer, pos]``: the natural log of each valid token's norm, float32 (NaN where
      ``valid`` is false: padding, special tokens, an excluded position 0);
    * ``norm_count_by_position``: valid tokens at each position (the sample size of every mean there);
      ``norm_mean_by_layer_position`` / ``lognorm_mean_by_layer_position``: mean norm / mean log-norm
      there (float64 accumulation; NaN where the count is 0);
    * ``lognorm_mean_by_layer`` / ``lognorm_std_by_layer``: over all valid tokens (std with ddof 0);
    * ``lognorm_hist_counts[layer, bin]`` on the bins ``lognorm_hist_edges`` (values outside the range
      go to the first or last bin); ``lognorm_percentiles_by_layer[layer, q]`` at the levels
      ``lognorm_percentile_levels`` (``numpy.percentile``, linear interpolation): the distribution the
      density figure shows;
    * ``text_lengths``: text tokens per sequence (before position 0 is excluded).
    """

    hook_names: tuple[str, ...]
    d_model: int
    n_sequences: int
    n_valid_tokens: int
    text_lengths: Int[Tensor, " batch"]
    norm_count_by_position: Int[Tensor, " pos"]
    norm_mean_by_layer_position: Float[Tensor, "layer pos"]
    lognorm_mean_by_layer_position: Float[Tensor, "layer pos"]
    lognorm_mean_by_layer: Float[np.ndarray, " layer"]
    lognorm_std_by_layer: Float[np.ndarray, " layer"]
    lognorm_hist_edges: Float[np.ndarray, " edge"]
    lognorm_hist_counts: Int[Tensor, "layer bin"]
    lognorm_percentile_levels: Float[np.ndarray, " quantile"]
    lognorm_percentiles_by_layer: Float[np.ndarray, "layer quantile"]
    lognorm: Float[Tensor, "batch layer pos"]
    valid: Bool[Tensor, "batch pos"]


@dataclasses.dataclass(frozen=True)
class PositionFit:
    """Part 2: per layer, the least-squares line ``log(mean norm at p) = intercept + slope * p`` over
    ``positions`` (the first ``n_fit`` positions that valid tokens reached: 1..n_fit when position 0 is
    excluded); ``log_mean_norm[layer, i]`` is the fitted point at ``positions[i]``."""

    positions: Int[np.ndarray, " n_fit"]
    log_mean_norm: Float[np.ndarray, "layer n_fit"]
    intercept: Float[np.ndarray, " layer"]
    slope: Float[np.ndarray, " layer"]


@dataclasses.dataclass(frozen=True)
class PreviousNormFit:
    """Part 3: per layer, ordinary least squares of a token's log-norm on ``[1, log-norm at t-2,
    log-norm at t-1]`` over every valid token whose two predecessors are valid too (the "triplets").
    ``betas[layer]`` holds the coefficients in the order :data:`BETA_NAMES` (const, t-2, t-1)."""

    betas: Float[np.ndarray, "layer 3"]
    n_regression_triplets: int

    def by_layer(self) -> list[dict[str, float]]:
        return [dict(zip(BETA_NAMES, map(float, b), strict=True)) for b in self.betas]


@dataclasses.dataclass(frozen=True)
class MagnitudesResult:
    """The study's typed result; its fields without ``not_in_metrics`` are ``results.json``'s metrics.

    The ``..._by_layer_position`` and ``norm_mean_by_position`` metrics are nested lists with ``None`` at
    positions no valid token reached (position 0 when it is excluded). Log RMS is ``log(norm /
    sqrt(d_model)) = log norm - 0.5 log d_model``: ``log_rms_mean_by_layer`` is
    ``lognorm_mean_by_layer`` shifted so (a mean over tokens); ``lognorm_text_mean_by_layer`` and
    ``log_rms_text_mean_by_layer`` average each text's own mean over its valid tokens, each text weighing
    one (what :func:`samples` resamples; equal to the token means when all texts have the same length).
    ``word_by_position[text, pos]``: the whitespace word that the token at ``pos`` begins
    (:func:`mechlens.tokens.word_index`), -1 where none does or the inputs were token ids."""

    n_sequences: int
    n_valid_tokens: int
    seq_length_counts: Int[np.ndarray, " length"]
    lognorm_mean_by_layer: Float[np.ndarray, " layer"]
    lognorm_std_by_layer: Float[np.ndarray, " layer"]
    lognorm_hist_edges: Float[np.ndarray, " edge"]
    lognorm_hist_counts: Int[Tensor, "layer bin"]
    norm_mean_by_layer_position: list
    norm_count_by_position: Int[Tensor, " pos"]
    lognorm_mean_by_layer_position: list
    norm_mean_by_position: list
    position_fit_by_layer: list[dict[str, float]]
    position_fit_positions: Int[np.ndarray, " n_fit"]
    previous_norm_betas_by_layer: list[dict[str, float]]
    n_regression_triplets: int
    d_model: int
    lognorm_percentile_levels: Float[np.ndarray, " quantile"]
    lognorm_percentiles_by_layer: Float[np.ndarray, "layer quantile"]
    log_rms_mean_by_layer: Float[np.ndarray, " layer"]
    lognorm_text_mean_by_layer: Float[np.ndarray, " layer"]
    log_rms_text_mean_by_layer: Float[np.ndarray, " layer"]
    norms: AttnOutNorms = not_in_metrics()
    position_fit: PositionFit = not_in_metrics()
    previous_norm_fit: PreviousNormFit = not_in_metrics()
    word_by_position: Int[Tensor, "batch pos"] = not_in_metrics()


# -- parts ---------------------------------------------------------------------------------------------


def encode_inputs(model, cfg: Config, texts: Texts | None = None) -> tuple[list, TokenBatch]:
    """The study's inputs: ``texts`` (default: ``cfg.data``; strings, or token ids without special tokens),
    the first ``cfg.n_texts`` of them, encoded with the config's BOS policy, padding side and
    ``max_tokens``."""
    texts = load_texts(cfg.data) if texts is None else texts
    texts = list(texts[: cfg.n_texts] if cfg.n_texts else texts)
    batch = encode(model, texts, bos=cfg.bos, padding_side=cfg.padding_side, max_tokens=cfg.max_tokens,
                   fix="lower --max-tokens")  # fmt: skip
    return texts, batch


def attn_out_norms(
    model,
    batch: TokenBatch,
    *,
    exclude_first: bool = True,
    batch_size: int | None = 16,
    hist_bins: int = 60,
    hist_range: tuple[float, float] = (-4.0, 8.0),
    percentiles: Sequence[float] = PERCENTILES,
    progress: bool | str = False,
) -> AttnOutNorms:
    """Part 1: the norms of ``blocks.{l}.hook_attn_out`` (every layer) at the valid tokens of ``batch``,
    streamed over mini-batches of ``batch_size`` texts (see :class:`AttnOutNorms`). Valid tokens are
    ``batch.valid_mask(exclude_first)``: text tokens, without position 0 when ``exclude_first``."""
    names = attn_out_names(model)
    n_layers, n_pos = len(names), batch.max_position + 1
    positions, valid = batch.positions, batch.valid_mask(exclude_first=exclude_first)
    norm_stats, log_stats = RunningPositionStats(n_pos), RunningPositionStats(n_pos)
    hist = torch.zeros(n_layers, hist_bins, dtype=torch.long)
    lo, hi = hist_range
    width = (hi - lo) / hist_bins
    lognorm = torch.full((len(batch), n_layers, n_pos), float("nan"), dtype=torch.float32)
    valid_by_pos = torch.zeros((len(batch), n_pos), dtype=torch.bool)
    for rows, _, acts in iter_cached(model, batch, names, batch_size=batch_size, progress=progress):
        norms = vector_norm(stack_layers(acts, names)).cpu()  # [layer, batch, pos]
        logn32 = norms.clamp(min=1e-30).log()
        logn = logn32.double()
        pos, ok = positions[rows], valid[rows]
        norm_stats.update(norms, pos, ok)
        log_stats.update(logn, pos, ok)
        idx = ((logn[:, ok] - lo) / width).floor().long().clamp(0, hist_bins - 1)  # [layer, n]
        hist.scatter_add_(1, idx, torch.ones_like(idx))
        r, c = torch.nonzero(ok, as_tuple=True)
        text = torch.arange(len(batch))[rows][r]
        lognorm[text, :, pos[r, c]] = logn32[:, r, c].T
        valid_by_pos[text, pos[r, c]] = True
    count = log_stats.count.sum().double()
    mean = (log_stats.sum.sum(1) / count).numpy()
    std = np.sqrt(np.maximum(log_stats.sumsq.sum(1).numpy() / count.item() - mean**2, 0))
    levels = np.asarray(percentiles, dtype=np.float64)
    pct = np.full((n_layers, len(levels)), np.nan)  # stays NaN only if no token is valid
    if valid_by_pos.any():
        for layer in range(n_layers):  # one layer's values at a time (memory)
            pct[layer] = np.percentile(lognorm[:, layer][valid_by_pos].double().numpy(), levels)
    norm, logm = norm_stats.result(), log_stats.result()
    return AttnOutNorms(
        hook_names=tuple(names),
        d_model=int(model.cfg.d_model),
        n_sequences=len(batch),
        n_valid_tokens=int(count),
        text_lengths=batch.text_mask.sum(-1),
        norm_count_by_position=norm.count,
        norm_mean_by_layer_position=norm.mean,
        lognorm_mean_by_layer_position=logm.mean,
        lognorm_mean_by_layer=mean,
        lognorm_std_by_layer=std,
        lognorm_hist_edges=np.linspace(lo, hi, hist_bins + 1),
        lognorm_hist_counts=hist,
        lognorm_percentile_levels=levels,
        lognorm_percentiles_by_layer=pct,
        lognorm=lognorm,
        valid=valid_by_pos,
    )


def position_fit(
    norm_mean_by_layer_position: Float[Tensor, "layer pos"],
    norm_count_by_position: Int[Tensor, " pos"],
    n_fit: int = 30,
) -> PositionFit:
    """Part 2: per layer, the least-squares line of ``log(mean norm)`` on position over the first ``n_fit``
    positions that valid tokens reached (part 1's ``norm_mean_by_layer_position`` and
    ``norm_count_by_position``; positions 1..n_fit when position 0 is excluded)."""
    pos = np.nonzero(norm_count_by_position.cpu().numpy() > 0)[0][:n_fit]
    y = np.log(norm_mean_by_layer_position.cpu().numpy()[:, pos])
    fits = np.array([lstsq_line(pos, row) for row in y], dtype=np.float64).reshape(-1, 2)
    return PositionFit(positions=pos.astype(np.int64), log_mean_norm=y, intercept=fits[:, 0], slope=fits[:, 1])


def previous_norm_fit(
    lognorm: Float[Tensor, "batch layer pos"], valid: Bool[Tensor, "batch pos"], *, chunk: int = 16
) -> PreviousNormFit:
    """Part 3: per layer, OLS of ``log n(t)`` on ``[1, log n(t-2), log n(t-1)]`` over the tokens whose
    two predecessors are valid (part 1's ``lognorm`` and ``valid``), from the normal equations in
    float64, accumulated over ``chunk`` texts at a time (:func:`run` passes its forward batch size, so the
    sums are added in the order of the streaming computation; the order matters only at rounding level,
    ~1e-10 relative where the design is nearly collinear, e.g. a post-LN encoder's near-constant norms)."""
    n_layers = lognorm.shape[1]
    xtx = torch.zeros(n_layers, 3, 3, dtype=torch.float64)
    xty = torch.zeros(n_layers, 3, dtype=torch.float64)
    trip_all = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
    for start in range(0, lognorm.shape[0], chunk):
        ln = einops.rearrange(lognorm[start : start + chunk].double(), "batch layer pos -> layer batch pos")
        trip = trip_all[start : start + chunk]
        y = ln[:, :, 2:][:, trip]
        x = torch.stack([torch.ones_like(y), ln[:, :, :-2][:, trip], ln[:, :, 1:-1][:, trip]], -1)  # [layer, n, 3]
        xtx += einops.einsum(x, x, "layer n i, layer n j -> layer i j")
        xty += einops.einsum(x, y, "layer n i, layer n -> layer i")
    n = int(trip_all.sum())
    if n < 3:
        raise DataError(f"the previous-norm regression has 3 coefficients but only {n} tokens have two valid "
                        "predecessors: use more or longer texts")  # fmt: skip
    try:
        betas = torch.linalg.solve(xtx, xty.unsqueeze(-1)).squeeze(-1).numpy()  # [layer, 3]
    except torch.linalg.LinAlgError:
        raise DataError("the previous-norm regression is singular (too few distinct tokens): use more texts") from None
    return PreviousNormFit(betas=betas, n_regression_triplets=n)


def word_by_position(model, texts: Texts, batch: TokenBatch) -> Int[Tensor, "batch pos"]:
    """:func:`mechlens.tokens.word_index` keyed on token position instead of batch column; all -1 when
    ``texts`` are token ids (no character offsets)."""
    out = torch.full((len(batch), batch.max_position + 1), -1, dtype=torch.long)
    if not texts or not isinstance(texts[0], str):
        return out
    words = word_index(model, texts, batch)
    r, c = torch.nonzero(batch.attention_mask.bool(), as_tuple=True)
    out[r, batch.positions[r, c]] = words[r, c]
    return out


def text_means(
    lognorm: Float[Tensor, "batch layer pos"], valid: Bool[Tensor, "batch pos"]
) -> tuple[Float[np.ndarray, "text layer"], Int[np.ndarray, " text"]]:
    """Each text's mean log-norm over its valid tokens, per layer, for the texts that have any (float64),
    and those texts' indices."""
    n = valid.sum(-1)
    keep = torch.nonzero(n > 0).squeeze(-1)
    sums = torch.stack([torch.where(valid, lognorm[:, layer].double(), 0.0).sum(-1)  # one layer at a time (memory)
                        for layer in range(lognorm.shape[1])], -1)  # fmt: skip
    return (sums[keep] / n[keep, None]).numpy(), keep.numpy().astype(np.int64)


# -- the study -----------------------------------------------------------------------------------------


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    """Every part on the first ``cfg.n_texts`` of ``texts`` (default: ``cfg.data``; strings or token ids
    without special tokens). ``result.parts`` is the :class:`MagnitudesResult`; ``result.metrics``
    derives from it."""
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    texts, batch = encode_inputs(model, cfg, texts)
    valid = batch.valid_mask(exclude_first=cfg.exclude_first)
    n_trip = int((valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]).sum())
    if n_trip < 3:  # checked before any forward pass: the previous-norm regression has 3 coefficients
        raise DataError(
            f"--data {cfg.data}: only {n_trip} tokens have two valid predecessors, and the previous-norm regression "
            "needs at least 3; use more or longer texts (each needs >= 3 tokens after position 0)"
        )
    norms = attn_out_norms(model, batch, exclude_first=cfg.exclude_first, batch_size=cfg.batch_size,
                           hist_bins=cfg.hist_bins, hist_range=cfg.hist_range, progress="study 4 forward")  # fmt: skip
    fit = position_fit(norms.norm_mean_by_layer_position, norms.norm_count_by_position, cfg.n_fit_positions)
    prev = previous_norm_fit(norms.lognorm, norms.valid, chunk=cfg.batch_size)
    typed = compose(norms, fit, prev, word_by_position(model, texts, batch))
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    res = StudyResult("magnitudes", prov.model, metrics_of(typed), prov.to_dict(), dataclasses.asdict(cfg),
                      tables(typed), parts=typed)  # fmt: skip
    res.figures = figures(typed)
    return res


def compose(
    norms: AttnOutNorms, fit: PositionFit, prev: PreviousNormFit, words: Int[Tensor, "batch pos"]
) -> MagnitudesResult:
    """The typed result from the three parts (and the word index of each position)."""
    empty = (norms.norm_count_by_position == 0).numpy()
    mean_np = norms.norm_mean_by_layer_position.numpy()
    shift = 0.5 * math.log(norms.d_model)
    per_text, _ = text_means(norms.lognorm, norms.valid)
    return MagnitudesResult(
        n_sequences=norms.n_sequences,
        n_valid_tokens=norms.n_valid_tokens,
        seq_length_counts=np.bincount(norms.text_lengths.numpy()),
        lognorm_mean_by_layer=norms.lognorm_mean_by_layer,
        lognorm_std_by_layer=norms.lognorm_std_by_layer,
        lognorm_hist_edges=norms.lognorm_hist_edges,
        lognorm_hist_counts=norms.lognorm_hist_counts,
        norm_mean_by_layer_position=none_where(mean_np, empty),
        norm_count_by_position=norms.norm_count_by_position,
        lognorm_mean_by_layer_position=none_where(norms.lognorm_mean_by_layer_position, empty),
        norm_mean_by_position=none_where(_mean_over_layers(mean_np), empty),
        position_fit_by_layer=[
            {"intercept": float(b0), "slope": float(b1)} for b0, b1 in zip(fit.intercept, fit.slope, strict=True)
        ],
        position_fit_positions=fit.positions,
        previous_norm_betas_by_layer=prev.by_layer(),
        n_regression_triplets=prev.n_regression_triplets,
        d_model=norms.d_model,
        lognorm_percentile_levels=norms.lognorm_percentile_levels,
        lognorm_percentiles_by_layer=norms.lognorm_percentiles_by_layer,
        log_rms_mean_by_layer=norms.lognorm_mean_by_layer - shift,
        lognorm_text_mean_by_layer=per_text.mean(0),
        log_rms_text_mean_by_layer=per_text.mean(0) - shift,
        norms=norms,
        position_fit=fit,
        previous_norm_fit=prev,
        word_by_position=words,
    )


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
            {"layer": layer, "lognorm_mean": r.lognorm_mean_by_layer[layer],
             "lognorm_std": r.lognorm_std_by_layer[layer],
             "fit_intercept": fit.intercept[layer], "fit_slope": fit.slope[layer],
             "beta_const": betas[layer][0], "beta_t2": betas[layer][1], "beta_t1": betas[layer][2],
             **dict(zip(levels, pct[layer], strict=True))}
            for layer in range(len(mean_np))
        ],
    }  # fmt: skip


def _mean_over_layers(x: np.ndarray) -> np.ndarray:
    """Per-position mean over layers; NaN where no token was valid (e.g. the excluded position 0)."""
    finite = np.isfinite(x)
    return np.where(finite.any(0), np.where(finite, x, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan)


# -- per-unit samples for comparisons ------------------------------------------------------------------


def samples(result: StudyResult) -> pd.DataFrame:
    """Per-text statistics of the attention-output norms, for :mod:`mechlens.comparison`.

    Unit ``text`` (``sample`` = the text's index in the inputs, the same for every model) when there are
    several texts; with one text, unit ``token`` (``sample`` = the token's position). Block ``l`` at
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

    Texts without a valid token (possible only with ``bos=False`` and one-token texts) give no rows."""
    r: MagnitudesResult = result.parts
    ln, valid = r.norms.lognorm.double().numpy(), r.norms.valid.numpy()
    n_texts, n_layers, _ = ln.shape
    depth = block_depth(n_layers)
    shift = 0.5 * math.log(r.d_model)
    words = r.word_by_position.numpy()
    t, p = np.nonzero(valid)  # every valid token, in reading order
    tok = ln[t, :, p]  # [token, layer]
    parts = []

    def block(quantity, values, samples_, positions=None, word=None):  # values [unit, layer]
        n = values.shape[0]
        pos = np.full(n, -1) if positions is None else positions
        w = np.full(n, -1) if word is None else word
        parts.append(pd.DataFrame({
            "quantity": quantity,
            "layer": np.tile(np.arange(n_layers), n),
            "relative_depth": np.tile(depth, n),
            "position": np.repeat(pos, n_layers),
            "word": np.repeat(w, n_layers),
            "sample": np.repeat(samples_, n_layers),
            "value": values.reshape(-1),
        }))  # fmt: skip

    if n_texts > 1:
        unit = "text"
        means, keep = text_means(r.norms.lognorm, r.norms.valid)
        block("log_rms", means - shift, keep)
        block("log_norm", means, keep)
        block("log_rms_by_position", tok - shift, t, positions=p, word=words[t, p])
    else:
        unit = "token"
        block("log_rms", tok - shift, p)
        block("log_norm", tok, p)
        block("log_rms_by_position", tok - shift, p, positions=p, word=words[t, p])
    frame = pd.concat(parts, ignore_index=True)
    out = pd.DataFrame(
        {
            "quantity": frame["quantity"].astype(object),
            "layer": frame["layer"].astype("Int64"),
            "relative_depth": frame["relative_depth"].astype(np.float64),
            "position": pd.array(frame["position"].where(frame["position"] >= 0), dtype="Int64"),
            "word": pd.array(frame["word"].where(frame["word"] >= 0), dtype="Int64"),
            "unit": unit,
            "sample": frame["sample"].astype(np.int64),
            "value": frame["value"].astype(np.float64),
        }
    )
    out["unit"] = out["unit"].astype(object)
    return out


# what hook_attn_out is, by normalisation placement: comparable across models only within one group
_ATTN_OUT_MEANING = {
    "pre-LN": "what attention adds to the residual stream",
    "output-norm": "what attention adds, after a norm on its output",
    "sandwich": "what attention adds, after a norm on its output",
    "post-LN": "the attention block's output after the residual add and LayerNorm",
}


def incomparable(provenances: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Quantities of :func:`samples` that are not comparable between these models: every one when the
    attention outputs are different vectors (normalisation placements of different meaning), and the raw
    ``log_norm`` when the widths differ (norms scale with width; ``log_rms`` removes it)."""
    meanings = {m: _ATTN_OUT_MEANING.get(p.get("norm_placement", "unchecked"), "unchecked") for m, p in
                provenances.items()}  # fmt: skip
    out: dict[str, str] = {}
    if len(set(meanings.values())) > 1:
        why = "attention outputs differ in meaning: " + "; ".join(f"{m}: {v}" for m, v in meanings.items())
        out = dict.fromkeys(("log_rms", "log_rms_by_position", "log_norm"), why)
    widths = {m: p.get("d_model") for m, p in provenances.items()}
    if len(set(widths.values())) > 1 and "log_norm" not in out:
        out["log_norm"] = (
            "raw norms scale with width ("
            + ", ".join(f"{m}: d_model {w}" for m, w in widths.items())
            + ("): compare log_rms")
        )
    return out


# -- figures -------------------------------------------------------------------------------------------


def density_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: the density of log-norms per layer (the histogram counts over the valid tokens, divided by
    their number and the bin width)."""
    edges = norms.lognorm_hist_edges
    centres = (edges[:-1] + edges[1:]) / 2
    f = go.Figure()
    for layer, row in enumerate(norms.lognorm_hist_counts.numpy()):
        row = row.astype(np.float64)
        f.add_scatter(x=centres, y=row / max(row.sum(), 1) / (edges[1] - edges[0]), name=f"layer {layer}",
                      mode="lines")  # fmt: skip
    return f.update_layout(title="Density of log attention-output norms by layer", xaxis_title="log norm")


def percentile_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: percentiles of the log-norms by layer (the median, and the central ranges between matching
    lower and upper levels as bands)."""
    levels, pct = norms.lognorm_percentile_levels, norms.lognorm_percentiles_by_layer
    x = np.arange(pct.shape[0])
    f = go.Figure()
    for i in range(len(levels) // 2):
        lo, hi = levels[i], levels[-1 - i]
        f.add_scatter(x=x, y=pct[:, -1 - i], mode="lines", line={"width": 0}, showlegend=False, name=f"p{hi:g}")
        f.add_scatter(x=x, y=pct[:, i], mode="lines", line={"width": 0}, fill="tonexty", name=f"p{lo:g}-p{hi:g}",
                      opacity=0.3)  # fmt: skip
    if len(levels) % 2:
        mid = len(levels) // 2
        f.add_scatter(x=x, y=pct[:, mid], mode="lines+markers", name=f"p{levels[mid]:g}")
    return f.update_layout(title="Percentiles of log attention-output norms by layer", xaxis_title="layer",
                           yaxis_title="log norm")  # fmt: skip


def heatmap_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: the mean norm by layer and position (colour limits at the 2nd-98th percentile)."""
    z = norms.norm_mean_by_layer_position.numpy()
    lo, hi = np.nanpercentile(z, [2, 98])
    f = go.Figure(go.Heatmap(z=z, zmin=lo, zmax=hi, colorscale="Magma"))
    return f.update_layout(title="Mean attention-output norm (colour limits: 2nd-98th percentile)",
                           xaxis_title="position", yaxis_title="layer")  # fmt: skip


def fits_figure(fit: PositionFit, prev: PreviousNormFit) -> go.Figure:
    """Parts 2-3: the slope of log mean norm on position, and the previous-token coefficients, by layer."""
    f = go.Figure([go.Bar(y=fit.slope, name="slope of log mean norm on position (left axis)")])
    f.add_scatter(y=prev.betas[:, 2], name="coefficient of log-norm at t-1 (right axis)", mode="lines+markers",
                  yaxis="y2")  # fmt: skip
    f.add_scatter(y=prev.betas[:, 1], name="coefficient of log-norm at t-2 (right axis)", mode="lines+markers",
                  yaxis="y2")  # fmt: skip
    return f.update_layout(
        title="Per-layer fits: position trend and previous-token regression",
        xaxis_title="layer",
        yaxis={"title": "slope (log norm per position)"},
        yaxis2={"title": "regression coefficient", "overlaying": "y", "side": "right"},
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0},
    )


def figures(r: MagnitudesResult) -> dict[str, go.Figure]:
    figs = {}
    cnt = r.norm_count_by_position.numpy()
    f = go.Figure(go.Bar(x=np.arange(len(cnt)), y=cnt))
    f.update_layout(title="Valid tokens per position (every statistic's sample size; padding and excluded positions "
                    "count 0)", xaxis_title="position", yaxis_title="valid tokens")  # fmt: skip
    figs["valid_tokens"] = f
    counts = r.seq_length_counts
    figs["seq_lengths"] = go.Figure(go.Bar(x=np.arange(len(counts)), y=counts)).update_layout(
        title="Sequence lengths (text tokens)", xaxis_title="tokens", yaxis_title="sequences"
    )
    figs["lognorm_density"] = density_figure(r.norms)
    mean, std = r.lognorm_mean_by_layer, r.lognorm_std_by_layer
    figs["lognorm_by_layer"] = go.Figure(
        go.Scatter(x=np.arange(len(mean)), y=mean, error_y={"array": std}, mode="markers+lines")
    ).update_layout(title="Log norm by layer (mean ± std)", xaxis_title="layer", yaxis_title="log norm")
    figs["lognorm_percentiles"] = percentile_figure(r.norms)
    figs["norm_heatmap"] = heatmap_figure(r.norms)
    y = np.asarray(r.norm_mean_by_position, dtype=np.float64)  # None -> NaN: a gap in the line
    figs["norm_by_position"] = go.Figure(go.Scatter(y=y, mode="lines+markers")).update_layout(
        title="Mean norm by position (average over layers)", xaxis_title="position", yaxis_title="norm"
    )
    figs["fits"] = fits_figure(r.position_fit, r.previous_norm_fit)
    return figs


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    ln = np.asarray(m["lognorm_mean_by_layer"], np.float64)
    slopes = [f["slope"] for f in m["position_fit_by_layer"]]
    b1 = [b["t-1"] for b in m["previous_norm_betas_by_layer"]]
    return [
        f"log-norm by layer {format_values(ln)} over {m['n_valid_tokens']} tokens",
        f"Over {m['n_valid_tokens']} tokens of {m['n_sequences']} texts, the mean log-norm of the attention output "
        f"is lowest at layer {int(np.argmin(ln))} ({ln.min():.2f}) and highest at layer {int(np.argmax(ln))} "
        f"({ln.max():.2f}).",
        f"The log of the mean norm changes by {min(slopes):+.3f} to {max(slopes):+.3f} per position across layers; "
        f"the previous token's log-norm predicts the next with coefficients {min(b1):.2f} to {max(b1):.2f}.",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same texts).

    Norms scale with width, so models are compared on the log RMS (``log(norm / sqrt(d_model))``, the
    mean log-norm minus ``log sqrt(d_model)``). Attention outputs of models with different
    normalisation placements are different quantities (a post-LN encoder's is taken after LayerNorm;
    output norms and sandwich norms normalise what attention adds): such a figure says so in its
    title and legend instead of overlaying them silently."""
    f = go.Figure()
    meanings = {}
    for model, e in entries.items():
        prov = e.get("provenance", {})
        placement = prov.get("norm_placement", "unchecked")
        meanings[model] = _ATTN_OUT_MEANING.get(placement, f"unchecked ({placement})")
        y = np.asarray(e["metrics"]["lognorm_mean_by_layer"], np.float64)
        d_model = prov.get("d_model")
        y_rms = y - 0.5 * np.log(d_model) if d_model else y
        f.add_scatter(x=block_depth(len(y)), y=y_rms, name=f"{model} [{placement}]", mode="lines+markers")
    title = "Attention-output log RMS (log norm / sqrt(d_model)) by relative depth"
    if len(set(meanings.values())) > 1:
        title += "<br><sup>NOT COMPARABLE: " + "; ".join(f"{m}: {v}" for m, v in meanings.items()) + "</sup>"
    f.update_layout(title=title, yaxis_title="mean log RMS", xaxis_title="relative depth (block l at (l+1)/L)")
    return {"comparison": f}


# -- the lesson ----------------------------------------------------------------------------------------

LESSON = (
    Step(
        "Set up: configuration, model and texts",
        "The study's configuration (`magnitudes.Config`; its fields are the `mechlens run magnitudes` flags), "
        'the embedded `tiny-gpt2` (offline; `gpt2-large` with `data="rotten_tomatoes"` reproduces the '
        "original online) and the texts, encoded once. Conventions that differ from the original notebook: BOS "
        "is prepended (`bos=False` to switch), position 0 is excluded from every statistic "
        "(`exclude_first=False`), texts keep their first 128 tokens (`max_tokens`). Statistics key on the "
        "model's position ids, so the padding side changes nothing.",
        'config = magnitudes.Config(data="reviews", n_texts=64, padding_side="right")\n'
        'model = load_model("tiny-gpt2")  # or "gpt2-large" online, with data="rotten_tomatoes"\n'
        "texts, batch = magnitudes.encode_inputs(model, config)\n"
        'print(len(batch), "texts,", int(batch.text_mask.sum()), "text tokens, BOS prepended:", batch.bos)',
    ),
    Step(
        "Part 1: attention-output norms by layer, text and position",
        "`attn_out_norms` caches only `blocks.{l}.hook_attn_out`, one mini-batch at a time, and keeps the L2 "
        "norm's log at every valid token (`norms.lognorm[text, layer, position]`), means by layer and "
        "position, a histogram and percentiles of the log-norms per layer. Look for the layers whose "
        "attention writes the largest vectors, how wide each layer's distribution is (5th to 95th "
        "percentile), and whether early positions stand out in the heatmap.",
        "norms = magnitudes.attn_out_norms(\n"
        "    model,\n"
        "    batch,\n"
        "    exclude_first=config.exclude_first,\n"
        "    batch_size=config.batch_size,\n"
        "    hist_bins=config.hist_bins,\n"
        "    hist_range=config.hist_range,\n"
        ")\n"
        'print("mean log-norm by layer:", norms.lognorm_mean_by_layer.round(3))\n'
        'print("percentiles", norms.lognorm_percentile_levels, "by layer:")\n'
        "print(norms.lognorm_percentiles_by_layer.round(3))\n"
        "magnitudes.density_figure(norms).show()\n"
        "magnitudes.heatmap_figure(norms).show()",
    ),
    Step(
        "Part 2: log mean norm against position",
        "`position_fit` fits, per layer, a line to the log of the mean norm at each position, over the first "
        "`n_fit_positions` (30) positions that valid tokens reached: 1..30 with position 0 excluded, fewer when "
        "the texts are shorter (the built-in reviews reach position 20). The original's `arange(n_fit)` "
        "silently dropped its undefined point 0. A negative slope means attention writes smaller vectors "
        "further into the text.",
        "fit = magnitudes.position_fit(\n"
        "    norms.norm_mean_by_layer_position, norms.norm_count_by_position, n_fit=config.n_fit_positions\n"
        ")\n"
        'print("positions", fit.positions.min(), "to", fit.positions.max())\n'
        'print("slope by layer:", fit.slope.round(4))',
    ),
    Step(
        "Part 3: does a token's norm follow its predecessors'?",
        "`previous_norm_fit` regresses each token's log-norm on the log-norms of the two tokens before it, "
        "per layer (ordinary least squares over every token whose two predecessors are valid). A large "
        "coefficient at t-1 means norms persist from token to token.",
        "prev = magnitudes.previous_norm_fit(norms.lognorm, norms.valid)\n"
        'print(prev.n_regression_triplets, "tokens with two valid predecessors")\n'
        "for layer, betas in enumerate(prev.by_layer()):\n"
        '    print(f"layer {layer}:", {k: round(v, 3) for k, v in betas.items()})',
    ),
    Step(
        "The whole study",
        "`run` composes the parts into one typed result (`result.parts`), from which the metrics "
        "(`results.json`), the CSV tables and the figures derive. `magnitudes.samples(result)` gives the "
        "per-text log RMS (`log(norm / sqrt(d_model))`) by layer and position, the input of cross-model "
        "comparisons with bootstrap intervals over texts.",
        "result = magnitudes.run(model, config)\n"
        'result.figures["norm_heatmap"].show()\n'
        'result.figures["lognorm_percentiles"].show()\n'
        "per_text = magnitudes.samples(result)\n"
        'print(per_text[per_text.quantity == "log_rms"].groupby("layer")["value"].mean().round(3))\n'
        "result.provenance",
    ),
)
