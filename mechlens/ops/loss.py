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
    # batch chunks of ~8 MB of logits: one vocab-sized log-softmax over the whole batch is memory-bound
    # (2x slower than a Python loop over tokens); slicing the batch axis copies nothing
    step = max(1, 2**21 // (logits.shape[1] * logits.shape[2]))
    loss = torch.cat(
        [
            -torch.log_softmax(logits[i : i + step, :-1].float(), dim=-1)
            .gather(-1, tokens[i : i + step, 1:, None])
            .squeeze(-1)
            for i in range(0, logits.shape[0], step)
        ]
    )
    if valid is not None:
        loss = loss.masked_fill(~next_token_mask(valid), float("nan"))
    return loss
