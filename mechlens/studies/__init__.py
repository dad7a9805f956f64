"""The study registry: the one list of studies, name -> :class:`StudyInfo`.

The registry holds what the command line needs without importing a study (so ``mechlens --help``,
``mechlens list`` and an unknown study answer without loading torch): name, title, the model kinds
the study applies to and its default models. ``info.module`` imports the study module, which holds
its ``Config`` and ``run``.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from mechlens.errors import MechlensError


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    name: str
    title: str
    kinds: frozenset[str]  # model kinds the study applies to: "causal", "masked"
    default_models: tuple[str, ...]
    module_name: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    def applies_to(self, kind: str) -> bool:
        return kind in self.kinds


def _study(name: str, title: str, kinds: set[str], default_models: tuple[str, ...]) -> StudyInfo:
    return StudyInfo(name, title, frozenset(kinds), default_models, f"mechlens.studies.{name}")


BOTH = {"causal", "masked"}
STUDIES: dict[str, StudyInfo] = {
    s.name: s
    for s in (
        _study("position", "1. Token position from loss", BOTH, ("tiny-gpt2",)),
        _study("logits", "2. Logits, next-token prediction and a logit intervention", BOTH, ("tiny-gpt2",)),
        _study("lens", "3. Logit lens (masked and causal)", BOTH, ("tiny-mlm", "tiny-gpt2")),
        _study("magnitudes", "4. Attention-output magnitudes", BOTH, ("tiny-gpt2",)),
        _study("distances", "5. Distances, mutual information and token position", BOTH, ("tiny-gpt2",)),
    )
}


def get_study(name: str) -> StudyInfo:
    if name not in STUDIES:
        raise MechlensError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)} or 'all'")
    return STUDIES[name]
