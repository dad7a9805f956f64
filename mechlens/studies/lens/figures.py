"""The lens study's figures, its findings in words (``headline``) and the figures comparing models
(:mod:`mechlens.studies.lens`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from mechlens import plotly_text
from mechlens.axes import readout_depth
from mechlens.lens.readings import (
    QUANTITIES as CORPUS_QUANTITIES,
)
from mechlens.lens.readings import (
    first_depth_below,
)
from mechlens.result import format_values
from mechlens.studies.lens.parts import (
    CausalLensResult,
    CorpusLensResult,
    LineFit,
    MaskedLensResult,
    SlidingMask,
)


def corpus_figures(r: CorpusLensResult) -> dict[str, go.Figure]:
    depth = readout_depth(len(r.target_logprob_by_layer))
    titles = {
        "target_logprob": "next-token log-prob",
        "rank": "rank of the next token (mean, 0-based)",
        "entropy": "entropy (nats)",
        "kl_to_final": "KL to the final readout (nats)",
        "top1_agrees_final": "top-1 agreement with the final readout",
    }
    means = dict(
        zip(
            CORPUS_QUANTITIES,
            (
                r.target_logprob_by_layer,
                r.rank_mean_by_layer,
                r.entropy_by_layer,
                r.kl_to_final_by_layer,
                r.top1_agreement_by_layer,
            ),
            strict=True,
        )
    )
    figs = {}
    for q, y in means.items():
        sd = r.std_by_layer[q]
        f = go.Figure(
            go.Scatter(
                x=np.arange(len(y)), y=y, mode="lines+markers", name="mean", error_y={"array": sd, "visible": True}
            )
        )
        f.update_layout(
            title=f"Corpus lens: {titles[q]} by readout point<br><sup>{r.n_texts} texts, "
            f"{r.n_predictions} next-token positions; bars: ±1 std over positions</sup>",
            xaxis_title="readout point (0 = embeddings)",
            yaxis_title=titles[q],
        )
        f.update_xaxes(tickvals=np.arange(len(y)), ticktext=[f"{i} ({d:.2f})" for i, d in enumerate(depth)])
        figs[f"corpus_{q}"] = f
    return figs


def figures(r: MaskedLensResult | CausalLensResult | CorpusLensResult) -> dict[str, go.Figure]:
    """``laminar`` and ``heatmap`` (and, causal, ``rank_trajectories``) from a typed result; the corpus
    lens' per-layer figures (:func:`corpus_figures`) from a corpus result."""
    if isinstance(r, CorpusLensResult):
        return corpus_figures(r) | tuned_figures(r)
    if isinstance(r, MaskedLensResult):
        where = f"masked position {r.position} ({r.position_token!r})"
        return {
            "laminar": laminar_figure(r.target_logprob_by_layer, r.max_logprob_by_layer, r.sqrt_layer_fit, where),
            "heatmap": sliding_heatmap(r.sliding),
        } | tuned_figures(r)
    shown = r.text_tokens[:-1]
    where = "mean over positions" + (" (BOS at position 0)" if r.bos else "")
    return {
        "laminar": laminar_figure(r.target_logprob_by_layer, r.max_logprob_by_layer, r.sqrt_layer_fit, where),
        "heatmap": text_heatmap(
            r.predicted_tokens,
            r.lens.max_logprob,
            r.target_logprob,
            r.rank,
            shown,
            "Causal lens",
            scale_note="every position shown" + (", BOS included" if r.bos else ""),
        ),
        "rank_trajectories": rank_figure(r.rank, r.text_tokens[1:]),
    } | tuned_figures(r)


_TITLES = {
    "target_logprob": "target log-prob (nats)",
    "rank": "rank of the target (mean, 0-based)",
    "entropy": "entropy (nats)",
    "kl_to_final": "KL to the final readout (nats)",
    "top1_agrees_final": "top-1 agreement with the final readout",
}


