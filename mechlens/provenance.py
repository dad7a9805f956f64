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
    tokenizer: str = ""  # mechlens.encoding.tokenizer_signature: equal iff two models tokenise text alike
    # architecture quirks (mechlens.arch) and the load-time readout check (mechlens.validate)
    source_architecture: str | None = None  # the class given when its text model is analysed (Gemma3 multimodal)
    norm_placement: str = "unchecked"  # "pre-LN", "post-LN", "sandwich", "output-norm" or "unchecked"
    block_layout: str = "unchecked"  # "sequential", "parallel" or "unchecked"
    family_checked: bool = False  # the family is in mechlens' HF cross-check matrix (arch.FAMILIES)
    readout: str = ""  # the lens readout, e.g. "ln_final(x) @ W_U + b_U; then softcap 30 (...)"
    readout_max_logprob_diff: float | None = None  # readout vs the model's log-probs on the load probe (nats)
    readout_tolerance: float | None = None  # the tolerance it was checked against (nats)
    readout_mismatch_allowed: bool = False  # load_model(..., allow_readout_mismatch=True) was given
    # the load-time generate check (mechlens.validate.check_generate; None for masked LMs): whether
    # generate uses TransformerLens' KV cache, and what was compared
    generate_kv_cache: bool | None = None
    generate_check: str | None = None
    transformer_lens: str = dataclasses.field(default_factory=lambda: _version("transformer-lens"))
    transformers: str = dataclasses.field(default_factory=lambda: _version("transformers"))
    torch: str = dataclasses.field(default_factory=lambda: _version("torch"))
    mechlens: str = dataclasses.field(default_factory=lambda: _version("mechlens"))

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
