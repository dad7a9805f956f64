"""Run studies on one or more models and write their outputs atomically: the orchestration.

One path from a command to files: :func:`mechlens.plan.plan` checks everything before the first forward
pass, :func:`run_plan` runs it, :func:`write_outputs` writes it (and :func:`compare_runs` combines earlier
runs through the same writer, :func:`write`). The command line (:mod:`mechlens.cli`), the experiment
scripts and the notebooks all go through here; a study's logic lives in its module only, and
:mod:`mechlens.comparison` and :mod:`mechlens.report` are functions of results that this module calls.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mechlens.comparison import comparison_frame
from mechlens.errors import MechlensError
from mechlens.outputs import Destination, prepare_output
from mechlens.plan import Plan, check_finite, check_models, make_config, samples_of
from mechlens.report import render, report_of, sections_of
from mechlens.result import StudyResult, to_jsonable
from mechlens.studies import STUDIES, get_study


def _execute(study: str, cfg, models: Mapping[str, Any], inputs: Any = None) -> dict[str, StudyResult]:
    """Run one checked study on every model (same config and inputs) and check every result for NaN."""
    from mechlens.distributed import world

    module = STUDIES[study].module
    results = {}
    for name, model in models.items():
        r = module.run(model, cfg) if inputs is None else module.run(model, cfg, inputs)
        check_finite(r)
        r.provenance["world_size"] = world()[1]  # processes whose shards were merged into these statistics
        results[name] = r
    return results


def run_plan(plan: Plan, log=lambda _: None) -> dict[str, list[StudyResult]]:
    """Every study of a checked :class:`~mechlens.plan.Plan` on its models."""
    results = {}
    for study, (cfg, models) in plan.runs.items():
        log(f"{study}: {', '.join(models)}")
        results[study] = list(_execute(study, cfg, models).values())
    return results


def run_study(study: str, models: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[StudyResult]:
    """Run one study with the same config on every model (same inputs): the config is checked, the
    study's applicability and the model-dependent options are checked for every model before any
    forward pass, and every result is checked for NaN."""
    info = get_study(study)
    cfg = make_config(info, overrides or {})
    check_models(info, models, cfg)
    return list(_execute(info.name, cfg, models).values())


def compare(study: str, models: Mapping[str, Any], inputs: Any = None, cfg: Any = None, **options: Any):
    """Run ``study`` on every model (same inputs and config) and return the comparison table.

    ``models``: name -> a model loaded with :func:`mechlens.load_model`; ``inputs``: the study's inputs
    (texts or token ids; default: its config's data); ``cfg``: its ``Config`` (default: defaults);
    ``options``: :func:`~mechlens.comparison.comparison_frame`'s (confidence, n_resamples, method, seed,
    reference). The results are kept in ``frame.attrs["results"]`` (model -> StudyResult)."""
    from mechlens.loading import provenance_of

    info = get_study(study)
    cfg = cfg or info.module.Config()
    check_models(info, models, cfg)
    results = _execute(info.name, cfg, models, inputs)
    frame = comparison_frame(
        study,
        {n: samples_of(r) for n, r in results.items()},
        {n: provenance_of(m).to_dict() for n, m in models.items()},
        **options,
    )
    frame.attrs["results"] = results
    return frame


def comparisons(results: dict[str, list[StudyResult]], samples: dict[tuple[str, str], Any]):
    """The comparison table (:func:`mechlens.comparison.comparison_frame`) of every study that ran on
    two or more models, concatenated; ``None`` when there is none."""
    import pandas as pd

    frames = []
    for study, rs in results.items():
        per_model = {r.model: samples[(study, r.model)] for r in rs if samples.get((study, r.model)) is not None}
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


def write(dest: Destination, doc: Mapping[str, Any], report_html: str, files: Mapping[str, Any] = ()) -> None:
    """The one writer of ``mechlens run`` and ``mechlens compare``: ``results.json`` (``doc``),
    ``report.html`` and ``files`` (name -> a pandas DataFrame or a list of row dicts, written as CSV)
    into ``dest``, atomically."""
    with dest.writing() as tmp:
        for name, content in dict(files).items():
            if isinstance(content, list):
                _csv(tmp / name, content)
            else:
                content.to_csv(tmp / name, index=False)
        (tmp / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
        (tmp / "report.html").write_text(report_html, encoding="utf-8")


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

    dest = out if isinstance(out, Destination) else prepare_output(out)
    samples = {(study, r.model): samples_of(r) for study, rs in results.items() for r in rs}
    comparison = comparisons(results, samples)
    doc: dict[str, Any] = {study: {r.model: r.to_json() for r in rs} for study, rs in results.items()}
    files: dict[str, Any] = {}
    for (study, model), frame in samples.items():
        if frame is not None:
            name = f"{study}__{_slug(model)}__samples.csv"
            files[name] = frame
            doc[study][model]["samples_csv"] = name  # per-unit statistics: mechlens compare rebuilds from them
    if comparison is not None:
        files["comparison.csv"] = comparison
    doc["_notes"] = list(notes)
    doc["_run"] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **(context or {})}
    for study, rs in results.items():
        for r in rs:
            for name, rows in r.tables.items():
                files[f"{study}__{_slug(r.model)}__{name}.csv"] = rows
    write(dest, doc, report_of(results, notes, context=doc["_run"], comparison=comparison), files)


def load_runs(dirs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each directory's ``results.json`` (written by ``mechlens run``), read and checked."""
    runs = []
    for d in dirs:
        path = pathlib.Path(d) / "results.json"
        if not path.is_file():
            raise MechlensError(f"{d} has no results.json: pass directories written by 'mechlens run'")
        try:
            runs.append((d, json.loads(path.read_text())))
        except (OSError, ValueError) as e:
            raise MechlensError(f"{path} cannot be read ({e}): pass directories written by 'mechlens run'") from None
    return runs


