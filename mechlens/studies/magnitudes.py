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
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import einops
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechlens import arch, distributed, progress
from mechlens.axes import block_depth
from mechlens.data import batched, iter_texts, shard
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.loading import provenance_of
from mechlens.ops import stack_layers, vector_norm
from mechlens.options import Options, fail, option
from mechlens.result import StudyResult, format_values, metrics_of, none_where, not_in_metrics, sample_table, view
from mechlens.stats.regression import lstsq_line
from mechlens.stats.streaming import Moments, Reservoir, priorities
from mechlens.studies import Step
from mechlens.tokens import Texts, TokenBatch, encode, word_index

PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
BETA_NAMES = ("const", "t-2", "t-1")  # the previous-norm regression's coefficients, in column order


@dataclasses.dataclass
class Config(Options):
    data: str = option(
        "reviews", "text source: a built-in name, a local file or an online dataset (mechlens list)", nonempty=True
    )
    n_texts: int | None = option(64, "texts taken from the source (None in Python: all of them)", ge=1)
    padding_side: str = option(
        "right", "side on which batches are padded (statistics do not depend on it)", choices=("right", "left")
    )
    bos: bool = option(True, "prepend BOS")
    exclude_first: bool = option(True, "exclude position 0 (BOS: the attention sink) from every statistic")
    max_tokens: int | None = option(128, "text tokens kept per text (None in Python: all that fit the context)", ge=1)
    batch_size: int = option(16, "texts per forward pass", ge=1)
    n_fit_positions: int = option(30, "positions used by the fit of log mean norm on position", ge=2)
    hist_bins: int = option(60, "bins of the log-norm histograms", ge=1)
    hist_range: tuple[float, float] = option((-4.0, 8.0), "LOW HIGH: log-norm range of the histograms")
    token_reservoir: int = option(
        200_000,
        "size of the seeded sample of tokens the log-norm percentiles are "
        "computed from (exact when the corpus has no more valid tokens)",
        ge=1,
    )
    reservoir: int = option(
        2_000,
        "size of the seeded sample of texts kept for per-text comparisons (each keeps "
        "its log-norms at every layer and position: ~7 KB per text on tiny-gpt2, ~37 KB on "
        "gpt2-large)",
        ge=1,
    )
    seed: int = option(0, "random seed (and the seed of the token and text samples)", ge=0)

    def check(self) -> None:
        lo, hi = self.hist_range
        if not lo < hi:
            fail("hist_range", f"must be LOW HIGH with LOW < HIGH, got {lo:g} {hi:g}")

    def check_model(self, model) -> None:
        room = model.cfg.n_ctx - int(self.bos) - (1 if arch.kind_of(model) == "masked" else 0)
        if self.max_tokens is not None and self.max_tokens > room:
            fail(
                "max_tokens",
                f"must be <= {room} (the model's context is {model.cfg.n_ctx} tokens with its "
                f"special tokens), got {self.max_tokens}",
            )


def attn_out_names(model) -> list[str]:
    return [f"blocks.{layer}.hook_attn_out" for layer in range(model.cfg.n_layers)]


def position_budget(model, max_tokens: int | None) -> int:
    """Positions every statistic is sized for: ``max_tokens`` text tokens plus BOS or ``<s>`` and ``</s>``
    (all that fit the context when ``max_tokens`` is None). A token's global index in the token sample is
    ``text_index * position_budget + position``."""
    return (model.cfg.n_ctx if max_tokens is None else max_tokens) + 2


