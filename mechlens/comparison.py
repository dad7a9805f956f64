"""Comparisons across models: one tidy table with bootstrap intervals, and figures drawn from it.

Every study's ``samples(result)`` gives per-unit statistics (one row per text, token or occurrence and
statistic; see :mod:`mechlens.studies`). This module turns several models' samples into the
comparison table, :func:`comparison_frame`, a pandas DataFrame in long format with one row per
(model, quantity, layer, position):

==================  ======================================================================================
``model``           the model (for a difference row: the model whose value is compared)
``reference``       NA for a model's own statistic; for a difference row the model subtracted
``study``           the study
``quantity``        the statistic (the study's name for it)
``layer``           the model's own layer index (a readout point, or a block), NA if none
``relative_depth``  the shared depth axis of :mod:`mechlens.axes` (0 = embeddings, 1.0 = last block)
``position``        a token position, or a word index when the models' tokenizers differ; NA if none
``position_axis``   ``token``, ``word`` (the token that begins each whitespace word) or NA
``n``               the number of units averaged (texts, tokens or occurrences)
``value``           the mean over units (for a difference row: the mean of the paired differences)
``ci_low, ci_high`` the bootstrap confidence interval of that mean (NaN when ``n < 2``)
``ci_method``       e.g. ``percentile bootstrap, 95%, 2000 resamples, seed 0, over texts``
``unit``            what was resampled: ``text``, ``token`` or ``occurrence``
``note``            what is not comparable, or why a value has no interval; NA if nothing
==================  ======================================================================================

Missing values are one kind of NA (``pd.NA``; ``isna()``/``notna()`` select them) in every column but the
float ones (NaN), as ``pd.read_csv`` reads ``comparison.csv`` back: ``frame.reference.notna()`` selects the
difference rows.

Uncertainty: intervals come from :func:`scipy.stats.bootstrap` (percentile by default, BCa on request,
seeded) over the units; a difference between two models is the paired bootstrap of per-unit
differences on the same units (the same texts), at the same relative depth and position, so depths
that only one model has get no difference row. Alignment: token positions when all models share a
tokenizer (:func:`mechlens.encoding.tokenizer_signature`), otherwise word indices
(:func:`mechlens.encoding.word_index`); for the differences, units that are tokens are then paired by
the word they begin (tokens that begin no word are left out of the pairs, not of each model's own
statistic). A study may declare quantities that are not comparable between
two models (``incomparable(provenances) -> {quantity: reason}``): they are kept, flagged in ``note``
and in the figures, and get no difference rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from mechlens.result import SAMPLE_COLUMNS  # noqa: F401  (the samples' columns, documented above)
from mechlens.stats.bootstrap import mean_intervals

COLUMNS = [
    "model",
    "reference",
    "study",
    "quantity",
    "layer",
    "relative_depth",
    "position",
    "position_axis",
    "n",
    "value",
    "ci_low",
    "ci_high",
    "ci_method",
    "unit",
    "note",
]
METHODS = ("percentile", "BCa", "basic")


def _aligned(samples: pd.DataFrame, axis: str, pairing: bool = False) -> pd.DataFrame:
    """Samples on the shared position axis: token positions as they are, or word indices (tokens that
    begin no word dropped from position-keyed rows). ``pairing``: for the paired differences, per-token
    units are also keyed by the word they begin (a token is a unit of its own tokenizer), so tokens that
    begin no word leave those rows too; a model's own statistics keep every unit."""
    s = samples.copy()
    s["layer"] = s["layer"].astype("Int64")
    s["position"] = s["position"].astype("Int64")
    if axis == "word":
        by_token = (s["unit"] == "token") & pairing
        has_pos = s["position"].notna()
        s = s[~(has_pos | by_token) | s["word"].notna()].copy()
        by_token, has_pos = (s["unit"] == "token") & pairing, s["position"].notna()
        s.loc[has_pos, "position"] = s.loc[has_pos, "word"]
        s.loc[by_token, "sample"] = s.loc[by_token, "word"].astype("int64")
    s["position_axis"] = np.where(s["position"].notna(), axis, "")
    s["depth_key"] = s["relative_depth"].round(9)
    return s


