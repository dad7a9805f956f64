"""Study 3 -- the logit lens, for masked LMs (the original study used roberta-large) and causal LMs.

The residual stream after the embeddings and after every block (``n_layers + 1`` readout points,
:func:`mechlens.arch.readout_hook_names`) is read out with the model's own head
(:func:`mechlens.arch.readout`: the full MLM head for masked LMs; final LayerNorm with recomputed
statistics + unembed for causal LMs) and reduced over the vocabulary in chunks
(:func:`mechlens.ops.lens_reduce`): ``[layer, batch, pos, d_vocab]`` logits are never held.

Masked: part 1 a single layer unmasked; part 2 the same position replaced by the mask token; part 3
the laminar view (every layer, with a fit of the target log-prob on sqrt(layer)); parts 4-5 every
position masked in turn -- all variants in one batched forward; part 6 a text heatmap.
Causal: per layer and position the top-k, target (next-token) log-prob and rank, entropy and KL to
the final layer; heatmap and rank trajectories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from mechlens import arch, progress
from mechlens.axes import readout_depth
from mechlens.forward import run_cached
from mechlens.loading import provenance_of
from mechlens.ops import LensStats, lens_reduce, stack_layers
from mechlens.options import Options, check_layer, fail, option
from mechlens.stats.regression import sqrt_layer_fit
from mechlens.studies.result import StudyResult, format_values
from mechlens.tokens import TokenBatch, encode


@dataclasses.dataclass
class Config(Options):
    text: str = option("She opened the fridge, took out the eggs, and started cooking breakfast.",
                       "the text read out at every layer", nonempty=True)  # fmt: skip
    position: int = option(8, "masked LMs: text-token index studied in parts 1-3 (8 = ' eggs' in the default text)",
                           ge=0)  # fmt: skip
    layer: int | None = option(None, "masked LMs: readout point of parts 1-2, 0 = embeddings (default: the middle one)",
                               ge=0)  # fmt: skip
    top_k: int = option(5, "top-k predictions kept per layer and position", ge=1)
    batch_size: int = option(64, "sequences per forward pass", ge=1)
    max_chunk_bytes: int = option(128 * 2**20, "memory budget of the vocabulary readout in bytes (>= 1 MiB)",
                                  ge=2**20)  # fmt: skip
    seed: int = option(0, "random seed", ge=0)

    def check_model(self, model) -> None:
        check_layer("layer", self.layer, model.cfg.n_layers + 1, "readout points")
        n_text = len(model.tokenizer(self.text, add_special_tokens=False)["input_ids"])
        if arch.kind_of(model) == "masked" and self.position >= n_text:
            fail("position", f"must be in 0..{n_text - 1} (the text has {n_text} tokens), got {self.position}")
        room = model.cfg.n_ctx - 1 - (1 if arch.kind_of(model) == "masked" else 0)
        if n_text > room:
            fail("text", f"is {n_text} tokens, more than the {room} that fit the model's context: shorten it")
        if self.top_k > model.cfg.d_vocab:
            fail("top_k", f"must be <= {model.cfg.d_vocab} (the vocabulary size), got {self.top_k}")


def lens_stats(
    model,
    batch: TokenBatch,
    targets: torch.Tensor | None,
    *,
    rows: torch.Tensor | None = None,
    k: int = 5,
    entropy: bool = True,
    kl_to_final: bool = False,
    batch_size: int | None = None,
    max_chunk_bytes: int = 128 * 2**20,
) -> LensStats:
    """Every readout point of ``batch`` through the model's head, reduced per (layer, position):
    one forward caching only the ``n_layers + 1`` residual-stream hook points."""
    names = arch.readout_hook_names(model)
    _, acts = run_cached(model, batch, names, batch_size=batch_size, progress="lens forward")
    resid = stack_layers(acts, names)  # [layer, batch, pos, d_model]
    rows = batch.attention_mask.bool() if rows is None else rows
    return lens_reduce(
        resid,
        arch.readout(model),
        targets=targets,
        rows=rows,
        k=k,
        entropy=entropy,
        kl_to_final=kl_to_final,
        max_chunk_bytes=max_chunk_bytes,
        progress=not progress.QUIET,
    )


def next_token_targets(batch: TokenBatch) -> torch.Tensor:
    """``targets[b, p] = tokens[b, p+1]`` where both are real tokens, else -1."""
    t = torch.full_like(batch.tokens, -1)
    both = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
    t[:, :-1] = torch.where(both, batch.tokens[:, 1:], t[:, :-1])
    return t


def sliding_mask_batch(model, batch: TokenBatch) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """One variant per text position of ``batch`` (a single sequence) with that position masked.

    Returns the variants, the masked column of each variant, and the original token there
    (:meth:`mechlens.tokens.TokenBatch.mask_each`)."""
    variants, _, cols, originals = batch.mask_each(arch.mask_id(model))
    return variants, cols, originals


def _decode(model, ids) -> list[str]:
    return [model.tokenizer.decode([int(i)]) for i in ids]


def run_masked(model, cfg: Config, text: str | Sequence[int] | None = None) -> tuple[dict, dict, dict]:
    batch = encode(model, [cfg.text if text is None else text], bos=True)
    cols = torch.nonzero(batch.text_mask[0]).squeeze(-1)
    if not 0 <= cfg.position < len(cols):
        fail("position", f"must be in 0..{len(cols) - 1} (the text has {len(cols)} tokens), got {cfg.position}")
    n_points = model.cfg.n_layers + 1
    layer = n_points // 2 if cfg.layer is None else cfg.layer
    col = int(cols[cfg.position])
    original = int(batch.tokens[0, col])

    # one forward: row 0 the unmasked text (part 1), rows 1.. every text position masked in turn
    # (parts 2-5; row 1 + position is part 2's variant); only the studied cells are read out
    variants, vcols, originals = sliding_mask_batch(model, batch)
    n = len(vcols)
    both = TokenBatch(
        torch.cat([batch.tokens, variants.tokens]),
        torch.cat([batch.attention_mask, variants.attention_mask]),
        torch.cat([batch.text_mask, variants.text_mask]),
        bos=True,
        padding_side="right",
    )
    rows = torch.zeros_like(both.tokens, dtype=torch.bool)
    targets = torch.full_like(both.tokens, -1)
    rows[0, col], targets[0, col] = True, original
    rows[1 + torch.arange(n), vcols] = True
    targets[1 + torch.arange(n), vcols] = originals
    st = lens_stats(
        model,
        both,
        targets,
        rows=rows,
        k=cfg.top_k,
        entropy=False,  # the masked parts report top-k, target and max log-probs and ranks only
        batch_size=cfg.batch_size,
        max_chunk_bytes=cfg.max_chunk_bytes,
    )
    studied = 1 + cfg.position  # the row with the studied position masked

    def point(row: int, layer_: int) -> dict:
        return {
            "predicted": _decode(model, [st.predicted[layer_, row, col]])[0],
            "predicted_logprob": float(st.max_logprob[layer_, row, col]),
            "target_logprob": float(st.target_logprob[layer_, row, col]),
            "target_rank": int(st.target_rank[layer_, row, col]),
        }

    laminar_target = st.target_logprob[:, studied, col].numpy()
    laminar_max = st.max_logprob[:, studied, col].numpy()
    idx = (slice(None), 1 + torch.arange(n), vcols)
    s_target, s_max = st.target_logprob[idx].numpy(), st.max_logprob[idx].numpy()  # [layer, n_pos]
    s_rank, s_pred = st.target_rank[idx].numpy(), st.predicted[idx].numpy()
    slopes_target = [sqrt_layer_fit(s_target[:, p])["slope"] for p in range(n)]
    slopes_max = [sqrt_layer_fit(s_max[:, p])["slope"] for p in range(n)]
    words = _decode(model, originals)
    metrics = {
        "kind": "masked",
        "text_tokens": words,
        "position": cfg.position,
        "position_token": _decode(model, [original])[0],
        "layer": layer,
        "part1_unmasked": point(0, layer),
        "part2_masked": point(studied, layer),
        "predicted_by_layer_masked": _decode(model, st.predicted[:, studied, col]),
        "target_logprob_by_layer": laminar_target.tolist(),
        "max_logprob_by_layer": laminar_max.tolist(),
        "target_rank_by_layer": st.target_rank[:, studied, col].tolist(),
        "target_logprob_by_layer_unmasked": st.target_logprob[:, 0, col].tolist(),
        "sqrt_layer_fit": sqrt_layer_fit(laminar_target),
        "sqrt_layer_fit_max": sqrt_layer_fit(laminar_max),
        "predicted_tokens": [_decode(model, s_pred[li]) for li in range(n_points)],
        "sliding_target_logprob": s_target.tolist(),
        "sliding_max_logprob": s_max.tolist(),
        "sliding_target_rank": s_rank.tolist(),
        "slopes_by_position": {"target": slopes_target, "max": slopes_max},
        "final_top1_accuracy_sliding": float((s_pred[-1] == originals.numpy()).mean()),
    }
    tables = {
        "sliding": [
            {"layer": li, "position": p, "token": words[p], "predicted": metrics["predicted_tokens"][li][p],
             "target_logprob": float(s_target[li, p]), "max_logprob": float(s_max[li, p]), "rank": int(s_rank[li, p])}
            for li in range(n_points) for p in range(n)
        ],
    }  # fmt: skip
    figs = {
        "laminar": _laminar_figure(metrics),
        "heatmap": text_heatmap(metrics["predicted_tokens"], s_max, s_target, s_rank, words, "Masked-LM lens"),
    }
    return metrics, tables, figs


def run_causal(model, cfg: Config, text: str | Sequence[int] | None = None) -> tuple[dict, dict, dict]:
    batch = encode(model, [cfg.text if text is None else text], bos=True)
    targets = next_token_targets(batch)
    st = lens_stats(model, batch, targets, k=cfg.top_k, kl_to_final=True, max_chunk_bytes=cfg.max_chunk_bytes)
    n_pos = int(batch.lengths[0]) - 1  # positions with a next token
    sl = (slice(None), 0, slice(0, n_pos))
    t_lp, m_lp = st.target_logprob[sl].numpy(), st.max_logprob[sl].numpy()
    rank, pred = st.target_rank[sl].numpy(), st.predicted[sl].numpy()
    n_points = model.cfg.n_layers + 1
    words = _decode(model, batch.tokens[0, : n_pos + 1])
    next_words = words[1:]
    metrics = {
        "kind": "causal",
        "text_tokens": words,
        "predicted_tokens": [_decode(model, pred[li]) for li in range(n_points)],
        "topk_by_layer": [[_decode(model, st.topk_ids[li, 0, p]) for p in range(n_pos)] for li in range(n_points)],
        "target_logprob": t_lp.tolist(),
        "rank": rank.tolist(),
        "entropy": st.entropy[sl].tolist(),
        "kl_to_final": st.kl_to_final[sl].tolist(),
        "target_logprob_by_layer": t_lp.mean(1).tolist(),
        "max_logprob_by_layer": m_lp.mean(1).tolist(),
        "rank_by_layer": np.median(rank, 1).tolist(),
        "entropy_by_layer": st.entropy[sl].mean(1).tolist(),
        "kl_to_final_by_layer": st.kl_to_final[sl].mean(1).tolist(),
        "sqrt_layer_fit": sqrt_layer_fit(t_lp.mean(1)),
        "slopes_by_position": {
            "target": [sqrt_layer_fit(t_lp[:, p])["slope"] for p in range(n_pos)],
            "max": [sqrt_layer_fit(m_lp[:, p])["slope"] for p in range(n_pos)],
        },
        "final_top1_accuracy": float((pred[-1] == batch.tokens[0, 1 : n_pos + 1].numpy()).mean()),
    }
    tables = {
        "lens": [
            {"layer": li, "position": p, "token": words[p], "next_token": next_words[p],
             "predicted": metrics["predicted_tokens"][li][p], "target_logprob": float(t_lp[li, p]),
             "rank": int(rank[li, p]), "entropy": metrics["entropy"][li][p],
             "kl_to_final": metrics["kl_to_final"][li][p]}
            for li in range(n_points) for p in range(n_pos)
        ]
    }  # fmt: skip
    f = go.Figure([go.Scatter(x=list(range(n_points)), y=np.maximum(rank[:, p], 0) + 1, name=f"{p}: {next_words[p]!r}",
                              mode="lines+markers") for p in range(n_pos)])  # fmt: skip
    f.update_layout(title="Rank of the next token by layer (1 = top)", xaxis_title="readout point (0 = embeddings)",
                    yaxis_type="log", yaxis_title="rank + 1")  # fmt: skip
    figs = {
        "laminar": _laminar_figure(metrics),
        "heatmap": text_heatmap(metrics["predicted_tokens"], m_lp, t_lp, rank, words[:n_pos], "Causal lens"),
        "rank_trajectories": f,
    }
    return metrics, tables, figs


def run(model, cfg: Config | None = None, text: str | Sequence[int] | None = None) -> StudyResult:
    """The lens on ``cfg.text``, or on ``text``: a string, or the text's token ids exactly as another
    tool fed them (without special tokens: mechlens adds ``<s> ... </s>`` or BOS as for a string)."""
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    kind = arch.kind_of(model)
    metrics, tables, figs = (run_masked if kind == "masked" else run_causal)(model, cfg, text)
    prov = provenance_of(model).replace(bos="prepend", padding_side="right", seed=cfg.seed)
    res = StudyResult("lens", prov.model, metrics, prov.to_dict(), dataclasses.asdict(cfg), tables)
    res.figures = figs
    return res


def _laminar_figure(m: dict) -> go.Figure:
    y = np.asarray(m["target_logprob_by_layer"])
    x = np.arange(len(y))
    f = go.Figure()
    f.add_scatter(x=x, y=y, mode="lines+markers", name="target log-prob")
    f.add_scatter(x=x, y=m["max_logprob_by_layer"], mode="lines+markers", name="max log-prob")
    fit = m["sqrt_layer_fit"]
    f.add_scatter(x=x, y=fit["fitted"], mode="lines", line_dash="dash",
                  name=f"{fit['intercept']:.2f} + {fit['slope']:.2f}·sqrt(layer)")  # fmt: skip
    f.update_layout(title="Log-prob by layer", xaxis_title="readout point (0 = embeddings)", yaxis_title="log-prob")
    return f


def text_heatmap(predicted, max_lp, target_lp, rank, words, title) -> go.Figure:
    """Layers x positions of predicted tokens, coloured by min-max scaled max log-prob."""
    z = np.asarray(max_lp, dtype=np.float64)
    scaled = (z - np.nanmin(z)) / max(np.nanmax(z) - np.nanmin(z), 1e-12)
    custom = np.stack([np.asarray(target_lp), np.asarray(rank), z], -1)
    shown = [[t if len(t) <= 9 else t[:8] + "…" for t in row] for row in predicted]  # cells stay legible
    f = go.Figure(
        go.Heatmap(
            z=scaled,
            x=[f"{i}:{w}" for i, w in enumerate(words)],
            y=list(range(len(z))),
            text=shown,
            texttemplate="%{text}",
            textfont={"size": 11},
            customdata=np.concatenate([custom.astype(object), np.asarray(predicted, dtype=object)[..., None]], -1),
            colorscale="Viridis",
            colorbar={"title": "scaled"},
            hovertemplate="layer %{y}, %{x}<br>predicted %{customdata[3]} (log-prob %{customdata[2]:.2f})"
            "<br>original token log-prob %{customdata[0]:.2f}, rank %{customdata[1]}<extra></extra>",
        )
    )
    f.update_layout(title=f"{title}: predicted tokens (colour: max log-prob, min-max scaled over these cells)",
                    yaxis_title="readout point (0 = embeddings)", xaxis_title="position: original token",
                    width=max(800, 80 * len(words) + 200), height=max(400, 45 * len(z) + 200),
                    xaxis={"tickangle": -45})  # fmt: skip
    return f


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    fit = m["sqrt_layer_fit"]
    lp = m["target_logprob_by_layer"]
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
    else:
        kl = m["kl_to_final_by_layer"]
        lines.append(
            f"The last layer predicts the next token at {100 * m['final_top1_accuracy']:.0f}% of positions; KL "
            f"to the final layer falls from {kl[0]:.2f} nats at the embeddings to {kl[-2]:.2f} one layer before it."
        )
    return lines


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same text)."""
    f = go.Figure()
    for model, e in entries.items():
        y = e["metrics"]["target_logprob_by_layer"]
        f.add_scatter(x=readout_depth(len(y)), y=y, name=f"{model} ({e['metrics']['kind']})", mode="lines+markers")
    f.update_layout(title="Lens: target log-prob by relative depth", yaxis_title="log-prob",
                    xaxis_title="relative depth (readout point i of L+1 at i/L)")  # fmt: skip
    return {"comparison": f}
