"""Tuned-lens benchmarks (issue 23), CPU: training throughput and peak memory vs depth, and the memory of
the evaluation (both lenses through ``lens_reduce``) against the ``[layer, rows, vocab]`` logits it never
holds.

    HF_HUB_OFFLINE=1 python benchmarks/tuned_lens.py          # -> prints the rows; paste into RESULTS.md

Models: seeded random GPT-2s (d_model 128, 4 heads, the real 50,257-token vocabulary) of 2, 4 and 8 blocks.
Training: ``train_tuned_lens`` on ``contexts`` (16 texts of at most 32 tokens per step), 1 warm-up step then
timed steps; throughput counts loss positions (next-token positions) per second. Memory: whole-process
peak RSS above the loaded model, in a fresh child with large allocations straight from mmap
(:func:`bench.in_child` with ``exact_peak``), as the other benchmarks measure it. Training materialises
one readout point's chunk of ``[rows, d_vocab]`` logits at a time (``max_chunk_bytes``), so its peak
should follow the chunk budget, not the depth; evaluation goes through ``lens_reduce`` tiles.
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch
from bench import bridge_of, in_child

GIB = 2**30


def _gpt2(n_layers: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layers, n_embd=128, n_head=4, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def train_job(n_layers: int, steps: int, chunk_mb: int = 256):
    def setup():
        from mechlens.data import load_texts

        return bridge_of(_gpt2(n_layers)), load_texts("contexts")

    def work(state):
        from mechlens.lens import training as tl

        model, texts = state
        kw = dict(batch_size=16, heldout=0, max_tokens=32, evaluate=False, max_chunk_bytes=chunk_mb * 2**20)
        tl.train_tuned_lens(model, texts, tl.TrainConfig(steps=1, **kw))  # warm-up
        t0 = time.perf_counter()
        lens = tl.train_tuned_lens(model, texts, tl.TrainConfig(steps=steps, **kw))
        return {"seconds": time.perf_counter() - t0, "positions": lens.card.tokens_per_step * steps}

    return setup, work


def eval_job(n_layers: int, tuned: bool, n_texts: int = 32):
    def setup():
        from mechlens.data import load_texts
        from mechlens.lens import tuned as tlens

        model = bridge_of(_gpt2(n_layers))
        return model, load_texts("contexts")[:n_texts], tlens.identity_lens(model) if tuned else None

    def work(state):
        from mechlens.lens.corpus import corpus_lens

        model, texts, t = state
        c = corpus_lens(model, texts, max_tokens=32, batch_size=16, tuned=t, n_samples=1)
        return {"positions": c.n_predictions}

    return setup, work


def main() -> None:
    rows = []
    depths = (2, 4, 8)
    for n in depths:
        timed = in_child("tuned_lens:train_job", n_layers=n, steps=4)["out"]
        peak = in_child("tuned_lens:train_job", exact_peak=True, n_layers=n, steps=2)["peak_bytes"]
        rows.append(("training", n, timed["positions"] / timed["seconds"], peak))
        print(f"train depth {n}: {timed['positions'] / timed['seconds']:.0f} positions/s, peak {peak / GIB:.3f} GiB",
              flush=True)  # fmt: skip
    small = in_child("tuned_lens:train_job", exact_peak=True, n_layers=4, steps=2, chunk_mb=64)["peak_bytes"]
    print(f"train depth 4 with a 64 MiB chunk budget: peak {small / GIB:.3f} GiB", flush=True)
    for n in depths:
        a = in_child("tuned_lens:eval_job", exact_peak=True, n_layers=n, tuned=False)
        b = in_child("tuned_lens:eval_job", exact_peak=True, n_layers=n, tuned=True)
        rows_n = b["out"]["positions"]
        materialised = (n + 1) * rows_n * 50257 * 4
        print(f"eval depth {n}: logit only {a['peak_bytes'] / GIB:.3f} GiB, both lenses "
              f"{b['peak_bytes'] / GIB:.3f} GiB; [layer, rows, vocab] fp32 would be {materialised / GIB:.2f} GiB "
              f"({rows_n} rows)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