def comparison_frame(
    study: str,
    samples: Mapping[str, pd.DataFrame],
    provenances: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    method: str = "percentile",
    seed: int = 0,
    reference: str | None = None,
    unpaired: str | None = None,
) -> pd.DataFrame:
    """The comparison table (see the module docstring) of one study from each model's ``samples``.

    ``provenances``: model -> provenance dict (tokenizer, width, normalisation placement), used to pick
    the position axis and to flag incomparable quantities. ``reference``: the model subtracted in the
    difference rows (default: the first); with one model there are no difference rows. ``unpaired``: why
    the models' units are not the same inputs (e.g. runs on different data): then no difference rows, and
    the reason is in every row's ``note``."""
    from mechlens.studies import STUDIES

    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")
    provenances = provenances or {}
    models = list(samples)
    sigs = {provenances.get(m, {}).get("tokenizer") or "" for m in models}
    axis = "token" if len(sigs) == 1 and "" not in sigs else "word"
    if len(models) == 1:
        axis = "token"
    module = STUDIES[study].module if study in STUDIES else None
    flagged: dict[str, str] = {}
    if module is not None and hasattr(module, "incomparable") and len(models) > 1:
        flagged = dict(module.incomparable(provenances))
    label = f"{method} bootstrap, {round(100 * confidence)}%, {n_resamples} resamples, seed {seed}"
    keys = ["quantity", "depth_key", "position"]
    aligned = {m: _aligned(samples[m], axis) for m in models}
    paired = {m: _aligned(samples[m], axis, pairing=True) for m in models}

    rows: list[dict[str, Any]] = []
    groups: list[np.ndarray] = []
    for m in models:
        s = aligned[m]
        for key, g in s.groupby(["quantity", "layer", "position"], dropna=False, sort=True):
            q, layer, pos = key
            first = g.iloc[0]
            rows.append(
                {
                    "model": m,
                    "reference": "",
                    "study": study,
                    "quantity": q,
                    "layer": layer,
                    "relative_depth": first["relative_depth"],
                    "position": pos,
                    "position_axis": first["position_axis"],
                    "n": len(g),
                    "value": float(g["value"].mean()),
                    "ci_method": f"{label}, over {first['unit']}s",
                    "unit": first["unit"],
                    "note": flagged.get(q, "") or (unpaired or ""),
                }
            )
            groups.append(g.sort_values("sample")["value"].to_numpy())
    ref = reference or models[0]
    if len(models) > 1 and ref not in aligned:
        raise ValueError(f"reference={ref!r} is not one of the compared models {models}")
    for m in models:
        if m == ref or len(models) < 2 or unpaired:
            continue
        a = paired[m].set_index([*keys, "sample"])
        b = paired[ref].set_index([*keys, "sample"])
        both = a[["value", "layer", "relative_depth", "position_axis", "unit"]].join(
            b[["value"]], rsuffix="_ref", how="inner"
        )
        for key, g in both.groupby(level=keys, dropna=False, sort=True):
            q = key[0]
            if q in flagged:
                continue
            first = g.iloc[0]
            diff = (g["value"] - g["value_ref"]).to_numpy()
            rows.append(
                {
                    "model": m,
                    "reference": ref,
                    "study": study,
                    "quantity": q,
                    "layer": first["layer"],
                    "relative_depth": first["relative_depth"],
                    "position": key[2],
                    "position_axis": first["position_axis"],
                    "n": len(diff),
                    "value": float(diff.mean()),
                    "ci_method": f"paired {label}, over {first['unit']}s",
                    "unit": first["unit"],
                    "note": "",
                }
            )
            groups.append(diff)
    cis = mean_intervals(groups, confidence, n_resamples, method, seed)
    for row, (lo, hi) in zip(rows, cis, strict=True):
        row["ci_low"], row["ci_high"] = lo, hi
        if lo is None and not row["note"]:
            row["note"] = f"no interval: n = {row['n']} {row['unit']}" + ("" if row["n"] == 1 else "s")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("layer", "position", "n"):
        frame[c] = frame[c].astype("Int64")
    for c in ("relative_depth", "value", "ci_low", "ci_high"):
        frame[c] = frame[c].astype("float64")
    for c in ("reference", "position_axis", "note"):  # empty text is missing: one NA, as in layer and position
        frame[c] = frame[c].astype(object).mask(frame[c].isin(["", None]), pd.NA)
    return frame


