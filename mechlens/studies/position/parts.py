"""Study 1's parts (:mod:`mechlens.studies.position`): the config, the loss matrix, the OLS and the multinomial
logistic regression of position on loss, the confusion matrices, and the typed result composed from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechlens import arch
from mechlens.encoding import Texts, TokenBatch, encode, word_index
from mechlens.errors import DataError
from mechlens.forward import iter_cached
from mechlens.ops import next_token_loss
from mechlens.options import MASKED_SPECIALS, Options, fail, option
from mechlens.result import not_in_metrics, view
from mechlens.stats.degenerate import check_regression, repeated_rows, require_finite, zero_variance
from mechlens.stats.regression import LogisticConfig, logistic, ols
from mechlens.stats.streaming import Moments, NormalEquations, Reservoir

SPLITS = ("train", "test")
SOLVERS = ("lbfgs", "newton-cg", "newton-cholesky", "sag", "saga")  # sklearn's multinomial solvers


@dataclasses.dataclass
class Config(Options):
    data: str = option(
        "contexts", "text source: a built-in name, a local file or an online dataset (mechlens list)", nonempty=True
    )
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
    reservoir: int = option(
        10_000,
        "texts per split kept in a seeded reservoir for the logistic regression, the confusion matrices, sklearn's "
        "line, the predictions and the per-text samples (the loss by position and the OLS use every text); a split "
        "with more texts is sampled",
        ge=1,
    )

    def not_applied(self, kind: str | None) -> dict[str, str]:
        return {"bos": MASKED_SPECIALS} if kind == "masked" else {}

    def check_model(self, model) -> None:
        n_ctx = model.cfg.n_ctx
        masked = arch.kind_of(model) == "masked"
        special = 2 if masked else int(self.bos)  # <s> ... </s>, or BOS
        if self.seqlen + special > n_ctx:
            fail("seqlen", f"must be <= {n_ctx - special} (the model's context is {n_ctx} tokens), got {self.seqlen}")
        if not masked and self.seqlen < 3:
            fail(
                "seqlen",
                f"must be >= 3 for a causal LM (losses at positions 0..seqlen-2: at least two "
                f"positions to tell apart), got {self.seqlen}",
            )

    def logistic_config(self) -> LogisticConfig:
        return LogisticConfig(self.solver, self.C, self.tol, self.max_iter, self.seed)


def encode_texts(model, texts: Texts, cfg: Config) -> TokenBatch:
    """The first ``cfg.seqlen`` text tokens of each text (texts with fewer are refused, by name), with
    BOS iff ``cfg.bos`` for a causal LM, and ``<s> ... </s>`` for a masked LM."""
    masked = arch.kind_of(model) == "masked"
    return encode(
        model,
        texts,
        bos=cfg.bos or masked,
        max_tokens=cfg.seqlen,
        min_tokens=cfg.seqlen,
        fix="lower --seqlen or use longer texts",
    )


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
        raise DataError(
            f"loss_matrix needs the same number of text tokens in every row, got {counts}: encode "
            "with max_tokens = min_tokens (encode_texts)"
        )
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
    position begins (:func:`mechlens.encoding.word_index`), -1 where that token begins no word (it is
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
    statsmodels, or from the normal equations over every training row when the matrix is a sample of
    them (``method``); ``summary``: statsmodels' table as printed (or the same numbers from the normal
    equations). Rows are the matrix flattened text by text (row ``i * n_pos + p`` is text i, position p);
    ``predictions`` are the fit's at those rows."""

    params: Float[np.ndarray, "2"]
    bse: Float[np.ndarray, "2"]
    tvalues: Float[np.ndarray, "2"]
    pvalues: Float[np.ndarray, "2"]
    r2: float
    r2_adj: float
    nobs: int
    summary: str
    method: str  # "statsmodels" (the rows themselves) or "normal equations" (every row, streamed)
    sklearn_intercept: float = not_in_metrics()  # sklearn LinearRegression on the matrix's rows
    sklearn_slope: float = not_in_metrics()
    predictions: Float[np.ndarray, " row"] = not_in_metrics()  # fitted position of every row
    position: Int[np.ndarray, " row"] = not_in_metrics()  # true position of every row
    loss: Float[np.ndarray, " row"] = not_in_metrics()  # the loss of every row (float64)


