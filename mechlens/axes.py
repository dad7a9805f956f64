"""Axis names, defined once. Every jaxtyping annotation and einops pattern in mechlens uses them.

=========  ==========================================================
``batch``  sequences in a batch
``pos``    token positions (0 = first token fed to the model)
``layer``  a residual-stream readout point (embeddings, then each block)
``d_model`` residual-stream width
``d_vocab`` vocabulary
``k``      top-k entries
``row``    flattened (batch, pos) rows
``target`` occurrences of a target token
=========  ==========================================================

Annotations are checked at runtime under pytest
(``--jaxtyping-packages=mechlens,beartype.beartype``); at import time elsewhere they cost nothing.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

BATCH, POS, LAYER, D_MODEL, D_VOCAB, K = "batch", "pos", "layer", "d_model", "d_vocab", "k"

Tokens = Int[Tensor, "batch pos"]
Mask = Bool[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos d_vocab"]
Resid = Float[Tensor, "batch pos d_model"]
LayerResid = Float[Tensor, "layer batch pos d_model"]
PerToken = Float[Tensor, "batch pos"]
LayerPerToken = Float[Tensor, "layer batch pos"]

__all__ = ["Bool", "Float", "Int", "LayerPerToken", "LayerResid", "Logits", "Mask", "PerToken", "Resid", "Tokens"]
