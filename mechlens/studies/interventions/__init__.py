"""Study 6 -- interventions: which components cause a prediction.

Prompt pairs ``(clean, corrupt, target, foil)`` (built-in: seeded induction pairs; ``--data``: a .jsonl,
.csv or .parquet file with those columns); the metric is the logit difference ``LD = logit[target] -
logit[foil]`` at the answer column (the last token of a causal LM's prompt, the ``<mask>`` of a masked
LM's). Part 1 direct logit attribution of the embeddings, each attention and MLP output and each head
(causal LMs with a linear readout; refused in one line otherwise): :func:`direct_logit_attribution`.
Part 2 zero, mean and resample ablation of each component and head: :func:`ablation`. Part 3 activation
patching, clean into corrupt (``denoise``) and corrupt into clean (``noise``), on a layer x position
grid of ``hook_resid_pre``, ``hook_attn_out``, ``hook_mlp_out`` and per head, batched (one forward
carries many patched rows): :func:`activation_patching`. Part 4 attribution patching, its first-order
estimate, with its error against part 3 on the same cells: :func:`attribution_patching`. :func:`run`
composes the parts into an :class:`InterventionsResult`; :func:`samples` gives per-pair statistics by
layer for depth-aligned comparisons with bootstrap intervals.

Conventions: causal LMs get BOS, masked LMs ``<s> ... </s>``; the two prompts of a pair must tokenize
to the same length (refused in one line naming the pair otherwise); every intervention goes through
TransformerLens hook points. In post-LN encoders (BERT, RoBERTa) ``hook_attn_out`` is the attention
block's output after the residual add and LayerNorm (see :mod:`mechlens.arch`): patching and ablating it
replace the whole stream at that point, not an additive term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mechlens.axes import block_depth, readout_depth
from mechlens.loading import provenance_of
from mechlens.options import Options, fail, option
from mechlens.result import StudyResult, metrics_of, sample_table
from mechlens.studies.interventions.figures import figures
from mechlens.studies.interventions.lesson import LESSON
from mechlens.studies.interventions.parts import (
    GRIDS,
    Ablation,
    AttributionPatching,
    DirectLogitAttribution,
    Patching,
    PromptPairs,
    RawPair,
    ablation,
    activation_patching,
    activations,
    all_hooks,
    attribution_patching,
    direct_logit_attribution,
    dla_refusal,
    encode_pairs,
    induction_pairs,
    iter_induction_pairs,
    iter_pairs,
    read_pairs,
)
from mechlens.studies.interventions.stream import Intervals, accumulate, finish, stream_width

__all__ = [
    "LESSON",
    "Ablation",
    "AttributionPatching",
    "Config",
    "DirectLogitAttribution",
    "Intervals",
    "InterventionsResult",
    "Patching",
    "PromptPairs",
    "RawPair",
    "ablation",
    "activation_patching",
    "activations",
    "all_hooks",
    "attribution_patching",
    "compare",
    "direct_logit_attribution",
    "figures",
    "headline",
    "load_pairs",
    "run",
    "samples",
]


@dataclasses.dataclass
class Config(Options):
    data: str | None = option(
        None,
        "prompt pairs: a .jsonl, .csv or .parquet file with the columns clean, corrupt, "
        "target, foil (default: seeded induction pairs)",
    )
    n_pairs: int = option(16, "prompt pairs: built-in pairs generated, or the first rows of --data", ge=1)
    segment_length: int = option(6, "tokens of the repeated segment of the built-in induction pairs", ge=2)
    rows_per_forward: int = option(512, "patched rows carried by one forward pass", ge=1)
    seed: int = option(
        0, "random seed (the built-in pairs, the resample ablation, the kept pairs, the bootstrap)", ge=0
    )
    batch_size: int = option(
        64, "prompt pairs per batch (pairs stream); the first batch is the mean and resample ablations' reference", ge=1
    )
    reservoir: int = option(
        1000,
        "pairs kept (a seeded uniform sample) for the bootstrap intervals and the "
        "per-pair samples; means are over every pair",
        ge=2,
    )
    n_resamples: int = option(2000, "bootstrap resamples of the intervals over pairs", ge=100)

    def check(self) -> None:
        if self.data is not None and not self.data.strip():
            fail("data", "must not be empty")

    def check_data(self) -> None:
        """Cheap checks of ``--data`` before any model is loaded: the file, its type and its columns."""
        if self.data is not None:
            read_pairs(self.data, 1)

    def check_model(self, model) -> None:
        """Every pair encodes for ``model`` (equal lengths, one-token targets, the mask): before any forward
        (streamed batch by batch: memory does not grow with the pairs)."""
        stream_width(model, pair_stream(model, self), self.batch_size, pair_source(self))


def pair_source(cfg: Config) -> str:
    return f"induction (segment {cfg.segment_length}, seed {cfg.seed})" if cfg.data is None else cfg.data


def pair_stream(model, cfg: Config) -> Callable[[], Iterator[RawPair]]:
    """A fresh stream of the config's raw pairs per call (the built-in generator, or ``--data`` read in chunks)."""
    if cfg.data is None:
        return lambda: iter_induction_pairs(model, cfg.n_pairs, cfg.segment_length, cfg.seed)
    return lambda: iter_pairs(cfg.data, cfg.n_pairs)


