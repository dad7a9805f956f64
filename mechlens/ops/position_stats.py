"""Statistics over valid tokens (a validity mask, not a masked LM): mean / std / count, overall and by position.

"By position" keys on :attr:`mechlens.tokens.TokenBatch.positions` (the model's position id), so left-
and right-padded batches give identical results. :class:`RunningPositionStats` streams over batches
with memory constant in the number of sequences.
"""

from __future__ import annotations

import dataclasses

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def masked_mean_std(
    values: Float[Tensor, "*lead batch pos"], mask: Bool[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "*lead"], Float[Tensor, "*lead"], int]:
    """Mean and (population, ddof=0) std over the valid tokens, per leading index (e.g. per layer)."""
    v = values[..., mask].double()  # [*lead, n_valid]
    n = v.shape[-1]
    if n == 0:
        nan = torch.full(values.shape[:-2], float("nan"), dtype=torch.float64)
        return nan, nan, 0
    return v.mean(-1), v.std(-1, correction=0), n


@dataclasses.dataclass
class PositionStats:
    count: Int[Tensor, " pos"]
    mean: Float[Tensor, "*lead pos"]
    std: Float[Tensor, "*lead pos"]


class RunningPositionStats:
    """Running count / sum / sum of squares per (leading index, position), in float64.

    ``update(values, positions)`` with ``positions`` -1 (or masked out) where a token must not count.
    """

    def __init__(self, n_positions: int):
        self.n_positions = n_positions
        self.count = torch.zeros(n_positions, dtype=torch.long)
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def update(
        self,
        values: Float[Tensor, "*lead batch pos"],
        positions: Int[Tensor, "batch pos"],
        mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> None:
        keep = positions >= 0 if mask is None else mask & (positions >= 0)
        keep = keep & (positions < self.n_positions)
        idx = positions[keep]  # [n]
        v = values[..., keep].double()  # [*lead, n]
        lead = v.shape[:-1]
        flat = einops.rearrange(v, "... n -> (...) n") if lead else v[None]
        if self.sum is None:
            self.sum = torch.zeros(flat.shape[0], self.n_positions, dtype=torch.float64)
            self.sumsq = torch.zeros_like(self.sum)
            self._lead = lead
        index = idx.expand(flat.shape[0], -1)
        self.sum.scatter_add_(1, index, flat)
        self.sumsq.scatter_add_(1, index, flat * flat)
        self.count += torch.bincount(idx, minlength=self.n_positions)

    def result(self) -> PositionStats:
        if self.sum is None:
            raise ValueError("no values were added")
        n = self.count.double().clamp(min=1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp(min=0)
        empty = self.count == 0
        mean = mean.masked_fill(empty, float("nan"))
        std = var.sqrt().masked_fill(empty, float("nan"))
        shape = (*self._lead, self.n_positions)
        return PositionStats(count=self.count.clone(), mean=mean.reshape(shape), std=std.reshape(shape))


def stats_by_position(
    values: Float[Tensor, "*lead batch pos"],
    positions: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    n_positions: int | None = None,
) -> PositionStats:
    """Mean / std / count of ``values`` per position over the tokens in ``mask``."""
    n = int(positions.max()) + 1 if n_positions is None else n_positions
    acc = RunningPositionStats(n)
    acc.update(values, positions, mask)
    return acc.result()
