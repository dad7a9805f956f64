"""Training a tuned lens (:mod:`mechlens.lens.tuned`).

Training (:func:`train_tuned_lens`) minimises, for every readout point but the last, the mean over
positions of ``KL(final || translated readout)`` in nats, where "final" is the model's own output
distribution: over next-token positions for causal LMs, over masked positions for masked LMs (a seeded
``mask_prob`` of each text's tokens replaced by the mask token; the final distribution is the model's
prediction at that masked position). The loss is the sum over readout points of each point's mean KL,
so each translator receives the gradient of its own point's mean KL only. **The last readout point's
translator is not trained**: it is held at the identity (its readout is the model's output, KL 0), and
the saved file stores it as an exact identity.

The recipe is the reference implementation's (``tuned-lens`` 0.2.0, the paper's code): SGD with Nesterov
momentum 0.9, a learning-rate scale of 1.0 decayed linearly to 0 over the run, weight decay 1e-3 (towards the
identity: it is applied to ``W_l - I``), no warm-up, the gradient norm of all translators together clipped
at 1.0 before each step, 250 steps; as in the reference the SGD step size is ``lr * (1 - momentum)``. Before
clipping was part of the recipe the default scale was 0.1, because 1.0 diverged on both embedded models
(tiny-gpt2's mean KL went from 6.4 to 22 nats in 3 steps): the first steps' gradients are large (norms of
tens), and the clip bounds them; with it, 1.0 decreases the loss steadily (issue 29, ``benchmarks/RESULTS.md``:
tiny-mlm's held-out KL after 20 steps, ``training/tuned_lens_sweep.py``; tiny-gpt2's against the package,
``benchmarks/tuned_lens.py --reference-only``). The batch is sized for a CPU
(16 texts of at most 128 tokens per step, against the paper's 2^18 tokens): the card records both. The
defaults are in :class:`TrainConfig` with the reason for each. Texts stream through :mod:`mechlens.data`
(any ``--data`` source), tokenised one step at a time; the residual stream comes from one forward per
step through the TransformerLens hook points, stopped at the last readout point (:func:`stream_rows`; no
gradient through the model, no unembedding); the vocabulary readout materialises one chunk of rows of all
readout points at a time (``[points x rows, d_vocab]``, bounded by ``max_chunk_bytes``): :func:`kl_points`
reads the final distribution once per chunk for every point and uses the closed-form gradient
``softmax(z) - p_final``. The points' vocabulary products run in the dtype of ``readout_dtype``
(:func:`readout_dtype`: bfloat16 where it is native hardware arithmetic, else float32), recorded in the card.

**Data parallel**: under ``torchrun`` each rank streams every N-th text (:func:`mechlens.data.iter_indexed`);
step ``s`` covers the texts of global indices ``[s * batch_size, (s + 1) * batch_size)`` of the stream
(the held-out ones skipped), each rank computing the gradient of the summed KL of its own texts; the
gradients and position counts are summed with ``all_reduce`` (:func:`mechlens.distributed.all_reduce_sum`)
and divided by the global count before the optimiser step, so N processes take the same steps as one
(up to the order of float sums).

**Held-out split**: the first ``heldout`` texts of the source are held out and never trained on (the
stream of training texts starts at text ``heldout``); the card records the source, the split and the
number of texts trained on. The study (``mechlens run lens --tuned DIR --data SOURCE``) evaluates a lens
on the held-out texts only when SOURCE is its training source, and refuses ``--n-texts`` that would reach
training texts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from mechlens import arch, progress
from mechlens.errors import DataError, NonFiniteError
from mechlens.lens.tuned import (
    TunedLens,
    TunedLensCard,
    fingerprint,
    lens_inputs,
    model_label,
    residuals,
)
from mechlens.options import Options, fail, option

# -- training ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig(Options):
    """The training recipe. Defaults follow the reference implementation (SGD, Nesterov momentum 0.9, lr scale
    1.0 with linear decay, weight decay 1e-3, gradient norm clipped at 1.0, 250 steps); the batch is sized
    for a CPU (the paper's 2^18 tokens per step is ~1,000x more than a 2-core CPU does in a second on a
    50,257-token vocabulary)."""

    data: str | None = option(
        None,
        "training texts: a built-in name, a local .txt/.jsonl/.csv/.parquet file or "
        "hf:REPO[:CONFIG]:SPLIT[:COLUMN], streamed",
        nonempty=True,
    )
    n_texts: int | None = option(
        None, "read only the first N texts of --data (held-out ones included; default: all, cycled until --steps)", ge=1
    )
    heldout: int = option(100, "the first N texts of --data are held out: never trained on, kept for evaluation", ge=0)
    steps: int = option(250, "optimiser steps (the paper's 250)", ge=1)
    batch_size: int = option(16, "texts per step (all processes together; a multiple of the number of processes)", ge=1)
    max_tokens: int = option(128, "text tokens kept per text", ge=2)
    lr: float = option(
        1.0,
        "peak learning-rate scale, decayed linearly to 0; the SGD step size is lr * (1 - "
        "momentum), as in the tuned-lens reference implementation (its default 1.0, stable with "
        "--max-grad-norm; see the module docstring)",
        gt=0,
    )
    momentum: float = option(0.9, "Nesterov momentum (the paper's 0.9)", ge=0, le=0.999)
    weight_decay: float = option(1e-3, "weight decay towards the identity translator (the paper's 1e-3)", ge=0)
    max_grad_norm: float = option(
        1.0,
        "clip the gradient norm of all translators together at this value before "
        "each step, as the tuned-lens reference implementation does (0: no clipping)",
        ge=0,
    )
    mask_prob: float = option(0.15, "masked LMs: fraction of each text's tokens masked (BERT's 0.15)", gt=0, le=1)
    bos: bool = option(True, "causal LMs: prepend BOS (as the lens study does by default)")
    seed: int = option(0, "random seed (masking choice of masked LMs)", ge=0)
    max_chunk_bytes: int = option(
        256 * 2**20, "memory budget of one readout chunk [rows, d_vocab] in training (>= 1 MiB)", ge=2**20
    )
    evaluate: bool = option(True, "evaluate both lenses on the held-out texts at the end (recorded in the card)")
    readout_dtype: str = option(
        "auto",
        "type of the translated readouts' vocabulary products in training: bfloat16 (bf16 operands, fp32 "
        "sums, as the tuned-lens reference implementation's autocast), float32, or auto: bfloat16 where "
        "the hardware multiplies it natively (a CPU with AMX-BF16 or AVX512-BF16, a CUDA GPU that supports "
        "it), else float32; the card records the one used",
        choices=("auto", "float32", "bfloat16"),
    )


TunedLensConfig = TrainConfig  # the name exported from mechlens


def readout_dtype(choice: str, device) -> torch.dtype:
    """The dtype of training's vocabulary products for ``--readout-dtype`` ``choice`` on ``device``: ``auto``
    is bfloat16 only where it is native hardware arithmetic (CPUs with AMX-BF16 or AVX512-BF16
    (:func:`torch.cpu.get_capabilities`), CUDA GPUs with bf16 support), because elsewhere bf16 products are
    emulated and slower than fp32 (and then only lose precision)."""
    if choice != "auto":
        return getattr(torch, choice)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return torch.bfloat16 if caps.get("amx_bf16") or caps.get("avx512_bf16") else torch.float32
    return torch.float32


class _Stop(Exception):
    """Raised by the hook of the last readout point: the forward ends before the model's own readout."""


