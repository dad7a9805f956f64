"""Study 1's figures, its findings in words (``headline``) and the figures comparing models
(:mod:`mechlens.studies.position`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float

from mechlens.studies.position.parts import Confusion, LogisticFit, LossMatrix, OLSFit, PositionResult

# -- figures -----------------------------------------------------------------------------------------------------


def loss_figures(
    losses: LossMatrix,
    mean: Float[np.ndarray, " text_pos"] | None = None,
    std: Float[np.ndarray, " text_pos"] | None = None,
) -> dict[str, go.Figure]:
    """Mean loss by position (bars, ±1 sd, every token as a jittered dot) and its distribution per
    position (violins). ``mean``/``std``: the bars' values when ``losses`` is a sample of the texts
    (e.g. ``PositionResult.loss_mean_by_position``, over every text); default: those of ``losses``."""
    loss = losses.loss.numpy()
    pos = np.arange(loss.shape[1])
    mean = losses.mean_by_position() if mean is None else mean
    std = losses.std_by_position() if std is None else std
    f = go.Figure(go.Bar(x=pos, y=mean, name="mean loss", error_y={"array": std}))
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, loss.size)
    f.add_scatter(
        x=np.tile(pos, len(loss)) + jitter,
        y=loss.reshape(-1),
        mode="markers",
        name="tokens",
        marker={"size": 3, "opacity": 0.3},
    )
    f.update_layout(
        title=f"{losses.kind.capitalize()} loss by position", xaxis_title="position", yaxis_title="loss (nats)"
    )
    g = go.Figure([go.Violin(y=loss[:, p], name=str(p), box_visible=True) for p in pos])
    g.update_layout(title="Loss distribution per position", xaxis_title="position", yaxis_title="loss (nats)")
    return {"loss_by_position": f, "loss_distributions": g}


def ols_figures(fit: OLSFit) -> dict[str, go.Figure]:
    """Fitted vs true position of every training row, with the identity line."""
    pos = np.arange(int(fit.position.max()) + 1)
    f = go.Figure(
        go.Scatter(
            x=fit.position, y=fit.predictions, mode="markers", marker={"opacity": 0.3}, name="tokens (training set)"
        )
    )
    f.add_scatter(x=pos, y=pos, mode="lines", name="identity")
    f.update_layout(
        title=f"OLS: predicted vs true position (R² = {fit.r2:.3f})",
        xaxis_title="true position",
        yaxis_title="predicted position",
    )
    return {"linear_predictions": f}


def logistic_figures(fit: LogisticFit) -> dict[str, go.Figure]:
    """Per-class intercepts and slopes; accuracy by position on the training and the test rows."""
    x = fit.classes if len(fit.intercepts) == len(fit.classes) else fit.classes[1:]  # binary: one pair, class 1
    f = go.Figure([go.Bar(x=x, y=fit.intercepts, name="intercept"), go.Bar(x=x, y=fit.slopes, name="slope")])
    f.update_layout(title="Multinomial logistic regression: per-class intercepts and slopes", xaxis_title="position")
    figs = {"logistic_coefficients": f}
    for split in ("train", "test"):
        f = go.Figure(go.Bar(x=fit.classes, y=getattr(fit, f"accuracy_by_position_{split}")))
        f.add_hline(y=fit.chance, line_dash="dash", annotation_text="chance")
        acc = getattr(fit, f"accuracy_{split}")
        f.update_layout(
            title=f"Accuracy by position ({split}; overall {acc:.3f})",
            xaxis_title="position",
            yaxis_title="accuracy",
            yaxis_range=[0, 1],
        )
        figs[f"accuracy_{split}"] = f
    return figs


def confusion_figures(conf: Confusion) -> dict[str, go.Figure]:
    """Confusion matrices as heatmaps: counts as text, colour = row percent."""
    figs = {}
    for split in ("train", "test"):
        f = go.Figure(
            go.Heatmap(
                z=getattr(conf, f"row_percent_{split}"),
                x=conf.classes,
                y=conf.classes,
                colorscale="Blues",
                text=getattr(conf, f"counts_{split}"),
                texttemplate="%{text}",
            )
        )
        f.update_layout(
            title=f"Confusion matrix ({split}; counts, colour = row %)",
            xaxis_title="predicted",
            yaxis_title="true",
            yaxis_autorange="reversed",
        )
        figs[f"confusion_{split}"] = f
    return figs


FIGURES = (
    "loss_by_position",
    "loss_distributions",
    "linear_predictions",
    "logistic_coefficients",
    "accuracy_train",
    "confusion_train",
    "accuracy_test",
    "confusion_test",
)


def figures(result: PositionResult) -> dict[str, go.Figure]:
    """Every figure of the study, from its typed result (the report's order)."""
    figs = loss_figures(result.train, result.loss_mean_by_position, result.loss_std_by_position)
    figs |= ols_figures(result.ols) | logistic_figures(result.logistic) | confusion_figures(result.confusion)
    return {name: figs[name] for name in FIGURES}


# -- findings ------------------------------------------------------------------------------------------------------


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    loss = np.asarray(m["loss_mean_by_position"], np.float64)
    lo = int(np.argmin(loss))
    kind = m.get("loss_kind", "next-token")
    sample = ""
    if m.get("sampled"):
        sample = (
            f" on a seeded sample of {m['logistic_sample_texts']} of {m['n_texts_train']} training and "
            f"{m['logistic_sample_texts_test']} of {m['n_texts_test']} test texts"
        )
    marks = m.get("degenerate") or []
    warn = f"DEGENERATE ({'; '.join(marks)}): " if marks else ""
    fresh = "fresh texts" if not any("test texts" in n for n in marks) else "test texts that repeat training texts"
    lines = [
        f"{warn}logistic accuracy train {m['logistic_accuracy_train']:.3f} / test {m['logistic_accuracy_test']:.3f} "
        f"(chance {m['logistic']['chance']:.3f}); OLS R² {m['ols']['r2']:.4f}",
        f"Mean {kind} loss is {loss[0]:.2f} nats at position 0 and {loss[lo]:.2f} at its lowest (position "
        f"{lo}); position explains {100 * m['ols']['r2']:.1f}% of the variance of the loss (OLS).",
        f"A multinomial logistic regression recovers the position from the loss alone with "
        f"{100 * m['logistic_accuracy_test']:.0f}% accuracy on {fresh} "
        f"(chance {100 * m['logistic']['chance']:.0f}%){sample}.",
    ]
    if marks:  # the report shows lines[1:]: the mark leads there too
        lines.insert(1, f"DEGENERATE inputs, so these numbers are not findings: {'; '.join(marks)}.")
    return lines


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same inputs)."""
    f = go.Figure()
    for model, e in entries.items():
        f.add_scatter(y=e["metrics"]["loss_mean_by_position"], name=model, mode="lines+markers")
    title = "Loss by position, per model"
    if len({e.get("provenance", {}).get("d_vocab") for e in entries.values()}) > 1:
        title += (
            "<br><sup>different tokenizers: position p is the p-th token of each model's own tokenization, "
            "not the same text</sup>"
        )
    f.update_layout(title=title, xaxis_title="position (token index)", yaxis_title="mean loss (nats)")
    return {"comparison": f}
