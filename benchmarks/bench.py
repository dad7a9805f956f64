"""mechlens benchmarks: ratios and memory peaks, each measured within one run (medians of repeats).

    HF_HUB_OFFLINE=1 python benchmarks/bench.py            # CPU items 1-4, 6 and 7, writes benchmarks/RESULTS.md
    HF_HUB_OFFLINE=1 python benchmarks/bench.py --quick    # smaller sizes, for a smoke run

1. hook overhead: run_with_cache(names_filter=what a study needs) vs the plain HF forward (and the full cache)
2. analysis cost per study (time after the forwards / forward time) and speed-ups over loop baselines
3. chunked logit-lens peak memory vs the materialised [layer, batch, pos, vocab] logits, and vs depth
4. streaming attention-magnitude statistics: peak memory over 1,020 vs 10,200 sequences (the reviews
   repeated 15 and 150 times, so the statistics must be identical)
6. mechlens' causal lens vs TransformerLens' tools.analysis.logit_lens (time and peak memory)
7. corpus scale: peak memory of every study that streams a corpus (STREAMING: magnitudes, the corpus lens with
   and without a tuned lens) over 20,000 vs 2,000 lines of a local file, and torchrun with 2 processes vs 1
   (largest difference of any statistic, wall-time ratio)
9. interventions: the exact patching grid's time per patched run over one unpatched forward of the same
   pairs (batched rows: close to 1 means the grid costs ~ patched runs x one forward), and attribution
   patching's speed-up over exact patching on the same grid
(5. the GPU lens throughput runs only where a CUDA device is present: benchmarks/gpu_lens.py)

Peak memory is process RSS measured in a fresh child process: the kernel's peak counter is reset
(/proc/self/clear_refs) after set-up, and the peak minus the RSS at that moment is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import multiprocessing as mp
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent
GIB = 2**30


# -- helpers ----------------------------------------------------------------------------------------


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _child(target: str, kwargs: dict, queue, exact_peak: bool = False) -> None:
    import ctypes
    import gc
    import importlib

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if exact_peak:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: see in_child
    module, _, name = target.rpartition(":")  # "job" here, or "module:job" for another benchmark module
    setup, work = (getattr(importlib.import_module(module), name) if module else globals()[name])(**kwargs)
    state = setup()

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        # return heap freed during set-up to the OS: otherwise the workload reuses it without raising
        # RSS and its peak is under-counted (seen: TL's lens measured 3.6 GiB in one run, 0.3 in another)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = work(state)
    peak = _status("VmHWM")
    queue.put({"peak_bytes": peak - base, "peak_rss": peak, "seconds": time.perf_counter() - t0, "out": out})


def in_child(target: str, *, exact_peak: bool = False, **kwargs) -> dict:
    """Run ``target``'s work in a fresh process (``target``: a job of this module, or ``"module:job"`` of
    another benchmark module beside it). ``exact_peak``: large allocations come straight from
    mmap, so freed memory leaves RSS at once and VmHWM tracks live tensors rather than what the
    allocator kept; it also makes every large allocation page-fault afresh, so time such runs only
    for memory (``timed_and_peak`` does both, in two processes)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(target, kwargs, q, exact_peak))
    p.start()
    res = q.get()
    p.join()
    return res


def timed_and_peak(target: str, **kwargs) -> dict:
    """Seconds from a run with the default allocator; peak bytes from an ``exact_peak`` run."""
    timed = in_child(target, **kwargs)
    timed["peak_bytes"] = in_child(target, exact_peak=True, **kwargs)["peak_bytes"]
    return timed


def gpt2_small(n_layers: int = 12, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def bridge_of(hf):
    from mechlens import load_model
    from mechlens.tokenizer import gpt2_tokenizer

    return load_model(copy.deepcopy(hf), tokenizer=gpt2_tokenizer())


def random_batch(model, batch: int, seq: int, seed: int = 0):
    from mechlens.encoding import encode

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50257, (batch, seq), generator=g)
    return encode(model, tokens.tolist(), bos=False)  # random ids as text tokens: the batch's one owner builds it


# -- 1. hook overhead -------------------------------------------------------------------------------


