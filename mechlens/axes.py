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

Annotations spell these names out (``Float[Tensor, "layer batch pos d_model"]``) and are checked at
runtime under pytest (``--jaxtyping-packages=mechlens,beartype.beartype``); elsewhere they cost nothing.

Depth across models
-------------------
Models of different depth are compared on one **relative depth** axis, defined here and used by every
comparison figure: a model with ``L`` blocks has ``L + 1`` residual-stream readout points (embeddings =
point 0, then the output of each block); readout point ``i`` sits at ``i / L``, and block ``l``'s own
outputs (its attention or MLP output, written into the stream that block ``l`` leaves) at
``(l + 1) / L``. The embeddings are at 0 and the last block at 1.0 for every model.
"""

from __future__ import annotations

import numpy as np


def readout_depth(n_points: int) -> np.ndarray:
    """Relative depth of ``n_points = L + 1`` readout points (embeddings, then each block): ``i / L``."""
    return np.arange(n_points) / max(n_points - 1, 1)


def block_depth(n_blocks: int) -> np.ndarray:
    """Relative depth of ``n_blocks = L`` blocks' outputs (attention, MLP): ``(l + 1) / L``."""
    return (np.arange(n_blocks) + 1) / max(n_blocks, 1)