def load_pairs(model, cfg: Config) -> PromptPairs:
    """The config's pairs, checked and encoded for ``model``, in one batch (small runs, tests)."""
    if cfg.data is None:
        raw = induction_pairs(model, cfg.n_pairs, cfg.segment_length, cfg.seed)
        return encode_pairs(model, raw, pair_source(cfg))
    return encode_pairs(model, read_pairs(cfg.data, cfg.n_pairs), cfg.data)


@dataclasses.dataclass(frozen=True)
class InterventionsResult:
    """The study's typed result (its metrics: every field but the per-pair arrays). ``dla`` is None where
    ``dla_refusal`` says why (masked LMs, soft-capped logits). Means are over all ``n_pairs`` pairs; the
    parts' per-pair arrays and ``intervals`` are over the kept pairs (``intervals.pair_index``).
    ``strongest``: the three largest effects (by absolute mean) of each part, each with its interval."""

    n_pairs: int
    source: str
    ld_clean_mean: float
    ld_corrupt_mean: float
    dla: DirectLogitAttribution | None
    dla_refusal: str | None
    ablation: Ablation
    denoise: Patching
    noise: Patching
    attribution: AttributionPatching
    intervals: Intervals
    strongest: dict[str, Any]


TOP = 3  # effects named per part in ``strongest`` and the headline


def _top(values, k: int = TOP) -> list[tuple[int, ...]]:
    """Indices of the ``k`` largest finite ``|values|`` (descending)."""
    arr = np.asarray(values, dtype=float)
    flat = np.where(np.isfinite(arr), np.abs(arr), -np.inf).ravel()
    order = [i for i in np.argsort(-flat, kind="stable") if np.isfinite(flat[i])][:k]
    return [tuple(int(j) for j in np.unravel_index(i, arr.shape)) for i in order]


def _at(ci, where: tuple[int, ...]) -> list:
    for i in where:
        ci = ci[i]
    return ci


def _grid(rows) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _strongest(dla, abl: Ablation, den: Patching, ci: Intervals) -> dict[str, Any]:
    """The :data:`TOP` largest effects of each part by ``|mean|``, with their intervals over pairs."""
    out: dict[str, Any] = {}
    cells = [(g, i, j, v) for g in GRIDS if g != "resid_pre" for (i, j), v in np.ndenumerate(_grid(den.restored[g]))]
    order = _top([v for *_, v in cells], TOP)
    out["patch_component"] = [
        {"hook": g, "layer": i, "position": j, "restored": float(v), "ci": _at(ci.denoise_restored[g], (i, j))}
        for g, i, j, v in (cells[k] for (k,) in order)
    ]
    if den.head_restored is not None:
        out["patch_head"] = [
            {
                "layer": i,
                "head": j,
                "restored": float(den.head_restored[i, j]),
                "ci": _at(ci.denoise_head_restored, (i, j)),
            }
            for i, j in _top(den.head_restored.numpy())
        ]
    out["ablation"] = [
        {
            "method": abl.methods[i],
            "component": abl.components[j],
            "logprob_drop": float(abl.logprob_drop_mean[i, j]),
            "ci": _at(ci.ablation_logprob_drop, (i, j)),
        }
        for i, j in _top(abl.logprob_drop_mean.numpy())
    ]
    if dla is not None:
        out["dla"] = [
            {"component": dla.components[k], "contribution": float(dla.contribution_mean[k]), "ci": _at(ci.dla, (k,))}
            for (k,) in _top(dla.contribution_mean.numpy())
        ]
        if dla.head_mean is not None:
            out["dla_head"] = [
                {"layer": i, "head": j, "contribution": float(dla.head_mean[i, j]), "ci": _at(ci.dla_head, (i, j))}
                for i, j in _top(dla.head_mean.numpy())
            ]
    return out


