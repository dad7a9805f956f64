"""The fused Triton lens readout (mechlens.ops.lens_triton) against the eager tiled reduction and a float64
materialised readout.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter, which needs TRITON_INTERPRET=1 set
before triton is first imported (it also stops triton compiling GPU kernels in that process). So the
CPU cases run in a child pytest process with that variable set (test_cpu_interpreter_cases_in_a_child
_process): this process, and every other test in it, keeps the ordinary triton. Where CUDA is there,
the same cases run here, compiled, on the GPU.

Shapes are tiny (the interpreter executes every tile op in numpy): the interpreter's tiles are 16 rows x
32 vocabulary columns x 16 of d_in, so vocab 300, d_in 24 and rows not a multiple of 16 give partial
last tiles in all three dimensions; on CUDA the default GPU tiles (larger) make them partial as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechlens.ops import LinearReadout, lens_reduce

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # this is the child process
triton = pytest.importorskip("triton")

if INTERPRETER:
    DEVICES = ["cpu"]
else:
    DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.skipif(INTERPRETER, reason="this is the child process")
def test_cpu_interpreter_cases_in_a_child_process():
    """Run this file's cases on CPU tensors in a child pytest with TRITON_INTERPRET=1, and require that
    they all ran and passed (a child that collects nothing or skips everything fails here)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    only = "not child_process and not compiles"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", only]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    last = out.strip().splitlines()[-1]
    assert "skipped" not in last and last.startswith("10 passed"), out  # every case of this file on CPU


