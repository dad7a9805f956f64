"""Vector norms of activations, and stacking per-layer hook values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def vector_norm(x: Float[Tensor, "*lead d_model"], p: int | float = 2.0) -> Float[Tensor, "*lead"]:
    """Minkowski-p norm over ``d_model`` (fp32 accumulation)."""
    return torch.linalg.vector_norm(x.float(), ord=p, dim=-1)


def stack_layers(cache: Mapping[str, Tensor], names: Sequence[str]) -> Float[Tensor, "layer *rest"]:
    """``cache[names[0]], cache[names[1]], ...`` stacked on a new leading ``layer`` axis."""
    return torch.stack([cache[n] for n in names])