def run(model, cfg: Config | None = None, pairs: Sequence[RawPair] | None = None) -> StudyResult:
    """The study on the config's pairs, or on ``pairs`` (:class:`RawPair`), streamed in batches of
    ``cfg.batch_size`` (this rank's share under torchrun; :mod:`.stream`). ``result.parts`` is the
    :class:`InterventionsResult`; ``result.metrics`` is derived from it."""
    cfg = cfg or Config()
    if pairs is None:
        raw, source = pair_stream(model, cfg), pair_source(cfg)
    else:
        given = list(pairs)
        raw, source = (lambda: iter(given)), "given pairs"
    refusal = dla_refusal(model)
    acc = accumulate(
        model,
        raw,
        source,
        batch_size=cfg.batch_size,
        reservoir=cfg.reservoir,
        seed=cfg.seed,
        rows_per_forward=cfg.rows_per_forward,
        with_dla=refusal is None,
    )
    n, ld_clean, ld_corrupt, dla, abl, den, noi, att, ci = finish(
        model, acc, n_resamples=cfg.n_resamples, seed=cfg.seed
    )
    parts = InterventionsResult(
        n_pairs=n,
        source=source,
        ld_clean_mean=ld_clean,
        ld_corrupt_mean=ld_corrupt,
        dla=dla,
        dla_refusal=refusal,
        ablation=abl,
        denoise=den,
        noise=noi,
        attribution=att,
        intervals=ci,
        strongest=_strongest(dla, abl, den, ci),
    )
    prov = provenance_of(model).replace(bos="prepend", padding_side="right", seed=cfg.seed)
    tables = {"patching": _patching_rows(parts), "ablation": _ablation_rows(parts)}
    if dla is not None:
        tables["dla"] = [
            {"component": c, "contribution_mean": float(v), "ci_low": lo, "ci_high": hi}
            for c, v, (lo, hi) in zip(dla.components, dla.contribution_mean.tolist(), ci.dla, strict=True)
        ]
    if den.head_restored is not None:
        tables["heads"] = _head_rows(parts)
    res = StudyResult(
        "interventions", prov.model, metrics_of(parts), prov.to_dict(), dataclasses.asdict(cfg), tables, parts=parts
    )
    res.figures = figures(parts)
    return res


def _patching_rows(r: InterventionsResult) -> list[dict[str, Any]]:
    """One row per (direction, grid, layer, position): the fraction restored with its interval, and part
    4's estimate (its change of ``LD`` with its interval, and as a fraction of the gap)."""
    rows = []
    ci = r.intervals
    gap = r.denoise.gap
    for p, rci in ((r.denoise, ci.denoise_restored), (r.noise, ci.noise_restored)):
        for g in GRIDS:
            att = r.attribution.dld_mean[g].numpy()
            for layer, row in enumerate(p.restored[g]):
                for pos, v in enumerate(row):
                    den = p.direction == "denoise"
                    a = float(att[layer, pos]) if den and np.isfinite(att[layer, pos]) else None
                    lo, hi = rci[g][layer][pos]
                    alo, ahi = ci.attribution_dld[g][layer][pos] if den else (None, None)
                    rows.append(
                        {
                            "direction": p.direction,
                            "hook": g,
                            "layer": layer,
                            "position": pos,
                            "restored": v,
                            "ci_low": lo,
                            "ci_high": hi,
                            "attribution_restored": a / gap if a is not None and gap else None,
                            "attribution_dld": a,
                            "attribution_ci_low": alo,
                            "attribution_ci_high": ahi,
                        }
                    )
    return rows


