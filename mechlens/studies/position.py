"""Study 1 -- predict a token's position from its loss.

The first ``seqlen`` tokens of ``n_train`` texts (and a fresh ``n_test``) go through the model; the
per-token loss matrix is regressed on position (OLS, statsmodels + sklearn) and position is
classified from loss (multinomial logistic regression), with confusion matrices and per-position
accuracy on the training batch and on the fresh test batch.

Parts, in the original notebook's order: :func:`loss_matrix` (the loss of every text token by text
position), :func:`fit_position_ols` (position ~ const + loss), :func:`fit_position_logistic` (position
classified from loss) and :func:`confusion` (its confusion matrices). :func:`run` composes them into a
:class:`PositionResult` (``StudyResult.parts``; ``results.json`` is derived from it) and
:func:`samples` gives its per-text losses for cross-model comparison.

The loss of a causal LM is the next-token loss, ``[n, seqlen-1]`` (positions 0..seqlen-2): the loss at
position p is ``-log p(token p+1 | tokens 0..p)``, keyed on the token at p, the last one the
prediction reads. That of a masked LM is its natural analogue, the pseudo-log-likelihood loss of each
token masked in turn, ``[n, seqlen]`` (positions 0..seqlen-1): the loss at position p is that of the
token at p itself. Either way a position (and its ``word`` in :func:`samples`) refers to the token at
text position p. Conventions that differ from the original notebook (gpt2, HF tokenizer): none by
default (no BOS: the first text token is position 0); ``--bos`` (``Config(bos=True)``) prepends one
(its prediction is dropped, so positions stay text positions). Masked LMs always get their
``<s> ... </s>`` (the original study was causal only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechlens import arch
from mechlens.data import load_texts, split_train_test
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.loading import provenance_of
from mechlens.ops import next_token_loss
from mechlens.options import Options, fail, option
from mechlens.stats.regression import LogisticConfig, logistic, ols
from mechlens.studies import Step
from mechlens.studies.result import StudyResult, metrics_of, not_in_metrics
from mechlens.tokens import Texts, TokenBatch, encode, word_index

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
        masked = arch.kind_of(model) == "masked"
        special = 2 if masked else int(self.bos)  # <s> ... </s>, or BOS
        if self.seqlen + special > n_ctx:
            fail("seqlen", f"must be <= {n_ctx - special} (the model's context is {n_ctx} tokens), "
                           f"got {self.seqlen}")  # fmt: skip
        if not masked and self.seqlen < 3:
            fail("seqlen", f"must be >= 3 for a causal LM (losses at positions 0..seqlen-2: at least two "
                           f"positions to tell apart), got {self.seqlen}")  # fmt: skip

    def logistic_config(self) -> LogisticConfig:
        return LogisticConfig(self.solver, self.C, self.tol, self.max_iter, self.seed)


def split_texts(cfg: Config, texts: Texts | None = None) -> tuple[list, list]:
    """The training texts (the first ``n_train`` of ``texts``, default: those of ``cfg.data``) and the
    fresh test texts (the next ``n_test``); both default to ``min(500, len(texts) // 2)``."""
    texts = load_texts(cfg.data) if texts is None else texts
    half = min(500, len(texts) // 2)
    return split_train_test(texts, cfg.n_train or half, cfg.n_test or half)


def encode_texts(model, texts: Texts, cfg: Config) -> TokenBatch:
    """The first ``cfg.seqlen`` text tokens of each text (texts with fewer are refused, by name), with
    BOS iff ``cfg.bos`` for a causal LM, and ``<s> ... </s>`` for a masked LM."""
    masked = arch.kind_of(model) == "masked"
    return encode(model, texts, bos=cfg.bos or masked, max_tokens=cfg.seqlen, min_tokens=cfg.seqlen,
                  fix="lower --seqlen or use longer texts")  # fmt: skip


# -- part 1: the loss matrix ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossMatrix:
    """The per-token loss of every text of a batch by text position (:func:`loss_matrix`).

    ``loss[i, p]``: causal LMs, ``-log p(target | tokens 0..p)`` with target the text token p+1 (the
    next-token loss); masked LMs, ``-log p(target | text i with token p masked)`` with target the
    token p itself (pseudo-log-likelihood), in nats, fp32. ``column[i, p]``: the batch column of the
    token at text position p (BOS or ``<s>`` shift it by one), ``token[i, p]`` its id, ``target[i, p]``
    the id whose loss it is. ``kind``: "next-token" or "pseudo-log-likelihood"; ``batch``: the encoded
    inputs (its BOS policy and padding side)."""

    loss: Float[Tensor, "batch text_pos"]
    column: Int[Tensor, "batch text_pos"]
    token: Int[Tensor, "batch text_pos"]
    target: Int[Tensor, "batch text_pos"]
    kind: str
    batch: TokenBatch

    @property
    def bos(self) -> str:
        """The BOS policy of the inputs: "prepend" or "none" (masked LMs: "prepend", their ``<s>``)."""
        return self.batch.bos_policy()

    def mean_by_position(self) -> Float[np.ndarray, " text_pos"]:
        """Mean loss over texts at each position (float64 sums of the fp32 losses)."""
        return self.loss.numpy().mean(0, dtype=np.float64)

    def std_by_position(self) -> Float[np.ndarray, " text_pos"]:
        """Standard deviation over texts at each position (population, ``ddof=0``)."""
        return self.loss.numpy().std(0, dtype=np.float64)


def loss_matrix(model, batch: TokenBatch, batch_size: int = 64) -> LossMatrix:
    """The per-token loss matrix of ``batch`` (every row with the same number of text tokens, e.g. from
    :func:`encode_texts`), by text position, from the model's logits (``unembed.hook_out``).

    Causal LMs: next-token loss at text positions 0..n-2 (one batched forward per mini-batch of
    ``batch_size`` texts, reduced to losses at once; a BOS's own prediction, of text token 0, is not a
    text position and is dropped). Masked LMs (``<s> ... </s>``): the pseudo-log-likelihood loss
    ``-log p(token | the text with that token masked)`` at positions 0..n-1, every token of a
    mini-batch of texts masked in turn and all variants in one batched forward
    (:func:`pseudo_log_likelihood`)."""
    n_text = batch.text_mask.sum(1)
    if not bool((n_text == n_text[0]).all()):
        counts = sorted(set(n_text.tolist()))
        raise DataError(f"loss_matrix needs the same number of text tokens in every row, got {counts}: encode "
                        "with max_tokens = min_tokens (encode_texts)")  # fmt: skip
    n = int(n_text[0])
    cols = torch.nonzero(batch.text_mask)[:, 1].reshape(len(batch), n)  # row-major: each row's text columns
    if arch.kind_of(model) == "masked":
        loss = pseudo_log_likelihood(model, batch, batch_size).reshape(len(batch), n)
        column, target, kind = cols, batch.tokens.gather(1, cols), "pseudo-log-likelihood"
    else:
        if n < 2 or not bool((cols[:, 1:] == cols[:, :-1] + 1).all()):
            raise DataError("a causal next-token loss matrix needs >= 2 contiguous text tokens per row")
        column = cols[:, :-1]
        chunks = []
        for rows, logits, _ in iter_cached(
            model, batch, [], logits=True, batch_size=batch_size, progress="study 1 forward"
        ):
            sub = batch.select(rows)
            full = next_token_loss(logits, sub.tokens.to(logits.device), sub.valid_mask().to(logits.device))
            chunks.append(full.gather(1, column[rows].to(logits.device)).cpu())
        loss, target, kind = torch.cat(chunks), batch.tokens.gather(1, column + 1), "next-token"
    return LossMatrix(loss, column, batch.tokens.gather(1, column), target, kind, batch)


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


def word_of(model, texts: Texts, losses: LossMatrix) -> Int[np.ndarray, "batch text_pos"]:
    """For each entry of the loss matrix, the index of the whitespace word that the token at its text
    position begins (:func:`mechlens.tokens.word_index`), -1 where that token begins no word (it is
    inside one). For a causal LM this is the word of the token the prediction is made from, not of the
    predicted token. All -1 when the inputs are token ids (no characters to align) or the tokenizer
    gives no character offsets (a slow, Python tokenizer)."""
    if len(texts) == 0 or not isinstance(texts[0], str) or not getattr(model.tokenizer, "is_fast", False):
        return np.full(tuple(losses.loss.shape), -1, dtype=np.int64)
    return word_index(model, texts, losses.batch).gather(1, losses.column).numpy()


# -- part 2: OLS of position on loss ---------------------------------------------------------------------


def _as_array(x: Float[Tensor, "batch text_pos"] | Float[np.ndarray, "batch text_pos"]) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


@dataclasses.dataclass(frozen=True)
class OLSFit:
    """``position ~ const + loss`` by ordinary least squares over the rows of a loss matrix
    (:func:`fit_position_ols`). ``params``, ``bse``, ``tvalues``, ``pvalues``: (const, loss), from
    statsmodels; ``summary``: its table as printed. Rows are the matrix flattened text by text (row
    ``i * n_pos + p`` is text i, position p)."""

    params: Float[np.ndarray, "2"]
    bse: Float[np.ndarray, "2"]
    tvalues: Float[np.ndarray, "2"]
    pvalues: Float[np.ndarray, "2"]
    r2: float
    r2_adj: float
    nobs: int
    summary: str
    sklearn_intercept: float = not_in_metrics()  # sklearn LinearRegression on the same rows
    sklearn_slope: float = not_in_metrics()
    predictions: Float[np.ndarray, " row"] = not_in_metrics()  # fitted position of every row
    position: Int[np.ndarray, " row"] = not_in_metrics()  # true position of every row
    loss: Float[np.ndarray, " row"] = not_in_metrics()  # the loss of every row (float64)


def fit_position_ols(losses: Float[Tensor, "batch text_pos"] | Float[np.ndarray, "batch text_pos"]) -> OLSFit:
    """Regress position on loss, ``position ~ const + loss``, over every (text, position) of the loss
    matrix ``[texts, positions]`` (e.g. ``loss_matrix(...).loss``): statsmodels OLS (the full table) and
    sklearn's LinearRegression (the same intercept and slope), in float64."""
    x = _as_array(losses)
    pos = np.tile(np.arange(x.shape[1]), len(x))
    lin = ols(x.reshape(-1), pos)
    return OLSFit(
        params=np.asarray(lin["params"]),
        bse=np.asarray(lin["bse"]),
        tvalues=np.asarray(lin["tvalues"]),
        pvalues=np.asarray(lin["pvalues"]),
        r2=lin["r2"],
        r2_adj=lin["r2_adj"],
        nobs=lin["nobs"],
        summary=lin["summary"],
        sklearn_intercept=lin["sklearn_intercept"],
        sklearn_slope=float(lin["sklearn_coef"][0]),
        predictions=np.asarray(lin["predictions"], dtype=np.float64),
        position=pos,
        loss=x.reshape(-1).astype(np.float64),
    )


# -- part 3: multinomial logistic regression of position on loss ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogisticFit:
    """Position classified from loss by a multinomial logistic regression fitted on the training
    matrix and scored on both (:func:`fit_position_logistic`). ``intercepts``/``slopes``: one per
    position (sklearn's single binary pair when there are two positions); ``chance``: 1 / positions;
    ``n_iter``: the solver's iterations. Rows as in :class:`OLSFit` (train) and likewise for the
    test matrix; ``probabilities_*``: ``[rows, positions]`` predicted distributions, ``predicted_*``
    their argmax."""

    config: LogisticConfig
    classes: Int[np.ndarray, " text_pos"]
    intercepts: Float[np.ndarray, " coef"]
    slopes: Float[np.ndarray, " coef"]
    chance: float
    n_iter: int
    accuracy_train: float = not_in_metrics()
    accuracy_test: float = not_in_metrics()
    accuracy_by_position_train: Float[np.ndarray, " text_pos"] = not_in_metrics()
    accuracy_by_position_test: Float[np.ndarray, " text_pos"] = not_in_metrics()
    position_train: Int[np.ndarray, " row"] = not_in_metrics()
    position_test: Int[np.ndarray, " row_test"] = not_in_metrics()
    predicted_train: Int[np.ndarray, " row"] = not_in_metrics()
    predicted_test: Int[np.ndarray, " row_test"] = not_in_metrics()
    probabilities_train: Float[np.ndarray, "row text_pos"] = not_in_metrics()
    probabilities_test: Float[np.ndarray, "row_test text_pos"] = not_in_metrics()


def fit_position_logistic(
    train_losses: Float[Tensor, "batch text_pos"] | Float[np.ndarray, "batch text_pos"],
    test_losses: Float[Tensor, "batch_test text_pos"] | Float[np.ndarray, "batch_test text_pos"],
    cfg: Config | None = None,
) -> LogisticFit:
    """Classify position from loss alone: sklearn's multinomial ``LogisticRegression`` (``cfg.solver``,
    ``C``, ``tol``, ``max_iter``, ``random_state = cfg.seed``) fitted on every (text, position) of the
    training loss matrix, scored on it and on the fresh test matrix (accuracy overall and per position,
    predicted distributions)."""
    cfg = cfg or Config()
    x_train, x_test = _as_array(train_losses), _as_array(test_losses)
    n_pos = x_train.shape[1]
    pos_train, pos_test = np.tile(np.arange(n_pos), len(x_train)), np.tile(np.arange(n_pos), len(x_test))
    fit = logistic(x_train.reshape(-1), pos_train, x_test.reshape(-1), pos_test, cfg.logistic_config())
    train, test = fit["train"], fit["test"]
    return LogisticFit(
        config=cfg.logistic_config(),
        classes=np.asarray(fit["classes"], dtype=np.int64),
        intercepts=np.asarray(fit["intercepts"], dtype=np.float64),
        slopes=np.asarray(fit["slopes"], dtype=np.float64),
        chance=fit["chance"],
        n_iter=fit["n_iter"],
        accuracy_train=train["accuracy"],
        accuracy_test=test["accuracy"],
        accuracy_by_position_train=np.asarray(train["accuracy_by_class"], dtype=np.float64),
        accuracy_by_position_test=np.asarray(test["accuracy_by_class"], dtype=np.float64),
        position_train=pos_train,
        position_test=pos_test,
        predicted_train=np.asarray(train["predicted"], dtype=np.int64),
        predicted_test=np.asarray(test["predicted"], dtype=np.int64),
        probabilities_train=np.asarray(train["probabilities"], dtype=np.float64),
        probabilities_test=np.asarray(test["probabilities"], dtype=np.float64),
    )


# -- part 4: confusion matrices ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Confusion:
    """Confusion matrices of the logistic classifier (:func:`confusion`): ``counts_*[true, predicted]``
    (rows: true position, columns: predicted position) and ``row_percent_*``, each row as percent of
    its true position's rows (rows sum to 100)."""

    classes: Int[np.ndarray, " text_pos"]
    counts_train: Int[np.ndarray, "text_pos text_pos"]
    counts_test: Int[np.ndarray, "text_pos text_pos"]
    row_percent_train: Float[np.ndarray, "text_pos text_pos"]
    row_percent_test: Float[np.ndarray, "text_pos text_pos"]


def confusion(fit: LogisticFit) -> Confusion:
    """The confusion matrices of :func:`fit_position_logistic`'s predictions, on the training and the
    test rows (sklearn's ``confusion_matrix`` over every position), counts and row percent."""
    from sklearn.metrics import confusion_matrix

    out = {}
    for split, true, pred in (("train", fit.position_train, fit.predicted_train),
                              ("test", fit.position_test, fit.predicted_test)):  # fmt: skip
        cm = confusion_matrix(true, pred, labels=fit.classes)
        out[f"counts_{split}"] = cm.astype(np.int64)
        out[f"row_percent_{split}"] = 100.0 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
    return Confusion(classes=fit.classes, **out)


# -- the composed result ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    intercept: float
    slope: float


@dataclasses.dataclass(frozen=True)
class PositionResult:
    """The study's typed result (``StudyResult.parts``). Its fields before ``train`` are the metrics of
    ``results.json`` under their own names (:func:`~mechlens.studies.result.metrics_of`); ``train`` and
    ``test`` (the loss matrices), ``confusion`` (the part) and ``word`` (the word index of the token at
    each training position, -1 where none: see :func:`word_of`) stay out of it."""

    loss_mean_by_position: Float[np.ndarray, " text_pos"]
    loss_std_by_position: Float[np.ndarray, " text_pos"]
    loss_mean_by_position_test: Float[np.ndarray, " text_pos"]
    ols: OLSFit
    sklearn_linear: Line
    linear_predictions: Float[np.ndarray, " row"]
    logistic: LogisticFit
    logistic_accuracy_train: float
    logistic_accuracy_test: float
    accuracy_by_position_train: Float[np.ndarray, " text_pos"]
    accuracy_by_position_test: Float[np.ndarray, " text_pos"]
    confusion_train: Int[np.ndarray, "text_pos text_pos"]
    confusion_test: Int[np.ndarray, "text_pos text_pos"]
    confusion_row_percent_train: Float[np.ndarray, "text_pos text_pos"]
    confusion_row_percent_test: Float[np.ndarray, "text_pos text_pos"]
    loss_kind: str
    train: LossMatrix = not_in_metrics()
    test: LossMatrix = not_in_metrics()
    confusion: Confusion = not_in_metrics()
    word: Int[np.ndarray, "batch text_pos"] = not_in_metrics()

    @classmethod
    def of(cls, train: LossMatrix, test: LossMatrix, lin: OLSFit, logit: LogisticFit, conf: Confusion,
           word: Int[np.ndarray, "batch text_pos"]) -> PositionResult:  # fmt: skip
        """Compose the parts (the metric fields are views of them)."""
        return cls(
            loss_mean_by_position=train.mean_by_position(),
            loss_std_by_position=train.std_by_position(),
            loss_mean_by_position_test=test.mean_by_position(),
            ols=lin,
            sklearn_linear=Line(lin.sklearn_intercept, lin.sklearn_slope),
            linear_predictions=lin.predictions,
            logistic=logit,
            logistic_accuracy_train=logit.accuracy_train,
            logistic_accuracy_test=logit.accuracy_test,
            accuracy_by_position_train=logit.accuracy_by_position_train,
            accuracy_by_position_test=logit.accuracy_by_position_test,
            confusion_train=conf.counts_train,
            confusion_test=conf.counts_test,
            confusion_row_percent_train=conf.row_percent_train,
            confusion_row_percent_test=conf.row_percent_test,
            loss_kind=train.kind,
            train=train,
            test=test,
            confusion=conf,
            word=word,
        )


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    """Run the four parts on the training texts and the fresh test texts of ``texts`` (default: the
    texts of ``cfg.data``; strings, or token ids of the text tokens only)."""
    cfg = cfg or Config()
    train_texts, test_texts = split_texts(cfg, texts)
    torch.manual_seed(cfg.seed)
    train = loss_matrix(model, encode_texts(model, train_texts, cfg), cfg.batch_size)
    test = loss_matrix(model, encode_texts(model, test_texts, cfg), cfg.batch_size)
    lin = fit_position_ols(train.loss)
    logit = fit_position_logistic(train.loss, test.loss, cfg)
    parts = PositionResult.of(train, test, lin, logit, confusion(logit), word_of(model, train_texts, train))
    batch = train.batch
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    n_pos = train.loss.shape[1]
    tables = {
        "loss_matrix": [
            {"split": s, "text": i, "position": p, "loss": float(v)}
            for s, mat in (("train", train.loss), ("test", test.loss))
            for i, row in enumerate(mat.tolist())
            for p, v in enumerate(row)
        ],
        "accuracy_by_position": [
            {"split": s, "position": p, "accuracy": float(getattr(logit, f"accuracy_by_position_{s}")[p])}
            for s in ("train", "test")
            for p in range(n_pos)
        ],
        "test_predictions": [
            {"row": i, "true": int(t), "predicted": int(pr), **{f"p{c}": float(v) for c, v in enumerate(pp)}}
            for i, (t, pr, pp) in enumerate(
                zip(logit.position_test, logit.predicted_test, logit.probabilities_test, strict=True)
            )
        ],
    }
    result = StudyResult(
        study="position",
        model=prov.model,
        metrics=metrics_of(parts),
        provenance=prov.to_dict(),
        config=dataclasses.asdict(cfg) | {"n_train": len(train_texts), "n_test": len(test_texts)},
        tables=tables,
        parts=parts,
    )
    result.figures = figures(parts)
    return result


# -- per-unit samples for cross-model comparison ------------------------------------------------------------------


SAMPLE_COLUMNS = ("quantity", "layer", "relative_depth", "position", "word", "unit", "sample", "value")


def samples(result: StudyResult) -> pd.DataFrame:
    """The training loss matrix as one row per (text, position): quantity "loss" (nats; next-token or
    pseudo-log-likelihood, as ``loss_kind``), unit "text", ``sample`` = the text's index in the training
    split (the same for every model fed the same inputs), ``position`` = text position p, ``word`` = the
    index of the whitespace word that the token at p begins (for a causal LM, the token the prediction
    is made from, not the predicted token p+1; <NA> inside a word or for token-id inputs), no layer
    (``layer`` <NA>, ``relative_depth`` NaN). The mean of ``value`` per position is
    ``loss_mean_by_position``."""
    parts: PositionResult = result.parts
    loss = parts.train.loss.numpy().astype(np.float64)
    n, n_pos = loss.shape
    word = parts.word.reshape(-1)
    return pd.DataFrame(
        {
            "quantity": pd.Series(["loss"] * (n * n_pos), dtype=object),
            "layer": pd.array([None] * (n * n_pos), dtype="Int64"),
            "relative_depth": np.full(n * n_pos, np.nan),
            "position": pd.array(np.tile(np.arange(n_pos), n), dtype="Int64"),
            "word": pd.arrays.IntegerArray(np.maximum(word, 0).astype(np.int64), word < 0),
            "unit": pd.Series(["text"] * (n * n_pos), dtype=object),
            "sample": np.repeat(np.arange(n, dtype=np.int64), n_pos),
            "value": loss.reshape(-1),
        },
        columns=list(SAMPLE_COLUMNS),
    )


# -- figures -----------------------------------------------------------------------------------------------------


def loss_figures(losses: LossMatrix) -> dict[str, go.Figure]:
    """Mean loss by position (bars, ±1 sd, every token as a jittered dot) and its distribution per
    position (violins)."""
    loss = losses.loss.numpy()
    pos = np.arange(loss.shape[1])
    f = go.Figure(go.Bar(x=pos, y=losses.mean_by_position(), name="mean loss",
                         error_y={"array": losses.std_by_position()}))  # fmt: skip
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, loss.size)
    f.add_scatter(x=np.tile(pos, len(loss)) + jitter, y=loss.reshape(-1), mode="markers", name="tokens",
                  marker={"size": 3, "opacity": 0.3})  # fmt: skip
    f.update_layout(title=f"{losses.kind.capitalize()} loss by position", xaxis_title="position",
                    yaxis_title="loss (nats)")  # fmt: skip
    g = go.Figure([go.Violin(y=loss[:, p], name=str(p), box_visible=True) for p in pos])
    g.update_layout(title="Loss distribution per position", xaxis_title="position", yaxis_title="loss (nats)")
    return {"loss_by_position": f, "loss_distributions": g}


def ols_figures(fit: OLSFit) -> dict[str, go.Figure]:
    """Fitted vs true position of every training row, with the identity line."""
    pos = np.arange(int(fit.position.max()) + 1)
    f = go.Figure(go.Scatter(x=fit.position, y=fit.predictions, mode="markers", marker={"opacity": 0.3},
                             name="tokens (training set)"))  # fmt: skip
    f.add_scatter(x=pos, y=pos, mode="lines", name="identity")
    f.update_layout(title=f"OLS: predicted vs true position (R² = {fit.r2:.3f})",
                    xaxis_title="true position", yaxis_title="predicted position")  # fmt: skip
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
        f.update_layout(title=f"Accuracy by position ({split}; overall {acc:.3f})", xaxis_title="position",
                        yaxis_title="accuracy", yaxis_range=[0, 1])  # fmt: skip
        figs[f"accuracy_{split}"] = f
    return figs


def confusion_figures(conf: Confusion) -> dict[str, go.Figure]:
    """Confusion matrices as heatmaps: counts as text, colour = row percent."""
    figs = {}
    for split in ("train", "test"):
        f = go.Figure(go.Heatmap(z=getattr(conf, f"row_percent_{split}"), x=conf.classes, y=conf.classes,
                                 colorscale="Blues", text=getattr(conf, f"counts_{split}"),
                                 texttemplate="%{text}"))  # fmt: skip
        f.update_layout(title=f"Confusion matrix ({split}; counts, colour = row %)", xaxis_title="predicted",
                        yaxis_title="true", yaxis_autorange="reversed")  # fmt: skip
        figs[f"confusion_{split}"] = f
    return figs


FIGURES = ("loss_by_position", "loss_distributions", "linear_predictions", "logistic_coefficients",
           "accuracy_train", "confusion_train", "accuracy_test", "confusion_test")  # fmt: skip


def figures(result: PositionResult) -> dict[str, go.Figure]:
    """Every figure of the study, from its typed result (the report's order)."""
    figs = (loss_figures(result.train) | ols_figures(result.ols) | logistic_figures(result.logistic)
            | confusion_figures(result.confusion))  # fmt: skip
    return {name: figs[name] for name in FIGURES}


# -- findings ------------------------------------------------------------------------------------------------------


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


# -- the lesson: the notebook and experiments/position.py, part by part ---------------------------------------------

LESSON = (
    Step(
        "Setup: config, model, texts",
        "The config's defaults are the original study's: the first `seqlen = 6` text tokens of each text, no "
        "BOS (the first text token is position 0; `bos=True` prepends one and drops its prediction, so positions "
        "stay text positions), half the texts for training and the other half as fresh test texts. A masked "
        'LM (`load_model("tiny-mlm")`) gets its `<s> ... </s>` and a pseudo-log-likelihood loss instead. '
        "`encode_texts` keeps the first `seqlen` tokens of each text and refuses shorter texts by name.",
        "config = position.Config(seqlen=6, bos=False)  # as the original: no BOS, first text token = position 0\n"
        'model = load_model("tiny-gpt2")  # or "gpt2" online, with data="hellaswag"\n'
        "train_texts, test_texts = position.split_texts(config)  # the texts of config.data, split in two\n"
        "train_batch = position.encode_texts(model, train_texts, config)\n"
        "test_batch = position.encode_texts(model, test_texts, config)\n"
        'print(len(train_texts), "training texts,", len(test_texts), "test texts")\n'
        'print("token ids of the first:", train_batch.tokens[0].tolist())',
    ),
    Step(
        "Part 1: the loss matrix",
        "`loss_matrix` runs the texts through the model and reads the loss of every text token off the logits "
        "(`unembed.hook_out`): for a causal LM the next-token loss `-log p(token p+1 | tokens 0..p)` at "
        "positions 0..seqlen-2, for a masked LM the loss of token p with that token masked. The result keeps "
        "the `[texts, positions]` tensor, the token ids it refers to and the batch. Look at how the mean and the "
        "spread of the loss change with position: that is all the regressions below can use.",
        "train = position.loss_matrix(model, train_batch, config.batch_size)\n"
        "test = position.loss_matrix(model, test_batch, config.batch_size)\n"
        'print(train.kind, "loss, [texts, positions] =", tuple(train.loss.shape))\n'
        'print("mean by position:", train.mean_by_position().round(3))\n'
        'print("sd by position:  ", train.std_by_position().round(3))\n'
        'position.loss_figures(train)["loss_by_position"].show()',
    ),
    Step(
        "Part 2: OLS of position on loss",
        "`fit_position_ols` regresses position on loss, `position ~ const + loss`, over every (text, position) "
        "of the training matrix with statsmodels (the full table) and sklearn's LinearRegression (the same "
        "line). Look at the slope's sign and R²: how much of the position a single loss value explains "
        "linearly. A loss that is not monotonic in position gives an R² near 0 even when the position is "
        "recoverable from it (part 3).",
        "ols = position.fit_position_ols(train.loss)\n"
        "print(ols.summary)\n"
        'print("sklearn: intercept", ols.sklearn_intercept, "slope", ols.sklearn_slope)\n'
        'position.ols_figures(ols)["linear_predictions"].show()',
    ),
    Step(
        "Part 3: multinomial logistic regression",
        "`fit_position_logistic` classifies the position from the loss alone (one intercept and slope per "
        "position), fitted on the training matrix and scored on it and on the fresh test texts. Compare the "
        "accuracy with chance (1 / positions), and see which positions are recognisable: those whose losses "
        "stand apart from the others' (on tiny-gpt2 and the default texts, positions 0 and 1).",
        "logistic = position.fit_position_logistic(train.loss, test.loss, config)\n"
        'print(f"accuracy train {logistic.accuracy_train:.3f}, test {logistic.accuracy_test:.3f}, "\n'
        '      f"chance {logistic.chance:.3f}, {logistic.n_iter} iterations")\n'
        'print("test accuracy by position:", logistic.accuracy_by_position_test.round(3))\n'
        'position.logistic_figures(logistic)["accuracy_test"].show()',
    ),
    Step(
        "Part 4: confusion matrices",
        "`confusion` counts the classifier's predictions by true (rows) and predicted (columns) position, on "
        "the training and the test rows, and as percent of each true position. Look at where the mass sits "
        "off the diagonal: later positions, whose losses overlap, are confused with each other.",
        "conf = position.confusion(logistic)\n"
        'print("test counts [true, predicted]:")\n'
        "print(conf.counts_test)\n"
        'position.confusion_figures(conf)["confusion_test"].show()',
    ),
    Step(
        "All parts at once: run",
        "`run` composes the four parts (the same numbers as above) into `result.parts`, a `PositionResult` from "
        "which `results.json`'s metrics are derived, with the CSV tables, the figures and the provenance that "
        "`mechlens run position` writes. `samples` gives the training losses one row per (text, position): "
        "what a cross-model comparison resamples.",
        "result = position.run(model, config)\n"
        "print(position.headline(result.metrics)[1])\n"
        "print(position.samples(result).head())\n"
        'result.figures["loss_by_position"].show()\n'
        'result.figures["confusion_test"].show()\n'
        "result.provenance",
    ),
)