# -- typed results -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttnOutNorms:
    """Part 1: L2 norms (over ``d_model``, float32) of ``blocks.{l}.hook_attn_out`` at the valid tokens
    (text tokens, without position 0 when it is excluded), reduced to statistics of constant size. ``pos``
    indexes the token position (the model's position id), not the batch column, so the padding side
    changes nothing; it runs to the longest sequence's last position.

    * ``norm_count_by_position``: valid tokens at each position (the sample size of every mean there);
      ``norm_mean_by_layer_position`` / ``lognorm_mean_by_layer_position``: mean norm / mean log-norm
      there (float64 sums; NaN where the count is 0);
    * ``lognorm_mean_by_layer`` / ``lognorm_std_by_layer``: over all valid tokens (std with ddof 0);
      ``lognorm_text_mean_by_layer``: the mean over the ``n_texts_with_tokens`` texts that have a valid
      token of each text's mean log-norm (each text weighs one);
    * ``lognorm_hist_counts[layer, bin]`` on the bins ``lognorm_hist_edges`` (values outside the range
      go to the first or last bin);
    * ``lognorm_percentiles_by_layer[layer, q]`` at the levels ``lognorm_percentile_levels``
      (``numpy.percentile``, linear interpolation) of ``token_sample[token, layer]``: the log-norms of a
      seeded sample of at most ``n_token_samples`` valid tokens (:class:`~mechlens.stats.streaming.Reservoir`
      keyed on ``text_index * position_budget + position``), the token at position ``token_sample_position``
      of the text of global index ``token_sample_text`` (in reading order). ``percentiles_exact``: the
      sample holds every valid token, so the percentiles are those of the whole corpus;
    * ``triplet_xtx[layer]`` / ``triplet_xty[layer]``: the normal equations ``X'X``, ``X'y`` of the
      regression of a token's log-norm ``y`` on ``X = [1, log-norm at t-2, log-norm at t-1]`` over the
      ``n_regression_triplets`` valid tokens whose two predecessors are valid (part 3 solves them);
    * ``text_length_counts[n]``: texts with ``n`` text tokens (before position 0 is excluded);
    * the text sample: ``sample_text_index`` (global indices, ascending) of a seeded sample of at most
      ``n_samples`` texts, each text's mean log-norm per layer ``sample_text_lognorm`` (NaN for a text
      without a valid token), its log-norms ``sample_lognorm[text, layer, pos]`` (NaN where no valid
      token is) and ``sample_word[text, pos]``, the index of the whitespace word each token begins (-1
      where none, or for token ids).
    """

    hook_names: tuple[str, ...]
    d_model: int
    n_sequences: int
    n_valid_tokens: int
    text_length_counts: Int[np.ndarray, " length"]
    norm_count_by_position: Int[Tensor, " pos"]
    norm_mean_by_layer_position: Float[Tensor, "layer pos"]
    lognorm_mean_by_layer_position: Float[Tensor, "layer pos"]
    lognorm_mean_by_layer: Float[np.ndarray, " layer"]
    lognorm_std_by_layer: Float[np.ndarray, " layer"]
    lognorm_text_mean_by_layer: Float[np.ndarray, " layer"]
    n_texts_with_tokens: int
    lognorm_hist_edges: Float[np.ndarray, " edge"]
    lognorm_hist_counts: Int[Tensor, "layer bin"]
    lognorm_percentile_levels: Float[np.ndarray, " quantile"]
    lognorm_percentiles_by_layer: Float[np.ndarray, "layer quantile"]
    token_sample: Float[np.ndarray, "token layer"]
    token_sample_text: Int[np.ndarray, " token"]
    token_sample_position: Int[np.ndarray, " token"]
    percentiles_exact: bool
    triplet_xtx: Float[np.ndarray, "layer 3 3"]
    triplet_xty: Float[np.ndarray, "layer 3"]
    n_regression_triplets: int
    sample_text_index: Int[np.ndarray, " sample"]
    sample_text_lognorm: Float[np.ndarray, "sample layer"]
    sample_lognorm: Float[np.ndarray, "sample layer pos"]
    sample_word: Int[np.ndarray, "sample pos"]

    @property
    def percentile_basis(self) -> str:
        """What the percentiles are computed from, in words."""
        if self.percentiles_exact:
            return f"all {self.n_valid_tokens} valid tokens"
        return f"a seeded sample of {len(self.token_sample)} of the {self.n_valid_tokens} valid tokens"


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
    """The study's typed result: its three parts. ``results.json``'s metrics are views of them, declared
    below under their flat names (nothing is stored twice).

    The ``..._by_layer_position`` and ``norm_mean_by_position`` metrics are nested lists with ``None`` at
    positions no valid token reached (position 0 when excluded; positions past the longest text), so
    that NaN never stands for "no data". ``lognorm_percentiles_by_layer`` are over
    ``lognorm_percentile_tokens`` valid tokens: all of them, or a seeded sample when the corpus has more
    (``lognorm_percentile_basis`` says which); ``n_samples`` texts are kept for :func:`samples`."""

    norms: AttnOutNorms = not_in_metrics()
    position_fit: PositionFit = not_in_metrics()
    previous_norm_fit: PreviousNormFit = not_in_metrics()

    n_sequences = view("norms.n_sequences")
    n_valid_tokens = view("norms.n_valid_tokens")
    seq_length_counts = view("norms.text_length_counts")
    lognorm_mean_by_layer = view("norms.lognorm_mean_by_layer")
    lognorm_std_by_layer = view("norms.lognorm_std_by_layer")
    lognorm_hist_edges = view("norms.lognorm_hist_edges")
    lognorm_hist_counts = view("norms.lognorm_hist_counts")
    norm_mean_by_layer_position = view(lambda r: none_where(r.norms.norm_mean_by_layer_position.numpy(), r._empty))
    norm_count_by_position = view("norms.norm_count_by_position")
    lognorm_mean_by_layer_position = view(lambda r: none_where(r.norms.lognorm_mean_by_layer_position, r._empty))
    norm_mean_by_position = view(
        lambda r: none_where(_mean_over_layers(r.norms.norm_mean_by_layer_position.numpy()), r._empty)
    )
    position_fit_by_layer = view(
        lambda r: [
            {"intercept": float(b0), "slope": float(b1)}
            for b0, b1 in zip(r.position_fit.intercept, r.position_fit.slope, strict=True)
        ]
    )
    position_fit_positions = view("position_fit.positions")
    previous_norm_betas_by_layer = view(lambda r: r.previous_norm_fit.by_layer())
    n_regression_triplets = view("previous_norm_fit.n_regression_triplets")
    d_model = view("norms.d_model")
    lognorm_percentile_levels = view("norms.lognorm_percentile_levels")
    lognorm_percentiles_by_layer = view("norms.lognorm_percentiles_by_layer")
    lognorm_percentile_tokens = view(lambda r: len(r.norms.token_sample))
    lognorm_percentile_basis = view("norms.percentile_basis")
    log_rms_mean_by_layer = view(lambda r: r.norms.lognorm_mean_by_layer - 0.5 * math.log(r.norms.d_model))
    lognorm_text_mean_by_layer = view("norms.lognorm_text_mean_by_layer")
    log_rms_text_mean_by_layer = view(lambda r: r.norms.lognorm_text_mean_by_layer - 0.5 * math.log(r.norms.d_model))
    n_samples = view(lambda r: len(r.norms.sample_text_index))

    @property
    def _empty(self) -> np.ndarray:
        """Positions no valid token reached (``None`` in the by-position metrics)."""
        return (self.norms.norm_count_by_position == 0).numpy()