def bench_hook_overhead(quick: bool) -> list[dict]:
    from transformers import GPT2LMHeadModel

    from mechlens.studies.magnitudes import attn_out_names
    from mechlens.zoo import EMBEDDED

    def forwards(hf, bridge, batch, names):
        tok, mask = batch.tokens, batch.attention_mask
        with torch.no_grad():
            t_hf = median_time(lambda: hf(input_ids=tok, attention_mask=mask), 3)
            t_f = median_time(lambda: bridge.run_with_cache(tok, attention_mask=mask, names_filter=names), 3)
            t_all = median_time(lambda: bridge.run_with_cache(tok, attention_mask=mask), 3)
        return t_hf, t_f, t_all

    rows = []
    tiny = GPT2LMHeadModel.from_pretrained(EMBEDDED["tiny-gpt2"].path, attn_implementation="eager").eval()
    for label, hf in (("tiny-gpt2", tiny), ("gpt2-small-sized random", gpt2_small())):
        bridge = bridge_of(hf)
        batch = random_batch(bridge, 4 if quick else 16, 128)
        t_hf, t_f, t_all = forwards(hf, bridge, batch, attn_out_names(bridge))
        rows.append({"item": "1", "what": f"{label}, {len(batch)}x128: run_with_cache(hook_attn_out x L) / HF forward",
                     "value": t_f / t_hf, "unit": "x", "target": "<= 1.10", "ok": t_f / t_hf <= 1.10,
                     "detail": f"HF {t_hf * 1e3:.0f} ms, filtered {t_f * 1e3:.0f} ms"})  # fmt: skip
        rows.append({"item": "1", "what": f"{label}: full cache (no filter) / HF forward", "value": t_all / t_hf,
                     "unit": "x", "target": "(contrast)", "ok": None, "detail": f"{t_all * 1e3:.0f} ms"})  # fmt: skip
    return rows


# -- 2. analysis cost and loop baselines ------------------------------------------------------------


