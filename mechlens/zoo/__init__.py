"""Embedded models that ship inside the package: the registry and the weights, nothing else.

Weights are fp16 safetensors under ``mechlens/zoo/weights/<name>/`` with a model card
(``MODEL_CARD.md``) beside them; :func:`mechlens.load_model` loads them as fp32 by default.
They were trained by the repository's top-level ``training/`` folder, which is not part of the
package (the runtime never imports it).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    kind: str  # "causal" | "masked"
    tokenizer: str  # "gpt2" | "mlm" (see mechlens.tokenizer)
    description: str

    @property
    def path(self) -> pathlib.Path:
        return pathlib.Path(str(importlib.resources.files("mechlens.zoo") / "weights" / self.name))


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel("tiny-gpt2", "causal", "gpt2", "GPT-2 architecture, 6 layers, d_model 128, GPT-2 BPE (50257)"),
        EmbeddedModel("tiny-mlm", "masked", "mlm", "RoBERTa masked LM, 6 layers, d_model 128, GPT-2 BPE + specials"),
    )
}