# -- part 1: streamed norms ----------------------------------------------------------------------------


def position_grid(
    values: Float[Tensor, "layer batch col"], batch: TokenBatch, valid: Bool[Tensor, "batch col"], n_pos: int
) -> tuple[Float[Tensor, "batch layer pos"], Bool[Tensor, "batch pos"]]:
    """``values`` at the ``valid`` tokens re-keyed from batch column to position (the model's position id),
    NaN elsewhere, and the valid mask keyed the same way: the padding side no longer matters."""
    r, c = torch.nonzero(valid, as_tuple=True)
    p = batch.positions[r, c]
    grid = torch.full((len(batch), values.shape[0], n_pos), float("nan"), dtype=values.dtype)
    grid[r, :, p] = values[:, r, c].T
    mask = torch.zeros((len(batch), n_pos), dtype=torch.bool)
    mask[r, p] = True
    return grid, mask


def previous_norm_equations(
    lognorm: Float[Tensor, "batch layer pos"], valid: Bool[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "layer 3 3"], Float[Tensor, "layer 3"], int]:
    """The normal equations of part 3 over ``lognorm`` (position-keyed, as :func:`position_grid` gives):
    per layer ``X'X`` and ``X'y`` (float64) of ``log n(t)`` on ``X = [1, log n(t-2), log n(t-1)]`` over the
    tokens whose two predecessors are valid, and the number of such tokens. Sums of batches add up to the
    equations of their union."""
    ln = einops.rearrange(lognorm.double(), "batch layer pos -> layer batch pos")
    trip = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
    y = ln[:, :, 2:][:, trip]
    x = torch.stack([torch.ones_like(y), ln[:, :, :-2][:, trip], ln[:, :, 1:-1][:, trip]], -1)  # [layer, n, 3]
    xtx = einops.einsum(x, x, "layer n i, layer n j -> layer i j")
    xty = einops.einsum(x, y, "layer n i, layer n -> layer i")
    return xtx, xty, int(trip.sum())


