"""Tiled lens reduction: every per-(layer, position) statistic of a vocabulary readout in one pass over
the vocabulary, never holding ``[layer, batch, pos, d_vocab]`` -- nor even ``[rows, d_vocab]`` -- logits.

The readout of a residual vector is ``pre(x) @ weight + bias`` (:class:`LinearReadout`: final LayerNorm
+ unembed for causal LMs, the MLM head's dense/activation/LayerNorm + decoder for masked LMs), optionally
soft-capped (``softcap * tanh(z / softcap)``, Gemma2) tile by tile before any statistic. Rows
(flattened ``batch x pos``, all layers of a position together so that KL to the final layer is
available) are taken in chunks; for each chunk ``pre`` runs once and the decoder matmul runs one
vocabulary tile at a time into a reused buffer small enough to stay in cache. Each tile updates
running statistics, as in an online softmax:

- ``m`` the running max logit and ``s = sum exp(z - m)`` (so ``logsumexp = m + log s``);
- ``a = sum exp(z - m) (z - m)`` for the entropy ``H = log s - a / s`` (no cancellation: ``z - m <= 0``);
- ``B_l = sum exp(z_f - m_f) (z_f - z_l)`` for ``KL(final || l) = B_l / s_f - lse_f + lse_l``;
- a running top-k of logits merged with each tile's top-k;
- the number of logits strictly above the target's logit (its rank), the target logit being computed
  first by a small matmul on the chunk's distinct target columns.

Running sums are kept in float64; logit tiles and outputs are fp32 (float64 for a float64 readout).
Peak memory is the chunk's pre-activations plus ``_WORKING_COPIES`` tile buffers, bounded by
``max_chunk_bytes``; the tile shape also follows the device (cache-sized tiles on CPU, large ones on
GPUs). A readout given as a plain callable (residual -> logits) is materialised one row chunk at a
time and then reduced by the same tile code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

_WORKING_COPIES = 3  # the logits tile, its exponentials, one elementwise temporary (masks)
_PREFERRED_TILE_BYTES = {"cpu": 4 * 2**20}  # one fp32 tile that stays in a CPU's L2/L3 cache
_PREFERRED_TILE_BYTES_ACCELERATOR = 512 * 2**20
_PREFERRED_VOCAB_TILE = {"cpu": 1024}
_PREFERRED_VOCAB_TILE_ACCELERATOR = 16384


@dataclasses.dataclass(frozen=True)
class LinearReadout:
    """``readout(x) = pre(x) @ weight + bias``: a head whose last step is a linear map to the vocabulary,
    optionally soft-capped: ``softcap * tanh((pre(x) @ weight + bias) / softcap)``.

    ``pre`` maps ``[..., d_model]`` residual vectors to the decoder's input (identity, a final
    LayerNorm, an MLM transform); ``weight`` is ``[d_in, d_vocab]``. ``softcap`` is Gemma2's
    ``final_logit_softcapping`` (``None``: no cap); :func:`lens_reduce` applies it to every logit
    before any softmax statistic."""

    pre: Callable[[Tensor], Tensor]
    weight: Float[Tensor, "d_in vocab"]
    bias: Float[Tensor, " vocab"] | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be a positive number or None, got {self.softcap}")

    def __call__(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        out = h @ self.weight.to(h.dtype)
        if self.bias is not None:
            out = out + self.bias.to(h.dtype)
        return out if self.softcap is None else _softcap_(out, self.softcap)

    @property
    def d_vocab(self) -> int:
        return self.weight.shape[-1]


@dataclasses.dataclass
class LensStats:
    """Per (readout point, batch row, position) statistics from :func:`lens_reduce`; a field is
    ``None`` when it was not asked for. Log-probs and entropy/KL in nats; skipped rows hold NaN / -1."""

    max_logprob: Float[Tensor, "layer batch pos"]
    topk_ids: Int[Tensor, "layer batch pos k"] | None = None
    topk_logprobs: Float[Tensor, "layer batch pos k"] | None = None
    entropy: Float[Tensor, "layer batch pos"] | None = None
    target_logprob: Float[Tensor, "layer batch pos"] | None = None
    target_rank: Int[Tensor, "layer batch pos"] | None = None
    kl_to_final: Float[Tensor, "layer batch pos"] | None = None

    @property
    def predicted(self) -> Int[Tensor, "layer batch pos"]:
        if self.topk_ids is None:
            raise ValueError("this reduction ran with k=0: pass k >= 1 to lens_reduce for predicted tokens")
        return self.topk_ids[..., 0]


def tile_shape(
    n_layers: int,
    d_vocab: int,
    max_chunk_bytes: int,
    device: torch.device | str,
    itemsize: int = 4,
    n_positions: int | None = None,
) -> tuple[int, int]:
    """``(positions per chunk, vocabulary columns per tile)``: a tile is ``[n_layers * positions,
    columns]`` of ``itemsize``-byte floats, and ``_WORKING_COPIES`` of it fit in ``max_chunk_bytes``
    (at least one position and one column). With few positions in all (``n_positions``), tiles widen
    over the vocabulary instead, so that small lenses run few, larger tiles."""
    kind = torch.device(device).type
    preferred = _PREFERRED_TILE_BYTES.get(kind, _PREFERRED_TILE_BYTES_ACCELERATOR)
    tile_elems = max(1, min(max_chunk_bytes // _WORKING_COPIES, preferred) // itemsize)
    cols = min(d_vocab, _PREFERRED_VOCAB_TILE.get(kind, _PREFERRED_VOCAB_TILE_ACCELERATOR))
    if n_layers * cols > tile_elems:
        cols = max(1, tile_elems // n_layers)
    positions = max(1, tile_elems // (n_layers * cols))
    if n_positions is not None and 0 < n_positions < positions:
        positions = n_positions
        cols = max(cols, min(d_vocab, tile_elems // (n_layers * n_positions)))
    return positions, cols


class _Running:
    """Online statistics of ``[layer, r]`` rows over vocabulary tiles (see the module docstring)."""

    def __init__(
        self,
        n_layers: int,
        r: int,
        dev,
        dtype,
        *,
        k: int,
        entropy: bool,
        kl: bool,
        t_logit: Tensor | None,
        t_ids: Tensor | None,
    ):
        f64 = dict(dtype=torch.float64, device=dev)
        self.m = torch.full((n_layers, r), -math.inf, dtype=dtype, device=dev)
        self.s = torch.zeros(n_layers, r, **f64)
        self.a = torch.zeros(n_layers, r, **f64) if entropy else None
        self.b = torch.zeros(n_layers, r, **f64) if kl else None
        self.k = k
        self.top_v = torch.full((n_layers, r, k), -math.inf, dtype=dtype, device=dev) if k else None
        self.top_i = torch.full((n_layers, r, k), -1, dtype=torch.long, device=dev) if k else None
        self.t_logit = t_logit  # [layer, r], the target's logit (NaN where no target)
        self.t_ids = t_ids  # [r], the target's vocabulary id (any id where no target)
        self.above = torch.zeros(n_layers, r, dtype=dtype, device=dev) if t_logit is not None else None

    def update(self, z: Tensor, v0: int, exp_buf: Tensor, tmp_buf: Tensor) -> None:
        """Fold the logits tile ``z`` ``[layer, r, cols]`` (vocabulary ids ``v0..``) in; ``z`` is
        overwritten. ``exp_buf`` and ``tmp_buf`` are flat scratch buffers of at least ``z.numel()``."""
        tile_max = z.amax(-1)
        m_new = torch.maximum(self.m, tile_max)
        seen = self.s > 0
        shift = torch.where(seen, (self.m - m_new).double(), torch.zeros_like(self.s))
        alpha = torch.where(seen, shift.exp(), torch.zeros_like(self.s))
        tmp = tmp_buf[: z.numel()].view(z.shape)
        if self.above is not None:
            # logits strictly above the target's (a float compare-and-sum: exact, and much faster on CPU
            # than a bool mask); the target's own column is taken out again below
            self.above += torch.gt(z, self.t_logit[..., None], out=tmp).sum(-1)
            in_tile = (self.t_ids >= v0) & (self.t_ids < v0 + z.shape[-1])
            local = (self.t_ids - v0).clamp(0, z.shape[-1] - 1)
            own = z.gather(-1, local[None, :, None].expand(z.shape[0], -1, 1))[..., 0]
            self.above -= (in_tile[None] & (own > self.t_logit)).to(self.above.dtype)
        if self.k:
            self._merge_topk(z, v0, tile_max)
        zm = z.sub_(m_new[..., None])  # z - m <= 0
        e = torch.exp(zm, out=exp_buf[: z.numel()].view(z.shape))
        s_tile = e.sum(-1).double()
        if self.a is not None:
            a_tile = torch.mul(e, zm, out=tmp).sum(-1).double()
            self.a = alpha * (self.a + shift * self.s) + a_tile
        if self.b is not None:
            # sum_v e_f (z_f - z_l) = sum e_f zm_f - sum e_f zm_l + (m_f - m_l) sum e_f, per layer l;
            # the final layer's own term is the same product, so its KL is exactly 0
            c = torch.mul(zm, e[-1:], out=tmp).sum(-1).double()
            b_tile = c[-1:] - c + (m_new[-1:] - m_new).double() * s_tile[-1:]
            self.b = alpha[-1:] * self.b + b_tile
        self.s = alpha * self.s + s_tile
        self.m = m_new

    def _merge_topk(self, z: Tensor, v0: int, tile_max: Tensor) -> None:
        """Merge the tile's top-k into the running one, only for rows whose tile max beats their
        running k-th value (after the first tiles, few rows do)."""
        kk = min(self.k, z.shape[-1])
        need = tile_max > self.top_v[..., -1]
        n_need = int(need.sum())
        if n_need == 0:
            return
        if n_need == need.numel():
            tv, ti = z.topk(kk, dim=-1)
            v, order = torch.cat([self.top_v, tv], -1).topk(self.k, dim=-1)
            self.top_i = torch.cat([self.top_i, ti + v0], -1).gather(-1, order)
            self.top_v = v
            return
        li, ri = need.nonzero(as_tuple=True)
        tv, ti = z[li, ri].topk(kk, dim=-1)
        v, order = torch.cat([self.top_v[li, ri], tv], -1).topk(self.k, dim=-1)
        self.top_i[li, ri] = torch.cat([self.top_i[li, ri], ti + v0], -1).gather(-1, order)
        self.top_v[li, ri] = v

    def lse(self) -> Tensor:
        return self.m.double() + self.s.log()


_BACKENDS = ("auto", "eager", "triton")


def _use_triton(backend: str, readout, device: torch.device) -> bool:
    """Whether :func:`lens_reduce` runs the fused Triton kernel (see its ``backend`` argument)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "eager" or (backend == "auto" and device.type != "cuda"):
        return False
    linear = isinstance(readout, LinearReadout)
    if backend == "triton" and not linear:
        raise ValueError("backend='triton' needs a LinearReadout (pre + weight [+ bias, softcap]), not a callable")
    if not linear:
        return False
    from mechlens.ops import lens_triton

    if backend == "triton":
        lens_triton.check_usable(device, readout.weight.dtype)
        return True
    return lens_triton.auto(device, readout.weight.dtype)


