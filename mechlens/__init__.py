"""mechlens: classic mechanistic-interpretability studies on TransformerLens hook points.

The public API is re-exported here and imported lazily, so ``import mechlens`` is cheap and the
training pipeline (the top-level ``training/`` folder, not part of the package) runs where TransformerLens
is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # models
    "load_model": "mechlens.loading",
    "provenance_of": "mechlens.loading",
    "Provenance": "mechlens.provenance",
    "EMBEDDED": "mechlens.zoo",
    "export_model": "mechlens.zoo.export",
    # tokens and masks
    "TokenBatch": "mechlens.encoding",
    "encode": "mechlens.encoding",
    "single_token_id": "mechlens.encoding",
    "target_positions": "mechlens.encoding",
    "word_index": "mechlens.encoding",
    # studies and comparisons across models
    "STUDIES": "mechlens.studies",
    "compare": "mechlens.runner",
    "comparison_frame": "mechlens.comparison",
    # forward passes
    "run_cached": "mechlens.forward",
    "iter_cached": "mechlens.forward",
    # the tuned lens
    "TunedLens": "mechlens.lens.tuned",
    "TunedLensCard": "mechlens.lens.tuned",
    "TunedLensConfig": "mechlens.lens.training",
    "train_tuned_lens": "mechlens.lens.training",
    "load_tuned_lens": "mechlens.lens.tuned",
    "identity_lens": "mechlens.lens.tuned",
    # architecture quirks
    "readout": "mechlens.arch",
    "readout_hook_names": "mechlens.arch",
    # tensor utilities
    "next_token_loss": "mechlens.ops",
    "next_token_mask": "mechlens.ops",
    "vector_norm": "mechlens.ops",
    "stack_layers": "mechlens.ops",
    "lens_reduce": "mechlens.ops",
    "LensStats": "mechlens.ops",
    "LinearReadout": "mechlens.ops",
    # errors
    "MechlensError": "mechlens.errors",
    "ModelNotAvailableError": "mechlens.errors",
    "UnsupportedArchitectureError": "mechlens.errors",
    "TokenError": "mechlens.errors",
    "DataError": "mechlens.errors",
    "TokenizerError": "mechlens.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mechlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs
    from mechlens.arch import readout, readout_hook_names
    from mechlens.comparison import compare, comparison_frame
    from mechlens.encoding import TokenBatch, encode, single_token_id, target_positions, word_index
    from mechlens.errors import (
        DataError,
        MechlensError,
        ModelNotAvailableError,
        TokenError,
        UnsupportedArchitectureError,
    )
    from mechlens.forward import iter_cached, run_cached
    from mechlens.lens.training import TunedLensConfig, train_tuned_lens
    from mechlens.lens.tuned import TunedLens, TunedLensCard, identity_lens, load_tuned_lens
    from mechlens.loading import load_model, provenance_of
    from mechlens.ops import (
        LensStats,
        LinearReadout,
        lens_reduce,
        next_token_loss,
        next_token_mask,
        stack_layers,
        vector_norm,
    )
    from mechlens.provenance import Provenance
    from mechlens.studies import STUDIES
    from mechlens.tokenizer import TokenizerError
    from mechlens.zoo import EMBEDDED
    from mechlens.zoo.export import export_model
