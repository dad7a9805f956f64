"""Study 1's stream (:mod:`mechlens.studies.position`): the loss matrices of a corpus, batch by batch, with
memory constant in the number of texts, merged over the ranks under ``torchrun``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mechlens import distributed, progress
from mechlens.encoding import TokenBatch
from mechlens.errors import DataError, MechlensError
from mechlens.stats.streaming import Moments, NormalEquations, Reservoir
from mechlens.studies.position.parts import SPLITS, Config, Layout, LossStream, encode_texts, loss_matrix, word_of

# -- the stream: the loss matrices of a corpus, batch by batch (memory constant in the number of texts) ----------


def _split_batches(texts: Iterable[tuple[int, Any]], n_train: int, batch_size: int) -> Iterator[tuple[str, list]]:
    """``(split, [(global index, text), ...])`` mini-batches of at most ``batch_size`` texts, never spanning
    the two splits (so one process forwards exactly the mini-batches of the whole splits' matrices)."""
    chunk: list = []
    split = "train"
    for i, t in texts:
        s = "train" if i < n_train else "test"
        if chunk and (s != split or len(chunk) == batch_size):
            yield split, chunk
            chunk = []
        split = s
        chunk.append((i, t))
    if chunk:
        yield split, chunk


def _encode_chunk(model, chunk: list, cfg: Config) -> TokenBatch:
    """:func:`encode_texts` of a mini-batch; a text with fewer than ``seqlen`` tokens is named by its
    global index (the position in the source)."""
    try:
        return encode_texts(model, [t for _, t in chunk], cfg)
    except DataError:
        for i, t in chunk:
            try:
                encode_texts(model, [t], cfg)
            except DataError as e:
                if "fewer than" in str(e):
                    raise DataError(
                        f"text #{i} of the source has fewer than {cfg.seqlen} tokens ({t!r}): lower "
                        "--seqlen or use longer texts"
                    ) from None
                raise DataError(f"text #{i} of the source: {e}") from None
        raise


def _local_batches(n_train: int, n_test: int, batch_size: int) -> int:
    """How many mini-batches this rank's shard of the two splits makes (the progress bar's total)."""
    rank, world_size = distributed.world()
    train = len(range(rank, n_train, world_size))
    test = len(range(n_train + (rank - n_train) % world_size, n_train + n_test, world_size))
    return math.ceil(train / batch_size) + math.ceil(test / batch_size)


def stream_losses(model, texts: Iterable[tuple[int, Any]], cfg: Config, n_train: int, n_test: int) -> LossStream:
    """The loss matrices of a stream of ``(global index, text)`` pairs (:func:`mechlens.data.iter_indexed`,
    this rank's shard under ``torchrun``; texts are strings or token ids of the text tokens): texts with
    global index < ``n_train`` form the training split, the next ``n_test`` the test split. Each
    mini-batch of ``cfg.batch_size`` texts is encoded (:func:`encode_texts`), its :func:`loss_matrix`
    computed and accumulated (:class:`LossStream`), then dropped, so memory is constant in the number of
    texts: ``2 * n_samples`` texts' rows at most. The accumulators are merged over the ranks of a process
    group; every rank returns the same stream. A bad text raises on every rank."""
    layout = Layout.of(model, cfg)
    n_pos = layout.n_pos
    moments = {s: Moments(n_pos) for s in SPLITS}
    equations = NormalEquations(1)
    reservoirs = {s: Reservoir(cfg.reservoir, cfg.seed) for s in SPLITS}
    positions = np.arange(n_pos, dtype=np.float64)
    total = _local_batches(n_train, n_test, cfg.batch_size)
    batches = progress.bar(
        _split_batches(texts, n_train, cfg.batch_size),
        "study 1: losses",
        unit="batch",
        show=distributed.is_main(),
        total=total,
    )
    with distributed.share_then_merge(*moments.values(), equations, *reservoirs.values()):
        for split, chunk in batches:
            batch = _encode_chunk(model, chunk, cfg)
            with progress.quiet():  # one bar: the stream's
                lm = loss_matrix(model, batch, cfg.batch_size)
            if lm.kind != layout.kind or tuple(batch.tokens.shape) != (len(chunk), layout.width):
                raise MechlensError(f"study 1: unexpected encoding {tuple(batch.tokens.shape)} (a bug in mechlens)")
            word = word_of(model, [t for _, t in chunk], lm)
            loss = lm.loss.numpy().astype(np.float64)
            moments[split].update(loss)
            if split == "train":
                equations.update(loss.reshape(-1), np.tile(positions, len(chunk)))
            rows = np.concatenate([loss, word.astype(np.float64), batch.tokens.numpy().astype(np.float64)], 1)
            reservoirs[split].update([i for i, _ in chunk], rows)
    return LossStream(
        layout=layout,
        n_train=int(moments["train"].count[0]),
        n_test=int(moments["test"].count[0]),
        moments_train=moments["train"],
        moments_test=moments["test"],
        equations=equations,
        reservoir_train=reservoirs["train"],
        reservoir_test=reservoirs["test"],
    )