def _softcap_(z: Tensor, cap: float) -> Tensor:
    """``cap * tanh(z / cap)`` in place (``z`` is a fresh tensor or a tile buffer)."""
    return z.div_(cap).tanh_().mul_(cap)


def _matmul_into(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> None:
    """``out = x @ w + b`` into the tile buffer ``out`` (computed in the weights' dtype)."""
    if w.dtype == out.dtype:
        if b is None:
            torch.mm(x, w, out=out)
        else:
            torch.addmm(b, x, w, out=out)
    else:
        out.copy_(x @ w if b is None else torch.addmm(b.to(w.dtype), x, w))


@torch.no_grad()
def lens_reduce(
    resid: Float[Tensor, "layer batch pos d_model"],
    readout: LinearReadout | Callable[[Tensor], Tensor],
    *,
    targets: Int[Tensor, "batch pos"] | None = None,
    rows: Bool[Tensor, "batch pos"] | None = None,
    k: int = 5,
    entropy: bool = True,
    kl_to_final: bool = False,
    max_chunk_bytes: int = 128 * 2**20,
    progress: bool = False,
    backend: str = "auto",
) -> LensStats:
    """Apply ``readout`` (residual -> logits) to every layer and position and reduce over the vocabulary.

    Per layer and position, each only if asked for: top-``k`` ids and log-probs (``k=0``: none; the
    max log-prob is always returned), entropy in nats, and if ``targets`` is given (``-1`` = no
    target) the target's log-prob and 0-based rank (the number of tokens whose logit is strictly
    larger than the target's); with ``kl_to_final``, KL(final layer || layer) in nats. Rows outside
    ``rows`` (e.g. padding) are skipped and get id -1 / NaN. Work is tiled (see the module docstring),
    so memory stays within ``max_chunk_bytes`` plus the chunk's pre-activations and the outputs.
    ``progress``: a tqdm bar over row chunks (shown when there are at least two).

    ``backend``: ``"eager"`` the tiled torch code above (the reference, and the CPU implementation);
    ``"triton"`` the fused kernel of :mod:`mechlens.ops.lens_triton` (a :class:`LinearReadout` with
    16/32-bit weights; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, for tests);
    ``"auto"`` the kernel on CUDA when triton is installed and the readout is a :class:`LinearReadout`
    with bf16/fp16 weights on an Ampere or newer GPU (:func:`mechlens.ops.lens_triton.auto`), else eager.
    """
    n_layers, batch, pos, _ = resid.shape
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    use_triton = _use_triton(backend, readout, resid.device)
    dev = resid.device
    flat = einops.rearrange(resid, "layer batch pos d_model -> layer (batch pos) d_model")
    n_rows = batch * pos
    keep = torch.arange(n_rows, device=dev) if rows is None else torch.nonzero(rows.reshape(-1).to(dev)).squeeze(-1)
    tgt_flat = None if targets is None else targets.reshape(-1).to(dev)
    linear = isinstance(readout, LinearReadout)

    if len(keep) == 0:
        acc = torch.float32
    else:
        probe = readout.weight if linear else readout(flat[:1, keep[:1]])  # a callable: one probe row
        d_vocab = probe.shape[-1]
        acc = torch.float64 if probe.dtype == torch.float64 else torch.float32  # tiles and outputs

    nan = dict(fill_value=float("nan"), dtype=acc, device=dev)
    out_max = torch.full((n_layers, n_rows), **nan)
    topk_ids = torch.full((n_layers, n_rows, k), -1, dtype=torch.long, device=dev) if k else None
    topk_lp = torch.full((n_layers, n_rows, k), **nan) if k else None
    ent = torch.full((n_layers, n_rows), **nan) if entropy else None
    t_lp = torch.full((n_layers, n_rows), **nan) if targets is not None else None
    t_rank = torch.full((n_layers, n_rows), -1, dtype=torch.long, device=dev) if targets is not None else None
    kl = torch.full((n_layers, n_rows), **nan) if kl_to_final else None

    if len(keep) and use_triton:
        from mechlens.ops import lens_triton

        res = lens_triton.reduce_rows(
            flat,
            readout,
            None if rows is None else keep,
            tgt_flat,
            k=k,
            entropy=entropy,
            kl_to_final=kl_to_final,
            max_chunk_bytes=max_chunk_bytes,
        )
        out_max[:, keep] = res["max"]
        for name, out in (
            ("entropy", ent),
            ("target_logprob", t_lp),
            ("target_rank", t_rank),
            ("kl_to_final", kl),
            ("topk_logprobs", topk_lp),
            ("topk_ids", topk_ids),
        ):
            if out is not None:
                out[:, keep] = res[name]
    elif len(keep):
        r_step, cols = tile_shape(n_layers, d_vocab, max_chunk_bytes, dev, acc.itemsize, n_positions=len(keep))
        exp_buf = torch.empty(n_layers * r_step * cols, dtype=acc, device=dev)
        z_buf = torch.empty(n_layers * r_step * cols, dtype=acc, device=dev)
        tmp_buf = torch.empty(n_layers * r_step * cols, dtype=acc, device=dev)
        softcap = None
        if linear:
            weight = readout.weight
            bias = readout.bias.to(acc) if readout.bias is not None else None
            softcap = readout.softcap
        starts = range(0, len(keep), r_step)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="lens readout", unit="chunk", disable=len(starts) < 2, leave=False)
        for start in starts:
            idx = keep[start : start + r_step]
            r = len(idx)
            if linear:
                h = readout.pre(flat[:, idx])  # [layer, r, d_in]
                x = einops.rearrange(h, "layer r d -> (layer r) d").to(weight.dtype)
                full = None
            else:
                full = readout(flat[:, idx]).to(acc)  # [layer, r, d_vocab], one row chunk materialised
            t_logit = tc = None
            if tgt_flat is not None:
                t = tgt_flat[idx]
                has = t >= 0
                tc = t.clamp(min=0)
                if linear:
                    uniq, inv = torch.unique(tc, return_inverse=True)
                    tl = (x @ weight[:, uniq]).to(acc)
                    if bias is not None:
                        tl += bias[uniq]
                    if softcap is not None:
                        _softcap_(tl, softcap)
                    tl = tl.reshape(n_layers, r, -1).gather(-1, inv[None, :, None].expand(n_layers, -1, 1))[..., 0]
                else:
                    tl = full.gather(-1, tc[None, :, None].expand(n_layers, -1, 1))[..., 0]
                t_logit = torch.where(has[None], tl, torch.full_like(tl, float("nan")))
            run = _Running(n_layers, r, dev, acc, k=k, entropy=entropy, kl=kl_to_final, t_logit=t_logit, t_ids=tc)
            for v0 in range(0, d_vocab, cols):
                c = min(cols, d_vocab - v0)
                if linear:
                    z2 = z_buf[: n_layers * r * c].view(n_layers * r, c)
                    _matmul_into(z2, x, weight[:, v0 : v0 + c], None if bias is None else bias[v0 : v0 + c])
                    if softcap is not None:
                        _softcap_(z2, softcap)
                    z = z2.view(n_layers, r, c)
                else:
                    z = z_buf[: n_layers * r * c].view(n_layers, r, c).copy_(full[..., v0 : v0 + c])
                run.update(z, v0, exp_buf, tmp_buf)
            lse = run.lse()
            out_max[:, idx] = (run.m.double() - lse).to(acc)  # m is the largest logit (= the top-1)
            if k:
                topk_lp[:, idx] = (run.top_v.double() - lse[..., None]).to(acc)
                topk_ids[:, idx] = run.top_i
            if entropy:
                ent[:, idx] = (run.s.log() - run.a / run.s).to(acc)
            if kl is not None:
                kl[:, idx] = (run.b / run.s[-1:] - lse[-1:] + lse).to(acc)
            if t_logit is not None:
                t_lp[:, idx] = (t_logit.double() - lse).to(acc)
                t_rank[:, idx] = torch.where(has[None], run.above.long(), torch.full_like(run.above, -1).long())

    def unflat(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.reshape(n_layers, batch, pos, *x.shape[2:]).cpu()

    return LensStats(
        max_logprob=unflat(out_max),
        topk_ids=unflat(topk_ids),
        topk_logprobs=unflat(topk_lp),
        entropy=unflat(ent),
        target_logprob=unflat(t_lp),
        target_rank=unflat(t_rank),
        kl_to_final=unflat(kl),
    )