class _Pending:
    """Items waiting to enter a :class:`Reservoir`, added to it in blocks of about a quarter of its size
    (each ``Reservoir.update`` selects over the priorities of all it holds). Once the reservoir is full, an item whose
    priority is above the largest kept one can never enter and is dropped at once."""

    def __init__(self, reservoir: Reservoir):
        self.reservoir = reservoir
        self.block = max(reservoir.size // 4, 1)
        self.index: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.n = 0

    def add(self, index: np.ndarray, rows: np.ndarray) -> None:
        res = self.reservoir
        if len(res) >= res.size:
            keep = priorities(index, res.seed) < res.priority.max()
            index, rows = index[keep], rows[keep]
        if len(index):
            self.index.append(index)
            self.rows.append(rows)
            self.n += len(index)
        if self.n >= self.block:
            self.flush()

    def flush(self) -> Reservoir:
        if self.n:
            self.reservoir.update(np.concatenate(self.index), np.concatenate(self.rows))
            self.index, self.rows, self.n = [], [], 0
        return self.reservoir


class NormStatistics:
    """The running state of part 1: every statistic of :class:`AttnOutNorms` as float64 sums and counts of
    constant size (per layer and position up to ``n_pos``), plus two seeded samples capped at their sizes.
    :meth:`update` adds one batch's norms, :meth:`merge_ranks` sums the state over the ranks of a process
    group (and merges the samples), :meth:`result` gives the typed part."""

    def __init__(
        self,
        n_layers: int,
        n_pos: int,
        *,
        hist_bins: int = 60,
        hist_range: tuple[float, float] = (-4.0, 8.0),
        n_token_samples: int = 200_000,
        n_samples: int = 10_000,
        seed: int = 0,
    ):
        self.n_layers, self.n_pos = n_layers, n_pos
        self.hist_range, self.hist_bins = (float(hist_range[0]), float(hist_range[1])), hist_bins
        self.norm = Moments((n_layers, n_pos))
        self.lognorm = Moments((n_layers, n_pos))
        self.text_lognorm = Moments(n_layers)  # each text's mean log-norm, over texts with a valid token
        self.hist = torch.zeros((n_layers, hist_bins), dtype=torch.long)
        self.xtx = torch.zeros((n_layers, 3, 3), dtype=torch.float64)
        self.xty = torch.zeros((n_layers, 3), dtype=torch.float64)
        # counts: [texts, triplets]; text tokens per text and tokens per sequence (special tokens included)
        self.counts = torch.zeros(2, dtype=torch.long)
        self.text_lengths = torch.zeros(n_pos + 1, dtype=torch.long)
        self.seq_lengths = torch.zeros(n_pos + 1, dtype=torch.long)
        self.tokens = _Pending(Reservoir(n_token_samples, seed))
        self.texts = _Pending(Reservoir(n_samples, seed))

    def update(
        self,
        batch: TokenBatch,
        norms: Float[Tensor, "layer batch col"],
        index: Int[Tensor, " batch"],
        valid: Bool[Tensor, "batch col"],
        words: Int[Tensor, "batch pos"] | None = None,
    ) -> None:
        """Add one batch: ``norms`` of every layer at every column of ``batch`` (float32; only ``valid``
        tokens count), ``index`` the texts' global indices, ``words`` the position-keyed word index."""
        batch = batch.to("cpu")
        norms, valid, index = norms.float().cpu(), valid.cpu(), index.cpu()
        if batch.max_position >= self.n_pos:
            raise DataError(
                f"a sequence of {batch.max_position + 1} tokens exceeds the {self.n_pos} positions "
                "these statistics were sized for: lower --max-tokens"
            )
        logn32 = norms.clamp(min=1e-30).log()
        lognorm, mask = position_grid(logn32, batch, valid, self.n_pos)  # [batch, layer, pos], [batch, pos]
        norm, _ = position_grid(norms, batch, valid, self.n_pos)
        self.norm.update(norm, mask[:, None, :])
        self.lognorm.update(lognorm, mask[:, None, :])
        lo, hi = self.hist_range
        width = (hi - lo) / self.hist_bins
        logn = logn32[:, valid].double()  # [layer, n]
        idx = ((logn - lo) / width).floor().long().clamp(0, self.hist_bins - 1)
        self.hist.scatter_add_(1, idx, torch.ones_like(idx))
        xtx, xty, n_trip = previous_norm_equations(lognorm, mask)
        self.xtx += xtx
        self.xty += xty
        n = mask.sum(-1)  # valid tokens per text
        sums = torch.where(mask[:, None, :], lognorm.double(), 0.0).sum(-1)  # [batch, layer]
        means = torch.where(n[:, None] > 0, sums / n.clamp(min=1)[:, None], float("nan"))
        self.text_lognorm.update(means[n > 0])
        self.counts += torch.tensor([len(batch), n_trip])
        self.text_lengths += torch.bincount(batch.text_mask.sum(-1), minlength=self.n_pos + 1)
        self.seq_lengths += torch.bincount(batch.lengths, minlength=self.n_pos + 1)
        r, p = torch.nonzero(mask, as_tuple=True)
        self.tokens.add((index[r] * self.n_pos + p).numpy(), lognorm[r, :, p].double().numpy())
        w = torch.full((len(batch), self.n_pos), -1, dtype=torch.long) if words is None else words.cpu()
        rows = torch.cat([means, einops.rearrange(lognorm.double(), "b l p -> b (l p)"), w.double()], 1)
        self.texts.add(index.numpy().astype(np.int64), rows.numpy())

    def merge_ranks(self) -> NormStatistics:
        """Sum the state over the ranks of the process group and merge their samples (a no-op in one
        process); every rank then holds the same statistics."""
        sums = [*self.norm.state().values(), *self.lognorm.state().values(), *self.text_lognorm.state().values()]
        distributed.all_reduce_sum(
            *sums, self.hist, self.xtx, self.xty, self.counts, self.text_lengths, self.seq_lengths
        )
        distributed.merge(self.tokens.flush())
        distributed.merge(self.texts.flush())
        return self

    def result(
        self, hook_names: Sequence[str], d_model: int, percentiles: Sequence[float] = PERCENTILES
    ) -> AttnOutNorms:
        n_texts, n_trip = (int(x) for x in self.counts)
        if n_texts == 0:
            raise DataError("no texts to read: pass at least one text (--data, --n-texts)")
        n_pos = int(torch.nonzero(self.seq_lengths).max())  # the longest sequence: positions 0..n_pos-1
        count = self.lognorm.count[0, :n_pos].round().long()
        n_valid = int(count.sum())
        sums = self.lognorm.sum[:, :n_pos]
        mean = (sums.sum(1) / n_valid).numpy()
        std = np.sqrt(np.maximum(self.lognorm.sumsq[:, :n_pos].sum(1).numpy() / n_valid - mean**2, 0))
        tokens = self.tokens.flush()
        token_rows = tokens.rows if tokens.rows is not None else np.zeros((0, self.n_layers))
        levels = np.asarray(percentiles, dtype=np.float64)
        pct = np.full((self.n_layers, len(levels)), np.nan)  # stays NaN only if no token is valid
        if len(token_rows):
            pct = np.percentile(token_rows, levels, axis=0).T
        texts = self.texts.flush()
        rows = texts.rows if texts.rows is not None else np.zeros((0, self.n_layers * (self.n_pos + 1) + self.n_pos))
        grid = rows[:, self.n_layers : self.n_layers * (self.n_pos + 1)].reshape(-1, self.n_layers, self.n_pos)
        lengths = self.text_lengths.numpy()
        lo, hi = self.hist_range
        return AttnOutNorms(
            hook_names=tuple(hook_names),
            d_model=int(d_model),
            n_sequences=n_texts,
            n_valid_tokens=n_valid,
            text_length_counts=lengths[: int(np.nonzero(lengths)[0].max()) + 1],
            norm_count_by_position=count,
            norm_mean_by_layer_position=torch.from_numpy(self.norm.mean[:, :n_pos]),
            lognorm_mean_by_layer_position=torch.from_numpy(self.lognorm.mean[:, :n_pos]),
            lognorm_mean_by_layer=mean,
            lognorm_std_by_layer=std,
            lognorm_text_mean_by_layer=self.text_lognorm.mean,
            n_texts_with_tokens=int(self.text_lognorm.count[0]),
            lognorm_hist_edges=np.linspace(lo, hi, self.hist_bins + 1),
            lognorm_hist_counts=self.hist.clone(),
            lognorm_percentile_levels=levels,
            lognorm_percentiles_by_layer=pct,
            token_sample=token_rows,
            token_sample_text=tokens.index.astype(np.int64) // self.n_pos,
            token_sample_position=tokens.index.astype(np.int64) % self.n_pos,
            percentiles_exact=len(token_rows) == n_valid,
            triplet_xtx=self.xtx.numpy().copy(),
            triplet_xty=self.xty.numpy().copy(),
            n_regression_triplets=n_trip,
            sample_text_index=texts.index.astype(np.int64),
            sample_text_lognorm=rows[:, : self.n_layers].copy(),
            sample_lognorm=grid[:, :, :n_pos].copy(),  # copies: the padded rows can go
            sample_word=rows[:, -self.n_pos :][:, :n_pos].astype(np.int64),
        )


def _is_pair(item: Any) -> bool:
    """``(global index, text)``, as opposed to a text (a string, or token ids)."""
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], int | np.integer)
        and not isinstance(item[1], int | np.integer)
    )


