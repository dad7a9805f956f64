"""The report figures of study 6, from its typed result: the layer x position patching heatmaps, the
per-head grids, the direct-logit-attribution bars and the attribution-vs-exact scatter."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from mechlens.studies.interventions import InterventionsResult

GRID_TITLES = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


def _grid(rows) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def patching_heatmap(r: InterventionsResult, direction: str = "denoise") -> go.Figure:
    """Fraction of the clean-minus-corrupt gap restored, per layer (rows) and position (columns), one
    panel per hook."""
    p = r.denoise if direction == "denoise" else r.noise
    f = make_subplots(rows=1, cols=3, subplot_titles=list(GRID_TITLES.values()), shared_yaxes=True)
    for i, g in enumerate(GRID_TITLES, start=1):
        z = _grid(p.restored[g])
        f.add_trace(
            go.Heatmap(
                z=z, colorscale="RdBu", zmid=0, zmin=-1, zmax=1, showscale=i == 3, colorbar={"title": "restored"}
            ),
            row=1,
            col=i,
        )
        f.update_xaxes(title_text="position", row=1, col=i)
    f.update_yaxes(title_text="layer", row=1, col=1)
    what = "clean into corrupt" if direction == "denoise" else "corrupt into clean"
    f.update_layout(
        title=f"Activation patching ({what}): fraction of the logit-difference gap restored, mean over "
        f"{r.n_pairs} pairs"
    )
    return f


def head_grid(r: InterventionsResult) -> go.Figure | None:
    """Per-head effects: patching (fraction restored), zero ablation (log-prob drop) and DLA."""
    if r.denoise.head_restored is None:
        return None
    panels = [
        ("patching: restored", r.denoise.head_restored.numpy()),
        ("mean ablation: log-prob drop", r.ablation.head_logprob_drop_mean[1].numpy()),
    ]
    if r.dla is not None and r.dla.head_mean is not None:
        panels.append(("DLA: contribution", r.dla.head_mean.numpy()))
    f = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels])
    for i, (_, z) in enumerate(panels, start=1):
        f.add_trace(go.Heatmap(z=z, colorscale="RdBu", zmid=0, showscale=False), row=1, col=i)
        f.update_xaxes(title_text="head", row=1, col=i)
    f.update_yaxes(title_text="layer", row=1, col=1)
    f.update_layout(title="Per head (attn.hook_z)")
    return f


def dla_bars(r: InterventionsResult) -> go.Figure | None:
    """Each component's direct contribution to the logit difference (mean over pairs, with its 95% bootstrap
    interval over pairs as whiskers), the readout bias and the model's logit difference (means over the
    kept pairs: all of them up to ``--reservoir``)."""
    if r.dla is None:
        return None
    d = r.dla
    mean = d.contribution_mean.numpy()
    ci = np.asarray([[np.nan if v is None else v for v in c] for c in r.intervals.dla], dtype=float)
    lo, hi = np.where(np.isnan(ci[:, 0]), mean, ci[:, 0]), np.where(np.isnan(ci[:, 1]), mean, ci[:, 1])
    x = [*d.components, "readout bias", "= logit diff"]
    y = [*mean.tolist(), float(d.readout_bias.mean()), float(d.logit_diff.mean())]
    f = go.Figure(
        go.Bar(
            x=x,
            y=y,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [*(hi - mean).tolist(), 0, 0],
                "arrayminus": [*(mean - lo).tolist(), 0, 0],
            },
        )
    )
    f.update_layout(
        title=f"Direct logit attribution (sum identity error {d.identity_error:.1g})",
        yaxis_title="contribution to logit[target] - logit[foil]",
    )
    return f


def attribution_scatter(r: InterventionsResult) -> go.Figure:
    """Attribution patching's estimate against exact denoising patching, per cell (means over pairs)."""
    f = go.Figure()
    for g in GRID_TITLES:
        a = r.attribution.dld_mean[g].numpy().ravel()
        e = r.denoise.dld_mean[g].numpy().ravel()
        f.add_scatter(x=e, y=a, mode="markers", name=GRID_TITLES[g])
    if r.attribution.head_dld is not None:
        f.add_scatter(
            x=r.denoise.head_dld_mean.numpy().ravel(),
            y=r.attribution.head_dld_mean.numpy().ravel(),
            mode="markers",
            name="heads (z)",
        )
    a = r.attribution
    title = f"Attribution vs exact patching: r = {a.correlation:.3f}, max |error| = {a.max_abs_error:.3g}"
    f.update_layout(title=title, xaxis_title="exact change of LD", yaxis_title="attribution estimate")
    return f


def figures(r: InterventionsResult) -> dict[str, go.Figure]:
    out = {
        "patching": patching_heatmap(r, "denoise"),
        "patching_noise": patching_heatmap(r, "noise"),
        "heads": head_grid(r),
        "dla": dla_bars(r),
        "attribution_vs_exact": attribution_scatter(r),
    }
    return {k: v for k, v in out.items() if v is not None}
