"""Chunked lens reduction: every per-(layer, position) statistic of a vocabulary readout in one pass,
never holding ``[layer, batch, pos, d_vocab]`` logits.

Rows (flattened ``batch x pos``) are processed in chunks; a chunk holds ``[layer, rows, d_vocab]``
logits for all layers at once (so KL to the final layer is available), and the chunk's row count is
chosen so that its working set stays under ``max_chunk_bytes`` whatever the number of layers. Peak
memory is therefore bounded by ``max_chunk_bytes`` plus the (small) outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_WORKING_COPIES = 3  # logits/log-probs, probabilities, one elementwise temporary


@dataclasses.dataclass
class LensStats:
    topk_ids: Int[Tensor, "layer batch pos k"]
    topk_logprobs: Float[Tensor, "layer batch pos k"]
    entropy: Float[Tensor, "layer batch pos"]
    target_logprob: Float[Tensor, "layer batch pos"] | None = None
    target_rank: Int[Tensor, "layer batch pos"] | None = None
    kl_to_final: Float[Tensor, "layer batch pos"] | None = None

    @property
    def predicted(self) -> Int[Tensor, "layer batch pos"]:
        return self.topk_ids[..., 0]

    @property
    def max_logprob(self) -> Float[Tensor, "layer batch pos"]:
        return self.topk_logprobs[..., 0]


def chunk_rows(n_layers: int, d_vocab: int, max_chunk_bytes: int) -> int:
    return max(1, max_chunk_bytes // (n_layers * d_vocab * 4 * _WORKING_COPIES))


@torch.no_grad()
def lens_reduce(
    resid: Float[Tensor, "layer batch pos d_model"],
    readout: Callable[[Tensor], Tensor],
    *,
    targets: Int[Tensor, "batch pos"] | None = None,
    rows: Bool[Tensor, "batch pos"] | None = None,
    k: int = 5,
    kl_to_final: bool = False,
    max_chunk_bytes: int = 128 * 2**20,
) -> LensStats:
    """Apply ``readout`` (residual -> logits) to every layer and position and reduce over the vocabulary.

    Per layer and position: top-``k`` ids and log-probs, entropy (nats), and if ``targets`` is given
    (``-1`` = no target) the target's log-prob and 0-based rank (number of tokens with a strictly
    larger logit, counted on the logits themselves); with ``kl_to_final``, KL(final layer || layer) in
    nats. Log-softmax is computed in fp32 whatever the activations' dtype. Rows outside ``rows`` (e.g.
    padding) are skipped and get id -1 / NaN.
    """
    n_layers, batch, pos, _ = resid.shape
    flat = einops.rearrange(resid, "layer batch pos d_model -> layer (batch pos) d_model")
    n_rows = batch * pos
    dev = resid.device
    keep = torch.arange(n_rows, device=dev) if rows is None else torch.nonzero(rows.reshape(-1).to(dev)).squeeze(-1)
    tgt_flat = None if targets is None else targets.reshape(-1).to(dev)

    # outputs live on the activations' device until the end: no host sync per chunk
    topk_ids = torch.full((n_layers, n_rows, k), -1, dtype=torch.long, device=dev)
    topk_lp = torch.full((n_layers, n_rows, k), float("nan"), device=dev)
    entropy = torch.full((n_layers, n_rows), float("nan"), device=dev)
    t_lp = torch.full((n_layers, n_rows), float("nan"), device=dev) if targets is not None else None
    t_rank = torch.full((n_layers, n_rows), -1, dtype=torch.long, device=dev) if targets is not None else None
    kl = torch.full((n_layers, n_rows), float("nan"), device=dev) if kl_to_final else None

    if len(keep) == 0:
        step = 1
    else:
        d_vocab = readout(flat[:1, keep[:1]]).shape[-1]  # one row, to learn the vocabulary size
        step = chunk_rows(n_layers, d_vocab, max_chunk_bytes)
    for start in range(0, len(keep), step):
        idx = keep[start : start + step]
        logp = readout(flat[:, idx]).float()  # [layer, r, d_vocab] logits, then in place log-probs
        if tgt_flat is not None:
            # rank on the raw logits, before the subtraction below can round near-ties together
            t = tgt_flat[idx]
            has = t >= 0
            gather_at = t.clamp(min=0)[None, :, None].expand(n_layers, -1, 1)
            rank = (logp > logp.gather(-1, gather_at)).sum(-1)
            t_rank[:, idx] = torch.where(has, rank, torch.full_like(rank, -1))
        logp -= torch.logsumexp(logp, dim=-1, keepdim=True)
        lp_k, id_k = logp.topk(k, dim=-1)
        topk_lp[:, idx], topk_ids[:, idx] = lp_k, id_k
        p = logp.exp()
        entropy[:, idx] = -(p * logp).sum(-1)
        if kl is not None:
            final_lp, final_p = logp[-1], p[-1]
            kl[:, idx] = (final_p * (final_lp - logp)).sum(-1)
        del p
        if tgt_flat is not None:
            lp_t = logp.gather(-1, gather_at).squeeze(-1)
            t_lp[:, idx] = torch.where(has, lp_t, torch.full_like(lp_t, float("nan")))
        del logp

    def unflat(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.reshape(n_layers, batch, pos, *x.shape[2:]).cpu()

    return LensStats(
        topk_ids=unflat(topk_ids),
        topk_logprobs=unflat(topk_lp),
        entropy=unflat(entropy),
        target_logprob=unflat(t_lp),
        target_rank=unflat(t_rank),
        kl_to_final=unflat(kl),
    )