def _ablation_rows(r: InterventionsResult) -> list[dict[str, Any]]:
    """One row per (method, component): the mean log-prob drop and KL with their intervals."""
    a, ci = r.ablation, r.intervals
    return [
        {
            "method": m,
            "component": c,
            "logprob_drop_mean": float(a.logprob_drop_mean[i, j]),
            "ci_low": ci.ablation_logprob_drop[i][j][0],
            "ci_high": ci.ablation_logprob_drop[i][j][1],
            "kl_mean": float(a.kl_mean[i, j]),
            "kl_ci_low": ci.ablation_kl[i][j][0],
            "kl_ci_high": ci.ablation_kl[i][j][1],
        }
        for i, m in enumerate(a.methods)
        for j, c in enumerate(a.components)
    ]


def _head_rows(r: InterventionsResult) -> list[dict[str, Any]]:
    """One row per head: the fraction restored by patching its z (both directions), the attribution
    estimate and the log-prob drop of each ablation, with intervals."""
    ci, rows = r.intervals, []
    n_layers, n_heads = r.denoise.head_restored.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            row = {"layer": layer, "head": head}
            for name, p, c in (
                ("denoise", r.denoise, ci.denoise_head_restored),
                ("noise", r.noise, ci.noise_head_restored),
            ):
                row[f"{name}_restored"] = float(p.head_restored[layer, head])
                row[f"{name}_ci_low"], row[f"{name}_ci_high"] = c[layer][head]
            row["attribution_dld"] = float(r.attribution.head_dld_mean[layer, head])
            row["attribution_ci_low"], row["attribution_ci_high"] = ci.attribution_head_dld[layer][head]
            if r.ablation.head_logprob_drop_mean is not None:
                for i, m in enumerate(r.ablation.methods):
                    row[f"ablation_{m}_logprob_drop"] = float(r.ablation.head_logprob_drop_mean[i, layer, head])
                    lo, hi = ci.ablation_head_logprob_drop[i][layer][head]
                    row[f"ablation_{m}_ci_low"], row[f"ablation_{m}_ci_high"] = lo, hi
            rows.append(row)
    return rows


# -- per-pair samples for cross-model comparison ---------------------------------------------------------


