"""Study 4 -- magnitudes of what attention adds to the residual stream (original: gpt2-large on the
rotten_tomatoes test split).

Only ``blocks.{l}.hook_attn_out`` is cached. Every statistic streams over mini-batches with memory
constant in the number of sequences: running sums per (layer, position), fixed-bin histograms of
log-norms, and the normal equations of the previous-token regression. Statistics key on the model's
position ids and a valid-token mask (padding, and position 0 by default, excluded), so the padding
side does not change them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import einops
import numpy as np
import plotly.graph_objects as go
import torch

from mechlens import arch
from mechlens.axes import block_depth
from mechlens.data import load_texts
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.loading import provenance_of
from mechlens.ops import RunningPositionStats, stack_layers, vector_norm
from mechlens.options import Options, fail, option
from mechlens.stats.regression import lstsq_line
from mechlens.studies.result import StudyResult, format_values, none_where
from mechlens.tokens import Texts, encode


@dataclasses.dataclass
class Config(Options):
    data: str = option("reviews", "text source: a built-in name, a local file or an online dataset (mechlens list)",
                       nonempty=True)  # fmt: skip
    n_texts: int | None = option(64, "texts taken from the source (None in Python: all of them)", ge=1)
    padding_side: str = option("right", "side on which batches are padded (statistics do not depend on it)",
                               choices=("right", "left"))  # fmt: skip
    bos: bool = option(True, "prepend BOS")
    exclude_first: bool = option(True, "exclude position 0 (BOS: the attention sink) from every statistic")
    max_tokens: int | None = option(128, "text tokens kept per text (None in Python: all that fit the context)", ge=1)
    batch_size: int = option(16, "texts per forward pass", ge=1)
    n_fit_positions: int = option(30, "positions used by the fit of log mean norm on position", ge=2)
    hist_bins: int = option(60, "bins of the log-norm histograms", ge=1)
    hist_range: tuple[float, float] = option((-4.0, 8.0), "LOW HIGH: log-norm range of the histograms")
    seed: int = option(0, "random seed", ge=0)

    def check(self) -> None:
        lo, hi = self.hist_range
        if not lo < hi:
            fail("hist_range", f"must be LOW HIGH with LOW < HIGH, got {lo:g} {hi:g}")

    def check_model(self, model) -> None:
        room = model.cfg.n_ctx - int(self.bos) - (1 if arch.kind_of(model) == "masked" else 0)
        if self.max_tokens is not None and self.max_tokens > room:
            fail("max_tokens", f"must be <= {room} (the model's context is {model.cfg.n_ctx} tokens with its "
                               f"special tokens), got {self.max_tokens}")  # fmt: skip


def attn_out_names(model) -> list[str]:
    return [f"blocks.{layer}.hook_attn_out" for layer in range(model.cfg.n_layers)]


class MagnitudeAccumulator:
    """Streaming per-layer statistics of attention-output norms."""

    def __init__(self, n_layers: int, n_positions: int, cfg: Config):
        self.cfg = cfg
        self.norm = RunningPositionStats(n_positions)
        self.lognorm = RunningPositionStats(n_positions)
        self.hist = torch.zeros(n_layers, cfg.hist_bins, dtype=torch.long)
        self.xtx = torch.zeros(n_layers, 3, 3, dtype=torch.float64)  # [1, log n(t-2), log n(t-1)]
        self.xty = torch.zeros(n_layers, 3, dtype=torch.float64)
        self.n_triplets = 0
        self.lengths: list[int] = []  # one int per sequence (for the length histogram)

    def update(self, norms: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, lengths) -> None:
        """``norms [layer, batch, pos]``; ``valid [batch, pos]``."""
        logn = norms.clamp(min=1e-30).log().double()
        self.norm.update(norms, positions, valid)
        self.lognorm.update(logn, positions, valid)
        lo, hi = self.cfg.hist_range
        width = (hi - lo) / self.cfg.hist_bins
        v = logn[:, valid]  # [layer, n]
        idx = ((v - lo) / width).floor().long().clamp(0, self.cfg.hist_bins - 1)
        self.hist.scatter_add_(1, idx, torch.ones_like(idx))
        # previous-token regression: tokens whose two predecessors are valid too
        trip = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
        y = logn[:, :, 2:][:, trip]
        x = torch.stack([torch.ones_like(y), logn[:, :, :-2][:, trip], logn[:, :, 1:-1][:, trip]], -1)  # [L, n, 3]
        self.xtx += einops.einsum(x, x, "layer n i, layer n j -> layer i j")
        self.xty += einops.einsum(x, y, "layer n i, layer n -> layer i")
        self.n_triplets += int(trip.sum())
        self.lengths += [int(n) for n in lengths]


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    texts = load_texts(cfg.data) if texts is None else texts
    texts = texts[: cfg.n_texts] if cfg.n_texts else texts
    batch = encode(model, texts, bos=cfg.bos, padding_side=cfg.padding_side, max_tokens=cfg.max_tokens,
                   fix="lower --max-tokens")  # fmt: skip
    names = attn_out_names(model)
    n_layers = model.cfg.n_layers
    acc = MagnitudeAccumulator(n_layers, batch.max_position + 1, cfg)
    positions, valid = batch.positions, batch.valid_mask(exclude_first=cfg.exclude_first)
    n_trip = int((valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]).sum())
    if n_trip < 3:  # the previous-norm regression has 3 coefficients
        raise DataError(
            f"--data {cfg.data}: only {n_trip} tokens have two valid predecessors, and the previous-norm regression "
            "needs at least 3; use more or longer texts (each needs >= 3 tokens after position 0)"
        )
    for rows, _, acts in iter_cached(model, batch, names, batch_size=cfg.batch_size, progress="study 4 forward"):
        norms = vector_norm(stack_layers(acts, names))  # [layer, batch, pos]
        acc.update(norms, positions[rows], valid[rows], batch.text_mask[rows].sum(-1))
    return finish(model, acc, cfg, batch)


def finish(model, acc: MagnitudeAccumulator, cfg: Config, batch) -> StudyResult:
    norm, logn = acc.norm.result(), acc.lognorm.result()
    overall = acc.lognorm
    cnt = overall.count.sum().double()
    ln_mean = (overall.sum.sum(1) / cnt).numpy()
    ln_std = np.sqrt(np.maximum(overall.sumsq.sum(1).numpy() / cnt.item() - ln_mean**2, 0))
    # the fit runs over the first n_fit positions that valid tokens reached: 1..n_fit when position 0 is
    # excluded (the original notebook's arange(n_fit) silently lost its NaN point 0 and fitted 1..n_fit-1)
    pos = np.nonzero(norm.count.numpy() > 0)[0][: cfg.n_fit_positions]
    mean_np = norm.mean.numpy()
    empty = norm.count.numpy() == 0  # [pos]
    fits = [lstsq_line(pos, np.log(mean_np[layer, pos])) for layer in range(len(mean_np))]
    try:
        betas = torch.linalg.solve(acc.xtx, acc.xty.unsqueeze(-1)).squeeze(-1).numpy()  # [layer, 3]
    except torch.linalg.LinAlgError:
        raise DataError(
            f"--data {cfg.data}: the previous-norm regression is singular (too few distinct tokens): use more texts"
        ) from None
    lo, hi = cfg.hist_range
    edges = np.linspace(lo, hi, cfg.hist_bins + 1)
    metrics = {
        "n_sequences": len(acc.lengths),
        "n_valid_tokens": int(cnt),
        "seq_length_counts": np.bincount(acc.lengths).tolist(),
        "lognorm_mean_by_layer": ln_mean.tolist(),
        "lognorm_std_by_layer": ln_std.tolist(),
        "lognorm_hist_edges": edges.tolist(),
        "lognorm_hist_counts": acc.hist.tolist(),
        # None at positions no valid token reached (position 0 when it is excluded)
        "norm_mean_by_layer_position": none_where(mean_np, empty),
        "norm_count_by_position": norm.count.tolist(),
        "lognorm_mean_by_layer_position": none_where(logn.mean, empty),
        "norm_mean_by_position": none_where(_mean_over_layers(mean_np), empty),
        "position_fit_by_layer": [{"intercept": b0, "slope": b1} for b0, b1 in fits],
        "position_fit_positions": pos.tolist(),
        "previous_norm_betas_by_layer": [{"const": b[0], "t-2": b[1], "t-1": b[2]} for b in betas],
        "n_regression_triplets": acc.n_triplets,
    }
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    tables = {
        "norm_by_layer_position": [
            {"layer": layer, "position": p, "mean_norm": float(mean_np[layer, p]), "count": int(norm.count[p])}
            for layer in range(len(mean_np))
            for p in range(mean_np.shape[1])
        ],
        "per_layer": [
            {"layer": layer, "lognorm_mean": ln_mean[layer], "lognorm_std": ln_std[layer],
             "fit_intercept": fits[layer][0], "fit_slope": fits[layer][1],
             "beta_const": betas[layer][0], "beta_t2": betas[layer][1], "beta_t1": betas[layer][2]}
            for layer in range(len(mean_np))
        ],
    }  # fmt: skip
    res = StudyResult("magnitudes", prov.model, metrics, prov.to_dict(), dataclasses.asdict(cfg), tables)
    res.figures = figures(metrics, acc)
    return res


def _mean_over_layers(x: np.ndarray) -> np.ndarray:
    """Per-position mean over layers; NaN where no token was valid (e.g. the excluded position 0)."""
    finite = np.isfinite(x)
    return np.where(finite.any(0), np.where(finite, x, 0).sum(0) / np.maximum(finite.sum(0), 1), np.nan)


def figures(m: dict, acc: MagnitudeAccumulator) -> dict[str, go.Figure]:
    figs = {}
    cnt = np.asarray(m["norm_count_by_position"])
    f = go.Figure(go.Bar(x=np.arange(len(cnt)), y=cnt))
    f.update_layout(title="Valid tokens per position (every statistic's sample size; padding and excluded positions "
                    "count 0)", xaxis_title="position", yaxis_title="valid tokens")  # fmt: skip
    figs["valid_tokens"] = f
    counts = np.asarray(m["seq_length_counts"])
    figs["seq_lengths"] = go.Figure(go.Bar(x=np.arange(len(counts)), y=counts)).update_layout(
        title="Sequence lengths (text tokens)", xaxis_title="tokens", yaxis_title="sequences"
    )
    edges = np.asarray(m["lognorm_hist_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    f = go.Figure()
    for layer, row in enumerate(m["lognorm_hist_counts"]):
        row = np.asarray(row, np.float64)
        f.add_scatter(x=centres, y=row / max(row.sum(), 1) / (edges[1] - edges[0]), name=f"layer {layer}",
                      mode="lines")  # fmt: skip
    f.update_layout(title="Density of log attention-output norms by layer", xaxis_title="log norm")
    figs["lognorm_density"] = f
    mean, std = np.asarray(m["lognorm_mean_by_layer"]), np.asarray(m["lognorm_std_by_layer"])
    figs["lognorm_by_layer"] = go.Figure(
        go.Scatter(x=np.arange(len(mean)), y=mean, error_y={"array": std}, mode="markers+lines")
    ).update_layout(title="Log norm by layer (mean ± std)", xaxis_title="layer", yaxis_title="log norm")
    z = np.asarray(m["norm_mean_by_layer_position"], np.float64)
    lo, hi = np.nanpercentile(z, [2, 98])
    f = go.Figure(go.Heatmap(z=z, zmin=lo, zmax=hi, colorscale="Magma"))
    f.update_layout(title="Mean attention-output norm (colour limits: 2nd-98th percentile)", xaxis_title="position",
                    yaxis_title="layer")  # fmt: skip
    figs["norm_heatmap"] = f
    figs["norm_by_position"] = go.Figure(go.Scatter(y=m["norm_mean_by_position"], mode="lines+markers")).update_layout(
        title="Mean norm by position (average over layers)", xaxis_title="position", yaxis_title="norm"
    )
    slopes = [b["slope"] for b in m["position_fit_by_layer"]]
    b1 = [b["t-1"] for b in m["previous_norm_betas_by_layer"]]
    b2 = [b["t-2"] for b in m["previous_norm_betas_by_layer"]]
    f = go.Figure([go.Bar(y=slopes, name="slope of log mean norm on position (left axis)")])
    f.add_scatter(y=b1, name="coefficient of log-norm at t-1 (right axis)", mode="lines+markers", yaxis="y2")
    f.add_scatter(y=b2, name="coefficient of log-norm at t-2 (right axis)", mode="lines+markers", yaxis="y2")
    f.update_layout(
        title="Per-layer fits: position trend and previous-token regression",
        xaxis_title="layer",
        yaxis={"title": "slope (log norm per position)"},
        yaxis2={"title": "regression coefficient", "overlaying": "y", "side": "right"},
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "x": 0},
    )
    figs["fits"] = f
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


# what hook_attn_out is, by normalisation placement: comparable across models only within one group
_ATTN_OUT_MEANING = {
    "pre-LN": "what attention adds to the residual stream",
    "output-norm": "what attention adds, after a norm on its output",
    "sandwich": "what attention adds, after a norm on its output",
    "post-LN": "the attention block's output after the residual add and LayerNorm",
}


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same texts).

    Norms scale with width, so models are compared on the log RMS (``log(norm / sqrt(d_model))``, the
    mean log-norm minus ``log sqrt(d_model)``). Attention outputs of models with different
    normalisation placements are different quantities (a post-LN encoder's is taken after LayerNorm;
    output norms and sandwich norms normalise what attention adds): such a figure says so in its
    title and legend instead of overlaying them silently."""
    f = go.Figure()
    meanings = {}
    for model, e in entries.items():
        prov = e.get("provenance", {})
        placement = prov.get("norm_placement", "unchecked")
        meanings[model] = _ATTN_OUT_MEANING.get(placement, f"unchecked ({placement})")
        y = np.asarray(e["metrics"]["lognorm_mean_by_layer"], np.float64)
        d_model = prov.get("d_model")
        y_rms = y - 0.5 * np.log(d_model) if d_model else y
        f.add_scatter(x=block_depth(len(y)), y=y_rms, name=f"{model} [{placement}]", mode="lines+markers")
    title = "Attention-output log RMS (log norm / sqrt(d_model)) by relative depth"
    if len(set(meanings.values())) > 1:
        title += "<br><sup>NOT COMPARABLE: " + "; ".join(f"{m}: {v}" for m, v in meanings.items()) + "</sup>"
    f.update_layout(title=title, yaxis_title="mean log RMS", xaxis_title="relative depth (block l at (l+1)/L)")
    return {"comparison": f}
