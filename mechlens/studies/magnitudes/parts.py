"""Study 4's parts (:mod:`mechlens.studies.magnitudes`): the config, the typed results (the streamed norms,
the position fit, the previous-norm fit, the composed result) and the fits computed from the streamed norms."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechlens import arch
from mechlens.data import iter_texts, shard
from mechlens.encoding import Texts, TokenBatch, encode, word_index
from mechlens.errors import DataError
from mechlens.options import Options, fail, option
from mechlens.result import none_where, not_in_metrics, view
from mechlens.stats.regression import lstsq_line

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
    """:func:`mechlens.encoding.word_index` keyed on token position instead of batch column (``n_pos``
    positions, default the batch's); all -1 when ``texts`` are token ids (no character offsets)."""
    out = torch.full((len(batch), n_pos or batch.max_position + 1), -1, dtype=torch.long)
    if not texts or not isinstance(texts[0], str):
        return out
    words = word_index(model, texts, batch)
    r, c = torch.nonzero(batch.attention_mask.bool(), as_tuple=True)
    out[r, batch.positions[r, c]] = words[r, c]
    return out


def compose(norms: AttnOutNorms, fit: PositionFit, prev: PreviousNormFit) -> MagnitudesResult:
    """The typed result from the three parts."""
    return MagnitudesResult(norms=norms, position_fit=fit, previous_norm_fit=prev)


def _mean_over_layers(x: np.ndarray) -> np.ndarray:
    """Per-position mean over layers; NaN where no token was valid (e.g. the excluded position 0)."""
    finite = np.isfinite(x)
    return np.where(finite.any(0), np.where(finite, x, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan)
