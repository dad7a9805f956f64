"""Typed tensor utilities (einops + jaxtyping; axis names from :mod:`mechlens.axes`)."""

from mechlens.ops.lens_reduce import LensStats, LinearReadout, lens_reduce
from mechlens.ops.loss import next_token_loss, next_token_mask
from mechlens.ops.norms import stack_layers, vector_norm

__all__ = [
    "LensStats",
    "LinearReadout",
    "lens_reduce",
    "next_token_loss",
    "next_token_mask",
    "stack_layers",
    "vector_norm",
]
