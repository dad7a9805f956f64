"""The corpus lens: the logit lens (and a tuned lens beside it) over every lensed position of a corpus,
streamed one batch at a time and merged across the ranks of a process group, as tuned-lens reports it.

Causal LMs read every next-token position; masked LMs a seeded fraction of each text's tokens, masked
(:func:`mechlens.lens.tuned.lens_inputs`). Statistics are float64 sums (memory constant in the number of
texts) and a seeded reservoir of per-text means, whose bootstrap gives the comparisons' intervals.
"""

from __future__ import annotations

import dataclasses

import einops
import numpy as np
import torch
from jaxtyping import Float, Int

from mechlens import progress
from mechlens.errors import DataError
from mechlens.lens.readings import QUANTITIES, pair_stats
from mechlens.lens.tuned import TunedLens, lens_inputs
from mechlens.result import not_in_metrics


@dataclasses.dataclass(frozen=True)
class CorpusLens:
    """The lens over a corpus, as tuned-lens reports it: at each readout point, the mean over every lensed
    position of every text (causal LMs: every next-token position; masked LMs: a seeded ``mask_prob`` of
    each text's tokens, masked) of the target's log-prob, its 0-based rank, the entropy, the KL(final
    readout || this readout) (nats) and the top-1 agreement with the final readout, with the population std
    of each. Accumulated in float64 sums per batch (memory constant in the number of texts) and, under
    ``torchrun``, summed over the ranks. ``per_text`` holds, for a seeded reservoir of at most
    ``n_samples`` texts (:class:`mechlens.stats.streaming.Reservoir`: the same texts whatever the
    sharding), each text's mean of each quantity per readout point; comparisons bootstrap over them.
    ``tuned``: the same statistics of the tuned lens on the same positions (same reservoir texts), when
    one was given."""

    n_texts: int
    n_predictions: int
    target_logprob_by_layer: Float[np.ndarray, " layer"]
    rank_mean_by_layer: Float[np.ndarray, " layer"]
    entropy_by_layer: Float[np.ndarray, " layer"]
    kl_to_final_by_layer: Float[np.ndarray, " layer"]
    top1_agreement_by_layer: Float[np.ndarray, " layer"]
    std_by_layer: dict[str, Float[np.ndarray, " layer"]]
    n_samples: int
    sample_text_index: Int[np.ndarray, " sample"] = not_in_metrics()
    per_text: Float[np.ndarray, "sample quantity layer"] = not_in_metrics()
    tuned: CorpusLens | None  # the tuned lens at the same positions, or None


def _corpus_stream(model, bar, moments, reservoir, cfg, tuned) -> int:
    """This rank's share of the corpus lens: each batch encoded (:func:`mechlens.lens.tuned.lens_inputs`),
    read out at every lensed position by both lenses, summed into ``moments``, and its per-text means
    offered to ``reservoir``. Returns the number of texts read."""
    n_texts = 0
    for chunk in bar:
        inputs = lens_inputs(
            model,
            [t for _, t in chunk],
            [i for i, _ in chunk],
            bos=cfg["bos"],
            max_tokens=cfg["max_tokens"],
            mask_prob=cfg["mask_prob"],
            seed=cfg["seed"],
        )
        targets = inputs.targets
        with progress.quiet():
            pair = pair_stats(
                model,
                inputs.batch,
                targets,
                tuned,
                rows=inputs.rows,
                batch_size=cfg["batch_size"],
                max_chunk_bytes=cfg["max_chunk_bytes"],
            )
        values = torch.cat(
            [
                torch.stack(
                    [
                        st.target_logprob.double(),
                        st.target_rank.double(),
                        st.entropy.double(),
                        st.kl_to_final.double(),
                        (st.predicted == st.predicted[-1:]).double(),
                    ]
                )
                for st in pair
                if st is not None
            ]
        )  # [lens x quantity, layer, batch, pos]
        valid = (targets >= 0).to(values.device)  # [batch, pos]
        flat = einops.rearrange(values, "q layer batch pos -> (batch pos) q layer")
        moments.update(flat, valid.reshape(-1, 1, 1))
        v = torch.where(valid[None, None], values, torch.zeros((), dtype=values.dtype, device=values.device))
        n = valid.sum(-1).clamp(min=1).double()  # [batch]
        per_text = einops.rearrange(v.sum(-1) / n, "q layer batch -> batch q layer")
        has = valid.any(-1).cpu()
        reservoir.update(inputs.index[has], per_text.cpu()[has])
        n_texts += len(chunk)
        if hasattr(bar, "update"):  # a tqdm bar counts one per batch itself: count the batch's tokens (tok/s)
            bar.update(int(inputs.batch.attention_mask.sum()) - 1)
    return n_texts