def fit_position_ols(
    losses: Float[Tensor, "batch text_pos"] | Float[np.ndarray, "batch text_pos"],
    equations: NormalEquations | None = None,
) -> OLSFit:
    """Regress position on loss, ``position ~ const + loss``, over every (text, position) of the loss
    matrix ``[texts, positions]`` (e.g. ``loss_matrix(...).loss``): statsmodels OLS (the full table) and
    sklearn's LinearRegression (the same intercept and slope), in float64.

    ``equations``: the normal equations of the same regression over every training row (``x`` the loss,
    ``y`` the position; :attr:`LossStream.equations`) when ``losses`` is a sample of those rows. If they
    cover more rows than ``losses``, the OLS numbers (params, bse, t, p, R², nobs) come from them, so they
    are those of every row; sklearn's line and the rows' predictions stay on ``losses``. If they cover
    exactly ``losses``' rows, statsmodels runs on the rows (the two agree to ~1e-12)."""
    x = _as_array(losses)
    pos = np.tile(np.arange(x.shape[1]), len(x))
    require_finite("fit_position_ols", {"the loss matrix": x})
    check_regression(
        x.reshape(-1),
        pos,
        n_params=2,
        what="the OLS of position on loss",
        x_name="loss",
        y_name="position",
        fix="raise --seqlen or pass more or other texts (--data, --n-train)",
    )
    if equations is None or int(equations.n) == pos.size:
        lin = ols(x.reshape(-1), pos)
        require_finite("fit_position_ols", {k: lin[k] for k in ("params", "bse", "tvalues", "pvalues", "r2")})
        return OLSFit(
            params=np.asarray(lin["params"]),
            bse=np.asarray(lin["bse"]),
            tvalues=np.asarray(lin["tvalues"]),
            pvalues=np.asarray(lin["pvalues"]),
            r2=lin["r2"],
            r2_adj=lin["r2_adj"],
            nobs=lin["nobs"],
            summary=lin["summary"],
            method="statsmodels",
            sklearn_intercept=lin["sklearn_intercept"],
            sklearn_slope=float(lin["sklearn_coef"][0]),
            predictions=np.asarray(lin["predictions"], dtype=np.float64),
            position=pos,
            loss=x.reshape(-1).astype(np.float64),
        )
    from sklearn.linear_model import LinearRegression

    fit = equations.fit()
    require_finite("fit_position_ols", {k: fit[k] for k in ("params", "bse", "tvalues", "pvalues", "r2")})
    params = np.asarray(fit["params"], dtype=np.float64)
    rows = x.reshape(-1).astype(np.float64)
    sk = LinearRegression().fit(rows[:, None], pos.astype(np.float64))
    return OLSFit(
        params=params,
        bse=np.asarray(fit["bse"], dtype=np.float64),
        tvalues=np.asarray(fit["tvalues"], dtype=np.float64),
        pvalues=np.asarray(fit["pvalues"], dtype=np.float64),
        r2=fit["r2"],
        r2_adj=fit["r2_adj"],
        nobs=fit["nobs"],
        summary=normal_equations_summary(fit, pos.size),
        method="normal equations",
        sklearn_intercept=float(sk.intercept_),
        sklearn_slope=float(sk.coef_[0]),
        predictions=params[0] + params[1] * rows,
        position=pos,
        loss=rows,
    )