def headline(frame: pd.DataFrame) -> list[str]:
    """The differences in words: for each compared model and quantity, at how many shared depths and
    positions the paired interval excludes zero, and the largest difference with its interval."""
    lines = []
    diffs = frame[frame["reference"].notna()]
    for (model, ref, q), g in diffs.groupby(["model", "reference", "quantity"], sort=False):
        g = g.dropna(subset=["ci_low", "ci_high"])
        if g.empty:
            continue
        excl = (g["ci_low"] > 0) | (g["ci_high"] < 0)
        top = g.loc[g["value"].abs().idxmax()]
        where = []
        if pd.notna(top["relative_depth"]):
            where.append(f"depth {top['relative_depth']:.2f}")
        if pd.notna(top["position"]):
            where.append(f"{top['position_axis']} {top['position']}")
        lines.append(
            f"{q}: {model} − {ref} excludes zero at {int(excl.sum())} of {len(g)} aligned points; largest "
            f"{top['value']:+.3g} [{top['ci_low']:+.3g}, {top['ci_high']:+.3g}]"
            + (f" at {', '.join(where)}" if where else "")
        )
    return lines


def figures(frame: pd.DataFrame) -> dict[str, Any]:
    """One figure per quantity: each model's mean with its confidence band, on relative depth (for
    per-layer quantities; at the last layer, depth 1.0, for per-layer-and-position ones) or on the
    position axis; the subtitle says what is aligned and what is not comparable."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    own = frame[frame["reference"].isna()]
    for q, g in own.groupby("quantity", sort=False):
        has_depth, has_pos = g["relative_depth"].notna().any(), g["position"].notna().any()
        notes = []
        if has_depth and has_pos:
            g = g[np.isclose(g["relative_depth"], 1.0)]
            x, xtitle = "position", f"{g['position_axis'].iloc[0] if len(g) else 'token'} position"
            notes.append("last block (relative depth 1.0) of each model")
        elif has_depth:
            x, xtitle = "relative_depth", "relative depth (0 = embeddings, 1 = last block)"
            notes.append("layers aligned on relative depth")
        elif has_pos:
            x, xtitle = "position", f"{g['position_axis'].iloc[0]} position"
        else:
            x, xtitle = "model", "model"
        if has_pos and len(g) and g["position_axis"].iloc[0] == "word":
            notes.append("tokenizers differ: positions are words (the token that begins each word)")
        flags = sorted({n for n in g["note"].dropna() if n and not n.startswith("no interval")})
        notes += [f"NOT COMPARABLE: {n}" for n in flags]
        unit = g["ci_method"].iloc[0] if len(g) else ""
        f = go.Figure()
        for i, (model, gm) in enumerate(g.groupby("model", sort=False)):
            gm = gm.sort_values(x) if x != "model" else gm
            colour = f"hsla({(i * 137) % 360}, 60%, 45%, {{}})"
            xs = gm[x].astype(float).tolist() if x != "model" else [model]
            if gm["ci_low"].notna().any() and x != "model":
                f.add_scatter(
                    x=xs + xs[::-1],
                    y=gm["ci_high"].tolist() + gm["ci_low"].tolist()[::-1],
                    fill="toself",
                    line={"width": 0},
                    fillcolor=colour.format(0.2),
                    hoverinfo="skip",
                    showlegend=False,
                    name=f"{model} CI",
                )
            err = None
            if x == "model" and gm["ci_low"].notna().all():
                err = {
                    "type": "data",
                    "symmetric": False,
                    "array": (gm["ci_high"] - gm["value"]).tolist(),
                    "arrayminus": (gm["value"] - gm["ci_low"]).tolist(),
                }
            f.add_scatter(
                x=xs,
                y=gm["value"].tolist(),
                mode="lines+markers",
                name=model,
                error_y=err,
                line={"color": colour.format(1)},
            )
        sub = "; ".join([*notes, f"bands: {unit}"])
        f.update_layout(
            title=f"{q}, per model<br><sup>{sub}</sup>",
            xaxis_title=xtitle,
            yaxis_title=f"{q} (mean)",
            legend_title_text="model",
        )
        figs[f"comparison_{q}"] = f
    return figs