class ForwardTimer:
    """Accumulates the time spent inside the model's forward (hooked runs and generate included)."""

    def __init__(self, model):
        self.model, self.seconds = model, 0.0
        self._orig = model.forward

    def __enter__(self):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return self._orig(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        self.model.forward = timed
        return self

    def __exit__(self, *exc):
        del self.model.forward


def bench_analysis(quick: bool) -> list[dict]:
    """Per study (from the registry, through its protocol only): analysis time = ``run`` - time inside the
    model's forward - the time to build its figures (``figures(result.parts)``, timed on its own)."""
    from mechlens import load_model
    from mechlens.studies import STUDIES

    rows = []
    models = {"tiny-gpt2": load_model("tiny-gpt2"), "tiny-mlm": load_model("tiny-mlm")}
    for name, study in STUDIES.items():
        model = models[study.default_models[0]]
        cfg = study.module.Config()
        study.module.run(model, cfg)  # warm-up
        totals, fwds, figs = [], [], []
        for _ in range(1 if quick else 3):
            with ForwardTimer(model) as ft:
                t0 = time.perf_counter()
                result = study.module.run(model, cfg)
                totals.append(time.perf_counter() - t0)
            fwds.append(ft.seconds)
            t0 = time.perf_counter()
            study.module.figures(result.parts)
            figs.append(time.perf_counter() - t0)
        total, fwd, fig = statistics.median(totals), statistics.median(fwds), statistics.median(figs)
        ratio = (total - fwd - fig) / fwd
        rows.append({"item": "2", "what": f"{name} on {study.default_models[0]}: analysis / forward time",
                     "value": ratio, "unit": "x", "target": "<= 0.25", "ok": ratio <= 0.25,
                     "detail": f"forward {fwd:.2f} s, analysis {total - fwd - fig:.2f} s, "
                               f"figures {fig:.2f} s"})  # fmt: skip
    rows += loop_baselines(models, quick)
    return rows


def loop_baselines(models, quick: bool) -> list[dict]:
    """Each vectorised analysis vs the original notebooks' loops, on identical inputs, equal results."""
    import scipy.spatial.distance

    from mechlens import encode, next_token_loss, run_cached
    from mechlens.data import load_texts
    from mechlens.ops import stack_layers, vector_norm
    from mechlens.stats.distance import pairwise_minkowski
    from mechlens.stats.streaming import Moments
    from mechlens.studies import lens
    from mechlens.studies.magnitudes import position_grid

    rows = []
    g = models["tiny-gpt2"]
    # study 1: loss matrix -- loops over sequences and tokens vs one vectorised gather
    batch = encode(g, load_texts("contexts")[:300], bos=False, max_tokens=6)
    logits, _ = run_cached(g, batch, [], logits=True)

    def loops():
        out = np.zeros((len(batch), 5))
        for i in range(len(batch)):
            for t in range(5):
                out[i, t] = -torch.log_softmax(logits[i, t], -1)[batch.tokens[i, t + 1]].item()
        return out

    ref = loops()
    np.testing.assert_allclose(next_token_loss(logits, batch.tokens).numpy(), ref, atol=1e-5)
    rows.append(_speedup("study 1 loss matrix (300 x 5)", median_time(loops, 3),
                         median_time(lambda: next_token_loss(logits, batch.tokens), 5)))  # fmt: skip
    # study 3: sliding mask -- one forward per masked variant vs one batch
    m = models["tiny-mlm"]
    one = encode(m, [lens.Config().text], bos=True)
    variants, _, _ = lens.sliding_mask_batch(m, one)
    names = [f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"]

    def per_variant():
        return torch.cat([run_cached(m, variants.select(slice(i, i + 1)), names, logits=True)[0]
                          for i in range(len(variants))])  # fmt: skip

    batched = run_cached(m, variants, names, logits=True)[0]
    assert (per_variant() - batched).abs().max() <= 1e-4
    t_batched = median_time(lambda: run_cached(m, variants, names, logits=True), 3)
    rows.append(_speedup(f"study 3 sliding mask ({len(variants)} variants): forward per variant vs one batch",
                         median_time(per_variant, 3), t_batched))  # fmt: skip
    # study 4: per-position mean norms -- loops over sequences and tokens vs scatter-add
    rb = encode(g, load_texts("reviews"), bos=True)
    names4 = [f"blocks.{i}.hook_attn_out" for i in range(g.cfg.n_layers)]
    _, acts = run_cached(g, rb, names4)
    norms = vector_norm(stack_layers(acts, names4))
    valid, pos = rb.valid_mask(True), rb.positions

    def loops4():
        n_pos = int(pos.max()) + 1
        s, c = np.zeros((len(norms), n_pos)), np.zeros(n_pos)
        for b in range(valid.shape[0]):
            for t in range(valid.shape[1]):
                if valid[b, t]:
                    c[pos[b, t]] += 1
                    for layer in range(len(norms)):
                        s[layer, pos[b, t]] += norms[layer, b, t].item()
        return s / np.maximum(c, 1)

    n_pos4 = int(pos.max()) + 1

    def vectorised4():  # what the study does per batch: re-key to position ids, then one masked sum
        grid, mask = position_grid(norms, rb, valid, n_pos4)
        return Moments((len(norms), n_pos4)).update(grid, mask[:, None, :]).mean

    np.testing.assert_allclose(np.nan_to_num(vectorised4()), loops4(), rtol=1e-5)
    rows.append(_speedup("study 4 per-position mean norms (68 reviews x 6 layers)", median_time(loops4, 3),
                         median_time(vectorised4, 5)))  # fmt: skip
    # study 5: pairwise L1/L2 over layers -- double loop over pairs vs cdist
    acts5 = torch.randn(g.cfg.n_layers, 10, g.cfg.d_model, dtype=torch.float64)

    def loops5():
        out = np.zeros((len(acts5), 2, 10, 10))
        for layer in range(len(acts5)):
            for i in range(10):
                for j in range(10):
                    for k, p in enumerate((1, 2)):
                        out[layer, k, i, j] = scipy.spatial.distance.minkowski(acts5[layer, i], acts5[layer, j], p)
        return out

    def vec5():
        return np.stack([[pairwise_minkowski(a, p).numpy() for p in (1, 2)] for a in acts5])

    np.testing.assert_allclose(vec5(), loops5(), atol=1e-10)
    rows.append(_speedup("study 5 pairwise L1/L2 (6 layers x 10 targets)", median_time(loops5, 3),
                         median_time(vec5, 5)))  # fmt: skip
    return rows


def _speedup(what: str, t_loop: float, t_vec: float) -> dict:
    s = t_loop / t_vec
    return {"item": "2", "what": f"{what}: speed-up, equal results", "value": s, "unit": "x", "target": ">= 10",
            "ok": s >= 10, "detail": f"loops {t_loop * 1e3:.1f} ms, mechlens {t_vec * 1e3:.2f} ms"}  # fmt: skip


# -- 3 and 6. lens memory and TransformerLens comparison (child processes) --------------------------


def lens_job(n_layers: int, batch: int, seq: int, which: str = "mechlens", chunk_mb: int = 128):
    def setup():
        from mechlens import arch
        from mechlens.forward import run_cached
        from mechlens.studies.lens import next_token_targets

        m = bridge_of(gpt2_small(n_layers))
        b = random_batch(m, batch, seq)
        # the forward is not what is measured: both lenses get their residual streams precomputed
        if which.startswith("mechlens"):
            _, acts = run_cached(m, b, arch.readout_hook_names(m))
        else:
            with torch.no_grad():
                _, acts = m.run_with_cache(b.tokens, names_filter=lambda n: n.endswith(("resid_pre", "resid_post")))
        return m, b, acts, next_token_targets(b)

    def work(state):
        from mechlens import arch
        from mechlens.ops import lens_reduce, stack_layers

        m, _, acts, targets = state
        if which.startswith("mechlens"):
            everything = which == "mechlens"
            resid = stack_layers(acts, arch.readout_hook_names(m))
            st = lens_reduce(resid, arch.readout(m), targets=targets, k=5 if everything else 0,
                             kl_to_final=everything, max_chunk_bytes=chunk_mb * 2**20)  # fmt: skip
            return {"lp": st.target_logprob[:, 0, :8].tolist(), "rank": st.target_rank[:, 0, :8].tolist(),
                    "entropy": st.entropy[:, 0, :8].tolist()}  # fmt: skip
        from transformer_lens.tools.analysis.logit_lens import logit_lens

        with torch.no_grad():
            res = logit_lens(m, cache=acts, positions=None, targets=targets.clamp(min=0), return_type="log_probs")
            if which == "tl+topk":  # TL computes one of targets / top_k per call: the top-5 is a second pass
                logit_lens(m, cache=acts, positions=None, top_k=5, return_type="log_probs")
        r = res.readout
        return {"lp": r.values[:, 0, :8, 0].tolist(), "rank": r.target_ranks[:, 0, :8, 0].tolist(),
                "entropy": r.entropy[:, 0, :8].tolist()}  # fmt: skip

    return setup, work


def bench_lens_memory(quick: bool) -> list[dict]:
    """Peak memory of the lens step (stacking the cached residual streams + the reduction). The
    ``[points, batch, pos, d_model]`` stack is the input every lens holds and grows with depth; the
    reduction's own working set (peak minus the stack) is what the chunk budget bounds."""
    rows = []
    batch = 8 if quick else 64
    r = timed_and_peak("lens_job", n_layers=12, batch=batch, seq=128)
    materialised = 13 * batch * 128 * 50257 * 4
    rows.append({"item": "3", "what": f"chunked lens peak, 12 layers x {batch} x 128 (gpt2-small-sized)",
                 "value": r["peak_bytes"] / GIB, "unit": "GiB",
                 "target": f"<< {materialised / GIB:.1f} GiB materialised",
                 "ok": r["peak_bytes"] < materialised / 10,
                 "detail": f"{r['seconds']:.1f} s; chunk budget 0.125 GiB; residual stack "
                           f"{13 * batch * 128 * 768 * 4 / GIB:.2f} GiB"})  # fmt: skip
    peaks, beyond = {}, {}
    for n in (12, 24, 36):
        peaks[n] = in_child("lens_job", exact_peak=True, n_layers=n, batch=8, seq=128)["peak_bytes"]
        beyond[n] = peaks[n] - (n + 1) * 8 * 128 * 768 * 4
    flat = max(beyond.values()) / min(beyond.values())
    rows.append({"item": "3", "what": "lens working set beyond the residual stack vs depth, 8 x 128: 12 / 24 / 36 "
                                      "layers", "value": flat, "unit": "x (max/min)", "target": "flat (<= 1.5)",
                 "ok": flat <= 1.5,
                 "detail": ", ".join(f"{n}: {beyond[n] / GIB:.3f} GiB (peak {peaks[n] / GIB:.2f})"
                                     for n in peaks)})  # fmt: skip
    return rows


def bench_vs_transformer_lens(quick: bool) -> list[dict]:
    """Two comparisons, both reading the same precomputed residual streams: (a) the statistics TL's
    targets call returns (target log-prob, rank, entropy); (b) everything mechlens computes in one pass
    (adds top-5 and KL to the final layer) vs TL's targets call + its top-k call (still without KL)."""
    batch = 2 if quick else 8
    runs = {w: timed_and_peak("lens_job", n_layers=12, batch=batch, seq=128, which=w)
            for w in ("mechlens-tl-set", "tl", "mechlens", "tl+topk")}  # fmt: skip
    rows = []
    for ours, theirs, what in (
        ("mechlens-tl-set", "tl", "same statistics as TL's targets call (target log-prob, rank, entropy)"),
        ("mechlens", "tl+topk", "mechlens top-5 + target log-prob + rank + entropy + KL in one pass vs TL "
                                "targets call + top-k call (no KL)"),
    ):  # fmt: skip
        a, b = runs[ours], runs[theirs]
        lp = float(np.abs(np.array(a["out"]["lp"]) - np.array(b["out"]["lp"])).max())
        ent = float(np.abs(np.array(a["out"]["entropy"]) - np.array(b["out"]["entropy"])).max())
        same_rank = a["out"]["rank"] == b["out"]["rank"]
        speed = b["seconds"] / a["seconds"]
        mem = a["peak_bytes"] / b["peak_bytes"]
        rows += [
            {"item": "6", "what": f"causal lens vs TL logit_lens, gpt2-small-sized, {batch} x 128, all positions, "
                                  f"{what}: speed-up", "value": speed, "unit": "x", "target": ">= 1.5",
             "ok": speed >= 1.5,
             "detail": f"TL {b['seconds']:.1f} s, mechlens {a['seconds']:.1f} s; max |diff| target log-prob "
                       f"{lp:.1e}, entropy {ent:.1e}; ranks identical: {same_rank}"},
            {"item": "6", "what": "  peak memory mechlens / TL", "value": mem, "unit": "x", "target": "<= 1.0",
             "ok": mem <= 1.0,
             "detail": f"TL {b['peak_bytes'] / GIB:.2f} GiB, mechlens {a['peak_bytes'] / GIB:.2f} GiB"},
        ]  # fmt: skip
    return rows


# -- 4. streaming statistics -------------------------------------------------------------------------


def magnitudes_job(n_sequences: int):
    def setup():
        from mechlens import load_model
        from mechlens.data import load_texts

        reviews = load_texts("reviews")
        texts = (reviews * (n_sequences // len(reviews) + 1))[:n_sequences]
        return load_model("tiny-gpt2"), texts

    def work(state):
        from mechlens.studies import magnitudes

        model, texts = state
        res = magnitudes.run(model, magnitudes.Config(n_texts=None, batch_size=64), texts=texts)
        return res.metrics["lognorm_mean_by_layer"]

    return setup, work


def bench_streaming(quick: bool) -> list[dict]:
    # multiples of the 68 built-in reviews, so both runs must give identical statistics
    small, big = (204, 2040) if quick else (1020, 10200)
    a, b = (
        in_child("magnitudes_job", exact_peak=True, n_sequences=small),
        in_child("magnitudes_job", exact_peak=True, n_sequences=big),
    )
    ratio = b["peak_bytes"] / a["peak_bytes"]
    same = np.allclose(a["out"], b["out"], atol=1e-6)  # the reviews repeat: same statistics
    return [{"item": "4", "what": f"attention-magnitude study peak: {big:,} vs {small:,} sequences",
             "value": ratio, "unit": "x", "target": "<= 1.10", "ok": ratio <= 1.10,
             "detail": f"{a['peak_bytes'] / 2**20:.0f} MiB vs {b['peak_bytes'] / 2**20:.0f} MiB; "
                       f"{b['seconds']:.1f} s for {big:,}; identical statistics: {same}"}]  # fmt: skip


# -- 7. corpus scale: streamed sources, constant memory, data-parallel ---------------------------------


def _corpus_file(n_lines: int) -> str:
    """A local .txt of ``n_lines`` lines: the built-in reviews repeated (so statistics of 2,000 and
    20,000 lines agree), written once per size under benchmarks/.cache."""
    from mechlens.data import load_texts

    path = ROOT / ".cache" / f"reviews_{n_lines}.txt"
    if not path.exists():
        reviews = load_texts("reviews")
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join((reviews * (n_lines // len(reviews) + 1))[:n_lines]) + "\n")
    return str(path)


def word_level_gpt2(seed: int = 0, n_layers: int = 6):
    """A random 6-layer GPT-2 (d_model 128) over a word-level vocabulary of the built-in reviews (~400
    words): the corpus lens reads out the whole vocabulary at every layer and position, so on 2 CPU cores
    a 50,257-token vocabulary makes 20,000 lines take hours; memory constancy does not depend on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from mechlens import load_model
    from mechlens.data import load_texts

    words = sorted({w for t in load_texts("reviews") for w in t.split()})
    tk = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                    unk_token="<unk>"))  # fmt: skip
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eot = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot, pad_token=eot, unk_token="<unk>",
                                  name_or_path="reviews-words")  # fmt: skip
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=128, n_layer=n_layers, n_head=4, bos_token_id=0,
                     eos_token_id=0)  # fmt: skip
    return load_model(GPT2LMHeadModel(cfg).eval(), tokenizer=tok)


def word_level_tuned_lens(model):
    """A tuned lens for :func:`word_level_gpt2` (identity translators plus seeded noise, written under
    benchmarks/.cache): the corpus lens reads it exactly as a trained one, and its memory does not depend on
    what the translators learned."""
    from mechlens.lens import tuned as tuned_lens

    lens = tuned_lens.identity_lens(model)
    g = torch.Generator().manual_seed(0)
    lens = tuned_lens.TunedLens(lens.weight + 0.01 * torch.randn(lens.weight.shape, generator=g), lens.bias, lens.card)
    return str(lens.save(ROOT / ".cache" / "word_level_tuned_lens"))


# Every study that streams a corpus (--data) gets a peak-RSS row over 20,000 vs 2,000 lines, the same way:
# (label, study, Config overrides; "TUNED" stands for a tuned lens of the model). All run on
# word_level_gpt2: memory constancy does not depend on the vocabulary, and a 50,257-token readout makes
# 20,000 lines take hours on 2 cores. A new streaming study is measured by adding its line here.
STREAMING = (
    ("magnitudes", "magnitudes", {}),
    ("lens, tuned lens on (the default)", "lens", {"tuned": "TUNED"}),
    ("lens, tuned lens off", "lens", {"tuned": "none"}),
    ("interventions (prompt pairs)", "interventions", {"batch_size": 64, "reservoir": 50}),
)
METRIC = {"magnitudes": "lognorm_mean_by_layer", "lens": "target_logprob_by_layer", "interventions": "ld_clean_mean"}
# interventions reads prompt pairs, not lines of text, and each pair costs ~100 patched forward rows (every
# layer x position x hook, every head, 3 ablations) even on a 2-layer model: ~0.1 s a pair on the shared
# 2 cores, so its row runs on 1/40 of the lines (500 vs 50 pairs: still 10x apart, the reservoir full)
LINES_SCALE = {"interventions": 40}
LAYERS = {"interventions": 2}


def _pairs_file(n_pairs: int) -> str:
    """A .jsonl of ``n_pairs`` seeded induction pairs (segments of 2 words) of :func:`word_level_gpt2`'s
    vocabulary, as text (clean, corrupt, target, foil), written once per size under benchmarks/.cache."""
    import json

    from mechlens.studies import interventions as iv

    path = ROOT / ".cache" / f"pairs_{n_pairs}.jsonl"
    if not path.exists():
        model = word_level_gpt2()
        tok = model.tokenizer

        def text(ids) -> str:
            return " ".join(tok.convert_ids_to_tokens(list(ids)))

        path.parent.mkdir(exist_ok=True)
        with path.open("w") as f:
            for p in iv.parts.iter_induction_pairs(model, n_pairs, 2, 0):
                row = {"clean": text(p.clean), "corrupt": text(p.corrupt), "target": text([p.target]),
                       "foil": text([p.foil])}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    return str(path)


def corpus_job(study: str, path: str, overrides: dict | None = None):
    def setup():
        model = word_level_gpt2(n_layers=LAYERS.get(study, 6))
        cfg = {k: word_level_tuned_lens(model) if v == "TUNED" else v for k, v in (overrides or {}).items()}
        return model, cfg

    def work(state):
        from mechlens.studies import STUDIES

        model, cfg = state
        module = STUDIES[study].module
        n = {"n_pairs": 10**9} if study == "interventions" else {"n_texts": None}
        res = module.run(model, module.Config(data=path, **n, **cfg))
        return res.metrics[METRIC[study]]

    return setup, work


def _numbers(x, prefix=""):
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _numbers(val, f"{prefix}.{key}").items()}
    if isinstance(x, list):
        try:
            arr = np.array(x, dtype=np.float64)
        except (TypeError, ValueError):
            return {}
        return {prefix: arr}
    if isinstance(x, int | float) and not isinstance(x, bool):
        return {prefix: np.array(float(x))}
    return {}


def bench_corpus(quick: bool) -> list[dict]:
    """Peak RSS of the streamed studies over 20,000 vs 2,000 lines of a local file (targets <= 1.15), and
    2 torchrun processes (gloo, CPU) vs 1: the largest difference of any statistic, and the wall-time ratio."""
    small, big = (200, 2000) if quick else (2000, 20000)
    return corpus_peaks(small, big) + corpus_ranks(small)


def corpus_peaks(small: int, big: int) -> list[dict]:
    """One row per study of STREAMING: whole-process peak RSS over ``big`` vs ``small`` lines."""
    rows: list[dict] = []
    for label, study, overrides in STREAMING:
        # the default allocator (exact_peak's mmap-everything allocator makes the per-batch arrays crawl)
        k = LINES_SCALE.get(study, 1)
        file = _pairs_file if study == "interventions" else _corpus_file
        a = in_child("corpus_job", study=study, path=file(small // k), overrides=overrides)
        b = in_child("corpus_job", study=study, path=file(big // k), overrides=overrides)
        ratio = b["peak_rss"] / a["peak_rss"]
        rows.append({"item": "7", "what": f"{label} --data FILE peak RSS: {big // k:,} vs {small // k:,} lines",
                     "value": ratio,
                     "unit": "x", "target": "<= 1.15", "ok": ratio <= 1.15,
                     "detail": f"{b['peak_rss'] / 2**20:.0f} MiB vs {a['peak_rss'] / 2**20:.0f} MiB (above the loaded "
                               f"model: {b['peak_bytes'] / 2**20:.0f} vs {a['peak_bytes'] / 2**20:.0f} MiB); "
                               f"{b['seconds']:.0f} s for {big // k:,} lines (random word-level GPT-2, "
                               f"{LAYERS.get(study, 6)} layers, "
                               f"385-word vocabulary; wall time on a shared machine: noisy)"})  # fmt: skip
    return rows


def corpus_ranks(small: int) -> list[dict]:
    """2 torchrun processes (gloo, CPU) vs 1 on tiny-gpt2: the largest difference of any statistic."""
    import json
    import shutil
    import subprocess
    import tempfile

    rows: list[dict] = []
    binary = pathlib.Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    for study in ("magnitudes", "lens"):
        n_lines = small if study == "magnitudes" else 200  # the 50,257-token corpus lens: ~100 tokens/s here
        out, times = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for n in (1, 2):
                cmd = [str(binary / "mechlens"), "run", study, "--model", "tiny-gpt2", "--data", _corpus_file(n_lines),
                       "--quiet", "--out", f"{tmp}/{n}"]  # fmt: skip
                if n > 1:
                    cmd = [shutil.which("torchrun", path=str(binary)) or "torchrun", "--standalone",
                           f"--nproc-per-node={n}", "--no-python", *cmd]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                times[n] = time.perf_counter() - t0
                out[n] = _numbers(json.loads(pathlib.Path(f"{tmp}/{n}/results.json").read_text())[study]["tiny-gpt2"]
                                  ["metrics"])  # fmt: skip
        diff = max(float(np.nanmax(np.abs(out[1][k] - out[2][k]))) if out[1][k].size else 0.0 for k in out[1])
        rows.append({"item": "7", "what": f"{study}: 2 processes vs 1 ({n_lines:,} lines), max |diff| of any statistic",
                     "value": diff, "unit": "", "target": "fp rounding", "ok": diff < 1e-4,
                     "detail": f"wall time 2 procs / 1 proc = {times[2] / times[1]:.2f} (each process loads the "
                               f"model; 2 cores)"})  # fmt: skip
    return rows


def bench_interventions(quick: bool) -> list[dict]:
    from mechlens import load_model
    from mechlens.studies import interventions as iv

    model = load_model("tiny-gpt2")
    cfg = iv.Config(n_pairs=4 if quick else 16, segment_length=6)
    pairs = iv.load_pairs(model, cfg)
    names = iv.all_hooks(model)
    clean, corrupt = iv.activations(model, pairs.clean, names), iv.activations(model, pairs.corrupt, names)
    dev = pairs.corrupt

    def forward():  # one unpatched forward of the pairs, as the patched ones run it (stopped at the last block)
        iv.parts.run_edits(model, dev, pairs.answer, [iv.parts.Edit(None)], {})

    t_fwd = median_time(forward)
    exact = iv.activation_patching(model, pairs, clean, corrupt, "denoise", cfg.rows_per_forward)
    att = iv.attribution_patching(model, pairs, clean, exact)
    runs = exact.n_rows // len(pairs)  # patched runs (each: one edit applied to every pair)
    ratio = exact.seconds / (runs * t_fwd)
    detail = (f"tiny-gpt2, {len(pairs)} pairs of {dev.tokens.shape[1]} tokens: {runs} patched runs in "
              f"{exact.n_forwards} forwards, {exact.seconds:.2f} s; one unpatched forward "
              f"{t_fwd * 1e3:.1f} ms")  # fmt: skip
    return [
        {"item": "9", "what": "interventions: exact patching grid time / (patched runs x one forward)", "value": ratio,
         "unit": "x", "target": "<= 1.5", "ok": ratio <= 1.5, "detail": detail},
        {"item": "9", "what": "interventions: attribution patching speed-up over exact patching (same grid)",
         "value": att.speedup, "unit": "x", "target": "> 1", "ok": att.speedup > 1,
         "detail": f"correlation {att.correlation:.3f}, max abs error {att.max_abs_error:.3g} (logits)"},
    ]  # fmt: skip


# -- report -------------------------------------------------------------------------------------------


def write_results(rows: list[dict], seconds: float, quick: bool) -> str:
    def v(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    lines = [
        "# mechlens benchmark results",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; run time {seconds:.0f} s"
        + (" (--quick sizes)" if quick else ""),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"{platform.platform()}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformer-lens "
        f"{v('transformer-lens')}, transformers {v('transformers')}, numpy {np.__version__}",
        "- command: `HF_HUB_OFFLINE=1 python benchmarks/bench.py`",
        "",
        "| item | measurement | value | target | met | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        met = "-" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
        lines.append(
            f"| {r['item']} | {r['what']} | {r['value']:.3g} {r['unit']} | {r['target']} | {met} | {r['detail']} |"
        )
    return "\n".join(lines) + "\n"


BENCHES = {"1": bench_hook_overhead, "2": bench_analysis, "3": bench_lens_memory, "4": bench_streaming,
           "6": bench_vs_transformer_lens, "7": bench_corpus, "9": bench_interventions}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke run); RESULTS.md not written")
    ap.add_argument("--only", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    rows = []
    for item in args.only:
        print(f"[bench] item {item} ...", file=sys.stderr, flush=True)
        new = BENCHES[item](args.quick)
        for r in new:
            print(f"  {r['what']}: {r['value']:.3g} {r['unit']} (target {r['target']}) {r['detail']}", flush=True)
        rows += new
    text = write_results(rows, time.perf_counter() - t0, args.quick)
    print(text)
    if not args.quick and args.only == list(BENCHES):
        (ROOT / "RESULTS.md").write_text(text)


if __name__ == "__main__":
    main()
