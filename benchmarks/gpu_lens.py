"""Item 5: logit-lens readout throughput on a CUDA GPU (skips cleanly without one).

gpt2-large-sized random GPT-2 (36 layers, d_model 1280, vocab 50257), 64 x 256 tokens, bf16 and
fp32: the 37 residual-stream readout points through ln_f + unembed, reduced by
``mechlens.ops.lens_reduce`` -- the fused Triton kernel (``backend="triton"``, the CUDA default) and the
eager tiled reference (``backend="eager"``) -- for all statistics (top-5, target log-prob and rank,
entropy, KL to final) and for TransformerLens' set (target log-prob + rank + entropy), and, for
reference, a plain chunked readout (logsumexp, argmax, target gather). Reports seconds, tokens/s, the
achieved TFLOP/s of the readout matmuls (2 * rows * d_model * vocab * points) as a fraction of the
matmul peak measured in the same run, and the peak device memory the call adds to its inputs
(``torch.cuda.max_memory_allocated`` minus what was allocated before it). Needs only torch and
transformers (no TransformerLens), and triton for the kernel rows.

    python benchmarks/gpu_lens.py            # prints a markdown table; paste into RESULTS_GPU.md
    python benchmarks/gpu_lens.py --check    # first: kernel vs eager (and float64) at vocab 50257
    python benchmarks/gpu_lens.py --sweep    # first: kernel tile configurations (--bf16-only, --no-eager)
    python benchmarks/gpu_lens.py --resources  # no GPU needed: registers/spills of the kernel for sm_90
"""

from __future__ import annotations

import sys
import time

import torch