def lens_units(r) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str] | None:
    """Per-unit values of both lenses, ``quantity -> (logit [unit, layer], tuned [unit, layer])``, and the
    unit (``text``: the corpus reservoir's per-text means; ``token``: the cells of one text); None without
    a tuned lens."""
    if isinstance(r, CorpusLensResult):
        if r.tuned is None:
            return None
        return {q: (r.per_text[:, i], r.tuned.per_text[:, i]) for i, q in enumerate(CORPUS_QUANTITIES)}, "text"
    if getattr(r, "tuned", None) is None:
        return None
    a, b = r.tuned.logit.per_cell(), r.tuned.tuned.per_cell()
    return {q: (np.asarray(a[q], np.float64).T, np.asarray(b[q], np.float64).T) for q in CORPUS_QUANTITIES}, "token"


def lens_intervals(units: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over units per readout point and its 95% percentile bootstrap interval (2,000 resamples, seed 0:
    :mod:`mechlens.comparison`'s settings); with fewer than 2 units the interval is the mean itself."""
    from mechlens.stats.bootstrap import mean_intervals

    mean = units.mean(0)
    ci = mean_intervals([units[:, j] for j in range(units.shape[1])], 0.95, 2000, "percentile", seed)
    lo = np.array([m if c[0] is None else c[0] for m, c in zip(mean, ci, strict=True)])
    hi = np.array([m if c[1] is None else c[1] for m, c in zip(mean, ci, strict=True)])
    return mean, lo, hi


def tuned_figures(r) -> dict[str, go.Figure]:
    """One figure per lens statistic with the logit lens and the tuned lens by readout point, each with its
    bootstrap band (over texts for a corpus, over the text's cells for one text); none without a tuned lens."""
    got = lens_units(r)
    if got is None:
        return {}
    units, unit = got
    figs = {}
    for q, pair in units.items():
        f = go.Figure()
        for name, u, colour in (("logit lens", pair[0], "31,119,180"), ("tuned lens", pair[1], "214,39,40")):
            mean, lo, hi = lens_intervals(u)
            x = np.arange(len(mean))
            f.add_scatter(
                x=np.concatenate([x, x[::-1]]),
                y=np.concatenate([hi, lo[::-1]]),
                fill="toself",
                fillcolor=f"rgba({colour},0.2)",
                line={"width": 0},
                hoverinfo="skip",
                name=f"{name} 95% CI",
                showlegend=True,
            )
            f.add_scatter(x=x, y=mean, mode="lines+markers", name=name, line={"color": f"rgb({colour})"})
        n = pair[0].shape[0]
        f.update_layout(
            title=f"Logit lens vs tuned lens: {_TITLES[q]} by readout point<br><sup>mean over {n} "
            f"{unit}s{' (per-text means)' if unit == 'text' else ''}; bands: 95% percentile "
            f"bootstrap over {unit}s (2,000 resamples, seed 0)</sup>",
            xaxis_title="readout point (0 = embeddings)",
            yaxis_title=_TITLES[q],
        )
        figs[f"tuned_{q}"] = f
    return figs


def laminar_figure(target_logprob, max_logprob, fit: LineFit, where: str = "") -> go.Figure:
    """Target and top-1 log-prob by readout point, with the sqrt(layer) fit of the target."""
    y = np.asarray(target_logprob)
    x = np.arange(len(y))
    f = go.Figure()
    f.add_scatter(x=x, y=y, mode="lines+markers", name="target log-prob")
    f.add_scatter(x=x, y=np.asarray(max_logprob), mode="lines+markers", name="max log-prob")
    f.add_scatter(
        x=x,
        y=np.asarray(fit.fitted),
        mode="lines",
        line_dash="dash",
        name=f"{fit.intercept:.2f} + {fit.slope:.2f}·sqrt(layer)",
    )
    title = "Log-prob by layer" + (
        f"<br><sup>{where}; the model's own head at every readout point</sup>" if where else ""
    )
    f.update_layout(title=title, xaxis_title="readout point (0 = embeddings)", yaxis_title="log-prob (nats)")
    return f


def rank_figure(rank, next_tokens: Sequence[str]) -> go.Figure:
    """Causal lens: each position's next-token rank by readout point (log axis, 1 = top)."""
    rank = np.asarray(rank)
    x = list(range(rank.shape[0]))
    f = go.Figure(
        [
            go.Scatter(
                x=x,
                y=np.maximum(rank[:, p], 0) + 1,
                name=plotly_text.escape(f"{p}: {next_tokens[p]!r}"),
                mode="lines+markers",
            )
            for p in range(rank.shape[1])
        ]
    )
    f.update_layout(
        title="Rank of the next token by layer (1 = top)",
        xaxis_title="readout point (0 = embeddings)",
        yaxis_type="log",
        yaxis_title="rank + 1",
        legend_title_text="position: next token",
    )
    return f


def sliding_heatmap(s: SlidingMask) -> go.Figure:
    """Part 6: the sliding mask as a text heatmap (readout point x masked position), coloured by the
    top-1 log-prob min-max scaled over the positions ``s`` holds: text tokens only, or with
    ``<s>``/``</s>`` when it was computed with ``specials=True`` (the title says which)."""
    labels = [f"{i}:{w}" for i, w in enumerate(s.text_only().tokens)]
    it = iter(labels)
    x = [next(it) if t else f"[{w}]" for t, w in zip(s.is_text, s.tokens, strict=True)]
    note = "text tokens and <s>/</s> (as the original)" if s.has_specials else "text tokens only (<s>/</s> not shown)"
    note = plotly_text.escape(note)  # plotly reads <s> as strike-through
    return text_heatmap(
        s.predicted_tokens,
        s.max_logprob,
        s.target_logprob,
        s.target_rank,
        x,
        "Masked-LM lens",
        scale_note=note,
        top2_gap=s.top2_gap,
        labelled=True,
    )


def text_heatmap(
    predicted,
    max_lp,
    target_lp,
    rank,
    words,
    title,
    *,
    scale_note: str = "these cells",
    top2_gap=None,
    labelled: bool = False,
) -> go.Figure:
    """Layers x positions of predicted tokens, coloured by the max log-prob min-max scaled over the
    cells shown (``scale_note`` says which, in the title)."""
    z = np.asarray(max_lp, dtype=np.float64)
    scaled = (z - np.nanmin(z)) / max(np.nanmax(z) - np.nanmin(z), 1e-12)
    gap = np.full_like(z, np.nan) if top2_gap is None else np.asarray(top2_gap, dtype=np.float64)
    custom = np.stack([np.asarray(target_lp), np.asarray(rank), z, gap], -1)
    shown = [[plotly_text.escape(t if len(t) <= 9 else t[:8] + "…") for t in row] for row in predicted]  # legible
    words = [plotly_text.escape(w) for w in words]  # tokens such as <s> are text, not plotly markup
    predicted = [[plotly_text.escape(t) for t in row] for row in predicted]
    hover = (
        "layer %{y}, %{x}<br>predicted %{customdata[4]} (log-prob %{customdata[2]:.2f})"
        "<br>original token log-prob %{customdata[0]:.2f}, rank %{customdata[1]}"
    )
    if top2_gap is not None:
        hover += "<br>top-1 minus top-2 log-prob %{customdata[3]:.2f}"
    f = go.Figure(
        go.Heatmap(
            z=scaled,
            x=list(words) if labelled else [f"{i}:{w}" for i, w in enumerate(words)],
            y=list(range(len(z))),
            text=shown,
            texttemplate="%{text}",
            textfont={"size": 11},
            customdata=np.concatenate([custom.astype(object), np.asarray(predicted, dtype=object)[..., None]], -1),
            colorscale="Viridis",
            colorbar={"title": "scaled"},
            hovertemplate=hover + "<extra></extra>",
        )
    )
    f.update_layout(
        title=f"{title}: predicted tokens<br><sup>colour: max log-prob, min-max scaled over {scale_note}</sup>",
        yaxis_title="readout point (0 = embeddings)",
        xaxis_title="position: original token",
        height=max(400, 45 * len(z) + 200),  # no fixed width: the figure fills its page or cell
        xaxis={"tickangle": -45},
    )
    return f


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    fit = m["sqrt_layer_fit"]
    lp = m["target_logprob_by_layer"]
    if m["kind"] == "corpus":
        kl, agree = m["kl_to_final_by_layer"], m["top1_agreement_by_layer"]
        return _with_tuned(
            m,
            [
                f"corpus lens over {m['n_texts']} texts ({m['n_predictions']} predictions): log-prob by layer "
                f"{format_values(lp)}",
                f"Over {m['n_predictions']} {m.get('lensed', 'next-token positions')} of {m['n_texts']} texts of "
                f"{m['data']}, the target token's mean log-prob goes from {lp[0]:.2f} at the embeddings to "
                f"{lp[-1]:.2f} at the last layer (sqrt(layer) slope {fit['slope']:.2f}).",
                f"KL to the final layer falls from {kl[0]:.2f} nats at the embeddings to {kl[-2]:.2f} one layer "
                f"before the last; the lens' top-1 agrees with the final layer's at {100 * agree[0]:.0f}% and "
                f"{100 * agree[-2]:.0f}% of positions there.",
            ],
        )
    lines = [
        f"{m['kind']} lens: target log-prob by layer {format_values(lp)}; sqrt(layer) slope {fit['slope']:.3f}",
        f"The target's log-prob goes from {lp[0]:.2f} at the embeddings to {lp[-1]:.2f} at the last layer; "
        f"a fit on sqrt(layer) has slope {fit['slope']:.2f} per sqrt(layer).",
    ]
    if m["kind"] == "masked":
        lines.append(
            f"With every position masked in turn, the last layer recovers the original token at "
            f"{100 * m['final_top1_accuracy_sliding']:.0f}% of positions."
        )
        u, k = m["part1_unmasked"], m["part2_masked"]
        lines.append(
            f"At readout point {m['layer']} (parts 1-2) the original token {m['position_token']!r} has log-prob "
            f"{u['target_logprob']:.2f} (rank {u['target_rank']}) unmasked and {k['target_logprob']:.2f} "
            f"(rank {k['target_rank']}) masked."
        )
        if "sliding_top2_gap" in m:
            gap = np.asarray(m["sliding_top2_gap"], dtype=np.float64).mean(1)
            lines.append(
                f"The top-1 leads the top-2 by {gap[0]:.2f} nats on average over positions at the embeddings "
                f"and by {gap[-1]:.2f} at the last layer."
            )
    else:
        kl = m["kl_to_final_by_layer"]
        lines.append(
            f"The last layer predicts the next token at {100 * m['final_top1_accuracy']:.0f}% of positions; KL "
            f"to the final layer falls from {kl[0]:.2f} nats at the embeddings to {kl[-2]:.2f} one layer before it."
        )
        if "top1_agreement_by_layer" in m:
            agree = m["top1_agreement_by_layer"]
            lines.append(
                f"The lens' top-1 agrees with the final layer's at {100 * agree[0]:.0f}% of positions at the "
                f"embeddings and {100 * agree[-2]:.0f}% one layer before the last."
            )
    return _with_tuned(m, lines)


def _with_tuned(m: Mapping[str, Any], lines: list[str]) -> list[str]:
    """``lines`` and, with a tuned lens, where each lens' mean KL to the final readout first drops below
    1 nat and the KL of both by readout point."""
    t = m.get("tuned")
    if not t:
        return lines
    if m["kind"] == "corpus":
        logit, tuned = m["kl_to_final_by_layer"], t["kl_to_final_by_layer"]
        where = f"over {m['n_predictions']} {m.get('lensed', 'positions')} of {m['n_texts']} texts"
        if m.get("tuned_note"):
            where += f" ({m['tuned_note']})"
    else:
        logit, tuned = t["logit"]["kl_to_final_by_layer"], t["tuned"]["kl_to_final_by_layer"]
        where = "over the text's positions" + (" (each masked in turn)" if m["kind"] == "masked" else "")

    def depth(kl) -> str:
        d = first_depth_below(kl)
        n = len(kl) - 1
        if d is None or d == n:  # the last point reads the model's own output: KL 0 by construction
            return "only at the last readout point"
        return f"first at readout point {d} of 0..{n} (depth {d / n:.2f})"

    return [
        *lines,
        f"Mean KL to the final readout {where}: below 1 nat {depth(logit)} for the logit lens, {depth(tuned)} for "
        "the tuned lens.",
        f"KL to final by readout point, logit lens {format_values(logit)}, tuned lens {format_values(tuned)} nats.",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same text)."""
    f = go.Figure()
    for model, e in entries.items():
        y = e["metrics"]["target_logprob_by_layer"]
        f.add_scatter(x=readout_depth(len(y)), y=y, name=f"{model} ({e['metrics']['kind']})", mode="lines+markers")
    f.update_layout(
        title="Lens: target log-prob by relative depth",
        yaxis_title="log-prob",
        xaxis_title="relative depth (readout point i of L+1 at i/L)",
    )
    return {"comparison": f}