def _case(seed, n_layers=4, batch=3, pos=7, d=24, v=300, scale=1.0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    resid = torch.randn(n_layers, batch, pos, d, generator=g).to(device, dtype)
    w = (scale * torch.randn(d, v, generator=g)).to(device, dtype)
    b = torch.randn(v, generator=g).to(device)
    targets = torch.randint(0, v, (batch, pos), generator=g)
    targets[0, 0] = targets[2, 3] = -1
    rows = torch.ones(batch, pos, dtype=torch.bool)
    rows[2, 5:] = False
    rows[1, 0] = False
    return resid, w, b, targets, rows


def _float64_logprobs(resid, readout):
    """The materialised readout in float64 from the same (possibly 16-bit) inputs."""
    z = torch.einsum("lbpd,dv->lbpv", resid.double().cpu(), readout.weight.double().cpu())
    if readout.bias is not None:
        z = z + readout.bias.double().cpu()
    if readout.softcap is not None:
        z = readout.softcap * torch.tanh(z / readout.softcap)
    return torch.log_softmax(z, -1)


def _check(st, lp, targets, rows, atol):
    """Every statistic of ``st`` against float64 log-probs ``lp`` ``[layer, batch, pos, vocab]``."""
    n_layers = lp.shape[0]
    keep = rows[None].expand(n_layers, -1, -1)
    ref_lp, ref_id = lp.topk(4, -1)
    # top-k ids exactly: the data has no near-tie (within 1e-4, 25x the worst logit error seen) among the top 4
    assert (ref_lp[..., :-1] - ref_lp[..., 1:])[keep].min() > 1e-4
    ref_lp, ref_id = ref_lp[..., :3], ref_id[..., :3]
    assert torch.equal(st.topk_ids[keep], ref_id[keep])
    torch.testing.assert_close(st.topk_logprobs[keep].double(), ref_lp[keep], atol=atol, rtol=0)
    torch.testing.assert_close(st.max_logprob[keep].double(), ref_lp[..., 0][keep], atol=atol, rtol=0)
    ent = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(st.entropy[keep].double(), ent[keep], atol=atol, rtol=0)
    t = targets.clamp(min=0)[None, ..., None].expand(n_layers, -1, -1, 1)
    has = keep & (targets >= 0)[None]
    t_lp = lp.gather(-1, t)[..., 0]
    torch.testing.assert_close(st.target_logprob[has].double(), t_lp[has], atol=atol, rtol=0)
    # ranks exactly, except that a logit within atol of the target's (a near-tie) may count either way
    others = ~torch.nn.functional.one_hot(t[..., 0], lp.shape[-1]).bool()
    lo = ((lp > t_lp[..., None] + atol) & others).sum(-1)
    hi = ((lp > t_lp[..., None] - atol) & others).sum(-1)
    assert ((st.target_rank[has] >= lo[has]) & (st.target_rank[has] <= hi[has])).all()
    assert (lo[has] == hi[has]).float().mean() > 0.9  # near-ties are the exception here
    assert (st.target_rank[~has] == -1).all() and torch.isnan(st.target_logprob[~has]).all()
    kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
    # KL also moves with a rounding error d of a final-layer logit as |log p_f / p_l| d: up to ~40 x the
    # fp32 logit error at these KL (~40 nats), hence 2e-6 relative on top (measured worst 7e-7 relative)
    torch.testing.assert_close(st.kl_to_final[keep].double(), kl[keep], atol=atol, rtol=2e-6)
    assert (st.kl_to_final[-1][rows] == 0).all()
    for field in (st.max_logprob, st.entropy, st.kl_to_final, st.topk_logprobs):
        assert torch.isnan(field[~keep]).all()
    assert (st.topk_ids[~keep] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("bias", "softcap"), [(False, None), (True, 8.0)], ids=["plain", "bias-softcap"])
def test_kernel_matches_eager_and_float64(device, bias, softcap):
    """fp32: kernel and eager against the float64 readout, and against each other, within 1e-5. Logits
    here reach ~15, whose fp32 spacing is ~1e-6; each path rounds every logit (a different summation
    order over d_in) and sums ~300 terms in fp32 per tile before float64 running sums, so both land
    within a few 1e-6 of float64 (measured worst ~4e-6); 1e-5 leaves room for other instruction sets
    (ATEN_CPU_CAPABILITY) without hiding a wrong term (a missed tile or cap moves these by >1e-2)."""
    resid, w, b, targets, rows = _case(1, device=device)
    readout = LinearReadout(lambda x: x, w, b if bias else None, softcap=softcap)
    kw = dict(targets=targets, rows=rows, k=3, kl_to_final=True)
    st = lens_reduce(resid, readout, backend="triton", **kw)
    ref = lens_reduce(resid, readout, backend="eager", **kw)
    lp = _float64_logprobs(resid, readout)
    if softcap is not None:  # the cap changes these log-probs by far more than the tolerance
        plain = _float64_logprobs(resid, LinearReadout(lambda x: x, w, b))
        assert (plain - lp).abs().amax() > 0.1
    _check(st, lp, targets, rows, atol=1e-5)
    _check(ref, lp, targets, rows, atol=1e-5)
    for name in ("max_logprob", "entropy", "target_logprob", "kl_to_final", "topk_logprobs"):
        torch.testing.assert_close(getattr(st, name), getattr(ref, name), atol=1e-5, rtol=0, equal_nan=True)
    assert torch.equal(st.topk_ids, ref.topk_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_16_bits_is_float64_of_the_rounded_inputs(device, dtype):
    """16-bit inputs: the kernel's fp32-accumulated logits match the float64 readout of the same 16-bit
    values within 1e-5 (their products are exact in fp32); the eager path, which rounds each logit to
    16 bits (~0.4% of a logit in bf16, ~0.05% in fp16), is shown to be further off, so the check can
    tell them apart."""
    resid, w, b, targets, rows = _case(2, d=32, dtype=dtype, device=device)
    readout = LinearReadout(lambda x: x, w, b.to(dtype), softcap=8.0)
    kw = dict(targets=targets, rows=rows, k=3, kl_to_final=True)
    st = lens_reduce(resid, readout, backend="triton", **kw)
    lp = _float64_logprobs(resid, readout)
    _check(st, lp, targets, rows, atol=1e-5)
    eager = lens_reduce(resid, readout, backend="eager", **kw)
    keep = rows[None].expand(resid.shape[0], -1, -1)
    assert (eager.max_logprob[keep].double() - lp.amax(-1)[keep]).abs().max() > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1 / 64, 64.0])
