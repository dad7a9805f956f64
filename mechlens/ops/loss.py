"""Per-token next-token loss."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def next_token_mask(valid: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos_m1"]:
    """Where the loss at position t is defined: token t and token t+1 both valid."""
    return valid[:, :-1] & valid[:, 1:]


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    valid: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos_m1"]:
    """``-log p(token[t+1] | tokens[<= t])`` for every t, in fp32, fully vectorised.

    Entry ``[b, t]`` is the loss of predicting column ``t+1`` from column ``t``. Where either token is
    not valid (padding, special tokens outside ``valid``) the entry is NaN, so no statistic can
    silently average padding in; the mean over finite entries equals HF's ``model(labels=...).loss``.
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # [(batch pos-1), d_vocab]
    target = tokens[:, 1:].reshape(-1, 1)
    # row chunks of ~8 MB: one vocab-sized log-softmax over the whole batch is memory-bound (2x slower)
    step = max(1, 2**21 // logits.shape[-1])
    loss = torch.cat(
        [
            -torch.log_softmax(pred[i : i + step].float(), dim=-1).gather(-1, target[i : i + step]).squeeze(-1)
            for i in range(0, len(pred), step)
        ]
    ).reshape(tokens.shape[0], tokens.shape[1] - 1)
    if valid is not None:
        loss = loss.masked_fill(~next_token_mask(valid), float("nan"))
    return loss
