"""Embedded models that ship inside the package: the registry and the weights, nothing else.

Weights are fp16 safetensors under ``mechlens/zoo/weights/<name>/`` with a model card
(``MODEL_CARD.md``) beside them; :func:`mechlens.load_model` loads them as fp32 by default.
They were trained by the repository's top-level ``training/`` folder, which is not part of the
package (the runtime never imports it). ``export_model(name, dir)`` (``mechlens export NAME DIR``)
writes one out as a plain ``save_pretrained`` checkpoint with its tokenizer (:mod:`mechlens.zoo.export`).
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
    architecture: str  # the transformers class of the weights

    @property
    def path(self) -> pathlib.Path:
        return pathlib.Path(str(importlib.resources.files("mechlens.zoo") / "weights" / self.name))


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="tiny-gpt2",
            kind="causal",
            tokenizer="gpt2",
            description="GPT-2 architecture, 6 layers, d_model 128, GPT-2 BPE (50257)",
            architecture="GPT2LMHeadModel",
        ),
        EmbeddedModel(
            name="tiny-mlm",
            kind="masked",
            tokenizer="mlm",
            description="RoBERTa masked LM, 6 layers, d_model 128, GPT-2 BPE + specials",
            architecture="RobertaForMaskedLM",
        ),
    )
}


def __getattr__(name: str):
    if name == "export_model":  # lazily: importing the registry must not import torch (mechlens list, --help)
        from mechlens.zoo.export import export_model

        return export_model
    raise AttributeError(f"module 'mechlens.zoo' has no attribute {name!r}")
