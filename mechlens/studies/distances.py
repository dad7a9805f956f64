"""Study 5 -- distances, mutual information and token position (original: gpt2-large on Wikipedia's
"Turkish coffee" page).

Part 1 Minkowski L1/L2 against scipy and part 2 mutual information on synthetic nonlinear data (2-D
histogram in bits vs sklearn kNN in nats, by bin count, and the Pearson correlation that misses the
relation): :func:`synthetic_mi`. Part 3 the target token's occurrences in one long text and the
attention / MLP outputs there at every block: :func:`target_outputs`. Parts 4-5 pairwise [MI, L1, L2]
between the occurrences at one block against their distance in tokens, and Kendall's tau over the
upper triangle: :func:`pairwise_measures`. Part 6 the same at every block, attention vs MLP outputs
(pooled and per-occurrence taus): :func:`kendall_by_layer`. Part 7 short contexts ending at each
occurrence (:func:`contexts_ending_at`), the output norms at the target per block, and the mutual
information between every pair of blocks: :func:`interlayer_mi`. :func:`run` composes the parts into a
:class:`DistancesResult`; :func:`samples` gives the per-occurrence statistics of cross-model comparisons.

Conventions (each switchable): BOS is prepended to the document (``bos=False``, ``--no-bos``); a masked
LM always gets ``<s> ... </s>`` and the document is cut so that it fits the model's positions with its
special tokens. Only the first text of ``data`` is studied, and the first ``n_targets`` occurrences of
the target in reading order (``n_targets``). Parts 4-5 use the middle block, ``n_layers // 2``
(``layer``, ``--layer``). "Attention output" is ``blocks.{l}.hook_attn_out`` and "MLP output"
``blocks.{l}.hook_mlp_out``: what the block adds to the residual stream in pre-LN models, but after the
residual add and LayerNorm in post-LN encoders (BERT, RoBERTa; see :mod:`mechlens.arch`). The contexts
of part 7 are cut from the encoded document (ids as the model saw them): the first may begin with
BOS/``<s>``, none ends with ``</s>``. Mutual information between representations is the kNN
(Kraskov) estimate in nats with ``seed`` fixed, treating the ``d_model`` coordinates as samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import scipy.spatial.distance
import scipy.stats
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots

from mechlens import arch
from mechlens.axes import block_depth
from mechlens.data import load_texts
from mechlens.encoding import Texts, TokenBatch, encode, single_token_id, target_positions, word_index
from mechlens.errors import DataError, NonFiniteError, TokenError
from mechlens.forward import run_cached
from mechlens.loading import provenance_of
from mechlens.ops import stack_layers, vector_norm
from mechlens.options import Options, check_layer, option
from mechlens.result import StudyResult, format_values, metrics_of, not_in_metrics, sample_table, view
from mechlens.stats.degenerate import zero_variance
from mechlens.stats.distance import minkowski, pairwise_minkowski
from mechlens.stats.information import mi_histogram, mi_knn, pairwise_mi
from mechlens.studies import Step

MEASURES = ("MI", "L1", "L2")
KINDS = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@dataclasses.dataclass
class Config(Options):
    data: str = option("coffee", "text source; its first text is the document studied (mechlens list)", nonempty=True)
    target: str = option(" coffee", "the token whose occurrences are compared (exactly one token)", nonempty=True)
    n_targets: int = option(10, "occurrences of the target used (kNN mutual information needs >= 4)", ge=4)
    layer: int | None = option(None, "block of parts 4-5 (default: the middle one)", ge=0)
    n_context: int = option(12, "part 7: tokens per context ending at each target", ge=1)
    bos: bool = option(True, "prepend BOS")
    mi_bins: tuple[int, ...] = option(
        (4, 6, 8, 10, 12, 16, 20, 24), "bin counts of the histogram MI (each >= 2)", ge=2, nonempty=True
    )
    n_synthetic: int = option(2000, "points of the synthetic MI example", ge=20)
    n_jobs: int = option(1, "parallel jobs for scikit-learn's kNN MI", ge=1)
    seed: int = option(0, "random seed", ge=0)

    def check_model(self, model) -> None:
        check_layer("layer", self.layer, model.cfg.n_layers, "blocks")
        single_token_id(model, self.target, flag="--target")


# -- typed results -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticMI:
    """Parts 1-2: y = x² + noise with x uniform on [-2, 2] (symmetric): a strong dependence with a near-zero
    Pearson correlation. ``mi_histogram_bits_by_bins``: bin count -> plug-in MI of a ``bins x bins``
    histogram, in bits; ``mi_knn_nats``: sklearn's kNN estimate, in nats; ``minkowski_demo``: L1 and L2
    distance between the first 10 x and the first 10 y (mechlens' own implementation), and
    ``minkowski_scipy`` the same from ``scipy.spatial.distance.minkowski``."""

    mi_histogram_bits_by_bins: dict[int, float]
    mi_knn_nats: float
    pearson_r: float
    minkowski_demo: dict[str, float]
    minkowski_scipy: dict[str, float]
    x: Float[np.ndarray, " n"] = not_in_metrics()
    y: Float[np.ndarray, " n"] = not_in_metrics()


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """The target token: the string asked for, its id, and how many times it occurs in the (cut) text."""

    string: str
    id: int
    occurrences: int


@dataclasses.dataclass(frozen=True)
class TargetOutputs:
    """Part 3: the first ``n`` occurrences of the target in row 0 of the batch, in reading order, and the
    attention and MLP outputs there at every block (``outputs[kind][layer, occurrence]``, float64 copies
    of ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``)."""

    target: TargetInfo
    columns: Int[np.ndarray, " target"]  # batch columns of the occurrences
    positions: Int[np.ndarray, " target"]  # their token positions (position ids; BOS, when present, is 0)
    outputs: dict[str, Float[np.ndarray, "layer target d_model"]]


@dataclasses.dataclass(frozen=True)
class Tau:
    """Kendall's tau-b and its two-sided p-value (scipy.stats.kendalltau)."""

    tau: float
    p: float


@dataclasses.dataclass(frozen=True)
class PairwiseMeasures:
    """Parts 4-5 at one block: ``distance_matrices[kind][measure]`` between every pair of occurrences
    (``MI``: kNN mutual information in nats, the ``d_model`` coordinates as samples, diagonal 0; ``L1``,
    ``L2``: Minkowski distances), ``position_distance`` = |position_i - position_j| in tokens, and the
    Kendall tau of each measure against position distance over the upper triangle (all n(n-1)/2 pairs).
    NaN where tau is undefined (a constant measure): ``None`` in results.json."""

    layer: int
    positions: Int[np.ndarray, " target"]
    position_distance: Float[np.ndarray, "target target"]
    distance_matrices: dict[str, dict[str, Float[np.ndarray, "target target"]]]
    kendall_tau: dict[str, dict[str, Tau]]


@dataclasses.dataclass(frozen=True)
class KendallByLayer:
    """Part 6, the layer sweep (``[kind][measure][layer]``, block by block):

    * ``kendall_tau_by_layer``, ``kendall_p_by_layer``: the pooled Kendall tau-b of the measure against
      position distance over all n(n-1)/2 pairs of occurrences (as in part 5), and its p-value;
    * ``mean_normalised_distance_by_layer``: the mean over pairs of the measure divided by its maximum
      over pairs at that block;
    * ``kendall_tau_rowwise_by_layer``: the mean over occurrences of the **row-wise** tau (below).

    Per occurrence (``[kind][measure][layer, occurrence]``, not in results.json):

    * ``occurrence_tau``: for occurrence i, Kendall's tau-b between its token distances to the other
      n-1 occurrences, |p_i - p_j|, and its measure to them, m_ij (j != i): one row of the matrices,
      diagonal left out. It compares only pairs of pairs that share occurrence i, each row with its own
      tie correction, so its mean over occurrences is not the pooled tau (which compares every pair of
      pairs); it is the per-unit statistic whose mean :func:`samples` reports. NaN where undefined (a
      constant row, e.g. MI clipped to 0 everywhere), left out of the mean;
    * ``occurrence_normalised``: for occurrence i, the mean over j != i of m_ij / max over pairs; its
      mean over occurrences equals ``mean_normalised_distance_by_layer`` (the matrix is symmetric).

    ``distance_matrices_by_layer[kind][measure]``: the matrices, ``[layer, target, target]``.

    The per-occurrence values are rows of one matrix, so they are not independent: a bootstrap over
    occurrences treats them as exchangeable units and its intervals are approximate."""

    kendall_tau_by_layer: dict[str, dict[str, Float[np.ndarray, " layer"]]]
    kendall_p_by_layer: dict[str, dict[str, Float[np.ndarray, " layer"]]]
    mean_normalised_distance_by_layer: dict[str, dict[str, Float[np.ndarray, " layer"]]]
    kendall_tau_rowwise_by_layer: dict[str, dict[str, Float[np.ndarray, " layer"]]]
    occurrence_tau: dict[str, dict[str, Float[np.ndarray, "layer target"]]] = not_in_metrics()
    occurrence_normalised: dict[str, dict[str, Float[np.ndarray, "layer target"]]] = not_in_metrics()
    distance_matrices_by_layer: dict[str, dict[str, Float[np.ndarray, "layer target target"]]] = not_in_metrics()


@dataclasses.dataclass(frozen=True)
class InterlayerMI:
    """Part 7: for each context (a row of ``contexts``, ending at an occurrence of the target), the L2
    norm of the attention and MLP outputs at its last token, per block (``context_norms[kind][layer,
    context]``, computed in float32); the kNN mutual information in nats between every pair of blocks'
    norms, the contexts as samples (``interlayer_mi[kind]``, diagonal 0), and its mean over pairs of
    blocks ``g`` apart, g = 1 .. n_layers - 1 (``interlayer_mi_by_gap[kind]``)."""

    context_norms: dict[str, Float[np.ndarray, "layer target"]]
    interlayer_mi: dict[str, Float[np.ndarray, "layer layer"]]
    interlayer_mi_by_gap: dict[str, Float[np.ndarray, " gap"]]
    contexts: TokenBatch = not_in_metrics()
    last: Int[np.ndarray, " target"] = not_in_metrics()


@dataclasses.dataclass(frozen=True)
class DistancesResult:
    """The typed result of :func:`run`: the synthetic MI part, the chosen block ``layer`` and the parts on
    the model (``outputs``, ``pairwise``, ``sweep``, ``interlayer``); the ``results.json`` keys (the public
    schema) are views of the parts, declared below (nothing is stored twice). ``target_words``: the
    whitespace-word index of each occurrence (:func:`mechlens.encoding.word_index`; -1 when the inputs were
    token ids)."""

    synthetic: SyntheticMI
    outputs: TargetOutputs = not_in_metrics()
    pairwise: PairwiseMeasures = not_in_metrics()
    sweep: KendallByLayer = not_in_metrics()
    interlayer: InterlayerMI = not_in_metrics()
    target_words: Int[np.ndarray, " target"] = not_in_metrics()

    target = view("outputs.target")
    layer = view("pairwise.layer")
    target_positions = view("outputs.positions")
    distance_matrices = view("pairwise.distance_matrices")
    position_distance = view("pairwise.position_distance")
    kendall_tau = view("pairwise.kendall_tau")
    kendall_tau_by_layer = view("sweep.kendall_tau_by_layer")
    kendall_p_by_layer = view("sweep.kendall_p_by_layer")
    mean_normalised_distance_by_layer = view("sweep.mean_normalised_distance_by_layer")
    context_norms = view("interlayer.context_norms")
    interlayer_mi = view("interlayer.interlayer_mi")
    interlayer_mi_by_gap = view("interlayer.interlayer_mi_by_gap")
    kendall_tau_rowwise_by_layer = view("sweep.kendall_tau_rowwise_by_layer")


# -- parts ---------------------------------------------------------------------------------------------


def synthetic_mi(
    n_points: int = 2000, bins: Sequence[int] = (4, 6, 8, 10, 12, 16, 20, 24), seed: int = 0
) -> SyntheticMI:
    """Parts 1-2 (no model): y = x² + noise (x ~ U[-2, 2], noise ~ N(0, 0.3²), ``n_points`` points, numpy
    generator seeded with ``seed``): histogram MI (bits) by bin count, kNN MI (nats), Pearson r, and the
    Minkowski L1/L2 distance between the first 10 x and y, by mechlens and by scipy."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, n_points)
    y = x**2 + rng.normal(0, 0.3, n_points)
    x10, y10 = torch.tensor(x[:10]), torch.tensor(y[:10])
    return SyntheticMI(
        mi_histogram_bits_by_bins={int(b): mi_histogram(x, y, b) for b in bins},
        mi_knn_nats=mi_knn(x, y, seed),
        pearson_r=float(scipy.stats.pearsonr(x, y)[0]),
        minkowski_demo={"L1": minkowski(x10, y10, 1), "L2": minkowski(x10, y10, 2)},
        minkowski_scipy={f"L{p}": float(scipy.spatial.distance.minkowski(x[:10], y[:10], p)) for p in (1, 2)},
        x=x,
        y=y,
    )


def document(cfg: Config, texts: Texts | None = None) -> str | Sequence[int]:
    """The studied document: the first of ``texts`` (strings, or token ids without special tokens), or
    of the texts of ``cfg.data`` when ``texts`` is None."""
    texts = load_texts(cfg.data) if texts is None else texts
    if len(texts) == 0:
        raise DataError("no texts: the distances study reads the first text of --data (texts= in Python); pass one")
    return texts[0]


def document_batch(model, text: str | Sequence[int], *, bos: bool = True) -> TokenBatch:
    """The studied document as a one-row batch: BOS prepended iff ``bos`` (a masked LM always gets
    ``<s> ... </s>``), cut to the model's positions with its special tokens counted."""
    special = int(bos) + (1 if arch.kind_of(model) == "masked" else 0)  # BOS/<s> and </s> count too
    return encode(model, [text], bos=bos, max_tokens=model.cfg.n_ctx - special)


def target_outputs(
    model, batch: TokenBatch, target: str | int, n_targets: int, *, source: str = "the text"
) -> TargetOutputs:
    """Part 3: the first ``n_targets`` text occurrences of ``target`` (a single-token string or an id) in
    row 0 of ``batch``, and ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out`` there at every
    block, in float64. ``source`` names the text in the error raised when there are too few occurrences."""
    target_id = single_token_id(model, target)
    string = target if isinstance(target, str) else model.tokenizer.decode([target_id])
    found = target_positions(batch.select(slice(0, 1)), target_id)[:, 1]
    if len(found) < 2:
        raise TokenError(
            f"--target {string!r} occurs {len(found)} time(s) in {source}: it needs at least "
            f"{n_targets}; choose another --target or --data"
        )
    if len(found) < n_targets:
        raise DataError(
            f"--target {string!r} occurs {len(found)} times in {source}, fewer than --n-targets "
            f"{n_targets}: lower --n-targets"
        )
    cols = found[:n_targets]
    names = {k: [f"blocks.{i}.{h}" for i in range(model.cfg.n_layers)] for k, h in KINDS.items()}
    _, acts = run_cached(model, batch.select(slice(0, 1)), names["attn"] + names["mlp"], progress="study 5 forward")
    return TargetOutputs(
        target=TargetInfo(string=string, id=target_id, occurrences=len(found)),
        columns=cols.numpy(),
        positions=batch.positions[0, cols].numpy(),
        outputs={k: stack_layers(acts, v)[:, 0, cols].double().numpy() for k, v in names.items()},
    )


def upper(m: np.ndarray) -> np.ndarray:
    """The strict upper triangle of a square matrix, row by row."""
    return m[np.triu_indices(len(m), 1)]


def pair_measures(acts: np.ndarray, seed: int = 0, n_jobs: int = 1) -> dict[str, np.ndarray]:
    """[MI, L1, L2] between every pair of rows of ``acts [n, d_model]`` (MI diagonal 0)."""
    t = torch.from_numpy(acts)
    return {
        "MI": pairwise_mi(acts, seed, n_jobs),
        "L1": pairwise_minkowski(t, 1).numpy(),
        "L2": pairwise_minkowski(t, 2).numpy(),
    }


def kendall(measure: np.ndarray, pos_dist: np.ndarray, name: str | None = None) -> tuple[float, float]:
    """Kendall tau-b (and p) of two square matrices over their upper triangles. A constant triangle (no
    untied pair) leaves tau undefined: scipy's NaN when ``name`` is None (:func:`pairwise_measures` and the
    layer sweep report it as None: one degenerate measure does not stop the others), else
    :class:`NonFiniteError` naming ``name``."""
    a, b = upper(measure), upper(pos_dist)
    res = scipy.stats.kendalltau(a, b)
    if name is not None and not (np.isfinite(res.statistic) and np.isfinite(res.pvalue)):
        which = name if zero_variance(a) else "the token distance" if zero_variance(b) else f"{name} (non-finite)"
        raise NonFiniteError(
            f"Kendall's tau of {name} against token distance is undefined: {which} has the same value at all "
            f"{len(a)} pairs; choose another --target or --data with more varied occurrences"
        )
    return float(res.statistic), float(res.pvalue)


def rowwise_kendall_tau(x: Float[np.ndarray, "n n"], y: Float[np.ndarray, "n n"]) -> Float[np.ndarray, " n"]:
    """Kendall's tau-b between row i of ``x`` and row i of ``y``, the diagonal left out, for every i
    (what ``scipy.stats.kendalltau(x[i, j != i], y[i, j != i])`` gives; NaN where a row is constant):
    sum of sign products over pairs (j, k) / sqrt(pairs untied in x * pairs untied in y)."""
    n = len(x)
    keep = ~np.eye(n, dtype=bool)
    a = np.sign(x[:, :, None] - x[:, None, :])  # [i, j, k]
    b = np.sign(y[:, :, None] - y[:, None, :])
    w = keep[:, :, None] & keep[:, None, :]  # j != i and k != i
    num = (a * b * w).sum((1, 2))
    den = np.sqrt((a * a * w).sum((1, 2)) * (b * b * w).sum((1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _mean_defined(x: Float[np.ndarray, "layer target"]) -> Float[np.ndarray, " layer"]:
    """Mean over the finite entries of each row; NaN (``None`` in results.json) where there is none."""
    ok = np.isfinite(x)
    count = ok.sum(1)
    return np.where(count > 0, np.where(ok, x, 0.0).sum(1) / np.maximum(count, 1), np.nan)


def pairwise_measures(outputs: TargetOutputs, layer: int, *, seed: int = 0, n_jobs: int = 1) -> PairwiseMeasures:
    """Parts 4-5: [MI, L1, L2] between the occurrences' attention and MLP outputs at block ``layer``,
    their token distances, and Kendall's tau of each measure against token distance (upper triangle)."""
    pos = outputs.positions
    pos_dist = np.abs(pos[:, None] - pos[None, :]).astype(np.float64)
    dist = {k: pair_measures(a[layer], seed, n_jobs) for k, a in outputs.outputs.items()}
    # a constant measure (e.g. a histogram MI saturated at every pair) leaves its tau undefined: marked NaN ->
    # None in results.json, as PairwiseMeasures says, while the other measures still answer
    taus = {k: {m: Tau(*kendall(v, pos_dist)) for m, v in d.items()} for k, d in dist.items()}
    return PairwiseMeasures(
        layer=layer, positions=pos, position_distance=pos_dist, distance_matrices=dist, kendall_tau=taus
    )


def kendall_by_layer(outputs: TargetOutputs, *, seed: int = 0, n_jobs: int = 1) -> KendallByLayer:
    """Part 6: at every block, attention vs MLP outputs, the pooled Kendall tau (and p) of [MI, L1, L2]
    against token distance, the mean max-normalised measure, and the per-occurrence (row-wise) taus and
    normalised means (see :class:`KendallByLayer` for how the row-wise and pooled taus differ)."""
    pos = outputs.positions
    pos_dist = np.abs(pos[:, None] - pos[None, :]).astype(np.float64)
    n = len(pos)
    off = ~np.eye(n, dtype=bool)
    mats: dict[str, dict[str, list]] = {k: {m: [] for m in MEASURES} for k in KINDS}
    for k, a in outputs.outputs.items():
        for li in range(len(a)):
            for m, v in pair_measures(a[li], seed, n_jobs).items():
                mats[k][m].append(v)
    stacked = {k: {m: np.stack(v) for m, v in d.items()} for k, d in mats.items()}
    tau, p, norm, row_tau, occ_tau, occ_norm = ({k: {} for k in KINDS} for _ in range(6))
    for k, d in stacked.items():
        for m, ms in d.items():
            tp = [kendall(v, pos_dist) for v in ms]
            tau[k][m] = np.array([t for t, _ in tp], np.float64)
            p[k][m] = np.array([q for _, q in tp], np.float64)
            norm[k][m] = np.array([(upper(v) / max(upper(v).max(), 1e-300)).mean() for v in ms], np.float64)
            occ_tau[k][m] = np.stack([rowwise_kendall_tau(pos_dist, v) for v in ms])
            occ_norm[k][m] = np.stack([(v / max(upper(v).max(), 1e-300) * off).sum(1) / (n - 1) for v in ms])
            row_tau[k][m] = _mean_defined(occ_tau[k][m])
    return KendallByLayer(
        kendall_tau_by_layer=tau,
        kendall_p_by_layer=p,
        mean_normalised_distance_by_layer=norm,
        kendall_tau_rowwise_by_layer=row_tau,
        occurrence_tau=occ_tau,
        occurrence_normalised=occ_norm,
        distance_matrices_by_layer=stacked,
    )


def contexts_ending_at(model, batch: TokenBatch, columns: Sequence[int] | np.ndarray, n_context: int) -> TokenBatch:
    """Part 7's inputs: for each column of row 0 of ``batch``, the ``n_context`` tokens ending there (fewer
    at the start of the document), ids as the model saw them (special tokens included: the first context
    may begin with BOS/``<s>``), right-padded (:func:`mechlens.encoding.encode` with
    ``specials_included=True``; ``bos`` records whether every context starts with BOS)."""
    cols = [int(c) for c in columns]
    starts = [max(0, c - n_context + 1) for c in cols]
    ids = [batch.tokens[0, s : c + 1].tolist() for s, c in zip(starts, cols, strict=True)]
    bos = batch.bos and all(s == 0 for s in starts)
    return encode(model, ids, bos=bos, specials_included=True)


def interlayer_mi(model, contexts: TokenBatch, *, seed: int = 0, n_jobs: int = 1) -> InterlayerMI:
    """Part 7: the L2 norms of ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out`` at the last
    token of each row of ``contexts`` (one forward of the batch), and the kNN mutual information (nats)
    between every pair of blocks' norms over the rows."""
    n_layers = model.cfg.n_layers
    names = {k: [f"blocks.{i}.{h}" for i in range(n_layers)] for k, h in KINDS.items()}
    _, acts = run_cached(model, contexts, names["attn"] + names["mlp"])
    last = contexts.attention_mask.sum(-1) - 1 if contexts.padding_side == "right" else None
    if last is None:
        last = torch.full((len(contexts),), contexts.tokens.shape[1] - 1)
    rows = torch.arange(len(contexts))
    norms = {k: vector_norm(stack_layers(acts, v)[:, rows, last]).double().numpy() for k, v in names.items()}
    mi = {k: pairwise_mi(v, seed, n_jobs) for k, v in norms.items()}  # [layer, layer]
    gaps = np.abs(np.arange(n_layers)[:, None] - np.arange(n_layers)[None, :])
    by_gap = {
        k: np.array([upper(v)[upper(gaps) == g].mean() for g in range(1, n_layers)], np.float64) for k, v in mi.items()
    }
    return InterlayerMI(
        context_norms=norms, interlayer_mi=mi, interlayer_mi_by_gap=by_gap, contexts=contexts, last=last.numpy()
    )


# -- the study -----------------------------------------------------------------------------------------


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    """Every part on the first text of ``texts`` (default: ``cfg.data``; strings or token ids without
    special tokens). ``result.parts`` is the :class:`DistancesResult`; ``result.metrics`` derives from it."""
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    text = document(cfg, texts)
    batch = document_batch(model, text, bos=cfg.bos)
    outputs = target_outputs(model, batch, cfg.target, cfg.n_targets, source=f"--data {cfg.data}")
    layer = model.cfg.n_layers // 2 if cfg.layer is None else cfg.layer
    pairwise = pairwise_measures(outputs, layer, seed=cfg.seed, n_jobs=cfg.n_jobs)
    sweep = kendall_by_layer(outputs, seed=cfg.seed, n_jobs=cfg.n_jobs)
    contexts = contexts_ending_at(model, batch, outputs.columns, cfg.n_context)
    inter = interlayer_mi(model, contexts, seed=cfg.seed, n_jobs=cfg.n_jobs)
    if isinstance(text, str):
        words = word_index(model, [text], batch)[0, torch.from_numpy(outputs.columns)].numpy()
    else:
        words = np.full(len(outputs.columns), -1, dtype=np.int64)
    typed = DistancesResult(
        synthetic=synthetic_mi(cfg.n_synthetic, cfg.mi_bins, cfg.seed),
        outputs=outputs,
        pairwise=pairwise,
        sweep=sweep,
        interlayer=inter,
        target_words=words,
    )
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    res = StudyResult(
        "distances", prov.model, metrics_of(typed), prov.to_dict(), dataclasses.asdict(cfg), tables(typed), parts=typed
    )
    res.figures = figures(typed)
    return res


def tables(r: DistancesResult) -> dict[str, list[dict[str, Any]]]:
    """The CSV tables: ``pairs`` (every pair of occurrences at the chosen block, each measure) and
    ``layer_sweep`` (pooled tau, p and mean normalised measure per kind, measure and block)."""
    pos_dist, dist, sweep = r.position_distance, r.distance_matrices, r.sweep
    n, n_layers = len(r.target_positions), len(sweep.kendall_tau_by_layer["attn"]["L2"])
    return {
        "pairs": [
            {"kind": k, "i": i, "j": j, "position_distance": pos_dist[i, j], **{m: dist[k][m][i, j] for m in MEASURES}}
            for k in KINDS
            for i in range(n)
            for j in range(i + 1, n)
        ],
        "layer_sweep": [
            {
                "kind": k,
                "layer": li,
                "measure": m,
                "tau": sweep.kendall_tau_by_layer[k][m][li],
                "p": sweep.kendall_p_by_layer[k][m][li],
                "mean_normalised": sweep.mean_normalised_distance_by_layer[k][m][li],
            }
            for k in KINDS
            for m in MEASURES
            for li in range(n_layers)
        ],
    }


def samples(result: StudyResult) -> pd.DataFrame:
    """Per-occurrence statistics (unit ``occurrence``, ``sample`` = the occurrence's index in reading order,
    so the same text gives the same ids for every model), one row per (quantity, block, occurrence); block
    ``l`` at relative depth ``(l + 1) / L`` (:func:`mechlens.axes.block_depth`); ``position`` and ``word``
    are empty (the occurrences are the units, not a position axis). Across tokenizers, occurrence k pairs
    with occurrence k: check that it is the same word (``result.parts.target_words``). Quantities, for
    ``kind`` in attn / mlp:

    * ``tau_{kind}``: the row-wise Kendall tau-b of occurrence i (:class:`KendallByLayer`
      ``occurrence_tau``, L2 distance): between |p_i - p_j| and the L2 distance of the outputs, j != i.
      Its mean over occurrences is ``kendall_tau_rowwise_by_layer[kind]["L2"]``, not the pooled
      ``kendall_tau_by_layer[kind]["L2"]`` (which compares all pairs of pairs). Occurrences whose tau is
      undefined (a constant row) are left out;
    * ``mean_normalised_l2_{kind}``: the mean over j != i of the L2 distance divided by the largest L2
      distance at that block; its mean over occurrences is ``mean_normalised_distance_by_layer[kind]["L2"]``.
    """
    r: DistancesResult = result.parts
    rows = []
    for k in KINDS:
        for quantity, values in (
            (f"tau_{k}", r.sweep.occurrence_tau[k]["L2"]),
            (f"mean_normalised_l2_{k}", r.sweep.occurrence_normalised[k]["L2"]),
        ):
            depth = block_depth(len(values))
            for li, row in enumerate(values):
                for i, v in enumerate(row):
                    if np.isfinite(v):
                        rows.append((quantity, li, float(depth[li]), i, float(v)))
    quantity, layer, depth, sample, value = (list(c) for c in zip(*rows, strict=True)) if rows else ([],) * 5
    return sample_table(
        np.array(quantity, dtype=object), value, unit="occurrence", sample=sample, layer=layer, relative_depth=depth
    )


def incomparable(provenances: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Quantities of :func:`samples` that are not comparable between these models: the attention ones
    when the models' attention outputs are different vectors (normalisation placements of different
    meaning). Distances are normalised and taus are rank statistics, so width alone does not matter."""
    why = arch.attn_out_mismatch(provenances)
    return {} if why is None else {"tau_attn": why, "mean_normalised_l2_attn": why}


# -- figures -------------------------------------------------------------------------------------------


def mi_by_bins_figure(syn: SyntheticMI) -> go.Figure:
    """Part 2: histogram MI (bits) by bin count, with the kNN estimate converted to bits."""
    bins = list(syn.mi_histogram_bits_by_bins)
    f = go.Figure(
        go.Scatter(
            x=bins, y=list(syn.mi_histogram_bits_by_bins.values()), mode="lines+markers", name="2-D histogram estimate"
        )
    )
    knn_bits, r = syn.mi_knn_nats / np.log(2), syn.pearson_r
    f.add_hline(y=knn_bits, line_dash="dash", annotation_text=f"kNN estimate {knn_bits:.3f} bits")
    title = f"Mutual information of y = x² + noise, in bits, by bin count (Pearson r {r:.3f})"
    return f.update_layout(title=title, xaxis_title="bins per axis", yaxis_title="MI (bits)")


def pairs_figure(pw: PairwiseMeasures, normalised: bool = False) -> go.Figure:
    """Parts 4-5: every pair's measure (optionally divided by its maximum) against its token distance."""
    f = make_subplots(rows=2, cols=3, subplot_titles=[f"{k} {mm}" for k in KINDS for mm in MEASURES])
    for r, k in enumerate(KINDS):
        for c, mm in enumerate(MEASURES):
            y = upper(pw.distance_matrices[k][mm])
            y = y / max(y.max(), 1e-300) if normalised else y
            f.add_scatter(
                x=upper(pw.position_distance),
                y=y,
                mode="markers",
                row=r + 1,
                col=c + 1,
                showlegend=False,
                name=f"{k} {mm}",
            )
            f.update_xaxes(title_text="position distance (tokens)", row=r + 1, col=c + 1)
            unit = "MI (nats)" if mm == "MI" else f"{mm} distance"
            f.update_yaxes(title_text=f"{unit} / max" if normalised else unit, row=r + 1, col=c + 1)
    title = "max-normalised " if normalised else ""
    return f.update_layout(title=f"Pairwise {title}measures vs position distance (layer {pw.layer})")


def layer_sweep_figure(sweep: KendallByLayer) -> go.Figure:
    """Part 6: pooled Kendall tau and mean normalised measure by block, attention vs MLP."""
    f = make_subplots(rows=1, cols=2, subplot_titles=["Kendall tau by layer", "mean max-normalised measure"])
    for k in KINDS:
        for mm in MEASURES:
            f.add_scatter(y=sweep.kendall_tau_by_layer[k][mm], name=f"{k} {mm}", mode="lines+markers", row=1, col=1)
            f.add_scatter(
                y=sweep.mean_normalised_distance_by_layer[k][mm],
                name=f"{k} {mm}",
                mode="lines+markers",
                row=1,
                col=2,
                showlegend=False,
            )
    for c in (1, 2):
        f.update_xaxes(title_text="layer", row=1, col=c)
    f.update_yaxes(title_text="Kendall tau vs position distance", row=1, col=1)
    f.update_yaxes(title_text="mean of measure / its max", row=1, col=2)
    return f.update_layout(title="Layer sweep: attention vs MLP outputs")


def interlayer_figure(inter: InterlayerMI) -> go.Figure:
    """Part 7: MI between every pair of blocks' output norms at the target, attention and MLP."""
    f = make_subplots(rows=1, cols=2, subplot_titles=["attention", "MLP"])
    for c, k in enumerate(KINDS):
        f.add_heatmap(z=inter.interlayer_mi[k], row=1, col=c + 1, coloraxis="coloraxis", name=f"{k} MI")
        f.update_xaxes(title_text="layer", row=1, col=c + 1)
        f.update_yaxes(title_text="layer", row=1, col=c + 1)
    return f.update_layout(
        title="MI (nats, kNN) between layers' output norms at the target",
        coloraxis={"colorscale": "Viridis", "colorbar": {"title": "nats"}},
    )


def figures(r: DistancesResult) -> dict[str, go.Figure]:
    return {
        "mi_by_bins": mi_by_bins_figure(r.synthetic),
        "pairs": pairs_figure(r.pairwise),
        "pairs_normalised": pairs_figure(r.pairwise, normalised=True),
        "layer_sweep": layer_sweep_figure(r.sweep),
        "interlayer_mi": interlayer_figure(r.interlayer),
    }


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    tau = m["kendall_tau_by_layer"]
    syn = m["synthetic"]
    best = {k: int(np.nanargmax(np.asarray(tau[k]["L2"], np.float64))) for k in tau}
    return [
        f"Kendall tau (attn L2) by layer {format_values(tau['attn']['L2'])}",
        f"Between the {len(m['target_positions'])} occurrences of {m['target']['string']!r}, the L2 distance of "
        f"attention outputs tracks their distance in the text most at layer {best['attn']} (Kendall tau "
        f"{tau['attn']['L2'][best['attn']]:.2f}); for MLP outputs at layer {best['mlp']} "
        f"({tau['mlp']['L2'][best['mlp']]:.2f}).",
        f"On the synthetic y = x² + noise, kNN mutual information is {syn['mi_knn_nats']:.2f} nats while the Pearson "
        f"correlation is {syn['pearson_r']:.2f}: a dependence correlation misses.",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same text)."""
    f = go.Figure()
    for model, e in entries.items():
        for kind in ("attn", "mlp"):
            y = e["metrics"]["kendall_tau_by_layer"][kind]["L2"]
            f.add_scatter(x=block_depth(len(y)), y=y, name=f"{model} {kind}", mode="lines+markers")
    f.update_layout(
        title="Kendall tau (L2 vs position distance) by relative depth",
        xaxis_title="relative depth (block l at (l+1)/L)",
        yaxis_title="tau",
    )
    return {"comparison": f}


# -- the lesson ----------------------------------------------------------------------------------------

LESSON = (
    Step(
        "Setup: the document, the model, the conventions",
        "One long text (the first of `config.data`; the original used gpt2-large on Wikipedia's *Turkish "
        "coffee* page) encoded once, **BOS prepended** (`bos=False` to switch; a masked LM always gets "
        "`<s> ... </s>`), cut to the model's positions with its special tokens counted. The target is "
        "`config.target` (exactly one token); the study uses its first `config.n_targets` occurrences in "
        "reading order. Parts 4-5 look at the **middle block** `n_layers // 2` (`config.layer` to choose).",
        """config = distances.Config()  # data="coffee", target=" coffee", n_targets=10, bos=True, layer=None (middle)
model = load_model("tiny-gpt2")  # or "gpt2-large" with data="wikipedia:Turkish coffee"
text = distances.document(config)  # the first text of config.data
batch = distances.document_batch(model, text, bos=config.bos)
print(batch.tokens.shape, repr(model.tokenizer.decode(batch.tokens[0, :16])))""",
    ),
    Step(
        "Parts 1-2: Minkowski distances and mutual information on synthetic data",
        "No model yet. `synthetic_mi` draws y = x² + noise with x symmetric around 0: y depends strongly on "
        "x, yet their Pearson correlation is near 0. The Minkowski L1/L2 distances (mechlens' own code) "
        "match scipy's; mutual information is estimated twice: a 2-D histogram (bits), which grows with the "
        "bin count, and sklearn's kNN (Kraskov) estimator (nats), which needs no bins. Look for the "
        "histogram curve crossing the kNN line (converted to bits) and for r ≈ 0 despite MI > 1 bit.",
        """syn = distances.synthetic_mi(config.n_synthetic, config.mi_bins, config.seed)
print("Minkowski, mechlens:", syn.minkowski_demo, "scipy:", syn.minkowski_scipy)
print(f"kNN MI {syn.mi_knn_nats:.3f} nats, Pearson r {syn.pearson_r:.3f}")
distances.mi_by_bins_figure(syn).show()""",
    ),
    Step(
        "Part 3: the target's occurrences and the outputs there",
        "`target_outputs` finds the occurrences of the target token and caches, at every block, the "
        "attention output `blocks.{l}.hook_attn_out` and the MLP output `blocks.{l}.hook_mlp_out` at those "
        "positions (one forward pass). In pre-LN models (GPT-2) these are what each sublayer adds to the "
        "residual stream; in post-LN encoders the attention output is taken after the residual add and "
        "LayerNorm. The result holds the positions and `[layer, occurrence, d_model]` arrays.",
        """outputs = distances.target_outputs(model, batch, config.target, config.n_targets)
print(outputs.target)
print("token positions:", outputs.positions)
print({kind: a.shape for kind, a in outputs.outputs.items()})  # [layer, occurrence, d_model]""",
    ),
    Step(
        "Parts 4-5: pairwise measures at one block, and Kendall's tau against token distance",
        "`pairwise_measures` compares every pair of occurrences at one block: L1 and L2 distances between "
        "their output vectors and the kNN mutual information between them (the `d_model` coordinates as "
        "samples; a similarity, not a distance). Kendall's tau of each measure against the pair's distance "
        "in tokens, over all n(n-1)/2 pairs, asks: are occurrences far apart in the text also far apart in "
        "representation? Positive tau for L1/L2 (negative for MI) means position is encoded in the outputs.",
        """layer = model.cfg.n_layers // 2
pairs = distances.pairwise_measures(outputs, layer, seed=config.seed)
for kind, taus in pairs.kendall_tau.items():
    print(kind, {m: f"tau {t.tau:+.3f} (p {t.p:.2g})" for m, t in taus.items()})
distances.pairs_figure(pairs).show()""",
    ),
    Step(
        "Part 6: the layer sweep, attention vs MLP outputs",
        "`kendall_by_layer` repeats parts 4-5 at every block. The pooled tau compares all pairs of pairs; the "
        "row-wise tau is computed per occurrence (its token distances to the others against its "
        "representation distances to them) and averaged: the per-occurrence numbers are what cross-model "
        "comparisons bootstrap over. Look for where position tracking peaks in depth, and whether attention "
        "or MLP outputs carry it.",
        """sweep = distances.kendall_by_layer(outputs, seed=config.seed)
print("pooled tau (L2):  ", {k: v["L2"].round(3) for k, v in sweep.kendall_tau_by_layer.items()})
print("row-wise tau (L2):", {k: v["L2"].round(3) for k, v in sweep.kendall_tau_rowwise_by_layer.items()})
distances.layer_sweep_figure(sweep).show()""",
    ),
    Step(
        "Part 7: mutual information between layers",
        "Short contexts of `config.n_context` tokens ending at each occurrence (cut from the encoded "
        "document, ids as the model saw them) go through the model as one padded batch; `interlayer_mi` "
        "takes the L2 norm of each block's attention and MLP output at the last token, then the kNN mutual "
        "information between every pair of blocks' norms over the contexts. Look for MI falling with the "
        "gap between blocks.",
        """contexts = distances.contexts_ending_at(model, batch, outputs.columns, config.n_context)
inter = distances.interlayer_mi(model, contexts, seed=config.seed)
print("MI (nats) by layer gap:", {k: v.round(3) for k, v in inter.interlayer_mi_by_gap.items()})
distances.interlayer_figure(inter).show()""",
    ),
    Step(
        "The whole study",
        "`run` composes the parts; `result.parts` is the typed result, `result.metrics` the JSON of "
        "`results.json`, and `distances.samples(result)` the per-occurrence statistics (row-wise tau and "
        "mean normalised L2 distance per block) from which comparisons across models get bootstrap "
        "intervals.",
        """result = distances.run(model, config)
print(distances.headline(result.metrics)[1])
result.figures["mi_by_bins"].show()
result.figures["layer_sweep"].show()
print(distances.samples(result).groupby(["quantity", "layer"])["value"].mean().unstack().round(3))
result.provenance""",
    ),
)