def attn_out_norms(
    model,
    texts: TokenBatch | Iterable[tuple[int, str | Sequence[int]]] | Iterable[str | Sequence[int]],
    *,
    bos: bool = True,
    padding_side: str = "right",
    max_tokens: int | None = 128,
    exclude_first: bool = True,
    batch_size: int | None = 16,
    hist_bins: int = 60,
    hist_range: tuple[float, float] = (-4.0, 8.0),
    percentiles: Sequence[float] = PERCENTILES,
    n_token_samples: int = 200_000,
    n_samples: int = 10_000,
    seed: int = 0,
    progress_bar: bool = False,
) -> AttnOutNorms:
    """Part 1: the norms of ``blocks.{l}.hook_attn_out`` (every layer) at the valid tokens of ``texts``,
    reduced batch by batch to the statistics of :class:`AttnOutNorms` (memory constant in the number of
    texts). Valid tokens are text tokens, without position 0 when ``exclude_first``.

    ``texts``: a stream of ``(global index, text)`` pairs (:func:`corpus`, :func:`mechlens.data.iter_indexed`:
    this rank's share under ``torchrun``) or of texts (strings, or token ids without special tokens; the
    index is the place in the stream), read ``batch_size`` at a time and encoded with ``bos``,
    ``padding_side`` and ``max_tokens``; the statistics are then merged over the ranks of a process
    group. Or one encoded :class:`TokenBatch` (rows = texts 0, 1, ...; its own BOS policy, padding and
    length; no word index; never merged over ranks), run in mini-batches of ``batch_size``; ``max_tokens``
    then only sizes the statistics as for a stream (the token sample is keyed on
    ``text_index * position_budget(model, max_tokens) + position``), so the same texts give the same
    samples either way.
    ``progress_bar``: one bar (rank 0 only) counting tokens."""
    names = attn_out_names(model)
    n_layers = len(names)
    options = {
        "hist_bins": hist_bins,
        "hist_range": hist_range,
        "n_token_samples": n_token_samples,
        "n_samples": n_samples,
        "seed": seed,
    }
    if isinstance(texts, TokenBatch):
        stats = NormStatistics(n_layers, max(position_budget(model, max_tokens), texts.max_position + 1), **options)
        valid = texts.valid_mask(exclude_first=exclude_first)
        rows = torch.arange(len(texts))
        for sl, _, acts in iter_cached(model, texts, names, batch_size=batch_size, progress=progress_bar):
            stats.update(texts.select(sl), vector_norm(stack_layers(acts, names)), rows[sl], valid[sl])
        return stats.result(names, model.cfg.d_model, percentiles)
    stats = NormStatistics(n_layers, position_budget(model, max_tokens), **options)
    pairs = (item if _is_pair(item) else (i, item) for i, item in enumerate(texts))
    chunks = batched(pairs, batch_size or 16)
    bar = progress.bar(
        chunks, "study 4: attention-output norms", show=progress_bar and distributed.is_main(), unit="tok"
    )
    with distributed.share_then_merge():  # this rank's stream
        for chunk in bar:
            index = torch.tensor([int(i) for i, _ in chunk], dtype=torch.long)
            inputs = [t for _, t in chunk]
            batch = encode(
                model, inputs, bos=bos, padding_side=padding_side, max_tokens=max_tokens, fix="lower --max-tokens"
            )
            words = word_by_position(model, inputs, batch, stats.n_pos)
            valid = batch.valid_mask(exclude_first)
            for _, _, acts in iter_cached(model, batch, names):  # one forward: the whole chunk
                stats.update(batch, vector_norm(stack_layers(acts, names)), index, valid, words)
            if hasattr(bar, "update"):  # a tqdm bar counts one per batch itself: count the batch's tokens
                bar.update(int(batch.attention_mask.sum()) - 1)
    return stats.merge_ranks().result(names, model.cfg.d_model, percentiles)


