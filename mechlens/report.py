"""Self-contained HTML reports: plotly's JavaScript included once, every figure of every study,
provenance per model, and comparison figures when several models ran the same study.

Comparison figures are built from metrics alone (:func:`comparison_figures`), so
``mechlens compare`` can rebuild them from earlier runs' ``results.json``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.offline


def comparison_figures(study: str, entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """``entries``: model -> its ``results.json`` entry (``metrics``, ``provenance``); the study's own
    ``compare`` draws them (none for a single model)."""
    from mechlens.studies import STUDIES

    if len(entries) < 2 or study not in STUDIES:
        return {}
    return STUDIES[study].module.compare(entries)


def headlines(study: str, entries: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """model -> the study's findings in words (its ``headline``, from the saved metrics)."""
    from mechlens.studies import STUDIES

    if study not in STUDIES:
        return {}
    return {model: STUDIES[study].module.headline(e["metrics"]) for model, e in entries.items()}


def conventions(study: str) -> str:
    """The paragraph of a study's docstring that states its conventions (those that differ from the
    original notebook, and how to switch them), as plain text; empty if it has none."""
    import re

    from mechlens.studies import STUDIES

    doc = (STUDIES[study].module.__doc__ or "") if study in STUDIES else ""
    i = doc.find("Conventions")
    if i < 0:
        return ""
    rest = doc[i:]
    end = rest.find("\n\n")
    text = rest if end < 0 else rest[:end]
    if text.rstrip().endswith(":") and end >= 0:  # a list follows: keep it, up to the next blank line
        tail = rest[end + 2 :]
        stop = tail.find("\n\n")
        text += "\n" + (tail if stop < 0 else tail[:stop])
    text = re.sub(r":(?:func|class|meth|mod):`~?([^`]+)`", r"\1", text).replace("``", "").replace("**", "")
    return " ".join(text.split())


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
h2{border-bottom:2px solid #444;margin-top:2em}.note{background:#fff6d5;padding:.5em 1em;border-left:4px solid #e0b000}
details{margin:.5em 0}.caption{font-size:13px;color:#555;margin:0 0 1.5em}.conv{font-size:14px;color:#333}"""


def _prov_table(entries: Mapping[str, Mapping[str, Any]]) -> str:
    keys = [
        "architecture",
        "kind",
        "n_params",
        "n_layers",
        "weights",
        "bos",
        "padding_side",
        "dtype",
        "device",
        "seed",
        "transformer_lens",
        "transformers",
        "torch",
    ]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["model", *keys])
    rows = "".join(
        "<tr>"
        + f"<td>{html.escape(m)}</td>"
        + "".join(f"<td>{html.escape(str(e['provenance'].get(k)))}</td>" for k in keys)
        + "</tr>"
        for m, e in entries.items()
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


_MAX_INLINE = 12  # longer lists stay in results.json and the CSVs


def _flatten(x: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(x, Mapping):
        return [kv for k, v in x.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, x)]


def _cell(v: Any) -> str:
    if isinstance(v, str) and "\n" in v:
        return f"<pre>{html.escape(v)}</pre>"  # e.g. statsmodels' OLS summary, as printed
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            flat = "[" + ", ".join(f"{x:.6g}" for x in v) + "]"
        else:
            flat = json.dumps(v)
        if len(v) > _MAX_INLINE or len(flat) > 300:
            return f"<i>{len(v)} values: in results.json</i>"
        return html.escape(flat)
    return html.escape(str(v))


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """A study's metrics as a readable two-column table: nested keys dotted, numbers to 6 digits,
    multi-line text (the OLS summary) as printed, long arrays left to results.json and the CSVs."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in _flatten(metrics))
    return f"<table>{rows}</table>"


def caption(study: str, owner: str, name: str, fig: go.Figure) -> str:
    """A one-line caption: which figure, of which model, and its title in plain words (subtitle included)."""
    from mechlens.plotly_text import plain

    return f"{study} · {owner} · {name}: {plain(fig.layout.title.text or name)}"


def render(
    sections: Sequence[tuple[str, str, Mapping[str, Mapping[str, Any]], Mapping[str, Mapping[str, go.Figure]]]],
    notes: Sequence[str] = (),
    title: str = "mechlens report",
    context: Mapping[str, Any] | None = None,
    findings: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """``sections``: (study, heading, {model: json entry}, {model or 'comparison': {name: figure}});
    ``context``: what produced the report (command, date), shown under the title; ``findings``: study ->
    cross-model findings in words (:func:`mechlens.comparison.headline`)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if context:
        parts.append(
            "<p>" + "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(str(v))}" for k, v in context.items()) + "</p>"
        )
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    toc = "".join(
        f'<li><a href="#{html.escape(study)}">{html.escape(heading)}</a></li>' for study, heading, *_ in sections
    )
    parts.append(f"<nav><b>Contents</b><ol>{toc}</ol></nav>")
    for study, heading, entries, figs in sections:
        parts.append(f'<h2 id="{html.escape(study)}">{html.escape(heading)}</h2>')
        conv = conventions(study)
        if conv:
            parts.append(f'<p class="conv">{html.escape(conv)}</p>')
        for model, lines in headlines(study, entries).items():
            items = "".join(f"<li>{html.escape(line)}</li>" for line in lines[1:] or lines)
            parts.append(f"<p><b>{html.escape(model)}</b></p><ul>{items}</ul>")
        if findings and findings.get(study):
            items = "".join(f"<li>{html.escape(line)}</li>" for line in findings[study])
            parts.append(
                f"<p><b>Across models</b> (paired bootstrap over the same inputs; comparison.csv)</p><ul>{items}</ul>"
            )
        parts.append(_prov_table(entries))
        for owner, fs in figs.items():
            parts.append(f"<h3>{html.escape(owner)}</h3>")
            for name, fig in fs.items():
                parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
                parts.append(f'<p class="caption">{html.escape(caption(study, owner, name, fig))}</p>')
        for model, e in entries.items():
            parts.append(
                f"<details><summary>{html.escape(study)} metrics: {html.escape(model)}</summary>"
                f"{metrics_table(e['metrics'])}</details>"
            )
            if e.get("config"):
                parts.append(
                    f"<details><summary>{html.escape(study)} configuration: {html.escape(model)}</summary>"
                    f"{metrics_table(e['config'])}</details>"
                )
    js = plotly.offline.get_plotlyjs()
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script type='text/javascript'>{js}</script></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def sections_of(
    entries_by_study: Mapping[str, Mapping[str, Mapping[str, Any]]],
    comparison=None,
    figures_by_study: Mapping[str, Mapping[str, Mapping[str, go.Figure]]] | None = None,
    label: str = "comparison across models",
) -> tuple[list, dict[str, list[str]]]:
    """Report sections and cross-model findings: per study, the comparison figures (the study's own
    ``compare`` and one per quantity of the comparison table, with confidence bands), then each
    model's figures."""
    from mechlens import comparison as comparison_mod
    from mechlens.studies import STUDIES

    sections, findings = [], {}
    for study, entries in entries_by_study.items():
        figs: dict[str, dict[str, go.Figure]] = {}
        comp = dict(comparison_figures(study, entries))
        if comparison is not None and (comparison["study"] == study).any():
            frame = comparison[comparison["study"] == study]
            comp |= comparison_mod.figures(frame)
            findings[study] = comparison_mod.headline(frame)
        if comp:
            figs[label] = comp
        figs |= (figures_by_study or {}).get(study, {})
        sections.append((study, STUDIES[study].title, entries, figs))
    return sections, findings


def report_of(
    results,
    notes: Sequence[str] = (),
    context: Mapping[str, Any] | None = None,
    comparison=None,
) -> str:
    """The report of a run (study -> its :class:`~mechlens.result.StudyResult` list), as HTML."""
    entries = {study: {r.model: r.to_json() for r in rs} for study, rs in results.items()}
    figures = {study: {r.model: r.figures for r in rs} for study, rs in results.items()}
    sections, findings = sections_of(entries, comparison, figures)
    return render(sections, notes, context=context, findings=findings)