def samples(result: StudyResult) -> pd.DataFrame:
    """Per-pair statistics by layer for :mod:`mechlens.comparison` (unit ``pair``, ``sample`` = the pair's
    global index in the stream: the same pairs for every model of a run, and the same kept pairs, since
    the reservoir keeps pairs by a seeded hash of that index; position and word empty). Over the kept
    pairs (``intervals.pair_index``; all pairs up to ``--reservoir``). Quantities:

    * ``patch_resid_answer``: the change of ``LD`` when the clean ``hook_resid_pre`` of block ``l`` is
      patched into the corrupt run at the answer column (readout point ``l``, depth ``l / L``);
    * ``patch_attn_answer`` / ``patch_mlp_answer``: the same for block ``l``'s attention / MLP output
      (depth ``(l + 1) / L``); ``attribution_resid_answer``: part 4's estimate of ``patch_resid_answer``;
    * ``ablation_{zero,mean,resample}_{attn,mlp}``: the target's log-prob drop when that output is
      ablated (nats);
    * ``dla_embed`` (depth 0), ``dla_attn``, ``dla_mlp``: direct logit attribution (causal LMs only)."""
    r: InterventionsResult = result.parts
    n_layers = r.denoise.dld["resid_pre"].shape[0]
    rd, bd = readout_depth(n_layers + 1), block_depth(n_layers)
    ans = _answers(result)
    index = r.intervals.pair_index.numpy()
    frames = []

    def add(q: str, layer: int | None, depth: float, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        frames.append(
            sample_table(
                q,
                v,
                unit="pair",
                sample=index,
                layer=None if layer is None else [layer] * len(v),
                relative_depth=np.full(len(v), depth),
            )
        )

    pairs = np.arange(len(ans))
    for layer in range(n_layers):
        add("patch_resid_answer", layer, rd[layer], r.denoise.dld["resid_pre"][layer].numpy()[ans, pairs])
        add("attribution_resid_answer", layer, rd[layer], r.attribution.dld["resid_pre"][layer].numpy()[ans, pairs])
        add("patch_attn_answer", layer, bd[layer], r.denoise.dld["attn_out"][layer].numpy()[ans, pairs])
        add("patch_mlp_answer", layer, bd[layer], r.denoise.dld["mlp_out"][layer].numpy()[ans, pairs])
        for i, method in enumerate(r.ablation.methods):
            for j, c in enumerate(("attn", "mlp")):
                add(f"ablation_{method}_{c}", layer, bd[layer], r.ablation.logprob_drop[i, 2 * layer + j].numpy())
    if r.dla is not None:
        add("dla_embed", None, 0.0, r.dla.contribution[:, 0].numpy())
        for layer in range(n_layers):
            add("dla_attn", layer, bd[layer], r.dla.contribution[:, 1 + 2 * layer].numpy())
            add("dla_mlp", layer, bd[layer], r.dla.contribution[:, 2 + 2 * layer].numpy())
    return pd.concat(frames, ignore_index=True)


def _answers(result: StudyResult) -> np.ndarray:
    """Each kept pair's answer column (the last token for causal LMs, the mask for masked LMs)."""
    return result.parts.denoise.answer.numpy()


# -- headline, comparison ---------------------------------------------------------------------------------


def _ci_text(ci) -> str:
    lo, hi = ci if ci else (None, None)
    return "[no interval]" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics: the strongest components of each part with their 95%
    intervals over pairs."""
    s = m["strongest"]
    att = m["attribution"]
    ci = m["intervals"]
    first = (
        f"LD clean {m['ld_clean_mean']:.2f} vs corrupt {m['ld_corrupt_mean']:.2f}; attribution vs exact "
        f"r={att['correlation']:.3f}, max err {att['max_abs_error']:.3g}"
    )
    lines = [first]
    where = f"(mean over {m['n_pairs']} pairs; {ci['confidence']:.0%} bootstrap intervals over {ci['n_kept']} pairs)"
    if s.get("patch_component"):
        top = "; ".join(
            f"{e['hook']} of block {e['layer']} at position {e['position']}: {e['restored']:.2f} {_ci_text(e['ci'])}"
            for e in s["patch_component"]
        )
        lines.append(
            f"Patching the clean activation into the corrupt run restores most of the logit-difference "
            f"gap at {top} {where}."
        )
    if s.get("patch_head"):
        top = "; ".join(f"L{e['layer']}H{e['head']} {e['restored']:.2f} {_ci_text(e['ci'])}" for e in s["patch_head"])
        lines.append(f"The strongest heads (patching their z): {top}.")
    top = "; ".join(
        f"{e['method']}-ablating {e['component']}: {e['logprob_drop']:.2f} {_ci_text(e['ci'])}" for e in s["ablation"]
    )
    lines.append(f"Ablations that change the target's log-prob most (drop, nats): {top}.")
    if m.get("dla_refusal"):
        lines.append(m["dla_refusal"] + ".")
    elif s.get("dla"):
        top = "; ".join(f"{e['component']} {e['contribution']:+.2f} {_ci_text(e['ci'])}" for e in s["dla"])
        lines.append(
            f"Direct contributions to the logit difference: {top}; the contributions add up to it within "
            f"{m['dla']['identity_error']:.1g}."
        )
    lines.append(
        f"Attribution patching estimates the {att['n_cells']} exact denoising cells with correlation "
        f"{att['correlation']:.3f} and largest absolute error {att['max_abs_error']:.3g} (means over "
        "pairs)."
    )
    return lines


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """The fraction restored by patching each block's residual stream at the answer column... per model,
    on relative depth: from the metrics, the mean over the answer columns' grid row."""
    f = go.Figure()
    for name, e in entries.items():
        grid = e["metrics"]["denoise"]["restored"]["resid_pre"]
        n = len(grid)
        ys = [max((v for v in row if v is not None), default=None, key=lambda v: abs(v)) for row in grid]
        f.add_scatter(x=readout_depth(n + 1)[:n].tolist(), y=ys, mode="lines+markers", name=name)
    f.update_layout(
        title="Largest fraction restored by patching hook_resid_pre at one position, per block",
        xaxis_title="relative depth (0 = embeddings, 1 = last block)",
        yaxis_title="fraction restored",
    )
    return {"comparison": f}