def stream_rows(model, inputs, rows: Tensor) -> Tensor:
    """``residuals(model, inputs)[:, rows]`` (``[point, n, d_model]``, the readout points at the positions
    ``rows`` selects) from a forward through the hook points that stops at the last readout point: training
    reads out the final point itself at the loss positions, so the model's final norm and unembedding over
    every (padded) position, a ``[batch, pos, d_vocab]`` product, would be discarded work. A non-finite
    activation takes the full forward (:func:`~mechlens.lens.tuned.residuals`), whose error names it."""
    import contextlib

    names = arch.readout_hook_names(model)
    got: dict[str, Tensor] = {}

    def keep(name: str, last: bool):
        def hook(act: Tensor, hook) -> Tensor:
            got[name] = act[rows]
            if last:
                raise _Stop
            return act

        return hook

    batch = inputs.batch.to(next(model.parameters()).device)
    fwd_hooks = [(name, keep(name, i == len(names) - 1)) for i, name in enumerate(names)]
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks), contextlib.suppress(_Stop):
        model(batch.tokens, attention_mask=batch.attention_mask)
    if len(got) != len(names) or not all(torch.isfinite(a).all() for a in got.values()):
        return residuals(model, inputs)[:, rows]
    return torch.stack([got[name] for name in names])


