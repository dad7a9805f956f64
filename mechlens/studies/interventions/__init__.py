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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mechlens.axes import block_depth, readout_depth
from mechlens.loading import provenance_of
from mechlens.options import Options, fail, option
from mechlens.result import StudyResult, metrics_of
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
    read_pairs,
)

__all__ = [
    "LESSON",
    "Ablation",
    "AttributionPatching",
    "Config",
    "DirectLogitAttribution",
    "InterventionsResult",
    "Patching",
    "PromptPairs",
    "RawPair",
    "ablation",
    "activation_patching",
    "activations",
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
    data: str | None = option(None, "prompt pairs: a .jsonl, .csv or .parquet file with the columns clean, corrupt, "
                              "target, foil (default: seeded induction pairs)")  # fmt: skip
    n_pairs: int = option(16, "prompt pairs: built-in pairs generated, or the first rows of --data", ge=1)
    segment_length: int = option(6, "tokens of the repeated segment of the built-in induction pairs", ge=2)
    rows_per_forward: int = option(512, "patched rows carried by one forward pass", ge=1)
    seed: int = option(0, "random seed (the built-in pairs, the resample ablation)", ge=0)

    def check(self) -> None:
        if self.data is not None and not self.data.strip():
            fail("data", "must not be empty")

    def check_data(self) -> None:
        """Cheap checks of ``--data`` before any model is loaded: the file, its type and its columns."""
        if self.data is not None:
            read_pairs(self.data, 1)

    def check_model(self, model) -> None:
        """Every pair encodes for ``model`` (equal lengths, one-token targets, the mask): before any forward."""
        load_pairs(model, self)


def load_pairs(model, cfg: Config) -> PromptPairs:
    """The config's pairs, checked and encoded for ``model``."""
    if cfg.data is None:
        raw = induction_pairs(model, cfg.n_pairs, cfg.segment_length, cfg.seed)
        return encode_pairs(model, raw, f"induction (segment {cfg.segment_length}, seed {cfg.seed})")
    return encode_pairs(model, read_pairs(cfg.data, cfg.n_pairs), cfg.data)


@dataclasses.dataclass(frozen=True)
class InterventionsResult:
    """The study's typed result (its metrics: every field but the per-pair arrays). ``dla`` is None where
    ``dla_refusal`` says why (masked LMs, soft-capped logits)."""

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
    strongest: dict[str, Any]


def _strongest(model, dla, abl: Ablation, den: Patching) -> dict[str, Any]:
    """The largest effect of each part, in words-ready form (name, value)."""
    out: dict[str, Any] = {}
    best = None
    for g in GRIDS:
        arr = np.asarray([[np.nan if v is None else v for v in row] for row in den.restored[g]], dtype=float)
        if g == "resid_pre":
            continue
        if np.isfinite(arr).any():
            i, j = np.unravel_index(np.nanargmax(np.abs(arr)), arr.shape)
            if best is None or abs(arr[i, j]) > abs(best[2]):
                best = (g, (int(i), int(j)), float(arr[i, j]))
    if best is not None:
        out["patch_component"] = {"hook": best[0], "layer": best[1][0], "position": best[1][1], "restored": best[2]}
    if den.head_restored is not None:
        hr = den.head_restored.numpy()
        i, j = np.unravel_index(np.nanargmax(np.abs(hr)), hr.shape)
        out["patch_head"] = {"layer": int(i), "head": int(j), "restored": float(hr[i, j])}
    m = abl.logprob_drop_mean.numpy()
    i, j = np.unravel_index(np.argmax(m), m.shape)
    out["ablation"] = {"method": abl.methods[i], "component": abl.components[j], "logprob_drop": float(m[i, j])}
    if dla is not None:
        c = dla.contribution_mean.numpy()
        k = int(np.argmax(np.abs(c)))
        out["dla"] = {"component": dla.components[k], "contribution": float(c[k])}
        if dla.head_mean is not None:
            hm = dla.head_mean.numpy()
            i, j = np.unravel_index(np.argmax(np.abs(hm)), hm.shape)
            out["dla_head"] = {"layer": int(i), "head": int(j), "contribution": float(hm[i, j])}
    return out


def run(model, cfg: Config | None = None, pairs: Sequence[RawPair] | None = None) -> StudyResult:
    """The study on the config's pairs, or on ``pairs`` (:class:`RawPair`). ``result.parts`` is the
    :class:`InterventionsResult`; ``result.metrics`` is derived from it."""
    cfg = cfg or Config()
    pp = load_pairs(model, cfg) if pairs is None else encode_pairs(model, pairs, "given pairs")
    refusal = dla_refusal(model)
    dla = direct_logit_attribution(model, pp) if refusal is None else None
    names = all_hooks(model)
    clean, corrupt = activations(model, pp.clean, names), activations(model, pp.corrupt, names)
    abl = ablation(model, pp, clean, seed=cfg.seed, rows_per_forward=cfg.rows_per_forward)
    den = activation_patching(model, pp, clean, corrupt, "denoise", cfg.rows_per_forward)
    noi = activation_patching(model, pp, clean, corrupt, "noise", cfg.rows_per_forward)
    att = attribution_patching(model, pp, clean, den)
    parts = InterventionsResult(
        n_pairs=len(pp),
        source=pp.source,
        ld_clean_mean=float(den.ld_clean.mean()),
        ld_corrupt_mean=float(den.ld_corrupt.mean()),
        dla=dla,
        dla_refusal=refusal,
        ablation=abl,
        denoise=den,
        noise=noi,
        attribution=att,
        strongest=_strongest(model, dla, abl, den),
    )
    prov = provenance_of(model).replace(bos="prepend", padding_side="right", seed=cfg.seed)
    tables = {"patching": _patching_rows(parts)}
    if dla is not None:
        tables["dla"] = [{"component": c, "contribution_mean": float(v)} for c, v in
                         zip(dla.components, dla.contribution_mean.tolist(), strict=True)]  # fmt: skip
    res = StudyResult("interventions", prov.model, metrics_of(parts), prov.to_dict(), dataclasses.asdict(cfg), tables,
                      parts=parts)  # fmt: skip
    res.figures = figures(parts)
    return res


def _patching_rows(r: InterventionsResult) -> list[dict[str, Any]]:
    """One row per (direction, grid, layer, position): the fraction restored, exact and attribution."""
    rows = []
    att = {g: np.nanmean(r.attribution.dld[g].numpy(), -1) for g in GRIDS}
    gap = r.denoise.gap
    for p in (r.denoise, r.noise):
        for g in GRIDS:
            for layer, row in enumerate(p.restored[g]):
                for pos, v in enumerate(row):
                    a = att[g][layer, pos] / gap if p.direction == "denoise" and gap else None
                    a = None if a is None or not np.isfinite(a) else float(a)
                    rows.append({"direction": p.direction, "hook": g, "layer": layer, "position": pos, "restored": v,
                                 "attribution_restored": a})  # fmt: skip
    return rows


# -- per-pair samples for cross-model comparison ---------------------------------------------------------

SAMPLE_COLUMNS = ["quantity", "layer", "relative_depth", "position", "word", "unit", "sample", "value"]


def samples(result: StudyResult) -> pd.DataFrame:
    """Per-pair statistics by layer for :mod:`mechlens.comparison` (unit ``pair``, ``sample`` = the pair's
    index: the same pairs for every model of a run; position and word empty). Quantities:

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
    frames = []

    def add(q: str, layer: int | None, depth: float, values) -> None:
        v = np.asarray(values, dtype=np.float64)
        n = len(v)
        frames.append(pd.DataFrame({
            "quantity": pd.Series([q] * n, dtype=object), "layer": pd.array([layer] * n, dtype="Int64"),
            "relative_depth": np.full(n, depth), "position": pd.array([None] * n, dtype="Int64"),
            "word": pd.array([None] * n, dtype="Int64"), "unit": pd.Series(["pair"] * n, dtype=object),
            "sample": np.arange(n, dtype=np.int64), "value": v}, columns=SAMPLE_COLUMNS))  # fmt: skip

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
    """Each pair's answer column (the last token for causal LMs, the mask for masked LMs)."""
    return result.parts.denoise.answer.numpy()


# -- headline, comparison ---------------------------------------------------------------------------------


def _fmt_where(s: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("restored", "contribution", "logprob_drop"))


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics."""
    s = m["strongest"]
    att = m["attribution"]
    first = (f"LD clean {m['ld_clean_mean']:.2f} vs corrupt {m['ld_corrupt_mean']:.2f}; attribution vs exact "
             f"r={att['correlation']:.3f}, max err {att['max_abs_error']:.3g}")  # fmt: skip
    lines = [first]
    pc = s.get("patch_component")
    if pc:
        lines.append(f"Patching the clean {pc['hook']} of block {pc['layer']} at position {pc['position']} into the "
                     f"corrupt run restores {pc['restored']:.2f} of the logit-difference gap (mean over "
                     f"{m['n_pairs']} pairs).")  # fmt: skip
    ph = s.get("patch_head")
    if ph:
        lines.append(
            f"The strongest head is L{ph['layer']}H{ph['head']}: patching its z restores {ph['restored']:.2f}."
        )
    ab = s["ablation"]
    lines.append(f"{ab['method'].capitalize()}-ablating {ab['component']} lowers the target's log-prob most: by "
                 f"{ab['logprob_drop']:.2f} nats.")  # fmt: skip
    if m.get("dla_refusal"):
        lines.append(m["dla_refusal"] + ".")
    elif "dla" in s:
        lines.append(f"Directly, {s['dla']['component']} contributes most to the logit difference "
                     f"({s['dla']['contribution']:+.2f}); the contributions add up to it within "
                     f"{m['dla']['identity_error']:.1g}.")  # fmt: skip
    lines.append(f"Attribution patching estimates the {att['n_cells']} exact denoising cells with correlation "
                 f"{att['correlation']:.3f} and largest absolute error {att['max_abs_error']:.3g} (means over "
                 "pairs).")  # fmt: skip
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
    f.update_layout(title="Largest fraction restored by patching hook_resid_pre at one position, per block",
                    xaxis_title="relative depth (0 = embeddings, 1 = last block)",
                    yaxis_title="fraction restored")  # fmt: skip
    return {"comparison": f}