def corpus(cfg: Config, texts: Iterable | None = None) -> Iterator[tuple[int, Any]]:
    """The study's inputs as ``(global index, text)`` pairs, this rank's share under ``torchrun``: the first
    ``cfg.n_texts`` texts of ``cfg.data`` streamed (:func:`mechlens.data.iter_indexed`), or of ``texts``
    given in Python (strings, or token ids without special tokens; index = place in the list, rank ``r``
    of ``w`` keeping the indices ``i % w == r``)."""
    return shard(cfg.data if texts is None else texts, cfg.n_texts)


def encode_inputs(model, cfg: Config, texts: Texts | None = None) -> tuple[list, TokenBatch]:
    """All of the study's inputs in one :class:`TokenBatch` (for small experiments; :func:`run` streams
    them): ``texts`` (default: ``cfg.data``), the first ``cfg.n_texts`` of them, encoded with the config's
    BOS policy, padding side and ``max_tokens``."""
    texts = list(iter_texts(cfg.data, cfg.n_texts) if texts is None else itertools.islice(texts, cfg.n_texts))
    batch = encode(
        model, texts, bos=cfg.bos, padding_side=cfg.padding_side, max_tokens=cfg.max_tokens, fix="lower --max-tokens"
    )
    return texts, batch


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
    xtx: Float[np.ndarray, "layer 3 3"], xty: Float[np.ndarray, "layer 3"], n_triplets: int
) -> PreviousNormFit:
    """Part 3: per layer, OLS of ``log n(t)`` on ``[1, log n(t-2), log n(t-1)]`` over the tokens whose two
    predecessors are valid, solved from the normal equations accumulated in part 1 (``triplet_xtx``,
    ``triplet_xty``, ``n_regression_triplets``; :func:`previous_norm_equations` gives them for explicit
    arrays). Float64 throughout; the order in which batches were added matters only at rounding level,
    ~1e-10 relative where the design is nearly collinear (e.g. a post-LN encoder's near-constant norms)."""
    if n_triplets < 3:
        raise DataError(
            f"the previous-norm regression has 3 coefficients but only {n_triplets} tokens have two "
            "valid predecessors: use more or longer texts"
        )
    a, b = torch.as_tensor(np.asarray(xtx, np.float64)), torch.as_tensor(np.asarray(xty, np.float64))
    try:
        betas = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1).numpy()  # [layer, 3]
    except torch.linalg.LinAlgError:
        raise DataError("the previous-norm regression is singular (too few distinct tokens): use more texts") from None
    return PreviousNormFit(betas=betas, n_regression_triplets=int(n_triplets))


