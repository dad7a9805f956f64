"""Study 1 -- predict a token's position from its loss.

The first ``seqlen`` tokens of ``n_train`` texts (and a fresh ``n_test``) go through the model; the
per-token loss matrix is regressed on position (OLS, statsmodels + sklearn) and position is
classified from loss (multinomial logistic regression), with confusion matrices and per-position
accuracy on the training batch and on the fresh test batch.

The loss of a causal LM is the next-token loss, ``[n, seqlen-1]`` (positions 0..seqlen-2); that of a
masked LM is its natural analogue, the pseudo-log-likelihood loss of each token masked in turn,
``[n, seqlen]`` (positions 0..seqlen-1). Conventions that differ from the original notebook
(gpt2, HF tokenizer): none by default (no BOS: the first text token is position 0); ``--bos``
prepends one (its prediction is dropped, so positions stay text positions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from mechlens import arch
from mechlens.data import load_texts, split_train_test
from mechlens.forward import iter_cached
from mechlens.loading import provenance_of
from mechlens.ops import next_token_loss
from mechlens.options import Options, fail, option
from mechlens.stats.regression import LogisticConfig, logistic, ols
from mechlens.studies.result import StudyResult
from mechlens.tokens import Texts, TokenBatch, encode

SOLVERS = ("lbfgs", "newton-cg", "newton-cholesky", "sag", "saga")  # sklearn's multinomial solvers


@dataclasses.dataclass
class Config(Options):
    data: str = option("contexts", "text source: a built-in name, a local file or an online dataset (mechlens list)",
                       nonempty=True)  # fmt: skip
    seqlen: int = option(6, "text tokens per text; losses are predicted at positions 0..seqlen-2", ge=2)
    n_train: int | None = option(None, "training texts (default: min(500, half the texts))", ge=1)
    n_test: int | None = option(None, "fresh test texts (default: min(500, half the texts))", ge=1)
    bos: bool = option(False, "prepend BOS; the original study did not (the first text token is position 0)")
    batch_size: int = option(64, "texts per forward pass", ge=1)
    solver: str = option("lbfgs", "scikit-learn solver of the multinomial logistic regression", choices=SOLVERS)
    C: float = option(1.0, "inverse regularisation strength of the logistic regression", gt=0)
    tol: float = option(1e-6, "stopping tolerance of the logistic regression", gt=0)
    max_iter: int = option(2000, "iteration limit of the logistic regression", ge=1)
    seed: int = option(0, "random seed", ge=0)

    def check_model(self, model) -> None:
        n_ctx = model.cfg.n_ctx
        special = 2 if arch.kind_of(model) == "masked" else int(self.bos)  # <s> ... </s>, or BOS
        if self.seqlen + special > n_ctx:
            fail("seqlen", f"must be <= {n_ctx - special} (the model's context is {n_ctx} tokens), "
                           f"got {self.seqlen}")  # fmt: skip


def loss_matrix(model, texts: Texts, cfg: Config) -> tuple[Float[Tensor, "n n_pos"], TokenBatch]:
    """The per-token loss matrix of the first ``seqlen`` text tokens of each text, by text position.

    Causal LMs: next-token loss at positions 0..seqlen-2 (one batched forward per mini-batch, reduced
    to losses at once). Masked LMs (always ``<s> ... </s>``): the pseudo-log-likelihood loss
    ``-log p(token | the text with that token masked)`` at positions 0..seqlen-1, every token of a
    mini-batch of texts masked in turn and all variants in one batched forward."""
    masked = arch.kind_of(model) == "masked"
    batch = encode(model, texts, bos=cfg.bos or masked, max_tokens=cfg.seqlen, min_tokens=cfg.seqlen,
                   fix="lower --seqlen or use longer texts")  # fmt: skip
    if masked:
        return pseudo_log_likelihood(model, batch, cfg.batch_size).reshape(len(texts), cfg.seqlen), batch
    chunks = []
    for rows, logits, _ in iter_cached(
        model, batch, [], logits=True, batch_size=cfg.batch_size, progress="study 1 forward"
    ):
        sub = batch.select(rows)
        chunks.append(next_token_loss(logits, sub.tokens.to(logits.device), sub.valid_mask().to(logits.device)).cpu())
    loss = torch.cat(chunks)
    if cfg.bos:  # drop the prediction made from BOS: rows are then text positions 0..seqlen-2 as without BOS
        loss = loss[:, 1:]
    return loss, batch


def pseudo_log_likelihood(model, batch: TokenBatch, batch_size: int) -> Float[Tensor, " n_tokens"]:
    """``-log p(token | the sequence with that token masked)`` for every text token of ``batch``, in
    reading order (a masked LM's per-token loss, Salazar et al. 2020): one forward per mini-batch of
    masked variants, keeping only the masked column's logits."""
    variants, _, cols, originals = batch.mask_each(arch.mask_id(model))
    out = []
    for rows, logits, _ in iter_cached(
        model, variants, [], logits=True, batch_size=batch_size, progress="study 1 forward (masked)"
    ):
        at = logits[torch.arange(logits.shape[0], device=logits.device), cols[rows].to(logits.device)].float()
        out.append(-torch.log_softmax(at, -1).gather(-1, originals[rows, None].to(at.device))[:, 0].cpu())
    return torch.cat(out)


def analyse(loss_train: np.ndarray, loss_test: np.ndarray, cfg: Config) -> dict:
    """Regressions on loss matrices ``[n, seqlen-1]`` (the analysis part, no model involved)."""
    n_pos = loss_train.shape[1]
    pos_train = np.tile(np.arange(n_pos), len(loss_train))
    pos_test = np.tile(np.arange(n_pos), len(loss_test))
    lin = ols(loss_train.reshape(-1), pos_train)
    lcfg = LogisticConfig(cfg.solver, cfg.C, cfg.tol, cfg.max_iter, cfg.seed)
    logit = logistic(loss_train.reshape(-1), pos_train, loss_test.reshape(-1), pos_test, lcfg)
    return {
        "loss_mean_by_position": loss_train.mean(0, dtype=np.float64).tolist(),  # float64 sums of fp32 losses
        "loss_std_by_position": loss_train.std(0, dtype=np.float64).tolist(),
        "loss_mean_by_position_test": loss_test.mean(0, dtype=np.float64).tolist(),
        "ols": {k: lin[k] for k in ("params", "bse", "tvalues", "pvalues", "r2", "r2_adj", "nobs", "summary")},
        "sklearn_linear": {"intercept": lin["sklearn_intercept"], "slope": lin["sklearn_coef"][0]},
        "linear_predictions": lin["predictions"],
        "logistic": {k: logit[k] for k in ("config", "classes", "intercepts", "slopes", "chance", "n_iter")},
        "logistic_accuracy_train": logit["train"]["accuracy"],
        "logistic_accuracy_test": logit["test"]["accuracy"],
        "accuracy_by_position_train": logit["train"]["accuracy_by_class"],
        "accuracy_by_position_test": logit["test"]["accuracy_by_class"],
        "confusion_train": logit["train"]["confusion"],
        "confusion_test": logit["test"]["confusion"],
        "confusion_row_percent_train": logit["train"]["confusion_row_percent"],
        "confusion_row_percent_test": logit["test"]["confusion_row_percent"],
        "_probabilities_test": logit["test"]["probabilities"],
        "_predicted_test": logit["test"]["predicted"],
    }


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    cfg = cfg or Config()
    texts = load_texts(cfg.data) if texts is None else texts
    half = min(500, len(texts) // 2)
    train, test = split_train_test(texts, cfg.n_train or half, cfg.n_test or half)
    torch.manual_seed(cfg.seed)
    loss_train, batch = loss_matrix(model, train, cfg)
    loss_test, _ = loss_matrix(model, test, cfg)
    m = analyse(loss_train.numpy(), loss_test.numpy(), cfg)
    m["loss_kind"] = "pseudo-log-likelihood" if arch.kind_of(model) == "masked" else "next-token"
    proba, pred = m.pop("_probabilities_test"), m.pop("_predicted_test")
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    n_pos = loss_train.shape[1]
    tables = {
        "loss_matrix": [
            {"split": s, "text": i, "position": p, "loss": float(v)}
            for s, mat in (("train", loss_train), ("test", loss_test))
            for i, row in enumerate(mat.tolist())
            for p, v in enumerate(row)
        ],
        "accuracy_by_position": [
            {"split": s, "position": p, "accuracy": m[f"accuracy_by_position_{s}"][p]}
            for s in ("train", "test")
            for p in range(n_pos)
        ],
        "test_predictions": [
            {"row": i, "true": i % n_pos, "predicted": int(pr), **{f"p{c}": float(v) for c, v in enumerate(pp)}}
            for i, (pr, pp) in enumerate(zip(pred, proba, strict=True))
        ],
    }
    result = StudyResult(
        study="position",
        model=prov.model,
        metrics=m,
        provenance=prov.to_dict(),
        config=dataclasses.asdict(cfg) | {"n_train": len(train), "n_test": len(test)},
        tables=tables,
    )
    result.figures = figures(loss_train.numpy(), m)
    return result


def figures(loss: np.ndarray, m: dict) -> dict[str, go.Figure]:
    n_pos = loss.shape[1]
    pos = np.arange(n_pos)
    figs: dict[str, go.Figure] = {}
    f = go.Figure(go.Bar(x=pos, y=loss.mean(0), name="mean loss", error_y={"array": loss.std(0)}))
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, loss.size)
    f.add_scatter(x=np.tile(pos, len(loss)) + jitter, y=loss.reshape(-1), mode="markers", name="tokens",
                  marker={"size": 3, "opacity": 0.3})  # fmt: skip
    kind = m.get("loss_kind", "next-token")
    f.update_layout(title=f"{kind.capitalize()} loss by position", xaxis_title="position", yaxis_title="loss (nats)")
    figs["loss_by_position"] = f
    f = go.Figure([go.Violin(y=loss[:, p], name=str(p), box_visible=True) for p in pos])
    f.update_layout(title="Loss distribution per position", xaxis_title="position", yaxis_title="loss (nats)")
    figs["loss_distributions"] = f
    f = go.Figure(go.Scatter(x=np.tile(pos, len(loss)), y=m["linear_predictions"], mode="markers",
                             marker={"opacity": 0.3}, name="tokens (training set)"))  # fmt: skip
    f.add_scatter(x=pos, y=pos, mode="lines", name="identity")
    f.update_layout(title=f"OLS: predicted vs true position (R² = {m['ols']['r2']:.3f})",
                    xaxis_title="true position", yaxis_title="predicted position")  # fmt: skip
    figs["linear_predictions"] = f
    f = go.Figure([go.Bar(x=pos, y=m["logistic"]["intercepts"], name="intercept"),
                   go.Bar(x=pos, y=m["logistic"]["slopes"], name="slope")])  # fmt: skip
    f.update_layout(title="Multinomial logistic regression: per-class intercepts and slopes", xaxis_title="position")
    figs["logistic_coefficients"] = f
    for split in ("train", "test"):
        f = go.Figure(go.Bar(x=pos, y=m[f"accuracy_by_position_{split}"]))
        f.add_hline(y=m["logistic"]["chance"], line_dash="dash", annotation_text="chance")
        acc = m[f"logistic_accuracy_{split}"]
        f.update_layout(title=f"Accuracy by position ({split}; overall {acc:.3f})", xaxis_title="position",
                        yaxis_title="accuracy", yaxis_range=[0, 1])  # fmt: skip
        figs[f"accuracy_{split}"] = f
        f = go.Figure(go.Heatmap(z=m[f"confusion_row_percent_{split}"], x=pos, y=pos, colorscale="Blues",
                                 text=m[f"confusion_{split}"], texttemplate="%{text}"))  # fmt: skip
        f.update_layout(title=f"Confusion matrix ({split}; counts, colour = row %)", xaxis_title="predicted",
                        yaxis_title="true", yaxis_autorange="reversed")  # fmt: skip
        figs[f"confusion_{split}"] = f
    return figs


def headline(m: Mapping[str, Any]) -> list[str]:
    """The findings in words, from the metrics (a live result's or a saved ``results.json`` entry's)."""
    loss = np.asarray(m["loss_mean_by_position"], np.float64)
    lo = int(np.argmin(loss))
    kind = m.get("loss_kind", "next-token")
    return [
        f"logistic accuracy train {m['logistic_accuracy_train']:.3f} / test {m['logistic_accuracy_test']:.3f} "
        f"(chance {m['logistic']['chance']:.3f}); OLS R² {m['ols']['r2']:.4f}",
        f"Mean {kind} loss is {loss[0]:.2f} nats at position 0 and {loss[lo]:.2f} at its lowest (position "
        f"{lo}); position explains {100 * m['ols']['r2']:.1f}% of the variance of the loss (OLS).",
        f"A multinomial logistic regression recovers the position from the loss alone with "
        f"{100 * m['logistic_accuracy_test']:.0f}% accuracy on fresh texts "
        f"(chance {100 * m['logistic']['chance']:.0f}%).",
    ]


def compare(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, go.Figure]:
    """Comparison figures from several models' ``results.json`` entries (same inputs)."""
    f = go.Figure()
    for model, e in entries.items():
        f.add_scatter(y=e["metrics"]["loss_mean_by_position"], name=model, mode="lines+markers")
    title = "Loss by position, per model"
    if len({e.get("provenance", {}).get("d_vocab") for e in entries.values()}) > 1:
        title += ("<br><sup>different tokenizers: position p is the p-th token of each model's own tokenization, "
                  "not the same text</sup>")  # fmt: skip
    f.update_layout(title=title, xaxis_title="position (token index)", yaxis_title="mean loss (nats)")
    return {"comparison": f}