def normal_equations_summary(fit: Mapping[str, Any], sample_rows: int) -> str:
    """statsmodels' OLS table (its model, coefficient and confidence-interval rows) from the numbers of
    :meth:`~mechlens.stats.streaming.NormalEquations.fit`; residual diagnostics (Durbin-Watson,
    Jarque-Bera, omnibus) need the rows and are left out."""
    from scipy import stats

    t = stats.t.ppf(0.975, fit["df_resid"])
    width = 78
    rows = [
        ("Dep. Variable:", "y", "R-squared:", f"{fit['r2']:.3f}"),
        ("Model:", "OLS", "Adj. R-squared:", f"{fit['r2_adj']:.3f}"),
        ("Method:", "Normal equations", "F-statistic:", f"{fit['fvalue']:.4g}"),
        ("No. Observations:", str(fit["nobs"]), "Prob (F-statistic):", f"{fit['f_pvalue']:.3g}"),
        ("Df Residuals:", f"{fit['df_resid']:.0f}", "Log-Likelihood:", f"{fit['llf']:.5g}"),
        ("Df Model:", f"{fit['df_model']:.0f}", "AIC:", f"{fit['aic']:.4g}"),
        ("Covariance Type:", "nonrobust", "BIC:", f"{fit['bic']:.4g}"),
    ]
    lines = ["OLS Regression Results".center(width), "=" * width]
    lines += [f"{a:<20}{b:>18}   {c:<21}{d:>16}" for a, b, c, d in rows]
    lines += [
        "=" * width,
        f"{'':<10}{'coef':>10}{'std err':>11}{'t':>11}{'P>|t|':>11}{'[0.025':>12}{'0.975]':>12}",
        "-" * width,
    ]
    for name, b, se, tv, pv in zip(
        ("const", "x1"), fit["params"], fit["bse"], fit["tvalues"], fit["pvalues"], strict=True
    ):
        lines.append(f"{name:<10}{b:>10.4f}{se:>11.3f}{tv:>11.3f}{pv:>11.3f}{b - t * se:>12.3f}{b + t * se:>12.3f}")
    lines += [
        "=" * width,
        "Notes:",
        f"[1] y: position, x1: loss. From the normal equations over every training row ({fit['nobs']} rows,",
        f"    streamed); sklearn's line and the predictions are over a seeded sample of {sample_rows} rows.",
        "[2] Residual diagnostics (Durbin-Watson, Jarque-Bera, omnibus) need the rows: not computed.",
    ]
    return "\n".join(lines)


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
    require_finite("fit_position_logistic", {"the training loss matrix": x_train, "the test loss matrix": x_test})
    if n_pos < 2 or len(x_test) == 0:
        raise DataError(
            f"fit_position_logistic needs >= 2 positions and >= 1 test text, got {n_pos} positions and "
            f"{len(x_test)} test texts: raise --seqlen or --n-test"
        )
    if zero_variance(x_train):
        raise DataError(
            f"fit_position_logistic: the training loss has the same value at all {x_train.size} "
            "points, so no position can be told from it: pass other texts (--data) or model"
        )
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
    for split, true, pred in (
        ("train", fit.position_train, fit.predicted_train),
        ("test", fit.position_test, fit.predicted_test),
    ):
        cm = confusion_matrix(true, pred, labels=fit.classes)
        out[f"counts_{split}"] = cm.astype(np.int64)
        out[f"row_percent_{split}"] = 100.0 * cm / np.maximum(cm.sum(1, keepdims=True), 1)
    return Confusion(classes=fit.classes, **out)