def test_kernel_kl_is_accurate_for_small_and_large_kl(device, scale):
    """Small-integer inputs at power-of-two scales make every logit exact in fp32 in any summation order,
    so only the online statistics are measured: near-uniform (scale 1/64: KL ~1e-3, entropy ~6 nats) to
    one-hot (scale 64: KL up to ~600 nats, where the earlier dot-product KL lost 1.5e-2). The eager test
    of the same design holds 2e-6 + 1e-6 relative; the kernel's fp32 tile sums get 4e-6 + 1e-6 relative."""
    g = torch.Generator().manual_seed(0)
    n_layers, batch, pos, d, v = 5, 2, 5, 16, 500
    base = torch.randint(-3, 4, (1, batch, pos, d), generator=g).float()
    layer_p = 0.1 * torch.arange(n_layers).flip(0)[:, None, None, None]
    resid = base + (torch.rand(n_layers, batch, pos, d, generator=g) < layer_p).float()
    w = torch.randint(-3, 4, (d, v), generator=g).float() * scale
    b = torch.randint(-3, 4, (v,), generator=g).float() * scale
    targets = torch.randint(0, v, (batch, pos), generator=g)
    z = resid.double() @ w.double() + b.double()
    assert torch.equal((resid @ w + b).double(), z)  # exact in fp32
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)
    kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
    readout = LinearReadout(lambda x: x, w.to(device), b.to(device))
    st = lens_reduce(resid.to(device), readout, targets=targets, k=3, kl_to_final=True, backend="triton")
    assert kl.max() > 100 if scale > 1 else kl.max() < 1e-2

    def close(got, ref):
        torch.testing.assert_close(got.double(), ref, atol=4e-6, rtol=1e-6)

    close(st.kl_to_final, kl)
    close(st.entropy, ent)
    close(st.target_logprob, lp.gather(-1, targets[None, ..., None].expand(n_layers, -1, -1, 1))[..., 0])
    close(st.max_logprob, lp.amax(-1))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_computes_only_what_is_asked(device):
    """k=0, no entropy, no targets, no KL: the other fields are None; the max log-prob still matches
    float64 (d_in a multiple of the K tile: the unmasked inner loop), and chunking positions (a small
    max_chunk_bytes) changes nothing."""
    resid, w, _, _, _ = _case(3, d=32, device=device)
    readout = LinearReadout(lambda x: x, w)
    st = lens_reduce(resid, readout, k=0, entropy=False, backend="triton")
    assert st.topk_ids is None and st.entropy is None and st.target_logprob is None and st.kl_to_final is None
    lp = _float64_logprobs(resid, readout)
    torch.testing.assert_close(st.max_logprob.double(), lp.amax(-1), atol=1e-5, rtol=0)
    chunked = lens_reduce(resid, readout, k=0, entropy=False, backend="triton", max_chunk_bytes=4 * 32 * 4 * 10)
    assert torch.equal(chunked.max_logprob, st.max_logprob)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_chunks_positions_with_kl(device):
    """With KL the final layer's logits of a chunk of positions are kept: a budget of eight positions'
    worth runs three chunks (8 + 8 + 2 kept positions) and gives the same statistics as one chunk."""
    resid, w, b, targets, rows = _case(4, v=100, device=device)
    readout = LinearReadout(lambda x: x, w, b)
    kw = dict(targets=targets, rows=rows, k=3, kl_to_final=True, backend="triton")
    one = lens_reduce(resid, readout, **kw)
    per_pos = 4 * 24 * 4 + 100 * 4
    many = lens_reduce(resid, readout, max_chunk_bytes=8 * per_pos, **kw)
    for name in ("max_logprob", "entropy", "target_logprob", "kl_to_final", "topk_logprobs", "topk_ids", "target_rank"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), equal_nan=True, atol=0, rtol=0)


