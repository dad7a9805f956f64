"""Everything checked before the first forward pass: the studies' configs, that each study applies to
each model (kind, hook points), the model-dependent options, that compared models share a vocabulary;
and, after the run, that results are finite and samples well-formed.

:func:`plan` is the one place a command checks what it will run (:mod:`mechlens.cli` builds the plan,
:mod:`mechlens.runner` runs it and writes the files); :func:`check_models` is the per-study check that
:func:`mechlens.runner.run_study` and :func:`mechlens.runner.compare` apply to models given in Python.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mechlens.errors import MechlensError, NonFiniteError, NotApplicableError
from mechlens.result import SAMPLE_COLUMNS, StudyResult
from mechlens.studies import STUDIES, StudyInfo


def make_config(study: StudyInfo, overrides: dict[str, Any]):
    """The study's dataclass config with ``overrides`` (unknown keys are ignored: shared options).
    Building it checks every option (:class:`mechlens.options.Options`)."""
    fields = {f.name for f in dataclasses.fields(study.module.Config)}
    return study.module.Config(**{k: v for k, v in overrides.items() if k in fields and v is not None})


def check_applicable(study: StudyInfo, models: dict[str, Any]) -> None:
    """Refuse, before any forward pass, a model whose kind the study does not apply to, or which lacks a
    hook point the study reads (:meth:`StudyInfo.unmet`)."""
    from mechlens import arch

    for name, model in models.items():
        kind = arch.kind_of(model)
        if not study.applies_to(kind):
            others = [s.name for s in STUDIES.values() if s.applies_to(kind)]
            raise NotApplicableError(
                f"study {study.name!r} does not apply to {name!r}, a {kind} LM (it needs a "
                f"{' or '.join(sorted(study.kinds))} LM): studies for {kind} LMs are {', '.join(others)}"
            )
        missing = study.unmet(model)
        if missing:
            others = [s.name for s in STUDIES.values() if s.unmet(model) is None]
            raise NotApplicableError(
                f"study {study.name!r} cannot run on {name!r}: {missing}. It reads {', '.join(study.hooks)} at "
                f"every layer; studies that run on this model: {', '.join(others)}"
            )


def check_models(study: StudyInfo, models: Mapping[str, Any], cfg) -> None:
    """The study applies to every model, and its model-dependent options hold for each."""
    check_applicable(study, dict(models))
    for model in models.values():
        cfg.check_model(model)


def first_nonfinite(x: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a nested metrics structure, or ``None``.

    ``None`` entries are allowed: a study writes ``None`` where a value is undefined by construction
    (e.g. a position with no valid token); a NaN is always a computation gone wrong."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "fc" and not np.isfinite(x).all():
            return f"{path}[{tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])}]"
        return None
    if isinstance(x, float | np.floating):
        return None if math.isfinite(float(x)) else path
    if isinstance(x, dict):
        for k, v in x.items():
            found = first_nonfinite(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(x, list | tuple):
        for i, v in enumerate(x):
            found = first_nonfinite(v, f"{path}[{i}]")
            if found:
                return found
    return None


def check_finite(result: StudyResult) -> None:
    """NaN or infinity in a reported statistic is an error, never a result."""
    where = first_nonfinite(result.metrics)
    if where:
        raise NonFiniteError(
            f"{result.study} on {result.model!r}: the statistic {where} is NaN or infinite; check the model's "
            "weights and dtype (e.g. --device cpu in float32)"
        )


def vocab_signature(model) -> tuple[int, tuple[int, ...]]:
    tok = model.tokenizer
    probe = tok("The coffee is hot, said Ana.", add_special_tokens=False)["input_ids"]
    return len(tok), tuple(probe)


def check_vocabularies(models: dict[str, Any], allow_different: bool) -> str | None:
    """``None`` if all models share a tokenizer; otherwise a sentence for the report, or an error."""
    sigs = {name: vocab_signature(m) for name, m in models.items()}
    if len(set(sigs.values())) <= 1:
        return None
    desc = ", ".join(f"{n} ({s[0]} tokens)" for n, s in sigs.items())
    if not allow_different:
        raise MechlensError(
            f"vocabulary mismatch between compared models: {desc}. Token ids differ, so results are only "
            "comparable text-by-text: pass --allow-different-tokenizers to compare them on the same texts"
        )
    return f"The compared models use different tokenizers ({desc}): they see the same texts, not the same token ids."


def samples_of(result: StudyResult):
    """The study's per-unit samples of ``result`` (``samples(result)``, :mod:`mechlens.comparison`), checked:
    the documented columns, finite values; ``None`` for a study without samples."""
    import numpy as np

    module = STUDIES[result.study].module
    if not hasattr(module, "samples") or result.parts is None:
        return None
    frame = module.samples(result)
    missing = [c for c in SAMPLE_COLUMNS if c not in frame.columns]
    if missing:
        raise MechlensError(f"{result.study}.samples() lacks the columns {missing} (a bug in the study)")
    if not np.isfinite(frame["value"].to_numpy(np.float64)).all():
        raise NonFiniteError(f"{result.study} on {result.model!r}: a per-unit sample is NaN or infinite")
    return frame


@dataclasses.dataclass
class Plan:
    """What a command will run, checked: study -> (its config, model name -> model), and the notes for the
    report (studies skipped on a model, tokenizers that differ)."""

    runs: dict[str, tuple[Any, dict[str, Any]]]
    notes: list[str]


def plan(
    studies: Sequence[str],
    configs: Mapping[str, Any],
    specs: Callable[[StudyInfo], Sequence[str]],
    models: Mapping[str, Any],
    *,
    skip_unmet: bool,
    allow_different_tokenizers: Callable[[StudyInfo], bool],
    log: Callable[[str], None] = lambda _: None,
) -> Plan:
    """Check every study against every model it will read, before any forward pass. ``specs(info)``: the
    model names the study reads (keys of the loaded ``models``); ``skip_unmet``: a model the study does
    not apply to is skipped with a note (``mechlens run all``) instead of refused."""
    notes: list[str] = []
    runs: dict[str, tuple[Any, dict[str, Any]]] = {}
    for study in studies:
        info = STUDIES[study]
        names = list(specs(info))
        unmet = {spec: info.unmet(models[spec]) for spec in names}
        chosen = {spec: models[spec] for spec in names if unmet[spec] is None}
        if len(chosen) < len(names):
            skipped = [s for s in names if s not in chosen]
            if not skip_unmet:
                check_applicable(info, {s: models[s] for s in skipped})
            notes.append(f"{study}: skipped for " + "; ".join(f"{s} ({unmet[s]})" for s in skipped))
            log(notes[-1])
            if not chosen:
                continue
        check_models(info, chosen, configs[study])
        note = check_vocabularies(chosen, allow_different_tokenizers(info))
        if note:
            notes.append(f"{study}: {note}")
        runs[study] = (configs[study], chosen)
    return Plan(runs, notes)
