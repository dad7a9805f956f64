"""Run studies on one or more models and write their outputs atomically.

The command line (:mod:`mechlens.cli`), the experiment scripts and the notebooks all go through
:func:`run_study` and :func:`write_outputs`; a study's logic lives in its module only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from mechlens.errors import MechlensError, NonFiniteError, NotApplicableError
from mechlens.outputs import Destination, prepare_output
from mechlens.studies import STUDIES, StudyInfo, get_study
from mechlens.studies.result import StudyResult, to_jsonable

Study = StudyInfo  # the registry entry (kept under its earlier name)


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


def run_study(study: str, models: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[StudyResult]:
    """Run one study with the same config on every model (same inputs): the config is checked, the
    study's applicability and the model-dependent options are checked for every model before any
    forward pass, and every result is checked for NaN."""
    s = get_study(study)
    cfg = make_config(s, overrides or {})
    check_applicable(s, models)
    for model in models.values():
        cfg.check_model(model)
    from mechlens.distributed import world

    results = [s.module.run(model, cfg) for model in models.values()]
    for r in results:
        check_finite(r)
        r.provenance["world_size"] = world()[1]  # processes whose shards were merged into these statistics
    return results


def samples_of(result: StudyResult):
    """The study's per-unit samples of ``result`` (``samples(result)``, :mod:`mechlens.comparison`), checked:
    the documented columns, finite values; ``None`` for a study without samples."""
    import numpy as np

    from mechlens.comparison import SAMPLE_COLUMNS

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


def comparisons(results: dict[str, list[StudyResult]], samples: dict[tuple[str, str], Any] | None = None):
    """The comparison table (:func:`mechlens.comparison.comparison_frame`) of every study that ran on
    two or more models, concatenated; ``None`` when there is none."""
    import pandas as pd

    from mechlens.comparison import comparison_frame

    frames = []
    for study, rs in results.items():
        per_model = {r.model: (samples or {}).get((study, r.model)) for r in rs}
        per_model = {
            m: (f if f is not None else samples_of(r)) for (m, f), r in zip(per_model.items(), rs, strict=True)
        }
        per_model = {m: f for m, f in per_model.items() if f is not None}
        if len(per_model) >= 2:
            frames.append(comparison_frame(study, per_model, {r.model: r.provenance for r in rs}))
    return pd.concat(frames, ignore_index=True) if frames else None


def _csv(path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(to_jsonable(rows))


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[-60:]


def write_outputs(
    results: dict[str, list[StudyResult]],
    out: str | os.PathLike | Destination,
    notes: Sequence[str] = (),
    context: dict[str, Any] | None = None,
) -> None:
    """``results.json``, tidy CSVs and ``report.html`` into ``out``, atomically. ``out`` is a path or
    a :class:`~mechlens.outputs.Destination` prepared (checked) before the run; a path is checked now
    (:func:`~mechlens.outputs.prepare_output`: only a new directory or an earlier mechlens run).
    ``context`` (e.g. the command and date) goes into ``results.json`` as ``_run`` and under the
    report's title."""
    import datetime

    from mechlens.report import write_report

    dest = out if isinstance(out, Destination) else prepare_output(out)
    samples = {(study, r.model): samples_of(r) for study, rs in results.items() for r in rs}
    comparison = comparisons(results, samples)
    with dest.writing() as tmp:
        doc = {study: {r.model: r.to_json() for r in rs} for study, rs in results.items()}
        for (study, model), frame in samples.items():
            if frame is not None:
                name = f"{study}__{_slug(model)}__samples.csv"
                frame.to_csv(tmp / name, index=False)
                doc[study][model]["samples_csv"] = name  # per-unit statistics: mechlens compare rebuilds from them
        if comparison is not None:
            comparison.to_csv(tmp / "comparison.csv", index=False)
        doc["_notes"] = list(notes)
        doc["_run"] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **(context or {})}
        (tmp / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
        for study, rs in results.items():
            for r in rs:
                for name, rows in r.tables.items():
                    _csv(tmp / f"{study}__{_slug(r.model)}__{name}.csv", rows)
        write_report(results, tmp / "report.html", notes, context=doc["_run"], comparison=comparison)


def summary_rows(results: dict[str, list[StudyResult]]) -> list[tuple[str, str, str]]:
    """One headline line per (study, model), for the terminal: the first line of the study's ``headline``."""
    return [(study, r.model, STUDIES[study].module.headline(r.metrics)[0]) for study, rs in results.items() for r in rs]