# -- the stream's accumulators (filled by mechlens.studies.position.stream) ---------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the text tokens sit in every encoded row (all rows alike: ``seqlen`` text tokens, no padding):
    ``head`` special tokens before them (BOS or ``<s>``), ``tail`` after (``</s>``), ``width`` columns;
    the loss matrix has ``n_pos`` positions, at columns ``head .. head + n_pos - 1``."""

    kind: str
    head: int
    tail: int
    seqlen: int

    @classmethod
    def of(cls, model, cfg: Config) -> Layout:
        masked = arch.kind_of(model) == "masked"
        kind = "pseudo-log-likelihood" if masked else "next-token"
        return cls(kind, int(cfg.bos or masked), int(masked), cfg.seqlen)

    @property
    def width(self) -> int:
        return self.head + self.seqlen + self.tail

    @property
    def n_pos(self) -> int:
        return self.seqlen if self.kind == "pseudo-log-likelihood" else self.seqlen - 1

    def column(self, n: int) -> Int[Tensor, "batch text_pos"]:
        return torch.arange(self.head, self.head + self.n_pos).expand(n, self.n_pos).contiguous()

    def text_mask(self, n: int) -> Bool[Tensor, "batch pos"]:
        row = [False] * self.head + [True] * self.seqlen + [False] * self.tail
        return torch.tensor(row, dtype=torch.bool).expand(n, self.width).contiguous()


@dataclasses.dataclass(frozen=True)
class LossStream:
    """The loss matrices of the training and test splits of a stream of texts, accumulated batch by batch
    (:func:`stream_losses`) and merged over the ranks: per split the float64 moments of the loss by
    position over every text (``moments_*``), the normal equations of ``position ~ const + loss`` over
    every training row (``equations``), and a seeded reservoir of at most ``n_samples`` whole texts
    (``reservoir_*``, keyed by global text index; each row holds the text's losses, word indices and
    encoded tokens). ``n_*``: texts seen per split."""

    layout: Layout
    n_train: int
    n_test: int
    moments_train: Moments
    moments_test: Moments
    equations: NormalEquations
    reservoir_train: Reservoir
    reservoir_test: Reservoir

    @property
    def kind(self) -> str:
        return self.layout.kind

    def complete(self, split: str | None = None) -> bool:
        """Whether the reservoir of ``split`` (default: of both) holds every text of the split."""
        splits = SPLITS if split is None else (split,)
        return all(len(getattr(self, f"reservoir_{s}")) == getattr(self, f"n_{s}") for s in splits)

    def index(self, split: str) -> Int[np.ndarray, " batch"]:
        """The kept texts' indices within their split (the global index, less ``n_train`` for the test split)."""
        offset = 0 if split == "train" else self.n_train
        return getattr(self, f"reservoir_{split}").index.astype(np.int64) - offset

    def _rows(self, split: str) -> np.ndarray:
        rows = getattr(self, f"reservoir_{split}").rows
        width = 2 * self.layout.n_pos + self.layout.width
        return np.zeros((0, width)) if rows is None else rows

    def word(self, split: str) -> Int[np.ndarray, "batch text_pos"]:
        """The word index of the token at each position of the kept texts (:func:`word_of`)."""
        n_pos = self.layout.n_pos
        return self._rows(split)[:, n_pos : 2 * n_pos].astype(np.int64)

    def sample(self, split: str) -> LossMatrix:
        """The loss matrix of the kept texts of ``split``, in global order: when the reservoir holds the
        whole split, exactly the :func:`loss_matrix` of the split's texts."""
        lay, rows = self.layout, self._rows(split)
        n, n_pos = len(rows), lay.n_pos
        tokens = torch.from_numpy(rows[:, 2 * n_pos :].astype(np.int64))
        batch = TokenBatch(
            tokens=tokens,
            attention_mask=torch.ones_like(tokens),
            text_mask=lay.text_mask(n),
            bos=lay.head == 1,
            padding_side="right",
        )
        column = lay.column(n)
        token = tokens.gather(1, column)
        target = token if lay.kind == "pseudo-log-likelihood" else tokens.gather(1, column + 1)
        loss = torch.from_numpy(rows[:, :n_pos].astype(np.float32))
        return LossMatrix(loss, column, token, target, lay.kind, batch)


# -- the composed result ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    intercept: float
    slope: float


def degenerate_notes(train: LossMatrix, test: LossMatrix, sampled: bool = False) -> list[str]:
    """What makes the statistics on these loss matrices degenerate, in words (:mod:`mechlens.stats.degenerate`:
    marked, not refused): training texts repeated (as encoded tokens), test texts equal to a training text.
    Counted over the matrices' texts (a sample of the splits when ``sampled``)."""
    rep_train, in_train = repeated_rows(train.batch.tokens.numpy(), test.batch.tokens.numpy())
    kept = " of the sampled" if sampled else ""
    notes = []
    if rep_train:
        notes.append(
            f"{rep_train}{kept} of {len(train.loss)} training texts repeat an earlier one (as tokens): "
            "the OLS p-values count them as independent"
        )
    if in_train:
        notes.append(
            f"{in_train}{kept} of {len(test.loss)} test texts are identical (as tokens) to a training "
            "text: the test accuracy is not on fresh texts"
        )
    return notes


@dataclasses.dataclass(frozen=True)
class LossByPosition:
    """Part 1's statistics over every text of the splits: the mean (and std) loss by position and the
    number of texts per split (``n_texts_*``); ``train_index`` / ``test_index``: the indices in their split
    of the texts whose loss matrices were kept (all of them, or the reservoirs' seeded sample)."""

    mean: Float[np.ndarray, " text_pos"]
    std: Float[np.ndarray, " text_pos"]
    mean_test: Float[np.ndarray, " text_pos"]
    n_texts_train: int
    n_texts_test: int
    train_index: Int[np.ndarray, " batch"]
    test_index: Int[np.ndarray, " batch_test"]

    @classmethod
    def of(cls, train: LossMatrix, test: LossMatrix, stream: LossStream | None = None) -> LossByPosition:
        """From the kept matrices, or from ``stream``'s moments over every text unless its reservoirs hold
        every text (then, as without it, from the matrices)."""
        if stream is None or stream.complete():
            mean, std, mean_test = train.mean_by_position(), train.std_by_position(), test.mean_by_position()
        else:
            mean, std, mean_test = stream.moments_train.mean, stream.moments_train.std, stream.moments_test.mean
        return cls(
            mean=mean,
            std=std,
            mean_test=mean_test,
            n_texts_train=len(train.loss) if stream is None else stream.n_train,
            n_texts_test=len(test.loss) if stream is None else stream.n_test,
            train_index=np.arange(len(train.loss)) if stream is None else stream.index("train"),
            test_index=np.arange(len(test.loss)) if stream is None else stream.index("test"),
        )


