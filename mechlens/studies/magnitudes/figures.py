"""Study 4's figures, its findings in words (``headline``) and the figures comparing models
(:mod:`mechlens.studies.magnitudes`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go

from mechlens import arch
from mechlens.axes import block_depth
from mechlens.result import format_values
from mechlens.studies.magnitudes.parts import AttnOutNorms, MagnitudesResult, PositionFit, PreviousNormFit

# -- figures -------------------------------------------------------------------------------------------


def density_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: the density of log-norms per layer (the histogram counts over the valid tokens, divided by
    their number and the bin width)."""
    edges = norms.lognorm_hist_edges
    centres = (edges[:-1] + edges[1:]) / 2
    f = go.Figure()
    for layer, row in enumerate(norms.lognorm_hist_counts.numpy()):
        row = row.astype(np.float64)
        f.add_scatter(x=centres, y=row / max(row.sum(), 1) / (edges[1] - edges[0]), name=f"layer {layer}", mode="lines")
    return f.update_layout(title="Density of log attention-output norms by layer", xaxis_title="log norm")


def percentile_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: percentiles of the log-norms by layer (the median, and the central ranges between matching
    lower and upper levels as bands)."""
    levels, pct = norms.lognorm_percentile_levels, norms.lognorm_percentiles_by_layer
    x = np.arange(pct.shape[0])
    f = go.Figure()
    for i in range(len(levels) // 2):
        lo, hi = levels[i], levels[-1 - i]
        f.add_scatter(x=x, y=pct[:, -1 - i], mode="lines", line={"width": 0}, showlegend=False, name=f"p{hi:g}")
        f.add_scatter(
            x=x, y=pct[:, i], mode="lines", line={"width": 0}, fill="tonexty", name=f"p{lo:g}-p{hi:g}", opacity=0.3
        )
    if len(levels) % 2:
        mid = len(levels) // 2
        f.add_scatter(x=x, y=pct[:, mid], mode="lines+markers", name=f"p{levels[mid]:g}")
    return f.update_layout(
        title=f"Percentiles of log attention-output norms by layer<br><sup>over {norms.percentile_basis}</sup>",
        xaxis_title="layer",
        yaxis_title="log norm",
    )


def heatmap_figure(norms: AttnOutNorms) -> go.Figure:
    """Part 1: the mean norm by layer and position (colour limits at the 2nd-98th percentile)."""
    z = norms.norm_mean_by_layer_position.numpy()
    lo, hi = np.nanpercentile(z, [2, 98])
    f = go.Figure(go.Heatmap(z=z, zmin=lo, zmax=hi, colorscale="Magma"))
    return f.update_layout(
        title="Mean attention-output norm (colour limits: 2nd-98th percentile)",
        xaxis_title="position",
        yaxis_title="layer",
    )


def fits_figure(fit: PositionFit, prev: PreviousNormFit) -> go.Figure:
    """Parts 2-3: the slope of log mean norm on position, and the previous-token coefficients, by layer."""
    f = go.Figure([go.Bar(y=fit.slope, name="slope of log mean norm on position (left axis)")])
    f.add_scatter(
        y=prev.betas[:, 2], name="coefficient of log-norm at t-1 (right axis)", mode="lines+markers", yaxis="y2"
    )
    f.add_scatter(
        y=prev.betas[:, 1], name="coefficient of log-norm at t-2 (right axis)", mode="lines+markers", yaxis="y2"
    )
    return f.update_layout(
        title="Per-layer fits: position trend and previous-token regression",
        xaxis_title="layer",
        yaxis={"title": "slope (log norm per position)"},
        yaxis2={"title": "regression coefficient", "overlaying": "y", "side": "right"},
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0},
    )


def figures(r: MagnitudesResult) -> dict[str, go.Figure]:
    figs = {}
    cnt = r.norm_count_by_position.numpy()
    f = go.Figure(go.Bar(x=np.arange(len(cnt)), y=cnt))
    f.update_layout(
        title="Valid tokens per position (every statistic's sample size; padding and excluded positions count 0)",
        xaxis_title="position",
        yaxis_title="valid tokens",
    )
    figs["valid_tokens"] = f
    counts = r.seq_length_counts
    figs["seq_lengths"] = go.Figure(go.Bar(x=np.arange(len(counts)), y=counts)).update_layout(
        title="Sequence lengths (text tokens)", xaxis_title="tokens", yaxis_title="sequences"
    )
    figs["lognorm_density"] = density_figure(r.norms)
    mean, std = r.lognorm_mean_by_layer, r.lognorm_std_by_layer
    figs["lognorm_by_layer"] = go.Figure(
        go.Scatter(x=np.arange(len(mean)), y=mean, error_y={"array": std}, mode="markers+lines")
    ).update_layout(title="Log norm by layer (mean ± std)", xaxis_title="layer", yaxis_title="log norm")
    figs["lognorm_percentiles"] = percentile_figure(r.norms)
    figs["norm_heatmap"] = heatmap_figure(r.norms)
    y = np.asarray(r.norm_mean_by_position, dtype=np.float64)  # None -> NaN: a gap in the line
    figs["norm_by_position"] = go.Figure(go.Scatter(y=y, mode="lines+markers")).update_layout(
        title="Mean norm by position (average over layers)", xaxis_title="position", yaxis_title="norm"
    )
    figs["fits"] = fits_figure(r.position_fit, r.previous_norm_fit)
    return figs


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    ln = np.asarray(m["lognorm_mean_by_layer"], np.float64)
    slopes = [f["slope"] for f in m["position_fit_by_layer"]]
    b1 = [b["t-1"] for b in m["previous_norm_betas_by_layer"]]
    return [
        f"log-norm by layer {format_values(ln)} over {m['n_valid_tokens']} tokens",
        f"Over {m['n_valid_tokens']} tokens of {m['n_sequences']} texts, the mean log-norm of the attention output "
        f"is lowest at layer {int(np.argmin(ln))} ({ln.min():.2f}) and highest at layer {int(np.argmax(ln))} "
        f"({ln.max():.2f}).",
        f"The log of the mean norm changes by {min(slopes):+.3f} to {max(slopes):+.3f} per position across layers; "
        f"the previous token's log-norm predicts the next with coefficients {min(b1):.2f} to {max(b1):.2f}.",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same texts).

    Norms scale with width, so models are compared on the log RMS (``log(norm / sqrt(d_model))``, the
    mean log-norm minus ``log sqrt(d_model)``). Attention outputs of models with different
    normalisation placements are different quantities (a post-LN encoder's is taken after LayerNorm;
    output norms and sandwich norms normalise what attention adds): such a figure says so in its
    title and legend instead of overlaying them silently."""
    f = go.Figure()
    for model, e in entries.items():
        prov = e.get("provenance", {})
        placement = prov.get("norm_placement", "unchecked")
        y = np.asarray(e["metrics"]["lognorm_mean_by_layer"], np.float64)
        d_model = prov.get("d_model")
        y_rms = y - 0.5 * np.log(d_model) if d_model else y
        f.add_scatter(x=block_depth(len(y)), y=y_rms, name=f"{model} [{placement}]", mode="lines+markers")
    title = "Attention-output log RMS (log norm / sqrt(d_model)) by relative depth"
    why = arch.attn_out_mismatch({m: e.get("provenance", {}) for m, e in entries.items()})
    if why is not None:
        title += f"<br><sup>NOT COMPARABLE: {why}</sup>"
    f.update_layout(title=title, yaxis_title="mean log RMS", xaxis_title="relative depth (block l at (l+1)/L)")
    return {"comparison": f}
