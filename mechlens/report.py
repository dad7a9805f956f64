"""Self-contained HTML reports: plotly's JavaScript included once, every figure of every study,
provenance per model, and comparison figures when several models ran the same study.

Comparison figures are built from metrics alone (:func:`comparison_figures`), so
``mechlens compare`` can rebuild them from earlier runs' ``results.json``.
"""

from __future__ import annotations

import html
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.offline


def _rel_depth(n_points: int) -> np.ndarray:
    return np.arange(n_points) / max(n_points - 1, 1)


def comparison_figures(study: str, entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """``entries``: model -> its ``results.json`` entry (``metrics``, ``provenance``)."""
    if len(entries) < 2:
        return {}
    f = go.Figure()
    if study == "position":
        for model, e in entries.items():
            f.add_scatter(y=e["metrics"]["loss_mean_by_position"], name=model, mode="lines+markers")
        f.update_layout(title="Loss by position, per model", xaxis_title="position", yaxis_title="mean loss (nats)")
    elif study == "logits":
        f.add_bar(x=list(entries), y=[e["metrics"]["target_logprob"] for e in entries.values()])
        f.update_layout(title="Log-prob of the target token, per model", yaxis_title="log-prob")
    elif study == "lens":
        for model, e in entries.items():
            y = e["metrics"]["target_logprob_by_layer"]
            f.add_scatter(x=_rel_depth(len(y)), y=y, name=f"{model} ({e['metrics']['kind']})", mode="lines+markers")
        f.update_layout(title="Lens: target log-prob by relative depth", xaxis_title="layer / n_layers",
                        yaxis_title="log-prob")  # fmt: skip
    elif study == "magnitudes":
        for model, e in entries.items():
            y = e["metrics"]["lognorm_mean_by_layer"]
            f.add_scatter(x=np.arange(len(y)) / max(len(y), 1), y=y, name=model, mode="lines+markers")
        f.update_layout(title="Attention-output log-norm by relative depth", xaxis_title="layer / n_layers",
                        yaxis_title="mean log norm")  # fmt: skip
    elif study == "distances":
        for model, e in entries.items():
            for kind in ("attn", "mlp"):
                y = e["metrics"]["kendall_tau_by_layer"][kind]["L2"]
                f.add_scatter(x=np.arange(len(y)) / max(len(y), 1), y=y, name=f"{model} {kind}", mode="lines+markers")
        f.update_layout(title="Kendall tau (L2 vs position distance) by relative depth",
                        xaxis_title="layer / n_layers", yaxis_title="tau")  # fmt: skip
    return {"comparison": f}


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
h2{border-bottom:2px solid #444;margin-top:2em}.note{background:#fff6d5;padding:.5em 1em;border-left:4px solid #e0b000}
details{margin:.5em 0}"""


def _prov_table(entries: Mapping[str, Mapping[str, Any]]) -> str:
    keys = ["architecture", "kind", "n_params", "n_layers", "weights", "bos", "padding_side", "dtype", "device",
            "seed", "transformer_lens", "transformers", "torch"]  # fmt: skip
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["model", *keys])
    rows = "".join(
        "<tr>" + f"<td>{html.escape(m)}</td>"
        + "".join(f"<td>{html.escape(str(e['provenance'].get(k)))}</td>" for k in keys) + "</tr>"
        for m, e in entries.items()
    )  # fmt: skip
    return f"<table><tr>{head}</tr>{rows}</table>"


def render(
    sections: Sequence[tuple[str, str, Mapping[str, Mapping[str, Any]], Mapping[str, Mapping[str, go.Figure]]]],
    notes: Sequence[str] = (),
    title: str = "mechlens report",
) -> str:
    """``sections``: (study, heading, {model: json entry}, {model or 'comparison': {name: figure}})."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for study, heading, entries, figs in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_prov_table(entries))
        for owner, fs in figs.items():
            parts.append(f"<h3>{html.escape(owner)}</h3>")
            for fig in fs.values():
                parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        for model, e in entries.items():
            metrics = json.dumps(e["metrics"], indent=1)
            parts.append(f"<details><summary>{html.escape(study)} metrics: {html.escape(model)}</summary>"
                         f"<pre>{html.escape(metrics[:200_000])}</pre></details>")  # fmt: skip
    js = plotly.offline.get_plotlyjs()
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script type='text/javascript'>{js}</script></head>"
        f"<body>{''.join(parts)}</body></html>"
    )


def write_report(results, path: pathlib.Path, notes: Sequence[str] = ()) -> None:
    from mechlens.runner import STUDIES

    sections = []
    for study, rs in results.items():
        entries = {r.model: r.to_json() for r in rs}
        figs: dict[str, dict[str, go.Figure]] = {}
        comp = comparison_figures(study, entries)
        if comp:
            figs["comparison across models"] = comp
        for r in rs:
            figs[r.model] = r.figures
        sections.append((study, STUDIES[study].title, entries, figs))
    pathlib.Path(path).write_text(render(sections, notes), encoding="utf-8")