def compare_runs(runs: Sequence[tuple[str, Mapping[str, Any]]], dest: Destination) -> None:
    """Combine earlier runs (:func:`load_runs`) into one comparison: their entries under ``model (dir)``,
    the comparison table rebuilt from their saved per-unit samples (no paired differences where the runs'
    inputs differ), and the report, written by :func:`write`."""
    import pandas as pd

    merged: dict[str, dict[str, dict]] = {}
    samples: dict[str, dict[str, pd.DataFrame]] = {}
    for d, doc in runs:
        for study, entries in doc.items():
            if study.startswith("_") or study not in STUDIES:
                continue
            for model, e in entries.items():
                label = f"{model} ({d})"
                merged.setdefault(study, {})[label] = e
                if e.get("samples_csv"):
                    samples.setdefault(study, {})[label] = _read_samples(pathlib.Path(d) / e["samples_csv"])
    frames = [
        comparison_frame(
            s,
            per_model,
            {m: merged[s][m]["provenance"] for m in per_model},
            unpaired=_different_inputs({m: merged[s][m] for m in per_model}),
        )
        for s, per_model in samples.items()
        if len(per_model) >= 2
    ]
    comparison = pd.concat(frames, ignore_index=True) if frames else None
    sections, findings = sections_of(merged, comparison, label="comparison across runs")
    html = render(sections, title="mechlens comparison", findings=findings)
    write(dest, merged, html, {} if comparison is None else {"comparison.csv": comparison})


def _different_inputs(entries: dict[str, dict]) -> str | None:
    """Why saved runs' units are not the same inputs (their study options differ, e.g. --data or --bos),
    or None: paired differences need the same texts, tokens or occurrences in every run."""
    configs = {m: e.get("config", {}) for m, e in entries.items()}
    for key in sorted({k for c in configs.values() for k in c}):
        values = {m: c.get(key) for m, c in configs.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            return (
                f"runs read different inputs or options ({key}: "
                + ", ".join(f"{m}: {v}" for m, v in values.items())
                + "): no paired differences"
            )
    return None


def _read_samples(path: pathlib.Path):
    import pandas as pd

    try:
        return pd.read_csv(path, dtype={"layer": "Int64", "position": "Int64", "word": "Int64"})
    except (OSError, ValueError) as e:
        raise MechlensError(f"{path} cannot be read ({e}): pass directories written by 'mechlens run'") from None


def summary_rows(results: dict[str, list[StudyResult]]) -> list[tuple[str, str, str]]:
    """One headline line per (study, model), for the terminal: the first line of the study's ``headline``."""
    return [(study, r.model, STUDIES[study].module.headline(r.metrics)[0]) for study, rs in results.items() for r in rs]