def _trained_points(n_points: int) -> list[int]:
    return list(range(n_points - 1))


class _Windows:
    """This rank's training texts, step window by step window: window ``s`` of an epoch holds the texts of
    global indices ``[heldout + s * size, heldout + (s + 1) * size)``; the source is re-read (a new epoch)
    when every rank has run out."""

    def __init__(self, open_stream, heldout: int, size: int):
        self.open, self.heldout, self.size = open_stream, heldout, size
        self.epoch, self.window = 0, 0
        self._start()

    def _start(self) -> None:
        self.it = iter(self.open())
        self.peek: tuple[int, str] | None = None
        self._advance()

    def _advance(self) -> None:
        for i, t in self.it:
            if i >= self.heldout:
                self.peek = (i, t)
                return
        self.peek = None

    def take(self) -> list[tuple[int, str]]:
        end = self.heldout + (self.window + 1) * self.size
        out = []
        while self.peek is not None and self.peek[0] < end:
            out.append(self.peek)
            self._advance()
        self.window += 1
        return out

    @property
    def exhausted(self) -> bool:
        return self.peek is None

    def restart(self) -> None:
        self.epoch += 1
        self.window = 0
        self._start()


def kl_sum(readout, h_final: Tensor, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``sum over rows of KL(softmax(readout(h_final)) || softmax(readout(h @ weight + bias)))`` in nats,
    differentiable in ``weight``, ``bias`` (and ``h``), with the final distribution held constant (no
    gradient flows into it). ``[rows, d_vocab]`` logits are materialised: call it on a chunk of rows
    (:func:`kl_rows`). Computed in float32, or float64 for float64 inputs."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        lp_f = torch.log_softmax(readout(h_final).to(acc), -1)
        p_f = lp_f.exp()
    lq = torch.log_softmax(readout(torch.addmm(bias, h, weight)).to(acc), -1)
    return (p_f * (lp_f - lq)).sum()


def rows_per_chunk(d_vocab: int, max_chunk_bytes: int, itemsize: int = 4) -> int:
    """Rows of one readout chunk: ~6 ``[rows, d_vocab]`` tensors are alive at once in :func:`kl_sum` and
    its backward (logits, log-probs of both distributions, the product, two gradient buffers)."""
    return max(1, max_chunk_bytes // (6 * itemsize * d_vocab))


def kl_rows(
    readout, h_final: Tensor, h: Tensor, weight: Tensor, bias: Tensor, max_chunk_bytes: int, backward: bool = True
) -> Tensor:
    """:func:`kl_sum` over all rows of ``h``, one chunk of :func:`rows_per_chunk` rows at a time (only that
    chunk's ``[rows, d_vocab]`` logits live); with ``backward`` each chunk's KL is backpropagated into
    ``weight``/``bias`` at once (gradients accumulate in ``.grad``). Returns the sum (float64, detached)."""
    d_vocab = readout.d_vocab if hasattr(readout, "d_vocab") else readout(h_final[:1]).shape[-1]
    rows = rows_per_chunk(d_vocab, max_chunk_bytes)
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, h.shape[0], rows):
        kl = kl_sum(readout, h_final[s : s + rows], h[s : s + rows], weight, bias)
        if backward:
            kl.backward()
        total += kl.detach().double().cpu()
    return total


def kl_points(
    readout,
    h_final: Tensor,
    hs: Sequence[Tensor],
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    max_chunk_bytes: int,
    *,
    dtype: torch.dtype = torch.float32,
    workspace: dict | None = None,
) -> Tensor:
    """For every readout point ``j``: ``sum over rows of KL(final || readout(hs[j] @ weights[j] + biases[j]))``
    (nats), with the gradient of that sum accumulated into the ``.grad`` of ``weights[j]``/``biases[j]``'s
    leaves. Returns the per-point sums (float64, detached).

    One training step's work, done once where :func:`kl_rows` per point would repeat it: the final
    distribution of a chunk of rows is read once for all points; the points' logits come from one
    ``[points * rows, d_model] @ [d_model, d_vocab]`` product into one buffer; and the gradient is the
    closed form ``dKL/dz = softmax(z) - p_final`` (no autograd graph over ``[rows, d_vocab]``: the vocabulary
    buffer is written by the product, rewritten in place by one fused softmax -- each row's max, exp and sum
    passes stay in cache -- and read once by the ``d_vocab``-side product ``softmax(z) @ W_U^T``), with
    autograd only through the translators and the readout's ``pre`` (final norm, MLM transform) on
    ``[points, rows, d_model]``. ``KL = sum p_f log p_f - sum_v p_f z_v + lse(z)``, where
    ``sum_v p_f z_v = pre(x) . (p_f @ W_U^T) + p_f . b_U`` needs no vocabulary-sized product and
    ``lse(z) = z_k - log softmax(z)_k`` at any word ``k`` (the final's top word; recomputed from the logits in
    a row where that probability is below 2^-100); the terms are summed in float64. A readout that is not a
    :class:`~mechlens.ops.lens_reduce.LinearReadout`, or is soft-capped, or float64 inputs, take
    :func:`kl_rows` per point (autograd).

    ``dtype`` is the points' vocabulary products' type (:func:`readout_dtype`): ``torch.bfloat16`` computes
    ``pre(x) @ W_U`` and ``softmax(z) @ W_U^T`` with bfloat16 operands and fp32 accumulation, the softmax in
    fp32 on bf16 storage, as the reference implementation's bfloat16 autocast does; the final distribution
    stays in fp32, and the gradient's other side ``p_final @ W_U^T`` uses the same bf16-rounded ``W_U`` (the
    gradient is then the derivative of the KL the forward computes, as under autocast; with the fp32 ``W_U``
    there it would carry the fixed error ``p_final @ (W_bf16 - W)^T``). ``workspace`` (a dict the caller
    keeps between calls) holds the vocabulary-sized buffers and the bfloat16 copies of ``W_U``, so that a
    training run allocates them once (fresh allocations of this size are page-faulted in on every step)."""
    from mechlens.ops.lens_reduce import LinearReadout

    n_points = len(hs)
    if not isinstance(readout, LinearReadout) or readout.softcap is not None or h_final.dtype == torch.float64:
        return torch.stack(
            [kl_rows(readout, h_final, hs[j], weights[j], biases[j], max_chunk_bytes) for j in range(n_points)]
        )
    ws = {} if workspace is None else workspace
    w_u = readout.weight.to(h_final.dtype)
    b_u = None if readout.bias is None else readout.bias.to(h_final.dtype)
    if b_u is not None and not bool(b_u.any()):  # an all-zero bias (GPT-2's): an addmm would copy it into z
        b_u = None
    low = dtype != h_final.dtype
    if low:  # the bfloat16 copies of the unembedding, made once per training run
        if ws.get("w_src") is not readout.weight or ws["w_low"].dtype != dtype:
            ws["w_src"], ws["w_low"] = readout.weight, w_u.to(dtype)
            ws["w_low_f"] = ws["w_low"].to(h_final.dtype)  # the same rounded values, for fp32 products
        w_z, b_z = ws["w_low"], None if b_u is None else b_u.to(dtype)
        # the final's side of the gradient, (q - p_final) @ W^T, must use the W of the forward (its bf16
        # rounding): p_final @ W_fp32^T beside q @ W_bf16^T would add p_final @ (W_bf16 - W)^T, a fixed error
        # that no step averages away (the translators would settle where it balances the gradient)
        w_p, b_p = ws["w_low_f"], None if b_z is None else b_z.to(h_final.dtype)
    else:
        w_z, b_z = w_u, b_u
        w_p, b_p = w_u, b_u
    d_vocab = w_u.shape[-1]
    item, item_f = torch.empty((), dtype=dtype).element_size(), h_final.element_size()
    # alive at once: the points' logits buffer, and the final chunk's logits and exp (fp32)
    rows = max(1, max_chunk_bytes // ((n_points * item + 2 * item_f) * d_vocab))
    n = h_final.shape[0]
    rows = min(rows, n)
    z_all = _workspace(ws, "z", rows * n_points * d_vocab, dtype, h_final.device)
    f_all = _workspace(ws, "final", 2 * rows * d_vocab, h_final.dtype, h_final.device)
    total = torch.zeros(n_points, dtype=torch.float64)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        r = e - s
        with torch.no_grad():
            # the final distribution by a fused softmax (fp32, every p_f rounded by 6e-8 relative, so they sum
            # to 1 within ~1e-7: an fp32 log_softmax's rounded logsumexp would shift every log p_f the same way
            # and bias the KL by ~1e-5 nats per row, measured); sum p_f log p_f = sum p_f (z - max) - log s
            # with pairwise fp32 sums, where at the top word k (z_k = max) p_k = 1 / s, s = sum exp(z - max)
            u_f = readout.pre(h_final[s:e])
            zm = f_all[: r * d_vocab].view(r, d_vocab)
            if b_u is None:
                torch.mm(u_f, w_u, out=zm)
            else:
                torch.addmm(b_u, u_f, w_u, out=zm)
            m_f, top = zm.max(-1, keepdim=True)
            p_f = torch.ops.aten._softmax.out(zm, -1, False, out=f_all[r * d_vocab : 2 * r * d_vocab].view(r, d_vocab))
            neg_h = zm.sub_(m_f).mul_(p_f).sum(-1).double() + p_f.gather(-1, top).view(r).double().log()
            pw = p_f @ w_p.T  # p_f @ W_U^T, [r, d_in] (W_U as the points' product rounds it)
            pb = (p_f @ b_p).double() if b_p is not None else torch.zeros_like(neg_h)
        x = torch.stack([torch.addmm(biases[j], hs[j][s:e], weights[j]) for j in range(n_points)])
        u = readout.pre(x)  # [point, r, d_in], with autograd
        with torch.no_grad():
            ud = u.detach().reshape(n_points * r, -1)
            z = z_all[: n_points * r * d_vocab].view(n_points * r, d_vocab)
            if b_z is None:
                torch.mm(ud.to(dtype), w_z, out=z)
            else:
                torch.addmm(b_z, ud.to(dtype), w_z, out=z)
            # lse(z) = z_k - log q_k at any word k: the final's top word (q_k is rarely tiny there; where it
            # underflows, that row's lse is recomputed from its logits)
            k = top.repeat(n_points, 1)
            z_k = z.gather(-1, k).double()
            if low:  # z becomes (q - p_final), computed in fp32 and rounded to bf16 once, as under autocast
                q_k = _softmax_minus_final(z, p_f, top, n_points, r, ws)
            else:
                q = torch.ops.aten._softmax.out(z, -1, False, out=z)  # in place, fp32 inside, row by row
                q_k = q.gather(-1, k).double()
            lse = z_k - q_k.log()
            bad = (q_k < 2**-100).view(-1)
            if bad.any():
                lse[bad] = (
                    torch.addmm(b_u, ud[bad], w_u).double().logsumexp(-1, keepdim=True)
                    if b_u is not None
                    else (ud[bad] @ w_u).double().logsumexp(-1, keepdim=True)
                )
            # KL_j = sum p_f log p_f - sum p_f z_j + lse_j, where sum_v p_f z_v = pre(x) . (p_f @ W_U^T) + p_f . b_U
            cross = (u.detach().double() * pw.double()).sum(-1) + pb  # [point, r]
            kl = neg_h - cross + lse.view(n_points, r)
            total += kl.sum(-1).cpu()
            if low:
                grad = (z @ w_z.T).to(pw.dtype).view(n_points, r, -1)  # (q - p_f) @ W_U^T
            else:
                grad = (q @ w_z.T).to(pw.dtype).view(n_points, r, -1).sub_(pw)  # (q - p_f) @ W_U^T
        u.backward(grad)
    return total


# rows of one fp32 block in _softmax_minus_final, beside the max_chunk_bytes buffers: on a CPU 32 rows (6.4 MB at
# 50,257 words: they stay in cache), elsewhere up to 64 MiB of rows (few kernel launches per chunk)
SOFTMAX_BLOCK, SOFTMAX_BLOCK_BYTES = 32, 2**26


def _softmax_minus_final(z: Tensor, p_f: Tensor, top: Tensor, n_points: int, r: int, ws: dict) -> Tensor:
    """In place, for low-precision logits ``z`` (``[points * r, d_vocab]``, point-major): ``z <- softmax(z) -
    p_f`` (``p_f``: the final distribution of the ``r`` rows, fp32), the softmax and the difference computed in
    fp32 a block of rows at a time and rounded to ``z``'s dtype once, which is what the reference
    implementation's autocast backward rounds: ``q - p_final``, whose rounding is 2^-9 of itself, where a
    rounded ``q`` with ``p_final`` subtracted after would carry 2^-9 of ``q``. Returns ``softmax(z)`` at the
    final's top word ``top`` of each row (``[points * r, 1]``, float64, from the fp32 softmax)."""
    d_vocab = z.shape[-1]
    block = min(r, SOFTMAX_BLOCK if z.device.type == "cpu" else max(1, SOFTMAX_BLOCK_BYTES // (4 * d_vocab)))
    buf = _workspace(ws, "q_block", block * d_vocab, p_f.dtype, z.device)
    q_k = torch.empty(n_points * r, 1, dtype=torch.float64, device=z.device)
    for j in range(n_points):
        for b0 in range(0, r, block):
            b1 = min(r, b0 + block)
            rows = slice(j * r + b0, j * r + b1)
            q = buf[: (b1 - b0) * d_vocab].view(b1 - b0, d_vocab)
            q.copy_(z[rows])
            torch.ops.aten._softmax.out(q, -1, False, out=q)
            q_k[rows] = q.gather(-1, top[b0:b1]).double()
            torch.sub(q, p_f[b0:b1], out=z[rows])
    return q_k


def _workspace(ws: dict, key: str, numel: int, dtype: torch.dtype, device) -> Tensor:
    """A flat buffer of at least ``numel`` elements kept in ``ws[key]`` (reallocated when too small)."""
    buf = ws.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
        buf = ws[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def train_tuned_lens(
    model, data: str | Iterable[str] | None = None, cfg: TrainConfig | None = None, *, command: str = ""
) -> TunedLens:
    """Train a tuned lens for ``model`` on ``data`` (a source as ``--data`` takes it, or a sequence of texts;
    default ``cfg.data``) with the recipe of ``cfg`` (see the module docstring). Data-parallel under
    ``torchrun``: every rank calls it and all return the same lens. One progress bar (rank 0) shows the
    running loss (mean KL over the trained readout points)."""
    from mechlens import distributed
    from mechlens.data import shard

    cfg = cfg or TrainConfig()
    data = cfg.data if data is None else data
    if data is None:
        fail("data", "must be given: the texts to train the tuned lens on")
    world_size = distributed.world()[1]
    if cfg.batch_size % world_size:
        fail("batch_size", f"must be a multiple of the {world_size} processes, got {cfg.batch_size}")
    masked = arch.kind_of(model) == "masked"
    room = model.cfg.n_ctx - (2 if masked else int(cfg.bos))
    if cfg.max_tokens > room:
        fail("max_tokens", f"must be <= {room} (the model's context), got {cfg.max_tokens}")
    texts = data if isinstance(data, str) else list(data)
    label = data if isinstance(data, str) else "(texts given in Python)"

    def open_stream():  # this rank's share, opened again for each pass over the source
        return shard(texts, cfg.n_texts)

    n_points, d = model.cfg.n_layers + 1, model.cfg.d_model
    dev = next(model.parameters()).device
    trained = _trained_points(n_points)
    delta = [torch.zeros(d, d, device=dev, requires_grad=True) for _ in trained]  # W_l - I
    bias = [torch.zeros(d, device=dev, requires_grad=True) for _ in trained]
    params = [*delta, *bias]
    step_size = cfg.lr * (1 - cfg.momentum)  # the reference implementation's lr scale: 1.0 -> steps of 0.1
    opt = torch.optim.SGD(params, lr=step_size, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps))
    eye = torch.eye(d, device=dev)
    readout = arch.readout(model)
    low = readout_dtype(cfg.readout_dtype, dev)
    workspace: dict = {}  # kl_points' vocabulary-sized buffers, allocated once
    windows = _Windows(open_stream, cfg.heldout, cfg.batch_size)
    n_train_texts, positions, curve = 0, 0.0, []
    per_point_curve: list[list[float]] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bar = progress.bar(range(cfg.steps), "train tuned lens", show=distributed.is_main(), unit="step")
    it = iter(bar)
    step, empty_epoch = 0, True
    try:
        while step < cfg.steps:
            sums, count, chunk = torch.zeros(len(trained), dtype=torch.float64), 0, []
            with distributed.share_then_merge():  # every rank reaches the all_reduce, or learns why another did not
                chunk = windows.take()
                if chunk:
                    inputs = lens_inputs(
                        model,
                        [t for _, t in chunk],
                        [i for i, _ in chunk],
                        bos=cfg.bos,
                        max_tokens=cfg.max_tokens,
                        mask_prob=cfg.mask_prob,
                        seed=cfg.seed,
                    )
                    h = stream_rows(model, inputs, inputs.rows.to(dev))  # [point, n, d]
                    count = h.shape[1]
                    sums[:] = kl_points(
                        readout,
                        h[-1],
                        [h[layer] for layer in trained],
                        [eye + dj for dj in delta],
                        bias,
                        cfg.max_chunk_bytes,
                        dtype=low,
                        workspace=workspace,
                    )
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            state = torch.cat([sums, torch.tensor([count, float(windows.exhausted), len(chunk)], dtype=torch.float64)])
            distributed.all_reduce_sum(*[p.grad for p in params], state)
            total, n_exhausted, n_texts = float(state[-3]), int(state[-2]), int(state[-1])
            if total == 0:  # no training position in this window
                for p in params:
                    p.grad = None
                if n_exhausted == world_size:  # every rank ran out: a new pass over the source
                    if empty_epoch:
                        raise DataError(
                            f"{label} has no training text after the {cfg.heldout} held-out ones (or none with a "
                            "position to predict): lower --heldout or pass more texts"
                        )
                    windows.restart()
                    empty_epoch = True
                continue
            empty_epoch = False
            kl = (state[: len(trained)] / total).tolist()
            if not all(math.isfinite(v) for v in kl):
                raise NonFiniteError(
                    f"the tuned-lens loss became NaN or infinite at step {step}: lower --lr (got {cfg.lr})"
                )
            for p in params:
                p.grad.div_(total)
            if cfg.max_grad_norm > 0:  # the reference implementation's clip: all translators' gradients together
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            n_train_texts += n_texts
            positions += total
            curve.append(sum(kl) / len(kl))
            per_point_curve.append(kl)
            next(it, None)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"KL {curve[-1]:.3f} nats", refresh=False)
            step += 1
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if hasattr(bar, "close"):
            bar.close()
    with torch.no_grad():
        weight = torch.eye(d).expand(n_points, d, d).clone()
        b = torch.zeros(n_points, d)
        for j, layer in enumerate(trained):
            weight[layer] = (eye + delta[j]).cpu()
            b[layer] = bias[j].cpu()
    tail = per_point_curve[-max(1, cfg.steps // 10) :]
    final = [sum(r[j] for r in tail) / len(tail) for j in range(len(trained))] + [0.0]
    card = TunedLensCard(
        model=model_label(model),
        fingerprint=fingerprint(model),
        kind=arch.kind_of(model),
        n_points=n_points,
        d_model=d,
        data=label,
        heldout=cfg.heldout,
        n_train_texts=n_train_texts,
        epochs=windows.epoch + 1,
        steps=cfg.steps,
        tokens_per_step=positions / cfg.steps,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        readout_dtype=str(low).removeprefix("torch."),
        mask_prob=cfg.mask_prob if masked else None,
        bos=cfg.bos,
        seed=cfg.seed,
        world_size=world_size,
        trained_points=trained,
        final_kl_by_layer=final,
        loss_curve=curve,
        command=command,
        **_data_identity(data if isinstance(data, str) else texts, cfg.heldout),
    )
    lens = TunedLens(weight, b, card)
    if cfg.evaluate and cfg.heldout > 0:
        lens = with_heldout_evaluation(model, lens, data, cfg)
    return lens


def _data_identity(data, heldout: int) -> dict[str, Any]:
    """The card's record of which texts trained the lens (:mod:`mechlens.data.identity`)."""
    from mechlens.data.identity import resolved, source_fingerprint

    n = heldout + 1
    return {
        "data_path": resolved(data) if isinstance(data, str) else None,
        "data_fingerprint": source_fingerprint(data, n),
        "data_fingerprint_texts": n,
    }


def with_heldout_evaluation(model, lens: TunedLens, data, cfg: TrainConfig) -> TunedLens:
    """``lens`` with the held-out KL of both lenses per readout point in its card (the corpus lens,
    :func:`mechlens.lens.corpus.corpus_lens`, on the first ``cfg.heldout`` texts)."""
    from mechlens.data import shard
    from mechlens.lens.corpus import corpus_lens

    c = corpus_lens(
        model,
        shard(data, cfg.heldout),
        bos=cfg.bos,
        max_tokens=cfg.max_tokens,
        tuned=lens,
        n_samples=1,
        mask_prob=cfg.mask_prob,
        seed=cfg.seed,
    )
    card = dataclasses.replace(
        lens.card,
        heldout_kl_logit=[float(v) for v in c.kl_to_final_by_layer],
        heldout_kl_tuned=[float(v) for v in c.tuned.kl_to_final_by_layer],
        heldout_n_texts=c.n_texts,
    )
    return dataclasses.replace(lens, card=card)
