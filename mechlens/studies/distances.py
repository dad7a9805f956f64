"""Study 5 -- distances, mutual information and token position (original: gpt2-large on Wikipedia's
"Turkish coffee" page).

Part 1 Minkowski L1/L2 vs scipy; part 2 MI on synthetic nonlinear data (2-D histogram in bits vs
sklearn kNN in nats, by bin count, and the Pearson correlation that misses the relation); part 3 the
target token's occurrences in a long text and the attention / MLP outputs there for every layer;
part 4 pairwise [MI, L1, L2] at one layer against position distance; part 5 Kendall tau over the
upper triangle; part 6 the layer sweep; part 7 short contexts ending at each target, output norms
per layer and MI between every pair of layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
import scipy.stats
import torch
from plotly.subplots import make_subplots

from mechlens import arch
from mechlens.axes import block_depth
from mechlens.data import load_texts
from mechlens.errors import DataError, TokenError
from mechlens.forward import run_cached
from mechlens.loading import provenance_of
from mechlens.ops import stack_layers, vector_norm
from mechlens.options import Options, check_layer, option
from mechlens.stats.distance import minkowski, pairwise_minkowski
from mechlens.stats.information import mi_histogram, mi_knn, pairwise_mi
from mechlens.studies.result import StudyResult, format_values
from mechlens.tokens import Texts, TokenBatch, encode, single_token_id, target_positions

MEASURES = ("MI", "L1", "L2")
KINDS = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}


@dataclasses.dataclass
class Config(Options):
    data: str = option("coffee", "text source; its first text is the document studied (mechlens list)",
                       nonempty=True)  # fmt: skip
    target: str = option(" coffee", "the token whose occurrences are compared (exactly one token)", nonempty=True)
    n_targets: int = option(10, "occurrences of the target used (kNN mutual information needs >= 4)", ge=4)
    layer: int | None = option(None, "block of parts 4-5 (default: the middle one)", ge=0)
    n_context: int = option(12, "part 7: tokens per context ending at each target", ge=1)
    bos: bool = option(True, "prepend BOS")
    mi_bins: tuple[int, ...] = option((4, 6, 8, 10, 12, 16, 20, 24), "bin counts of the histogram MI (each >= 2)",
                                      ge=2, nonempty=True)  # fmt: skip
    n_synthetic: int = option(2000, "points of the synthetic MI example", ge=20)
    n_jobs: int = option(1, "parallel jobs for scikit-learn's kNN MI", ge=1)
    seed: int = option(0, "random seed", ge=0)

    def check_model(self, model) -> None:
        check_layer("layer", self.layer, model.cfg.n_layers, "blocks")
        single_token_id(model, self.target, flag="--target")


def synthetic_mi(cfg: Config) -> dict:
    """Part 2: y = x^2 + noise with symmetric x: strong dependence, near-zero Pearson correlation."""
    rng = np.random.default_rng(cfg.seed)
    x = rng.uniform(-2, 2, cfg.n_synthetic)
    y = x**2 + rng.normal(0, 0.3, cfg.n_synthetic)
    return {
        "mi_histogram_bits_by_bins": {int(b): mi_histogram(x, y, b) for b in cfg.mi_bins},
        "mi_knn_nats": mi_knn(x, y, cfg.seed),
        "pearson_r": float(scipy.stats.pearsonr(x, y)[0]),
        "minkowski_demo": {
            "L1": minkowski(torch.tensor(x[:10]), torch.tensor(y[:10]), 1),
            "L2": minkowski(torch.tensor(x[:10]), torch.tensor(y[:10]), 2),
        },
    }


def upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(len(m), 1)]


def pair_measures(acts: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
    """[MI, L1, L2] between every pair of rows of ``acts [n_targets, d_model]``."""
    t = torch.from_numpy(acts)
    return {
        "MI": pairwise_mi(acts, cfg.seed, cfg.n_jobs),
        "L1": pairwise_minkowski(t, 1).numpy(),
        "L2": pairwise_minkowski(t, 2).numpy(),
    }


def kendall(measure: np.ndarray, pos_dist: np.ndarray) -> tuple[float, float]:
    res = scipy.stats.kendalltau(upper(measure), upper(pos_dist))
    return float(res.statistic), float(res.pvalue)


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    text = (load_texts(cfg.data) if texts is None else texts)[0]
    target = single_token_id(model, cfg.target)
    special = int(cfg.bos) + (1 if arch.kind_of(model) == "masked" else 0)  # BOS/<s> and </s> count too
    batch = encode(model, [text], bos=cfg.bos, max_tokens=model.cfg.n_ctx - special)
    found = target_positions(batch, target)[:, 1]
    if len(found) < 2:
        raise TokenError(
            f"--target {cfg.target!r} occurs {len(found)} time(s) in --data {cfg.data}: it needs at least "
            f"{cfg.n_targets}; choose another --target or --data"
        )
    if len(found) < cfg.n_targets:
        raise DataError(
            f"--target {cfg.target!r} occurs {len(found)} times in --data {cfg.data}, fewer than --n-targets "
            f"{cfg.n_targets}: lower --n-targets"
        )
    cols = found[: cfg.n_targets]
    n_layers = model.cfg.n_layers
    layer = n_layers // 2 if cfg.layer is None else cfg.layer
    names = {k: [f"blocks.{i}.{h}" for i in range(n_layers)] for k, h in KINDS.items()}
    _, acts = run_cached(model, batch, names["attn"] + names["mlp"], progress="study 5 forward")
    at = {k: stack_layers(acts, v)[:, 0, cols].double().numpy() for k, v in names.items()}  # [layer, n_t, d]
    pos = batch.positions[0, cols].numpy()
    pos_dist = np.abs(pos[:, None] - pos[None, :]).astype(np.float64)

    # parts 4-5: one layer
    dist = {k: pair_measures(at[k][layer], cfg) for k in KINDS}
    taus = {k: {mname: kendall(v, pos_dist) for mname, v in d.items()} for k, d in dist.items()}
    # part 6: layer sweep
    sweep = {k: {m: {"mean_normalised": [], "tau": [], "p": []} for m in MEASURES} for k in KINDS}
    for k in KINDS:
        for li in range(n_layers):
            d = dist[k] if li == layer else pair_measures(at[k][li], cfg)
            for mname in MEASURES:
                u = upper(d[mname])
                tau, p = kendall(d[mname], pos_dist)
                sweep[k][mname]["mean_normalised"].append(float((u / max(u.max(), 1e-300)).mean()))
                sweep[k][mname]["tau"].append(tau)
                sweep[k][mname]["p"].append(p)
    # part 7: contexts of n_context tokens ending at each target; output norms at the target per layer
    starts = np.clip(cols.numpy() - cfg.n_context + 1, 0, None)
    ctx_ids = [batch.tokens[0, s : c + 1].tolist() for s, c in zip(starts, cols.tolist(), strict=True)]
    ctx_batch = _left_aligned(model, ctx_ids, batch)
    _, cacts = run_cached(model, ctx_batch, names["attn"] + names["mlp"])
    last = ctx_batch.attention_mask.sum(-1) - 1
    rows = torch.arange(len(ctx_ids))
    norms = {k: vector_norm(stack_layers(cacts, v)[:, rows, last]).double().numpy() for k, v in names.items()}
    interlayer = {k: pairwise_mi(norms[k], cfg.seed, cfg.n_jobs) for k in KINDS}  # [layer, layer]
    gaps = np.abs(np.arange(n_layers)[:, None] - np.arange(n_layers)[None, :])
    mi_vs_gap = {
        k: [float(upper(v)[upper(gaps) == g].mean()) for g in range(1, n_layers)] for k, v in interlayer.items()
    }

    metrics = {
        "synthetic": synthetic_mi(cfg),
        "target": {"string": cfg.target, "id": target, "occurrences": len(found)},
        "target_positions": pos.tolist(),
        "layer": layer,
        "distance_matrices": {k: {m: v.tolist() for m, v in d.items()} for k, d in dist.items()},
        "position_distance": pos_dist.tolist(),
        "kendall_tau": {k: {m: {"tau": t, "p": p} for m, (t, p) in d.items()} for k, d in taus.items()},
        "kendall_tau_by_layer": {k: {m: v["tau"] for m, v in d.items()} for k, d in sweep.items()},
        "kendall_p_by_layer": {k: {m: v["p"] for m, v in d.items()} for k, d in sweep.items()},
        "mean_normalised_distance_by_layer": {
            k: {m: v["mean_normalised"] for m, v in d.items()} for k, d in sweep.items()
        },
        "context_norms": {k: v.tolist() for k, v in norms.items()},
        "interlayer_mi": {k: v.tolist() for k, v in interlayer.items()},
        "interlayer_mi_by_gap": mi_vs_gap,
    }  # fmt: skip
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    tables = {
        "pairs": [
            {"kind": k, "i": i, "j": j, "position_distance": pos_dist[i, j], **{m: dist[k][m][i, j] for m in MEASURES}}
            for k in KINDS for i in range(len(pos)) for j in range(i + 1, len(pos))
        ],
        "layer_sweep": [
            {"kind": k, "layer": li, "measure": m, "tau": sweep[k][m]["tau"][li], "p": sweep[k][m]["p"][li],
             "mean_normalised": sweep[k][m]["mean_normalised"][li]}
            for k in KINDS for m in MEASURES for li in range(n_layers)
        ],
    }  # fmt: skip
    res = StudyResult("distances", prov.model, metrics, prov.to_dict(), dataclasses.asdict(cfg), tables)
    res.figures = figures(metrics, dist, pos_dist)
    return res


def _left_aligned(model, ids: list[list[int]], like: TokenBatch) -> TokenBatch:
    """Contexts cut from an encoded text (already BOS-prefixed where the text was) as a right-padded
    batch: each context keeps its own ids, text mask true everywhere but padding."""
    width = max(map(len, ids))
    pad = like.tokens[0, 0].item() if like.bos else model.tokenizer.pad_token_id or 0
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        tokens[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
    return TokenBatch(tokens, attn, attn.bool(), bos=False, padding_side="right")


def figures(m: dict, dist: dict, pos_dist: np.ndarray) -> dict[str, go.Figure]:
    figs = {}
    syn = m["synthetic"]
    bins = list(syn["mi_histogram_bits_by_bins"])
    f = go.Figure(go.Scatter(x=bins, y=list(syn["mi_histogram_bits_by_bins"].values()), mode="lines+markers",
                             name="2-D histogram estimate"))  # fmt: skip
    knn_bits, r = syn["mi_knn_nats"] / np.log(2), syn["pearson_r"]
    f.add_hline(y=knn_bits, line_dash="dash", annotation_text=f"kNN estimate {knn_bits:.3f} bits")
    title = f"Mutual information of y = x² + noise, in bits, by bin count (Pearson r {r:.3f})"
    figs["mi_by_bins"] = f.update_layout(title=title, xaxis_title="bins per axis", yaxis_title="MI (bits)")
    for normalised in (False, True):
        f = make_subplots(rows=2, cols=3, subplot_titles=[f"{k} {mm}" for k in KINDS for mm in MEASURES])
        for r, k in enumerate(KINDS):
            for c, mm in enumerate(MEASURES):
                y = upper(dist[k][mm])
                y = y / max(y.max(), 1e-300) if normalised else y
                f.add_scatter(x=upper(pos_dist), y=y, mode="markers", row=r + 1, col=c + 1, showlegend=False)
                f.update_xaxes(title_text="position distance (tokens)", row=r + 1, col=c + 1)
                unit = "MI (nats)" if mm == "MI" else f"{mm} distance"
                f.update_yaxes(title_text=f"{unit} / max" if normalised else unit, row=r + 1, col=c + 1)
        title = "max-normalised " if normalised else ""
        f.update_layout(title=f"Pairwise {title}measures vs position distance (layer {m['layer']})")
        figs["pairs_normalised" if normalised else "pairs"] = f
    f = make_subplots(rows=1, cols=2, subplot_titles=["Kendall tau by layer", "mean max-normalised measure"])
    for k in KINDS:
        for mm in MEASURES:
            f.add_scatter(y=m["kendall_tau_by_layer"][k][mm], name=f"{k} {mm}", mode="lines+markers", row=1, col=1)
            f.add_scatter(y=m["mean_normalised_distance_by_layer"][k][mm], name=f"{k} {mm}", mode="lines+markers",
                          row=1, col=2, showlegend=False)  # fmt: skip
    for c in (1, 2):
        f.update_xaxes(title_text="layer", row=1, col=c)
    f.update_yaxes(title_text="Kendall tau vs position distance", row=1, col=1)
    f.update_yaxes(title_text="mean of measure / its max", row=1, col=2)
    f.update_layout(title="Layer sweep: attention vs MLP outputs")
    figs["layer_sweep"] = f
    f = make_subplots(rows=1, cols=2, subplot_titles=["attention", "MLP"])
    for c, k in enumerate(KINDS):
        f.add_heatmap(z=m["interlayer_mi"][k], row=1, col=c + 1, coloraxis="coloraxis")
        f.update_xaxes(title_text="layer", row=1, col=c + 1)
        f.update_yaxes(title_text="layer", row=1, col=c + 1)
    f.update_layout(title="MI (nats, kNN) between layers' output norms at the target",
                    coloraxis={"colorscale": "Viridis", "colorbar": {"title": "nats"}})  # fmt: skip
    figs["interlayer_mi"] = f
    return figs


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    tau = m["kendall_tau_by_layer"]
    syn = m["synthetic"]
    best = {k: int(np.nanargmax(np.asarray(tau[k]["L2"], np.float64))) for k in tau}
    return [
        f"Kendall tau (attn L2) by layer {format_values(tau['attn']['L2'])}",
        f"Between the {len(m['target_positions'])} occurrences of {m['target']['string']!r}, the L2 distance of "
        f"attention outputs tracks their distance in the text most at layer {best['attn']} (Kendall tau "
        f"{tau['attn']['L2'][best['attn']]:.2f}); for MLP outputs at layer {best['mlp']} "
        f"({tau['mlp']['L2'][best['mlp']]:.2f}).",
        f"On the synthetic y = x² + noise, kNN mutual information is {syn['mi_knn_nats']:.2f} nats while the Pearson "
        f"correlation is {syn['pearson_r']:.2f}: a dependence correlation misses.",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same text)."""
    f = go.Figure()
    for model, e in entries.items():
        for kind in ("attn", "mlp"):
            y = e["metrics"]["kendall_tau_by_layer"][kind]["L2"]
            f.add_scatter(x=block_depth(len(y)), y=y, name=f"{model} {kind}", mode="lines+markers")
    f.update_layout(title="Kendall tau (L2 vs position distance) by relative depth",
                    xaxis_title="relative depth (block l at (l+1)/L)", yaxis_title="tau")  # fmt: skip
    return {"comparison": f}
