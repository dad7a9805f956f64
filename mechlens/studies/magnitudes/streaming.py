"""Study 4's part 1 (:mod:`mechlens.studies.magnitudes`): the attention-output norms of a corpus, streamed batch by
batch into accumulators whose memory is constant in the number of texts, merged over the ranks under ``torchrun``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import einops
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechlens import distributed, progress
from mechlens.data import batched
from mechlens.encoding import TokenBatch, encode
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.ops import stack_layers, vector_norm
from mechlens.stats.streaming import Moments, Reservoir, priorities
from mechlens.studies.magnitudes.parts import (
    PERCENTILES,
    AttnOutNorms,
    attn_out_names,
    position_budget,
    word_by_position,
)

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
