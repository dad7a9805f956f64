"""Item 5: logit-lens readout throughput on a CUDA GPU (skips cleanly without one).

gpt2-large-sized random GPT-2 (36 layers, d_model 1280, vocab 50257), 64 x 256 tokens, bf16 and
fp32: the 37 residual-stream readout points through ln_f + unembed, reduced by
``mechlens.ops.lens_reduce`` (top-5, target log-prob and rank, entropy, KL to final) and, for
reference, a plain chunked readout (logsumexp, argmax, target gather). Reports tokens/s and the
achieved TFLOP/s of the readout matmuls (2 * rows * d_model * vocab * points) as a fraction of the
matmul peak measured in the same run. Needs only torch and transformers (no TransformerLens).

    python benchmarks/gpu_lens.py   # prints a markdown table; paste into RESULTS.md
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


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: item 5 skipped")
        return
    sys.path.insert(0, ".")
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechlens.ops import LinearReadout, lens_reduce

    torch.backends.cuda.matmul.allow_tf32 = False  # honest fp32
    batch, seq, n_layers, d, vocab = 64, 256, 36, 1280, 50257
    rows_md = ["| dtype | method | chunk budget | seconds | tokens/s | readout TFLOP/s | % of matmul peak |",
               "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    name = torch.cuda.get_device_name()
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=n_layers, n_embd=d, n_head=20, vocab_size=vocab, n_positions=1024)
        hf = GPT2LMHeadModel(cfg).to("cuda", dtype).eval()
        tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
        with torch.no_grad():
            t_fwd = cuda_time(lambda hf=hf: hf(tokens, output_hidden_states=True))
            hs = hf(tokens, output_hidden_states=True).hidden_states  # 37 points (the last already has ln_f)
            resid = torch.stack(hs)  # [point, batch, pos, d]
            targets = torch.roll(tokens, -1, 1)
            flops = 2 * batch * seq * d * vocab * (n_layers + 1)
            peak = matmul_peak(dtype)

            readout = LinearReadout(pre=hf.transformer.ln_f, weight=hf.lm_head.weight.T)
            stats = {"top-5, target lp+rank, entropy, KL": dict(k=5, kl_to_final=True),
                     "target lp+rank, entropy (TL's targets set)": dict(k=0)}  # fmt: skip
            for what, kw in stats.items():
                for budget_gb in (2, 16):
                    t = cuda_time(lambda b=budget_gb, kw=kw: lens_reduce(resid, readout, targets=targets,
                                                                         max_chunk_bytes=b * 2**30, **kw))  # fmt: skip
                    rows_md.append(f"| {str(dtype)[6:]} | mechlens lens_reduce ({what}) | "
                                   f"{budget_gb} GiB | {t:.2f} | {batch * seq / t:,.0f} | {flops / t / 1e12:.1f} | "
                                   f"{100 * flops / t / 1e12 / peak:.0f}% |")  # fmt: skip
            flat = resid.reshape(n_layers + 1, batch * seq, d)
            t = cuda_time(lambda: plain_readout(flat, hf.transformer.ln_f, hf.lm_head, targets.reshape(-1), 1024))
            tflops = flops / t / 1e12
            rows_md.append(f"| {str(dtype)[6:]} | plain chunked readout (lse, argmax, gather) | 1024 rows | {t:.2f} | "
                           f"{batch * seq / t:,.0f} | {tflops:.1f} | {100 * tflops / peak:.0f}% |")  # fmt: skip
            rows_md.append(f"| {str(dtype)[6:]} | (model forward, for scale) | - | {t_fwd:.2f} | "
                           f"{batch * seq / t_fwd:,.0f} | - | matmul peak {peak:.0f} TFLOP/s |")  # fmt: skip
        del hf, resid, hs
        torch.cuda.empty_cache()
    print(f"GPU: {name}; torch {torch.__version__}; 64 x 256 tokens, 37 readout points, vocab 50257\n")
    print("\n".join(rows_md))


if __name__ == "__main__":
    main()