def corpus_lens(
    model,
    texts,
    *,
    bos: bool = True,
    max_tokens: int = 128,
    batch_size: int = 64,
    max_chunk_bytes: int = 128 * 2**20,
    n_samples: int = 10_000,
    seed: int = 0,
    tuned: TunedLens | None = None,
    mask_prob: float = 0.15,
) -> CorpusLens:
    """The corpus lens of ``model`` over ``texts``: an iterable of ``(global index, text)`` pairs (e.g.
    :func:`mechlens.data.iter_indexed`, this rank's shard under ``torchrun``) or of strings. Texts are
    tokenised one batch at a time (the first ``max_tokens`` tokens, BOS per ``bos``; a masked LM gets a
    seeded ``mask_prob`` of its tokens masked, :func:`mechlens.lens.tuned.lens_inputs`); each batch's
    readout points go through the model's head at every lensed position (one forward caching the
    ``n_layers + 1`` residual-stream hook points, reduced over the vocabulary in tiles), and the
    statistics are summed. With ``tuned``, the tuned lens is read at the same positions from the same
    forward. The sums (and the reservoir) are merged over the ranks of a process group."""
    from mechlens import distributed
    from mechlens.data import batched
    from mechlens.stats.streaming import Moments, Reservoir

    n_points = model.cfg.n_layers + 1
    n_q = len(QUANTITIES) * (1 if tuned is None else 2)
    moments = Moments((n_q, n_points))
    reservoir = Reservoir(n_samples, seed)
    n_texts = 0
    indexed = ((i, t) if isinstance(t, str) else t for i, t in enumerate(texts))
    bar = progress.bar(batched(indexed, batch_size), "corpus lens", unit="tok", show=distributed.is_main())
    cfg = dict(
        bos=bos,
        max_tokens=max_tokens,
        mask_prob=mask_prob,
        seed=seed,
        batch_size=batch_size,
        max_chunk_bytes=max_chunk_bytes,
    )
    with distributed.share_then_merge(moments, reservoir):
        n_texts = _corpus_stream(model, bar, moments, reservoir, cfg, tuned)
    n_texts = int(sum(distributed.all_gather_object(n_texts)))
    count = moments.count[0, 0].item()
    if count == 0:
        raise DataError("the corpus has no position to read (texts of one token and no BOS): use longer texts")
    mean, std = moments.mean, moments.std
    rows, index = reservoir.rows, reservoir.index  # float64, int64: sorted copies (the storage is freed next)
    del reservoir
    rows = np.zeros((0, n_q, n_points)) if rows is None else rows.reshape(-1, n_q, n_points)

    def one(lo: int, sub: CorpusLens | None) -> CorpusLens:
        q = len(QUANTITIES)
        return CorpusLens(
            n_texts=n_texts,
            n_predictions=int(count),
            target_logprob_by_layer=mean[lo + 0],
            rank_mean_by_layer=mean[lo + 1],
            entropy_by_layer=mean[lo + 2],
            kl_to_final_by_layer=mean[lo + 3],
            top1_agreement_by_layer=mean[lo + 4],
            std_by_layer={name: std[lo + i] for i, name in enumerate(QUANTITIES)},
            n_samples=len(index),
            sample_text_index=index,
            per_text=rows[:, lo : lo + q],
            tuned=sub,
        )

    return one(0, None if tuned is None else one(len(QUANTITIES), None))
