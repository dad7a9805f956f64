"""Run studies on one or more models and write their outputs atomically.

The command line (:mod:`mechlens.cli`), the experiment scripts and the notebooks all go through
:func:`run_study` and :func:`write_outputs`; a study's logic lives in its module only.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from mechlens.errors import MechlensError
from mechlens.studies import distances, lens, logits, magnitudes, position
from mechlens.studies.result import StudyResult, to_jsonable


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    module: Any
    title: str
    default_models: tuple[str, ...]


STUDIES = {
    s.name: s
    for s in (
        Study("position", position, "1. Token position from next-token loss", ("tiny-gpt2",)),
        Study("logits", logits, "2. Logits, next-token prediction and a logit intervention", ("tiny-gpt2",)),
        Study("lens", lens, "3. Logit lens (masked and causal)", ("tiny-mlm", "tiny-gpt2")),
        Study("magnitudes", magnitudes, "4. Attention-output magnitudes", ("tiny-gpt2",)),
        Study("distances", distances, "5. Distances, mutual information and token position", ("tiny-gpt2",)),
    )
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise MechlensError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)} or 'all'")
    return STUDIES[name]


def make_config(study: Study, overrides: dict[str, Any]):
    """The study's dataclass config with ``overrides`` (unknown keys are ignored: shared options)."""
    fields = {f.name for f in dataclasses.fields(study.module.Config)}
    return study.module.Config(**{k: v for k, v in overrides.items() if k in fields and v is not None})


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
    """Run one study with the same config on every model (same inputs)."""
    s = get_study(study)
    cfg = make_config(s, overrides or {})
    return [s.module.run(model, cfg) for model in models.values()]


def _csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(to_jsonable(rows))


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[-60:]


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of ``out`` to write into; on success it replaces ``out`` (two renames),
    on any error it is removed and ``out`` is left as it was."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_outputs(results: dict[str, list[StudyResult]], out: str | os.PathLike, notes: Sequence[str] = ()) -> None:
    """``results.json``, tidy CSVs and ``report.html`` into ``out``, atomically (:func:`atomic_dir`)."""
    from mechlens.report import write_report

    with atomic_dir(out) as tmp:
        doc = {study: {r.model: r.to_json() for r in rs} for study, rs in results.items()}
        doc["_notes"] = list(notes)
        (tmp / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
        for study, rs in results.items():
            for r in rs:
                for name, rows in r.tables.items():
                    _csv(tmp / f"{study}__{_slug(r.model)}__{name}.csv", rows)
        write_report(results, tmp / "report.html", notes)


def summary_rows(results: dict[str, list[StudyResult]]) -> list[tuple[str, str, str]]:
    """One headline line per (study, model), for the terminal."""
    rows = []
    for study, rs in results.items():
        for r in rs:
            m = r.metrics
            if study == "position":
                line = (f"logistic accuracy train {m['logistic_accuracy_train']:.3f} / test "
                        f"{m['logistic_accuracy_test']:.3f} (chance {m['logistic']['chance']:.3f}); "
                        f"OLS R² {m['ols']['r2']:.4f}")  # fmt: skip
            elif study == "logits":
                line = (f"target {m['target']['string']!r} rank {m['target_rank']} p={m['target_prob']:.4f}; "
                        f"greedy==generate {m['greedy_equals_generate']}; intervention hits target "
                        f"{m['intervention_argmax_is_target']}")  # fmt: skip
            elif study == "lens":
                fit = m["sqrt_layer_fit"]
                line = f"{m['kind']} lens: target log-prob by layer {_fmt(m['target_logprob_by_layer'])}; " + (
                    f"sqrt(layer) slope {fit['slope']:.3f}"
                )
            elif study == "magnitudes":
                line = f"log-norm by layer {_fmt(m['lognorm_mean_by_layer'])} over {m['n_valid_tokens']} tokens"
            else:
                line = f"Kendall tau (attn L2) by layer {_fmt(m['kendall_tau_by_layer']['attn']['L2'])}"
            rows.append((study, r.model, line))
    return rows


def _fmt(xs) -> str:
    return "[" + ", ".join("nan" if x is None else f"{x:.2f}" for x in to_jsonable(list(xs))) + "]"