@dataclasses.dataclass(frozen=True)
class PositionResult:
    """The study's typed result (``StudyResult.parts``): its parts (the loss statistics by position, the
    OLS, the logistic regression, the confusion matrices), the kept loss matrices ``train`` and ``test``,
    ``word`` (the word index of the token at each training position, -1 where none: see :func:`word_of`)
    and ``degenerate`` (why these numbers are not findings; empty for sound inputs). The flat
    ``results.json`` names are :class:`~mechlens.result.view` s of the parts, declared below (the study's
    name map; nothing is stored twice).

    The loss by position (``loss_*``) and the OLS are over every text of the splits (``n_texts_*``); the
    logistic regression, the confusion matrices, sklearn's line and ``linear_predictions`` over the texts
    kept in the reservoirs (``logistic_sample_texts``, ``logistic_sample_texts_test``): all of them unless
    ``sampled``."""

    ols: OLSFit
    logistic: LogisticFit
    degenerate: list[str]  # why these numbers are not findings (degenerate_notes); empty for sound inputs
    by_position: LossByPosition = not_in_metrics()
    train: LossMatrix = not_in_metrics()
    test: LossMatrix = not_in_metrics()
    confusion: Confusion = not_in_metrics()
    word: Int[np.ndarray, "batch text_pos"] = not_in_metrics()

    loss_mean_by_position = view("by_position.mean")
    loss_std_by_position = view("by_position.std")
    loss_mean_by_position_test = view("by_position.mean_test")
    sklearn_linear = view(lambda r: Line(r.ols.sklearn_intercept, r.ols.sklearn_slope))
    linear_predictions = view("ols.predictions")
    logistic_accuracy_train = view("logistic.accuracy_train")
    logistic_accuracy_test = view("logistic.accuracy_test")
    accuracy_by_position_train = view("logistic.accuracy_by_position_train")
    accuracy_by_position_test = view("logistic.accuracy_by_position_test")
    confusion_train = view("confusion.counts_train")
    confusion_test = view("confusion.counts_test")
    confusion_row_percent_train = view("confusion.row_percent_train")
    confusion_row_percent_test = view("confusion.row_percent_test")
    loss_kind = view("train.kind")
    n_texts_train = view("by_position.n_texts_train")
    n_texts_test = view("by_position.n_texts_test")
    logistic_sample_texts = view(lambda r: len(r.train.loss))
    logistic_sample_texts_test = view(lambda r: len(r.test.loss))
    sampled = view(lambda r: r.logistic_sample_texts < r.n_texts_train or r.logistic_sample_texts_test < r.n_texts_test)

    @property
    def train_index(self) -> Int[np.ndarray, " batch"]:
        return self.by_position.train_index

    @property
    def test_index(self) -> Int[np.ndarray, " batch_test"]:
        return self.by_position.test_index

    @classmethod
    def of(
        cls,
        train: LossMatrix,
        test: LossMatrix,
        lin: OLSFit,
        logit: LogisticFit,
        conf: Confusion,
        word: Int[np.ndarray, "batch text_pos"],
        stream: LossStream | None = None,
    ) -> PositionResult:
        """Compose the parts. ``stream``: the :class:`LossStream` that ``train`` and ``test`` were sampled
        from (:meth:`LossByPosition.of`)."""
        by_position = LossByPosition.of(train, test, stream)
        sampled = len(train.loss) < by_position.n_texts_train or len(test.loss) < by_position.n_texts_test
        return cls(
            ols=lin,
            logistic=logit,
            degenerate=degenerate_notes(train, test, sampled),
            by_position=by_position,
            train=train,
            test=test,
            confusion=conf,
            word=word,
        )