def cuda_time(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def extra_peak_gb(fn) -> float:
    """Peak device memory ``fn`` allocates beyond what is already allocated (GiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def matmul_peak(dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    t = cuda_time(lambda: a @ b, 10)
    return 2 * 8192**3 / t / 1e12


def plain_readout(resid, ln, unembed, targets, chunk_rows):
    n_points, rows, _ = resid.shape
    out_lp = torch.empty(n_points, rows, device=resid.device)
    out_arg = torch.empty(n_points, rows, dtype=torch.long, device=resid.device)
    for s in range(0, rows, chunk_rows):
        logits = unembed(ln(resid[:, s : s + chunk_rows])).float()
        lse = torch.logsumexp(logits, -1)
        out_arg[:, s : s + chunk_rows] = logits.argmax(-1)
        t = targets[s : s + chunk_rows][None, :, None].expand(n_points, -1, 1)
        out_lp[:, s : s + chunk_rows] = logits.gather(-1, t)[..., 0] - lse
    return out_lp, out_arg


STATS = {
    "all statistics: top-5, target lp+rank, entropy, KL": dict(k=5, kl_to_final=True),
    "TL's set: target lp+rank, entropy": dict(k=0),
}


def check(hf, resid, targets, readout, dtype) -> list[str]:
    """Kernel vs eager on real-size rows (vocab 50257), all statistics; and both vs a float64
    materialised readout on a subset of positions. Returns markdown rows."""
    from mechlens.ops import lens_reduce

    out = []
    kw = dict(targets=targets, k=5, kl_to_final=True, max_chunk_bytes=2 * 2**30)
    sub = (slice(None), slice(0, 2), slice(None))  # 37 points x 2 x 256 positions for float64
    st = lens_reduce(resid, readout, backend="triton", **kw)
    ref = lens_reduce(resid, readout, backend="eager", **kw)
    r = resid[sub]
    h = readout.pre(r).double()
    z = h @ readout.weight.double()
    lp = torch.log_softmax(z, -1)
    del z
    t = targets[:2].to(lp.device)[None, ..., None].expand(lp.shape[0], -1, -1, 1)
    f64 = {
        "max_logprob": lp.amax(-1),
        "entropy": -(lp.exp() * lp).sum(-1),
        "target_logprob": lp.gather(-1, t)[..., 0],
        "kl_to_final": (lp[-1].exp() * (lp[-1] - lp)).sum(-1),
        "topk_logprobs": lp.topk(5, -1).values,
    }
    f64_rank = (lp > f64["target_logprob"][..., None]).sum(-1)
    f64_ids = lp.topk(5, -1).indices
    del lp
    for name, ref64 in f64.items():
        a, b = getattr(st, name), getattr(ref, name)
        r64 = ref64.cpu()
        out.append(
            f"| {str(dtype)[6:]} | {name} | {(a - b).abs().max():.2e} | {(a[:, :2].double() - r64).abs().max():.2e} | "
            f"{(b[:, :2].double() - r64).abs().max():.2e} |"
        )
    out.append(
        f"| {str(dtype)[6:]} | target_rank: equal kernel/eager, kernel/float64 | "
        f"{(st.target_rank == ref.target_rank).float().mean():.4%} | "
        f"{(st.target_rank[:, :2] == f64_rank.cpu()).float().mean():.4%} | "
        f"{(ref.target_rank[:, :2] == f64_rank.cpu()).float().mean():.4%} |"
    )
    out.append(
        f"| {str(dtype)[6:]} | topk_ids: equal kernel/eager, kernel/float64 | "
        f"{(st.topk_ids == ref.topk_ids).float().mean():.4%} | "
        f"{(st.topk_ids[:, :2] == f64_ids.cpu()).float().mean():.4%} | "
        f"{(ref.topk_ids[:, :2] == f64_ids.cpu()).float().mean():.4%} |"
    )
    return out


def sweep(resid, targets, readout, flops, peak, configs) -> list[str]:
    """Time the kernel at several (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) configurations."""
    from mechlens.ops import lens_triton

    out = []
    flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])
    keep = None  # all positions
    tflat = targets.reshape(-1)
    for cfg in configs:
        for what, kw in STATS.items():
            kwargs = dict(k=kw["k"], entropy=True, kl_to_final=kw.get("kl_to_final", False), max_chunk_bytes=2**31)
            try:

                def run(cfg=cfg, kwargs=kwargs):
                    return lens_triton.reduce_rows(flat, readout, keep, tflat, blocks=cfg, **kwargs)

                t = cuda_time(run, 2)
                out.append(
                    f"| {cfg} | {what} | {t:.3f} | {flops / t / 1e12:.0f} | {100 * flops / t / 1e12 / peak:.0f}% |"
                )
            except Exception as e:  # a configuration that does not compile (shared memory, registers)
                out.append(f"| {cfg} | {what} | failed: {type(e).__name__}: {str(e)[:80]} | - | - |")
            print(out[-1], flush=True)
    return out


# the defaults first; a 4-warp 64 x 64 tile can run two programs per multiprocessor (one's epilogue beside
# the other's matmul); 128 x 128 spills registers (RESULTS_GPU.md) but reads less from L2 per FLOP
SWEEP_BF16 = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4)]
SWEEP_FP32 = [(64, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3)]


def resources() -> None:
    """Registers, spills and shared memory of the kernel's variants compiled for sm_90 by ptxas (no GPU
    needed: Triton's bundled ptxas), at the default tile configurations."""
    import os
    import subprocess
    import tempfile

    import triton

    sys.path.insert(0, ".")
    from mechlens.ops import lens_triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    all_on = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_TARGET=True, ENTROPY=True)
    variants = {"TL's set (target, rank, entropy)": dict(HAS_TARGET=True, ENTROPY=True),
                "final layer (all, top-5, stores logits)": dict(all_on, K=5, KP=8, STORE_Z=True),
                "other layers (all, top-5, KL)": dict(all_on, K=5, KP=8, KL=True)}  # fmt: skip
    print(f"triton {triton.__version__}, sm_90a\n")
    print("| weights | blocks (BM, BN, BK, warps, stages) | variant | ptxas |\n| --- | --- | --- | --- |")
    for dtype in (torch.bfloat16, torch.float32):
        for name, flags in variants.items():
            ptx = lens_triton.compile_for_gpu(dtype, **flags).asm["ptx"]
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.ptx")
                with open(path, "w") as f:
                    f.write(ptx)
                for exe in ("ptxas-blackwell", "ptxas"):  # the newer one reads the newer PTX versions
                    r = subprocess.run([os.path.join(bin_dir, exe), "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                                       capture_output=True, text=True)  # fmt: skip
                    if r.returncode == 0:
                        break
            info = "; ".join(line.split(":", 1)[-1].strip() for line in r.stderr.splitlines()
                             if "registers" in line or "spill" in line)  # fmt: skip
            print(f"| {str(dtype)[6:]} | {lens_triton._CUDA_BLOCKS[dtype]} | {name} | {info or r.stderr[-200:]} |")


def main(argv: list[str]) -> None:
    if "--resources" in argv:
        resources()
        return
    if not torch.cuda.is_available():
        print("no CUDA device: item 5 skipped")
        return
    sys.path.insert(0, ".")
    import triton
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechlens.ops import LinearReadout, lens_reduce

    torch.backends.cuda.matmul.allow_tf32 = False  # honest fp32
    batch, seq, n_layers, d, vocab = 64, 256, 36, 1280, 50257
    rows_md = ["| dtype | method | statistics | chunk budget | seconds | tokens/s | readout TFLOP/s | % of matmul peak "
               "| extra peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    check_md = ["| dtype | statistic | max abs kernel - eager | kernel - float64 | eager - float64 |",
                "| --- | --- | --- | --- | --- |"]  # fmt: skip
    sweep_md = ["| config (BM, BN, BK, warps, stages) | statistics | seconds | TFLOP/s | % of peak |",
                "| --- | --- | --- | --- | --- |"]  # fmt: skip
    name = torch.cuda.get_device_name()
    dtypes = (torch.bfloat16,) if "--bf16-only" in argv else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=n_layers, n_embd=d, n_head=20, vocab_size=vocab, n_positions=1024)
        hf = GPT2LMHeadModel(cfg).to("cuda", dtype).eval()
        tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
        with torch.no_grad():
            t_fwd = cuda_time(lambda hf=hf: hf(tokens, output_hidden_states=True))
            hs = hf(tokens, output_hidden_states=True).hidden_states  # 37 points (the last already has ln_f)
            resid = torch.stack(hs)  # [point, batch, pos, d]
            del hs
            targets = torch.roll(tokens, -1, 1)
            flops = 2 * batch * seq * d * vocab * (n_layers + 1)
            peak = matmul_peak(dtype)
            readout = LinearReadout(pre=hf.transformer.ln_f, weight=hf.lm_head.weight.T)
            if "--check" in argv:
                check_md += check(hf, resid, targets, readout, dtype)
                print("\n".join(check_md[-7:]), flush=True)
            if "--sweep" in argv:
                sweep_md += sweep(
                    resid, targets, readout, flops, peak, SWEEP_BF16 if dtype != torch.float32 else SWEEP_FP32
                )
            backends = ("triton", "eager") if "--no-eager" not in argv else ("triton",)
            for backend in backends:
                for what, kw in STATS.items():
                    for budget_gb in (2, 16):

                        def run(b=budget_gb, kw=kw, backend=backend):
                            return lens_reduce(resid, readout, targets=targets, max_chunk_bytes=b * 2**30,
                                               backend=backend, **kw)  # fmt: skip

                        t = cuda_time(run)
                        mem = extra_peak_gb(run)
                        rows_md.append(f"| {str(dtype)[6:]} | lens_reduce {backend} | {what} | {budget_gb} GiB | "
                                       f"{t:.3f} | {batch * seq / t:,.0f} | {flops / t / 1e12:.1f} | "
                                       f"{100 * flops / t / 1e12 / peak:.0f}% | {mem:.2f} |")  # fmt: skip
                        print(rows_md[-1], flush=True)
            flat = resid.reshape(n_layers + 1, batch * seq, d)
            t = cuda_time(lambda: plain_readout(flat, hf.transformer.ln_f, hf.lm_head, targets.reshape(-1), 1024))
            tflops = flops / t / 1e12
            rows_md.append(f"| {str(dtype)[6:]} | plain chunked readout | lse, argmax, gather | 1024 rows | {t:.3f} | "
                           f"{batch * seq / t:,.0f} | {tflops:.1f} | {100 * tflops / peak:.0f}% | - |")  # fmt: skip
            rows_md.append(f"| {str(dtype)[6:]} | (model forward, for scale) | - | - | {t_fwd:.3f} | "
                           f"{batch * seq / t_fwd:,.0f} | - | matmul peak {peak:.0f} TFLOP/s | - |")  # fmt: skip
        del hf, resid, flat
        torch.cuda.empty_cache()
    print(f"\nGPU: {name}; torch {torch.__version__}; triton {triton.__version__}; "
          "64 x 256 tokens, 37 readout points, vocab 50257\n")  # fmt: skip
    if "--check" in argv:
        print("\n".join(check_md) + "\n")
    if "--sweep" in argv:
        print("\n".join(sweep_md) + "\n")
    print("\n".join(rows_md))


if __name__ == "__main__":
    main(sys.argv[1:])
