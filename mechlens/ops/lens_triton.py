"""Fused lens readout on the GPU: one Triton kernel computes ``pre(x) @ weight (+ bias, soft-cap)`` one
vocabulary tile at a time with ``tl.dot`` and folds each tile into per-row statistics held in registers,
so no logits tile ever goes through device memory (except the final layer's, for KL; see below).

One program owns ``BLOCK_M`` rows (a row is one readout point at one position) and loops over the
vocabulary in ``BLOCK_N``-wide tiles, each the product of the rows' ``[BLOCK_M, d_in]`` inputs and a
``[d_in, BLOCK_N]`` slice of the weight (``BLOCK_K`` at a time). Per tile, in registers, with the same
online-softmax formulation as the eager reference :mod:`mechlens.ops.lens_reduce`:

- ``m`` the running max and ``s = sum exp(z - m)``; ``a = sum exp(z - m) (z - m)`` for the entropy
  ``H = log s - a / s`` (``s``, ``a`` rescaled by ``exp(m_old - m_new)`` when the max moves; the running
  sums are float64, the tile's terms fp32);
- the target's logit, computed before the loop as a dot product of the row with the target's weight
  column (fp32 accumulation), and the count of logits strictly above it, the target's own column
  excluded by id (its rank);
- a running top-k of ``(value, id)`` pairs (``KP`` slots, the first ``K`` used): while some row's best
  remaining tile logit beats its current k-th value, take each row's best (lowest id on ties) and let
  it replace the row's smallest slot; the tile is then masked there. After the first tiles the loop
  rarely runs more than once per tile;
- KL(final || l) exactly as in the eager code, ``KL = sum_v p_f (z_f - z_l) / sum_v p_f - lse_f + lse_l``
  with each difference ``z_f - z_l`` taken per logit (no cancellation between large dot products): the
  final layer's rows run first, writing their fp32 logits to a scratch buffer ``[positions, d_vocab]``
  and their ``lse_f``; the other layers' rows then read the final logits tile beside their own and
  accumulate ``p_f = exp(z_f - lse_f)`` and ``p_f (z_f - z_l)`` (dividing by ``sum p_f`` cancels any
  rounding of ``lse_f``). Positions are processed in chunks so that the scratch fits ``max_chunk_bytes``.

A program writes its rows' raw sums (``m``, ``s``, ``a``, the count, the KL sums, the top-k candidates),
and the host finishes them in float64 (:func:`_combine`). That also lets a row's vocabulary pass be cut
into ranges, one program each, merged like the online softmax: how few rows (a short prompt, the final
layer's own launch) still fill the GPU.

The soft-cap ``c * tanh(z / c)`` is computed as ``c * sign(z) (1 - e) / (1 + e)``, ``e = exp(-2 |z| / c)``
(absolute error ~1e-7 c, far below the statistics' tolerances; Triton's core language has no tanh
that also runs in the interpreter).

On CPU tensors the kernel runs in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set before
triton is first imported (triton's own ``tl.sum``, ``tl.zeros``, ... are built for one mode at import):
that is how CI tests it without a GPU, in a child process (tests/test_lens_triton.py).
"""

from __future__ import annotations

import os
import typing

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is the optional extra mechlens[gpu]
    triton = None
    tl = None

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per weight dtype on CUDA; see benchmarks/RESULTS_GPU.md
# chosen by ptxas' resource report for sm_90 (compile_for_gpu): the largest tiles whose variants (plain,
# top-k, KL) compile without register spills to speak of (<= 24 bytes); not yet timed on a GPU
_CUDA_BLOCKS = {
    torch.bfloat16: (128, 64, 64, 8, 3),
    torch.float16: (128, 64, 64, 8, 3),
    torch.float32: (64, 64, 32, 8, 3),
}
_INTERPRET_BLOCKS = (16, 32, 16, 1, 1)  # small: the interpreter's cost is per tile op; tests get several tiles
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# what backend="auto" sends to the kernel on CUDA. fp32 stays on the eager path (cuBLAS SGEMM) until a GPU
# measurement shows the kernel's fp32 dot (FMA, no tensor cores) at least as fast: the issue asks that fp32
# be unchanged or faster, and no GPU was available to measure it (benchmarks/RESULTS_GPU.md)
AUTO_DTYPES = (torch.bfloat16, torch.float16)


