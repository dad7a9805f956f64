"""Typed tensor utilities (einops + jaxtyping; axis names from :mod:`mechlens.axes`)."""

from mechlens.ops.lens_reduce import LensStats, LinearReadout, lens_reduce
from mechlens.ops.loss import next_token_loss, next_token_mask
from mechlens.ops.norms import stack_layers, vector_norm
from mechlens.ops.position_stats import PositionStats, RunningPositionStats, masked_mean_std, stats_by_position

__all__ = [
    "LensStats",
    "LinearReadout",
    "PositionStats",
    "RunningPositionStats",
    "lens_reduce",
    "masked_mean_std",
    "next_token_loss",
    "next_token_mask",
    "stack_layers",
    "stats_by_position",
    "vector_norm",
]
