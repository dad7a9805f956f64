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
"""
