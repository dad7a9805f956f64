"""Minkowski distances, implemented directly (and checked against scipy in tests)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def minkowski(x: Float[Tensor, " d"], y: Float[Tensor, " d"], p: int | float) -> float:
    """``(sum |x - y|^p)^(1/p)`` in float64."""
    return float((x.double() - y.double()).abs().pow(p).sum().pow(1.0 / p))


def pairwise_minkowski(x: Float[Tensor, "n d"], p: int | float) -> Float[Tensor, "n n"]:
    """All pairwise Minkowski-p distances between rows, vectorised (``torch.cdist``, float64)."""
    x = x.double()
    return torch.cdist(x[None], x[None], p=p)[0]
