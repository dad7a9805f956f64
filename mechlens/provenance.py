"""Provenance: what produced a number. Every loaded model carries one; every result embeds one."""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "not installed"


@dataclasses.dataclass(frozen=True)
class Provenance:
    model: str  # the spec given to load_model (hub name, directory, embedded name, or a label)
    architecture: str  # HF architecture class, e.g. GPT2LMHeadModel
    kind: str  # "causal" or "masked"
    n_params: int
    n_layers: int
    d_model: int
    d_vocab: int
    weights: str  # "raw" (HF weights) or "processed" (TransformerLens compatibility processing)
    bos: str  # BOS policy of the run: "prepend" or "none" ("model-default" at load time)
    padding_side: str
    dtype: str
    device: str
    seed: int | None = None
    transformer_lens: str = dataclasses.field(default_factory=lambda: _version("transformer-lens"))
    transformers: str = dataclasses.field(default_factory=lambda: _version("transformers"))
    torch: str = dataclasses.field(default_factory=lambda: _version("torch"))
    mechlens: str = dataclasses.field(default_factory=lambda: _version("mechlens"))

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
