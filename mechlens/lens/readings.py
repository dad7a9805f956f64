"""Lens statistics over the residual stream: every readout point through the model's head (the logit
lens) and, with a :class:`~mechlens.lens.tuned.TunedLens`, through its translators first, reduced over the
vocabulary per (readout point, position) by :func:`mechlens.ops.lens_reduce`.

One forward caches the ``n_layers + 1`` readout points (:func:`mechlens.arch.readout_hook_names`); the
``[layer, batch, pos, d_vocab]`` logits are never held. :func:`lens_stats` is the logit lens of a batch,
:func:`pair_stats` both lenses from one forward, :func:`compare_lenses` both lenses at chosen cells as
:class:`LensReadings`. The corpus lens (streamed, data-parallel) is :mod:`mechlens.lens.corpus`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from mechlens import arch, progress
from mechlens.encoding import TokenBatch
from mechlens.forward import run_cached
from mechlens.lens.tuned import TunedLens
from mechlens.ops import LensStats, lens_reduce, stack_layers
from mechlens.result import not_in_metrics

# the per-position quantities of a lens reading, in the order of LensReadings.per_cell and the corpus lens
QUANTITIES = ("target_logprob", "rank", "entropy", "kl_to_final", "top1_agrees_final")


def lens_stats(
    model,
    batch: TokenBatch,
    targets: torch.Tensor | None,
    *,
    rows: torch.Tensor | None = None,
    k: int = 5,
    entropy: bool = True,
    kl_to_final: bool = False,
    batch_size: int | None = None,
    max_chunk_bytes: int = 128 * 2**20,
) -> LensStats:
    """Every readout point of ``batch`` through the model's head, reduced per (layer, position):
    one forward caching only the ``n_layers + 1`` residual-stream hook points."""
    names = arch.readout_hook_names(model)
    _, acts = run_cached(model, batch, names, batch_size=batch_size, progress="lens forward")
    resid = stack_layers(acts, names)  # [layer, batch, pos, d_model]
    rows = batch.attention_mask.bool() if rows is None else rows
    return lens_reduce(
        resid,
        arch.readout(model),
        targets=targets,
        rows=rows,
        k=k,
        entropy=entropy,
        kl_to_final=kl_to_final,
        max_chunk_bytes=max_chunk_bytes,
        progress=not progress.QUIET,
    )


def pair_stats(
    model,
    batch: TokenBatch,
    targets: torch.Tensor,
    tuned: TunedLens | None,
    *,
    rows: torch.Tensor | None = None,
    k: int = 1,
    batch_size: int | None = None,
    max_chunk_bytes: int = 128 * 2**20,
) -> tuple[LensStats, LensStats | None]:
    """The logit lens and (with ``tuned``) the tuned lens of ``batch`` from one forward: every readout point
    through the model's head, once as cached and once translated (:meth:`TunedLens.translate`), each reduced
    over the vocabulary by :func:`mechlens.ops.lens_reduce` (entropy and KL to the final readout included;
    the tuned lens' last point is the identity, so both lenses share the final readout)."""
    names = arch.readout_hook_names(model)
    _, acts = run_cached(model, batch, names, batch_size=batch_size)
    resid = stack_layers(acts, names)
    rows = batch.attention_mask.bool() if rows is None else rows
    kw = dict(targets=targets, rows=rows, k=k, entropy=True, kl_to_final=True, max_chunk_bytes=max_chunk_bytes)
    logit = lens_reduce(resid, arch.readout(model), **kw)
    if tuned is None:
        return logit, None
    with torch.no_grad():
        translated = tuned.translate(resid)
    del resid
    return logit, lens_reduce(translated, arch.readout(model), **kw)


@dataclasses.dataclass(frozen=True)
class LensReadings:
    """One lens at the study's cells (``[readout point, cell]``): the target's log-prob and 0-based rank,
    the entropy and KL(final readout || this readout) in nats, and whether the top-1 equals the final
    readout's; by-layer means over the cells beside them (``rank_mean_by_layer``: the mean rank)."""

    target_logprob_by_layer: Float[np.ndarray, " layer"]
    rank_mean_by_layer: Float[np.ndarray, " layer"]
    entropy_by_layer: Float[np.ndarray, " layer"]
    kl_to_final_by_layer: Float[np.ndarray, " layer"]
    top1_agreement_by_layer: Float[np.ndarray, " layer"]
    target_logprob: Float[np.ndarray, "layer cell"] = not_in_metrics()
    rank: Int[np.ndarray, "layer cell"] = not_in_metrics()
    entropy: Float[np.ndarray, "layer cell"] = not_in_metrics()
    kl_to_final: Float[np.ndarray, "layer cell"] = not_in_metrics()
    top1_agrees_final: Bool[np.ndarray, "layer cell"] = not_in_metrics()

    def per_cell(self) -> dict[str, np.ndarray]:
        """``QUANTITIES`` -> ``[layer, cell]`` float64 arrays."""
        return dict(
            zip(
                QUANTITIES,
                (self.target_logprob, self.rank, self.entropy, self.kl_to_final, self.top1_agrees_final),
                strict=True,
            )
        )


def readings_at(st: LensStats, rows: torch.Tensor, cols: torch.Tensor) -> LensReadings:
    idx = (slice(None), rows, cols)
    pred = st.predicted[idx]
    v = {
        "target_logprob": st.target_logprob[idx].numpy(),
        "rank": st.target_rank[idx].numpy(),
        "entropy": st.entropy[idx].numpy(),
        "kl_to_final": st.kl_to_final[idx].numpy(),
        "top1_agrees_final": (pred == pred[-1:]).numpy(),
    }
    mean = {q: np.asarray(a, dtype=np.float64).mean(1) for q, a in v.items()}
    return LensReadings(
        target_logprob_by_layer=mean["target_logprob"],
        rank_mean_by_layer=mean["rank"],
        entropy_by_layer=mean["entropy"],
        kl_to_final_by_layer=mean["kl_to_final"],
        top1_agreement_by_layer=mean["top1_agrees_final"],
        **v,
    )


@dataclasses.dataclass(frozen=True)
class TunedComparison:
    """The tuned lens beside the logit lens at the same cells (causal: every next-token position of the text;
    masked: every text position masked in turn), from one forward: ``logit`` and ``tuned``
    :class:`LensReadings`. ``source`` is the ``--tuned`` value, ``card`` the lens' training summary, ``note``
    whether the text was among its training data (a single text cannot be guaranteed held out)."""

    source: str
    card: dict[str, Any]
    note: str
    logit: LensReadings
    tuned: LensReadings


def card_summary(lens: TunedLens) -> dict[str, Any]:
    c = lens.card
    return {
        "model": c.model,
        "fingerprint": c.fingerprint,
        "data": c.data,
        "heldout": c.heldout,
        "steps": c.steps,
        "n_train_texts": c.n_train_texts,
        "trained_points": c.trained_points,
        "heldout_kl_logit": c.heldout_kl_logit,
        "heldout_kl_tuned": c.heldout_kl_tuned,
    }


def compare_lenses(
    model,
    batch: TokenBatch,
    targets: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    lens: TunedLens,
    *,
    source: str,
    note: str,
    batch_size: int | None = None,
    max_chunk_bytes: int = 128 * 2**20,
) -> TunedComparison:
    """Both lenses at the cells ``(rows[i], cols[i])`` of ``batch`` whose targets are ``targets`` there."""
    sel = torch.zeros_like(batch.tokens, dtype=torch.bool)
    sel[rows, cols] = True
    tgt = torch.where(sel, targets, torch.full_like(targets, -1))
    a, b = pair_stats(model, batch, tgt, lens, rows=sel, batch_size=batch_size, max_chunk_bytes=max_chunk_bytes)
    return TunedComparison(
        source=source,
        card=card_summary(lens),
        note=note,
        logit=readings_at(a, rows, cols),
        tuned=readings_at(b, rows, cols),
    )


def first_depth_below(kl_by_layer, threshold: float = 1.0) -> int | None:
    """The first readout point whose mean KL to the final readout is below ``threshold`` nats (None: none)."""
    below = np.nonzero(np.asarray(kl_by_layer, dtype=np.float64) < threshold)[0]
    return int(below[0]) if len(below) else None