def word_by_position(model, texts: Texts, batch: TokenBatch, n_pos: int | None = None) -> Int[Tensor, "batch pos"]:
    """:func:`mechlens.tokens.word_index` keyed on token position instead of batch column (``n_pos``
    positions, default the batch's); all -1 when ``texts`` are token ids (no character offsets)."""
    out = torch.full((len(batch), n_pos or batch.max_position + 1), -1, dtype=torch.long)
    if not texts or not isinstance(texts[0], str):
        return out
    words = word_index(model, texts, batch)
    r, c = torch.nonzero(batch.attention_mask.bool(), as_tuple=True)
    out[r, batch.positions[r, c]] = words[r, c]
    return out


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


def compose(norms: AttnOutNorms, fit: PositionFit, prev: PreviousNormFit) -> MagnitudesResult:
    """The typed result from the three parts."""
    return MagnitudesResult(norms=norms, position_fit=fit, previous_norm_fit=prev)


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


def _mean_over_layers(x: np.ndarray) -> np.ndarray:
    """Per-position mean over layers; NaN where no token was valid (e.g. the excluded position 0)."""
    finite = np.isfinite(x)
    return np.where(finite.any(0), np.where(finite, x, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan)


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


# -- figures -------------------------------------------------------------------------------------------


def density_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: the density of log-norms per layer (the histogram counts over the valid tokens, divided by
    their number and the bin width)."""
    edges = norms.lognorm_hist_edges
    centres = (edges[:-1] + edges[1:]) / 2
    f = go.Figure()
    for layer, row in enumerate(norms.lognorm_hist_counts.numpy()):
        row = row.astype(np.float64)
        f.add_scatter(x=centres, y=row / max(row.sum(), 1) / (edges[1] - edges[0]), name=f"layer {layer}", mode="lines")
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
        f.add_scatter(
            x=x, y=pct[:, i], mode="lines", line={"width": 0}, fill="tonexty", name=f"p{lo:g}-p{hi:g}", opacity=0.3
        )
    if len(levels) % 2:
        mid = len(levels) // 2
        f.add_scatter(x=x, y=pct[:, mid], mode="lines+markers", name=f"p{levels[mid]:g}")
    return f.update_layout(
        title=f"Percentiles of log attention-output norms by layer<br><sup>over {norms.percentile_basis}</sup>",
        xaxis_title="layer",
        yaxis_title="log norm",
    )


def heatmap_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: the mean norm by layer and position (colour limits at the 2nd-98th percentile)."""
    z = norms.norm_mean_by_layer_position.numpy()
    lo, hi = np.nanpercentile(z, [2, 98])
    f = go.Figure(go.Heatmap(z=z, zmin=lo, zmax=hi, colorscale="Magma"))
    return f.update_layout(
        title="Mean attention-output norm (colour limits: 2nd-98th percentile)",
        xaxis_title="position",
        yaxis_title="layer",
    )


def fits_figure(fit: PositionFit, prev: PreviousNormFit) -> go.Figure:
    """Parts 2-3: the slope of log mean norm on position, and the previous-token coefficients, by layer."""
    f = go.Figure([go.Bar(y=fit.slope, name="slope of log mean norm on position (left axis)")])
    f.add_scatter(
        y=prev.betas[:, 2], name="coefficient of log-norm at t-1 (right axis)", mode="lines+markers", yaxis="y2"
    )
    f.add_scatter(
        y=prev.betas[:, 1], name="coefficient of log-norm at t-2 (right axis)", mode="lines+markers", yaxis="y2"
    )
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
    f.update_layout(
        title="Valid tokens per position (every statistic's sample size; padding and excluded positions count 0)",
        xaxis_title="position",
        yaxis_title="valid tokens",
    )
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
    for model, e in entries.items():
        prov = e.get("provenance", {})
        placement = prov.get("norm_placement", "unchecked")
        y = np.asarray(e["metrics"]["lognorm_mean_by_layer"], np.float64)
        d_model = prov.get("d_model")
        y_rms = y - 0.5 * np.log(d_model) if d_model else y
        f.add_scatter(x=block_depth(len(y)), y=y_rms, name=f"{model} [{placement}]", mode="lines+markers")
    title = "Attention-output log RMS (log norm / sqrt(d_model)) by relative depth"
    why = arch.attn_out_mismatch({m: e.get("provenance", {}) for m, e in entries.items()})
    if why is not None:
        title += f"<br><sup>NOT COMPARABLE: {why}</sup>"
    f.update_layout(title=title, yaxis_title="mean log RMS", xaxis_title="relative depth (block l at (l+1)/L)")
    return {"comparison": f}


# -- the lesson ----------------------------------------------------------------------------------------

LESSON = (
    Step(
        "Set up: configuration, model and texts",
        "The study's configuration (`magnitudes.Config`; its fields are the `mechlens run magnitudes` flags), "
        'the embedded `tiny-gpt2` (offline; `gpt2-large` with `data="rotten_tomatoes"` reproduces the '
        "original online) and the texts as a stream of `(global index, text)` pairs: any source streams "
        "(a local `.txt`/`.jsonl`/`.csv`/`.parquet` file, `hf:REPO:SPLIT`), tokenised one batch at a time, "
        "so memory does not grow with the corpus. Conventions that differ from the original notebook: BOS "
        "is prepended (`bos=False` to switch), position 0 is excluded from every statistic "
        "(`exclude_first=False`), texts keep their first 128 tokens (`max_tokens`). Statistics key on the "
        "model's position ids, so the padding side changes nothing.",
        'config = magnitudes.Config(data="reviews", n_texts=64, padding_side="right")\n'
        'model = load_model("tiny-gpt2")  # or "gpt2-large" online, with data="rotten_tomatoes"\n'
        "texts = magnitudes.corpus(config)  # (global index, text) pairs, read lazily\n"
        "config",
    ),
    Step(
        "Part 1: attention-output norms by layer and position",
        "`attn_out_norms` caches only `blocks.{l}.hook_attn_out`, one mini-batch at a time, and reduces the "
        "L2 norms at once to sums of constant size: means by layer and position, a histogram per layer, and "
        "percentiles of the log-norms per layer from a seeded sample of at most `token_reservoir` tokens "
        "(exact here: the sample holds every token). Look for the layers whose attention writes the largest "
        "vectors, how wide each layer's distribution is (5th to 95th percentile), and whether early "
        "positions stand out in the heatmap.",
        "norms = magnitudes.attn_out_norms(\n"
        "    model,\n"
        "    texts,\n"
        "    bos=config.bos,\n"
        "    max_tokens=config.max_tokens,\n"
        "    exclude_first=config.exclude_first,\n"
        "    batch_size=config.batch_size,\n"
        "    n_token_samples=config.token_reservoir,\n"
        ")\n"
        'print(norms.n_sequences, "texts,", norms.n_valid_tokens, "valid tokens")\n'
        'print("mean log-norm by layer:", norms.lognorm_mean_by_layer.round(3))\n'
        'print("percentiles", norms.lognorm_percentile_levels, "over", norms.percentile_basis, "by layer:")\n'
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
        "per layer (ordinary least squares over every token whose two predecessors are valid), from the "
        "normal equations X'X and X'y that part 1 summed batch by batch. A large coefficient at t-1 means "
        "norms persist from token to token.",
        "prev = magnitudes.previous_norm_fit(norms.triplet_xtx, norms.triplet_xty, norms.n_regression_triplets)\n"
        'print(prev.n_regression_triplets, "tokens with two valid predecessors")\n'
        "for layer, betas in enumerate(prev.by_layer()):\n"
        '    print(f"layer {layer}:", {k: round(v, 3) for k, v in betas.items()})',
    ),
    Step(
        "The whole study",
        "`run` composes the parts into one typed result (`result.parts`), from which the metrics "
        "(`results.json`), the CSV tables and the figures derive; under `torchrun` each process streams its "
        "share of the texts and the sums are merged. `magnitudes.samples(result)` gives the per-text log RMS "
        "(`log(norm / sqrt(d_model))`) by layer and position for a seeded sample of at most `reservoir` "
        "texts, the input of cross-model comparisons with bootstrap intervals over texts.",
        "result = magnitudes.run(model, config)\n"
        'result.figures["norm_heatmap"].show()\n'
        'result.figures["lognorm_percentiles"].show()\n'
        "per_text = magnitudes.samples(result)\n"
        'print(per_text[per_text.quantity == "log_rms"].groupby("layer")["value"].mean().round(3))\n'
        "result.provenance",
    ),
)
