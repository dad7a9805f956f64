"""Study 1 -- predict a token's position from its loss.

The first ``seqlen`` tokens of ``n_train`` texts (and a fresh ``n_test``) go through the model; the
per-token loss matrix is regressed on position (OLS, statsmodels + sklearn) and position is
classified from loss (multinomial logistic regression), with confusion matrices and per-position
accuracy on the training texts and on the fresh test texts.

Parts, in the original notebook's order: :func:`loss_matrix` (the loss of every text token by text
position), :func:`fit_position_ols` (position ~ const + loss), :func:`fit_position_logistic` (position
classified from loss) and :func:`confusion` (its confusion matrices). :func:`run` composes them into a
:class:`PositionResult` (``StudyResult.parts``; ``results.json`` is derived from it) and
:func:`samples` gives its per-text losses for cross-model comparison.

Corpus scale: :func:`run` streams the texts (:func:`mechlens.data.iter_indexed`: the training split is
the first ``n_train`` texts of the source, the test split the next ``n_test``, by global index, so
sharding does not change it), tokenises and forwards them one mini-batch at a time
(:func:`stream_losses`) and accumulates, in memory constant in the number of texts: the loss by
position (:class:`~mechlens.stats.streaming.Moments`), the OLS of position on loss as normal equations
(:class:`~mechlens.stats.streaming.NormalEquations`) and, per split, a seeded reservoir of at most
``n_samples`` whole texts (:class:`~mechlens.stats.streaming.Reservoir`, keyed by global text index).
The loss by position and the OLS are over every text; the logistic regression, the confusion
matrices, sklearn's line, the predictions, the loss table and :func:`samples` are over the reservoir,
which holds the whole split unless it has more than ``n_samples`` texts (then ``sampled`` is true and
``logistic_sample_texts`` says how many). When it holds the whole split the results are those of the
loss matrices of the whole splits (statsmodels' OLS table included). Under ``torchrun`` each rank
streams its shard and the accumulators are merged (:func:`mechlens.distributed.merge`), so every rank
computes the same results.

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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from mechlens import distributed
from mechlens.data import iter_texts, load_texts, shard, split_train_test
from mechlens.encoding import Texts
from mechlens.errors import DataError
from mechlens.loading import provenance_of
from mechlens.result import StudyResult, metrics_of, sample_table
from mechlens.studies.position.figures import (
    FIGURES,
    compare,
    confusion_figures,
    figures,
    headline,
    logistic_figures,
    loss_figures,
    ols_figures,
)
from mechlens.studies.position.lesson import (
    LESSON,
)
from mechlens.studies.position.parts import (
    SOLVERS,
    SPLITS,
    Config,
    Confusion,
    Layout,
    Line,
    LogisticFit,
    LossByPosition,
    LossMatrix,
    LossStream,
    OLSFit,
    PositionResult,
    confusion,
    degenerate_notes,
    encode_texts,
    fit_position_logistic,
    fit_position_ols,
    loss_matrix,
    normal_equations_summary,
    pseudo_log_likelihood,
    word_of,
)
from mechlens.studies.position.stream import stream_losses

PEEK = 1000  # texts counted before the stream: enough to apply the default split, min(500, half the texts)


def _count(source: str, limit: int) -> int:
    return sum(1 for _ in iter_texts(source, limit))


def split_sizes(cfg: Config, texts: Sequence | None = None) -> tuple[int, int]:
    """``(n_train, n_test)``: ``cfg.n_train`` / ``cfg.n_test``, each defaulting to ``min(500, half the
    texts)``. Only the first ``min(1000, n_train + n_test)`` texts of ``cfg.data`` are counted (on rank 0
    under ``torchrun``), not the corpus: a source found shorter than the split is refused here, before any
    forward pass, naming how many texts it has; a longer split of a longer source is checked at the end
    of the stream (:func:`run`)."""
    given = cfg.n_train is not None and cfg.n_test is not None
    limit = min(cfg.n_train + cfg.n_test, PEEK) if given else PEEK
    if texts is not None:
        count, exact = len(texts), True
    else:
        count = distributed.on_main(_count, cfg.data, limit)
        exact = count < limit
    half = min(500, count // 2) if exact else 500
    n_train, n_test = cfg.n_train or half, cfg.n_test or half
    if exact and min(n_train, n_test) < 1:  # 0 or 1 texts: the default split leaves a split empty
        where = "the list passed as texts=" if texts is not None else f"--data {cfg.data}"
        raise DataError(
            f"the position study needs at least 2 texts (--n-train training texts and --n-test fresh test texts, "
            f">= 1 each), {where} holds {count}: pass more texts"
        )
    if exact:
        split_train_test(range(count), n_train, n_test)  # raises naming how many texts exist
    return n_train, n_test


def split_texts(cfg: Config, texts: Texts | None = None) -> tuple[list, list]:
    """The training texts (the first ``n_train`` of ``texts``, default: those of ``cfg.data``) and the
    fresh test texts (the next ``n_test``); both default to ``min(500, len(texts) // 2)``, as lists (for
    a corpus, :func:`run` streams them instead)."""
    n_train, n_test = split_sizes(cfg, texts)
    texts = load_texts(cfg.data, n_train + n_test) if texts is None else texts
    return split_train_test(texts, n_train, n_test)


def run(model, cfg: Config | None = None, texts: Texts | None = None) -> StudyResult:
    """Run the four parts on the training texts and the fresh test texts of ``texts`` (default: the
    texts of ``cfg.data``; strings, or token ids of the text tokens only), streamed
    (:func:`stream_losses`): the first ``n_train`` texts of the source train, the next ``n_test`` test
    (:func:`split_sizes`). Texts given in Python are indexed by their place in the list; under
    ``torchrun`` each rank takes the texts ``i`` with ``i % world_size == rank``, and every rank returns
    the same result. With at most ``cfg.reservoir`` texts per split (the default data) the results are
    those of the whole splits' loss matrices; beyond, see :class:`PositionResult`."""
    cfg = cfg or Config()
    if texts is not None and not isinstance(texts, Sequence):
        texts = list(texts)
    n_train, n_test = split_sizes(cfg, texts)
    stream = shard(cfg.data if texts is None else texts, n_train + n_test)  # this rank's share
    torch.manual_seed(cfg.seed)
    losses = stream_losses(model, stream, cfg, n_train, n_test)
    split_train_test(range(losses.n_train + losses.n_test), n_train, n_test)  # a source shorter than the split
    train, test = losses.sample("train"), losses.sample("test")
    lin = fit_position_ols(train.loss, losses.equations)
    logit = fit_position_logistic(train.loss, test.loss, cfg)
    parts = PositionResult.of(train, test, lin, logit, confusion(logit), losses.word("train"), losses)
    batch = train.batch
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    n_pos = train.loss.shape[1]
    tables = {
        "loss_matrix": [
            {"split": s, "text": int(i), "position": p, "loss": float(v)}
            for s, mat, index in (("train", train.loss, parts.train_index), ("test", test.loss, parts.test_index))
            for i, row in zip(index, mat.tolist(), strict=True)
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
        config=dataclasses.asdict(cfg) | {"n_train": n_train, "n_test": n_test},
        tables=tables,
        parts=parts,
    )
    result.figures = figures(parts)
    return result


# -- per-unit samples for cross-model comparison ------------------------------------------------------------------


def incomparable(provenances: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Quantities of :func:`samples` that are not comparable between these models: ``loss`` when causal
    and masked LMs are compared (a next-token loss from the tokens before vs a pseudo-log-likelihood of
    the token itself with its position masked)."""
    kinds = {m: p.get("kind") for m, p in provenances.items()}
    if len(set(kinds.values())) > 1:
        return {
            "loss": "causal LMs give the next-token loss, masked LMs the pseudo-log-likelihood: "
            + ", ".join(f"{m}: {k}" for m, k in kinds.items())
        }
    return {}


def samples(result: StudyResult) -> pd.DataFrame:
    """The training loss matrix as one row per (text, position): quantity "loss" (nats; next-token or
    pseudo-log-likelihood, as ``loss_kind``), unit "text", ``sample`` = the text's index in the training
    split (the same for every model fed the same inputs), ``position`` = text position p, ``word`` = the
    index of the whitespace word that the token at p begins (for a causal LM, the token the prediction
    is made from, not the predicted token p+1; <NA> inside a word or for token-id inputs), no layer
    (``layer`` <NA>, ``relative_depth`` NaN). The texts are those of the training reservoir: every
    training text unless the split has more than ``n_samples`` (``sampled``), then a seeded sample of
    ``logistic_sample_texts`` of them (the same texts for every model and any sharding). Without
    sampling, the mean of ``value`` per position is ``loss_mean_by_position``."""
    parts: PositionResult = result.parts
    loss = parts.train.loss.numpy().astype(np.float64)
    n, n_pos = loss.shape
    word = parts.word.reshape(-1)
    return sample_table(
        "loss",
        loss.reshape(-1),
        unit="text",
        sample=np.repeat(np.asarray(parts.train_index, dtype=np.int64), n_pos),
        position=np.tile(np.arange(n_pos), n),
        word=word,
    )


__all__ = [
    "FIGURES",
    "LESSON",
    "PEEK",
    "SOLVERS",
    "SPLITS",
    "Config",
    "Confusion",
    "Layout",
    "Line",
    "LogisticFit",
    "LossByPosition",
    "LossMatrix",
    "LossStream",
    "OLSFit",
    "PositionResult",
    "compare",
    "confusion",
    "confusion_figures",
    "degenerate_notes",
    "encode_texts",
    "figures",
    "fit_position_logistic",
    "fit_position_ols",
    "headline",
    "incomparable",
    "logistic_figures",
    "loss_figures",
    "loss_matrix",
    "normal_equations_summary",
    "ols_figures",
    "pseudo_log_likelihood",
    "run",
    "samples",
    "split_sizes",
    "split_texts",
    "stream_losses",
    "word_of",
]