def available() -> bool:
    """Whether triton is importable (the ``gpu`` extra is installed)."""
    return triton is not None


def auto(device: torch.device, weight_dtype: torch.dtype) -> bool:
    """Whether ``backend="auto"`` uses the kernel: triton installed, a CUDA device of compute capability
    >= 8.0 (bf16 tensor-core dots; the kernel was compiled for sm_80/86/89/90/100), weights in
    ``AUTO_DTYPES``."""
    return (
        triton is not None
        and device.type == "cuda"
        and weight_dtype in AUTO_DTYPES
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@typing.no_type_check  # keeps the jaxtyping import hook (pytest) from wrapping it: triton.jit needs the bare function
def _lens_kernel(
    X,  # [n_layers * P, D] rows of this launch (pre(x) in the weight's dtype), row stride stride_xr
    W,  # [D, V] weight, strides (stride_wd, stride_wv)
    Bias,  # [V] fp32 (unused without HAS_BIAS)
    T_ID,  # [P] int64 target id per position (-1: none)
    ZF,  # [P, V] fp32 final-layer logits: written with STORE_Z, read with KL
    LSEF,  # [P] float64 final-layer logsumexp (read with KL)
    # raw per-(split, row) statistics, index split * n_rows + row, combined in float64 by _combine:
    OUT_M,  # fp32 max logit of the split's columns
    OUT_S,  # float64 sum exp(z - m)
    OUT_A,  # float64 sum exp(z - m) (z - m)
    OUT_T,  # fp32 target logit (NaN: no target)
    OUT_ABOVE,  # int32 logits strictly above the target's, its own column excluded
    OUT_B,  # float64 sum p_f (z_f - z)
    OUT_SF,  # float64 sum p_f
    OUT_TV,  # [.., KP] fp32 top logits (unsorted; slots >= K hold +inf)
    OUT_TI,  # [.., KP] int32 their ids
    n_layers,  # readout points in this launch: row = layer * P + position
    V,
    D,
    P,  # positions in this chunk
    n_splits,  # the vocabulary is cut into n_splits ranges of v_split columns, one program each
    v_split,
    softcap,
    stride_xr,
    stride_wd,
    stride_wv,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    STORE_Z: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    # programs of one block of positions are adjacent, one per layer: they read the same final-layer
    # logits tiles (KL) at about the same time, from L2
    pid = tl.program_id(0)
    layer = pid % n_layers
    split = (pid // n_layers) % n_splits
    p = (pid // (n_layers * n_splits)) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < P
    pos = tl.where(row_ok, p, 0).to(tl.int64)
    rows64 = layer.to(tl.int64) * P + pos
    out64 = split.to(tl.int64) * n_layers * P + rows64
    v_lo = split * v_split
    v_hi = tl.minimum(v_lo + v_split, V)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    x_base = X + rows64[:, None] * stride_xr

    if HAS_TARGET:
        tid = tl.load(T_ID + pos, mask=row_ok, other=-1)
        has_t = tid >= 0
        tcol = tl.where(has_t, tid, 0).to(tl.int64)
        tacc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            kmask = row_ok[:, None] & (kk[None, :] < D)
            xv = tl.load(x_base + kk[None, :], mask=kmask, other=0.0).to(tl.float32)
            wv = tl.load(W + kk[None, :].to(tl.int64) * stride_wd + tcol[:, None] * stride_wv, mask=kmask, other=0.0)
            tacc += tl.sum(xv * wv.to(tl.float32), 1)
        if HAS_BIAS:
            tacc += tl.load(Bias + tcol, mask=row_ok, other=0.0)
        if HAS_SOFTCAP:  # (names of their own: Triton refuses a name reused with another shape in the loop)
            ty = tacc / softcap
            tey = tl.exp(-2.0 * tl.abs(ty))
            tth = (1.0 - tey) / (1.0 + tey)
            tacc = softcap * tl.where(ty < 0, -tth, tth)
        t_logit = tl.where(has_t, tacc, float("nan"))
        above = tl.zeros([BLOCK_M], dtype=tl.int32)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float64)
    if ENTROPY:
        a = tl.zeros([BLOCK_M], dtype=tl.float64)
    if KL:
        lse_f64 = tl.load(LSEF + pos, mask=row_ok, other=0.0)
        lse_f = lse_f64.to(tl.float32)  # its rounding scales every p_f alike: cancelled by / s_f
        b = tl.zeros([BLOCK_M], dtype=tl.float64)
        s_f = tl.zeros([BLOCK_M], dtype=tl.float64)
    if K > 0:
        kcols = tl.arange(0, KP)
        # slots beyond K hold +inf so that they are never the smallest (never replaced, never reported)
        tv = tl.where(kcols[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], dtype=tl.float32)
        ti = tl.full([BLOCK_M, KP], -1, dtype=tl.int32)
        thr = tl.min(tv, 1)

    for n0 in range(v_lo, v_hi, BLOCK_N):
        cols = n0 + offs_n
        cmask = cols < v_hi
        w_base = W + cols[None, :].to(tl.int64) * stride_wv
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K:
                xt = tl.load(x_base + kk[None, :], mask=row_ok[:, None], other=0.0)
                wt = tl.load(w_base + kk[:, None].to(tl.int64) * stride_wd, mask=cmask[None, :], other=0.0)
            else:
                kin = kk < D
                xt = tl.load(x_base + kk[None, :], mask=row_ok[:, None] & kin[None, :], other=0.0)
                wt = tl.load(
                    w_base + kk[:, None].to(tl.int64) * stride_wd, mask=kin[:, None] & cmask[None, :], other=0.0
                )
            if DOT_UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=cmask, other=0.0)[None, :]
        if HAS_SOFTCAP:
            y = acc / softcap
            ey = tl.exp(-2.0 * tl.abs(y))
            th = (1.0 - ey) / (1.0 + ey)
            acc = softcap * tl.where(y < 0, -th, th)
        z = tl.where(cmask[None, :], acc, float("-inf"))
        if STORE_Z:
            zptr = ZF + pos[:, None] * V + cols[None, :]
            tl.store(zptr, z, mask=row_ok[:, None] & cmask[None, :])

        tile_max = tl.max(z, 1)
        m_new = tl.maximum(m, tile_max)
        zs = tl.where(cmask[None, :], z - m_new[:, None], 0.0)  # z - m <= 0
        e = tl.where(cmask[None, :], tl.exp(zs), 0.0)
        seen = s > 0
        shift = tl.where(seen, m - m_new, 0.0)
        alpha = tl.where(seen, tl.exp(shift), 0.0).to(tl.float64)
        if ENTROPY:
            a = alpha * (a + shift.to(tl.float64) * s) + tl.sum(e * zs, 1).to(tl.float64)
        s = alpha * s + tl.sum(e, 1).to(tl.float64)
        m = m_new
        if HAS_TARGET:
            gt = (z > t_logit[:, None]) & (cols[None, :] != tid[:, None])
            above += tl.sum(gt.to(tl.int32), 1)
        if KL:
            zf = tl.load(ZF + pos[:, None] * V + cols[None, :], mask=row_ok[:, None] & cmask[None, :], other=0.0)
            pf = tl.where(cmask[None, :], tl.exp(zf - lse_f[:, None]), 0.0)
            diff = tl.where(cmask[None, :], zf - z, 0.0)
            b += tl.sum(pf * diff, 1).to(tl.float64)
            s_f += tl.sum(pf, 1).to(tl.float64)
        if K > 0:
            zt = z
            cur = tile_max
            go = tl.max((cur > thr).to(tl.int32), 0)
            while go > 0:
                idx = tl.min(tl.where(zt == cur[:, None], cols[None, :], 2147483647), 1)
                slot = tl.min(tl.where(tv == thr[:, None], kcols[None, :], KP), 1)
                put = (cur > thr)[:, None] & (kcols[None, :] == slot[:, None])
                tv = tl.where(put, cur[:, None], tv)
                ti = tl.where(put, idx[:, None], ti)
                thr = tl.min(tv, 1)
                zt = tl.where(cols[None, :] == idx[:, None], float("-inf"), zt)
                cur = tl.max(zt, 1)
                go = tl.max((cur > thr).to(tl.int32), 0)

    tl.store(OUT_M + out64, m, mask=row_ok)
    tl.store(OUT_S + out64, s, mask=row_ok)
    if ENTROPY:
        tl.store(OUT_A + out64, a, mask=row_ok)
    if HAS_TARGET:
        tl.store(OUT_T + out64, t_logit, mask=row_ok)
        tl.store(OUT_ABOVE + out64, above, mask=row_ok)
    if KL:
        tl.store(OUT_B + out64, b, mask=row_ok)
        tl.store(OUT_SF + out64, s_f, mask=row_ok)
    if K > 0:
        optr = out64[:, None] * KP + kcols[None, :]
        tl.store(OUT_TV + optr, tv, mask=row_ok[:, None])
        tl.store(OUT_TI + optr, ti, mask=row_ok[:, None])


_KERNEL = None


def _kernel():
    """The jitted kernel, built on first use (in a process with TRITON_INTERPRET=1 set before triton was
    imported, ``triton.jit`` gives the interpreter's version)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = triton.jit(_lens_kernel)
    return _KERNEL


def check_usable(device: torch.device, weight_dtype: torch.dtype) -> None:
    """Raise ValueError saying why the Triton path cannot run here (triton missing, an unsupported
    dtype, a CPU tensor without the interpreter)."""
    if triton is None:
        raise ValueError("backend='triton' needs triton: pip install 'mechlens[gpu]'")
    if weight_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"backend='triton' supports {SUPPORTED_DTYPES} weights, not {weight_dtype}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA (or CPU under TRITON_INTERPRET=1), not {device.type}")
    if device.type == "cpu":
        if not interpreting():
            raise ValueError(
                "backend='triton' on CPU tensors runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported"
            )
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.zeros, InterpretedFunction):  # triton's own helpers were built for the GPU
            raise ValueError(
                "TRITON_INTERPRET=1 was set after triton was imported: set it before (e.g. in a fresh process)"
            )


def _splits(n_programs: int, v: int, bn: int, device: torch.device, splits: int | None) -> int:
    """How many vocabulary ranges each row's pass is cut into: enough programs for two per multiprocessor
    when rows alone give fewer (a short prompt, the final layer's own launch), each range >= 16 tiles."""
    if splits is not None:
        return max(1, min(splits, triton.cdiv(v, bn)))
    if device.type != "cuda":
        return 1
    want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(want, n_programs), triton.cdiv(v, 16 * bn)))


def _launch(x, readout, t_ids, *, p, n_layers, k, kp, entropy, kl, store_z, zf, lse_f, blocks, interpret, splits):
    """One kernel launch over the ``n_layers * p`` rows of ``x``; returns the per-row statistics combined
    over vocabulary splits (:func:`_combine`)."""
    dev = x.device
    n_rows = n_layers * p
    weight = readout.weight
    d, v = weight.shape
    bm, bn, bk, warps, stages = blocks
    n_blocks = triton.cdiv(p, bm) * n_layers
    n_splits = _splits(n_blocks, v, bn, dev, splits)
    v_split = triton.cdiv(triton.cdiv(v, n_splits), bn) * bn
    n_splits = triton.cdiv(v, v_split)
    shape = (n_splits, n_rows)

    def empty(dtype, *extra):
        return torch.empty(*shape, *extra, dtype=dtype, device=dev)

    out = {
        "m": empty(torch.float32),
        "s": empty(torch.float64),
        "a": empty(torch.float64) if entropy else None,
        "t": empty(torch.float32) if t_ids is not None else None,
        "above": empty(torch.int32) if t_ids is not None else None,
        "b": empty(torch.float64) if kl else None,
        "sf": empty(torch.float64) if kl else None,
        "tv": empty(torch.float32, kp) if k else None,
        "ti": empty(torch.int32, kp) if k else None,
    }
    bias = readout.bias.to(device=dev, dtype=torch.float32).contiguous() if readout.bias is not None else None
    dummy = out["s"]  # any tensor: arguments the constexpr flags leave unread
    if weight.dtype == torch.float32:
        precision = "tf32" if dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = "ieee"  # ignored for 16-bit inputs
    extra = {} if interpret else dict(num_warps=warps, num_stages=stages)
    _kernel()[(n_blocks * n_splits,)](
        x,
        weight,
        dummy if bias is None else bias,
        dummy if t_ids is None else t_ids,
        dummy if zf is None else zf,
        dummy if lse_f is None else lse_f,
        *(dummy if t is None else t for t in out.values()),
        n_layers,
        v,
        d,
        p,
        n_splits,
        v_split,
        float(readout.softcap) if readout.softcap is not None else 1.0,
        x.stride(0),
        weight.stride(0),
        weight.stride(1),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=readout.softcap is not None,
        HAS_TARGET=t_ids is not None,
        ENTROPY=entropy,
        KL=kl,
        STORE_Z=store_z,
        K=k,
        KP=kp,
        EVEN_K=d % bk == 0,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_PRECISION=precision,
        # Triton's interpreter multiplies bfloat16 operands' raw uint16 storage in tl.dot (3.9's
        # interpreter.create_dot): upcast there (exact products, fp32 sums: what the GPU's bf16 dot does)
        DOT_UPCAST=interpret and weight.dtype == torch.bfloat16,
        **extra,
    )
    return _combine(out, k=k, lse_f=lse_f, n_layers=n_layers)


def _combine(out: dict, *, k: int, lse_f: Tensor | None, n_layers: int) -> dict[str, Tensor | None]:
    """Per-row statistics from the kernel's per-(split, row) sums, in float64: the splits' ``(m, s, a)``
    merge as in the online softmax (rescaled to the overall max), counts and KL sums add, and the top-k
    is taken over all splits' candidates."""
    m_i = out["m"].double()
    m = m_i.amax(0)
    scale = torch.exp(m_i - m)  # [split, row], 1 for the split that holds the max
    s = (scale * out["s"]).sum(0)
    lse = m + s.log()
    res = {"lse": lse, "max": (m - lse).float()}
    if out["a"] is not None:
        a = (scale * (out["a"] + (m_i - m) * out["s"])).sum(0)
        res["ent"] = (s.log() - a / s).float()
    if out["t"] is not None:
        t = out["t"][0].double()  # every split computed the same target logit
        res["tlp"] = (t - lse).float()
        res["rank"] = torch.where(t.isnan(), -1, out["above"].sum(0, dtype=torch.long))
    if out["b"] is not None:
        b, sf = out["b"].sum(0), out["sf"].sum(0)
        res["kl"] = (b / sf - lse_f.repeat(n_layers) + lse).float()
    if k:
        n_splits, n_rows, kp = out["tv"].shape
        tv = out["tv"].clone()
        tv[..., k:] = float("-inf")  # the unused slots (+inf in the kernel)
        tv = tv.permute(1, 0, 2).reshape(n_rows, n_splits * kp)
        ti = out["ti"].permute(1, 0, 2).reshape(n_rows, n_splits * kp)
        top, order = tv.topk(k, dim=-1)
        res["tv"] = (top.double() - lse[:, None]).float()
        res["ti"] = ti.gather(-1, order).long()
    return res


@torch.no_grad()
def reduce_rows(
    flat: Tensor,
    readout,
    keep: Tensor | None,
    targets: Tensor | None,
    *,
    k: int,
    entropy: bool,
    kl_to_final: bool,
    max_chunk_bytes: int,
    blocks: tuple[int, int, int, int, int] | None = None,
    splits: int | None = None,
) -> dict[str, Tensor | None]:
    """The statistics of :func:`mechlens.ops.lens_reduce` for the positions ``keep`` (None: all) of ``flat``
    ``[layer, positions, d_model]`` through the :class:`~mechlens.ops.lens_reduce.LinearReadout`
    ``readout``, by the fused kernel. ``targets`` ``[positions]`` (-1: none) or None. Returns
    ``[layer, len(keep)]`` tensors (``[layer, len(keep), k]`` for top-k, sorted by decreasing log-prob)
    keyed max / topk_ids / topk_logprobs / entropy / target_logprob / target_rank / kl_to_final.

    Positions go in chunks: ``pre`` runs on one chunk at a time, and with KL the final layer's fp32
    logits of a chunk (``positions x d_vocab x 4`` bytes) stay within ``max_chunk_bytes``. ``blocks``:
    the kernel's (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); ``splits``: vocabulary ranges per row
    (default: enough to fill the GPU; 1 on CPU)."""
    dev = flat.device
    check_usable(dev, readout.weight.dtype)
    interpret = dev.type == "cpu"
    n_layers = flat.shape[0]
    weight = readout.weight
    d_in, v = weight.shape
    if blocks is None:
        blocks = _INTERPRET_BLOCKS if interpret else _CUDA_BLOCKS[weight.dtype]
    if targets is not None and len(targets) and int(targets.max()) >= v:
        raise ValueError(f"target ids must be < d_vocab = {v} (or -1 for none), got {int(targets.max())}")
    kp = 1 << max(0, (k - 1).bit_length()) if k else 1
    n = flat.shape[1] if keep is None else len(keep)
    per_pos = n_layers * d_in * weight.dtype.itemsize + (v * 4 if kl_to_final else 0)
    p_step = max(1, min(n, max_chunk_bytes // per_pos))

    f32 = dict(dtype=torch.float32, device=dev)
    res = {
        "max": torch.empty(n_layers, n, **f32),
        "entropy": torch.empty(n_layers, n, **f32) if entropy else None,
        "target_logprob": torch.empty(n_layers, n, **f32) if targets is not None else None,
        "target_rank": torch.empty(n_layers, n, dtype=torch.long, device=dev) if targets is not None else None,
        "kl_to_final": torch.empty(n_layers, n, **f32) if kl_to_final else None,
        "topk_logprobs": torch.empty(n_layers, n, k, **f32) if k else None,
        "topk_ids": torch.empty(n_layers, n, k, dtype=torch.long, device=dev) if k else None,
    }
    zf = torch.empty(p_step, v, **f32) if kl_to_final else None
    for start in range(0, n, p_step):
        idx = slice(start, start + p_step) if keep is None else keep[start : start + p_step]
        p = len(range(n)[start : start + p_step])
        x = readout.pre(flat[:, idx]).to(weight.dtype).reshape(n_layers * p, d_in).contiguous()
        t_ids = targets[idx].contiguous() if targets is not None else None
        common = dict(p=p, k=k, kp=kp, entropy=entropy, blocks=blocks, interpret=interpret, splits=splits)
        if kl_to_final:
            last = _launch(
                x[(n_layers - 1) * p :], readout, t_ids, n_layers=1, kl=False, store_z=True, zf=zf, lse_f=None, **common
            )
            last["kl"] = torch.zeros(p, **f32)  # KL(final || final) = 0 exactly
            parts = [last]
            if n_layers > 1:
                rest = _launch(
                    x[: (n_layers - 1) * p],
                    readout,
                    t_ids,
                    n_layers=n_layers - 1,
                    kl=True,
                    store_z=False,
                    zf=zf,
                    lse_f=last["lse"],
                    **common,
                )
                parts = [rest, last]
            out = {key: torch.cat([q[key] for q in parts]) for key in last}
        else:
            out = _launch(x, readout, t_ids, n_layers=n_layers, kl=False, store_z=False, zf=None, lse_f=None, **common)
        sl = slice(start, start + p)
        names = {
            "max": "max",
            "ent": "entropy",
            "tlp": "target_logprob",
            "rank": "target_rank",
            "kl": "kl_to_final",
            "tv": "topk_logprobs",
            "ti": "topk_ids",
        }
        for key, name in names.items():
            if res[name] is not None:
                res[name][:, sl] = out[key].view(n_layers, p, *out[key].shape[1:])
        del x, out  # before the next chunk's pre-activations are made
    return res


_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_for_gpu(weight_dtype: torch.dtype, *, arch: int = 90, blocks=None, **flags):
    """Compile the kernel ahead of time for an NVIDIA GPU of compute capability ``arch`` (90: Hopper),
    without a GPU (Triton's bundled ptxas), specialised as a launch on contiguous, 16-byte-aligned inputs
    would be. ``flags``: the kernel's constexpr flags (HAS_BIAS, HAS_SOFTCAP, HAS_TARGET, ENTROPY, KL,
    STORE_Z, K, KP, EVEN_K; default off / 0). Returns Triton's compiled kernel (``.asm`` holds ttgir, ptx,
    cubin). This catches what the interpreter cannot: code that does not compile, tensor-core and
    pipelined-load use (wgmma, cp.async in the PTX)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(_lens_kernel)
    bm, bn, bk, warps, stages = blocks or _CUDA_BLOCKS[weight_dtype]
    ptr = "*" + _TRITON_DTYPES[weight_dtype]
    types = dict(
        X=ptr,
        W=ptr,
        Bias="*fp32",
        T_ID="*i64",
        ZF="*fp32",
        LSEF="*fp64",
        OUT_M="*fp32",
        OUT_S="*fp64",
        OUT_A="*fp64",
        OUT_T="*fp32",
        OUT_ABOVE="*i32",
        OUT_B="*fp64",
        OUT_SF="*fp64",
        OUT_TV="*fp32",
        OUT_TI="*i32",
        n_layers="i32",
        V="i32",
        D="i32",
        P="i32",
        n_splits="i32",
        v_split="i32",
        softcap="fp32",
        stride_xr="i32",
        stride_wv="i32",
    )
    consts = dict(
        HAS_BIAS=False,
        HAS_SOFTCAP=False,
        HAS_TARGET=False,
        ENTROPY=False,
        KL=False,
        STORE_Z=False,
        K=0,
        KP=1,
        EVEN_K=True,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        DOT_PRECISION="ieee",
        DOT_UPCAST=False,
        stride_wd=1,
    )
    unknown = set(flags) - set(consts)
    if unknown:
        raise ValueError(f"unknown kernel flags {sorted(unknown)}")
    consts.update(flags)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    aligned = [name for name, t in types.items() if t.startswith("*")] + ["D", "v_split", "stride_xr", "stride_wv"]
    src = ASTSource(
        fn,
        signature,
        constexprs={index[name]: value for name, value in consts.items()},
        attrs={index[name]: [["tt.divisibility", 16]] for name in aligned},
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