def test_backend_choice_and_refusals(monkeypatch):
    resid, w, _, _, _ = _case(5, v=40)
    readout = LinearReadout(lambda x: x, w)
    with pytest.raises(ValueError, match="backend must be one of"):
        lens_reduce(resid, readout, backend="fast")
    with pytest.raises(ValueError, match="LinearReadout"):
        lens_reduce(resid, lambda x: x @ w, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if INTERPRETER:  # the check runs before any launch
        with pytest.raises(ValueError, match="target ids must be < d_vocab"):
            lens_reduce(resid, readout, targets=torch.full(resid.shape[1:3], 40), backend="triton")
    with pytest.raises(ValueError, match="supports"):
        lens_reduce(resid.double(), LinearReadout(lambda x: x, w.double()), backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lens_reduce(resid, readout, backend="triton")
    # "auto" on CPU is the eager path, bit for bit
    auto, eager = lens_reduce(resid, readout), lens_reduce(resid, readout, backend="eager")
    assert torch.equal(auto.topk_logprobs, eager.topk_logprobs) and torch.equal(auto.entropy, eager.entropy)


@pytest.mark.skipif(INTERPRETER, reason="compiles for the GPU: not in the interpreter's process")
@pytest.mark.parametrize(
    ("dtype", "variant"),
    [(torch.bfloat16, "plain"), (torch.bfloat16, "final-layer"), (torch.bfloat16, "kl"), (torch.float32, "kl")],
)
def test_kernel_compiles_for_hopper_without_a_gpu(dtype, variant):
    """Ahead-of-time compilation for sm_90 with Triton's bundled ptxas (no GPU needed). The interpreter
    runs the kernel as Python and misses what only the compiler checks (it once let a variable change
    shape inside the vocabulary loop). Every statistic and flag on; for bf16 the matmul must be on the
    tensor cores (wgmma) with pipelined loads (cp.async)."""
    from mechlens.ops import lens_triton

    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_TARGET=True, ENTROPY=True, EVEN_K=False)
    flags.update(
        {"plain": dict(K=0, KP=1), "final-layer": dict(K=5, KP=8, STORE_Z=True), "kl": dict(K=5, KP=8, KL=True)}[
            variant
        ]
    )
    compiled = lens_triton.compile_for_gpu(dtype, **flags)
    ptx = compiled.asm["ptx"]
    assert "cp.async" in ptx
    if dtype == torch.bfloat16:
        assert "wgmma.mma_async" in ptx


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_vocabulary_splits_merge_exactly(device):
    """Rows whose vocabulary pass is cut into ranges (one program each: how few rows fill a GPU) merge
    their partial max/sum-exp/entropy sums, counts, KL sums and top-k candidates in float64 to the same
    statistics as one pass (1e-6: only the order of a few float64 additions differs) and as eager."""
    from mechlens.ops import lens_triton

    resid, w, b, targets, _ = _case(6, device=device)
    readout = LinearReadout(lambda x: x, w, b, softcap=8.0)
    flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])
    t = targets.reshape(-1).to(device)
    kw = dict(k=3, entropy=True, kl_to_final=True, max_chunk_bytes=2**30)
    one = lens_triton.reduce_rows(flat, readout, None, t, splits=1, **kw)
    four = lens_triton.reduce_rows(flat, readout, None, t, splits=4, **kw)  # 96 + 96 + 96 + 12 columns
    eager = lens_reduce(resid, readout, targets=targets, k=3, kl_to_final=True, backend="eager")
    for name in ("max", "entropy", "target_logprob", "kl_to_final", "topk_logprobs"):
        torch.testing.assert_close(four[name], one[name], atol=1e-6, rtol=0, equal_nan=True)
        ref = getattr(eager, "max_logprob" if name == "max" else name).flatten(1, 2)
        torch.testing.assert_close(four[name].cpu(), ref, atol=1e-5, rtol=2e-6, equal_nan=True)
    for name in ("topk_ids", "target_rank"):
        assert torch.equal(four[name], one[name])
    assert torch.equal(four["topk_ids"].cpu(), eager.topk_ids.flatten(1, 2))
