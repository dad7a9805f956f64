"""Issue 32: the corpus lens' memory does not grow with the number of texts read once its reservoir is full,
with and without a tuned lens, for a causal and a masked LM. One process reads a stream of 4N texts; at texts
N, 2N and 4N (the same point of the batching cycle: every batch holds the same texts, so the same shapes) it
records the reservoir's bytes, the RSS, and what mechlens' own code allocated since text N and still holds
(``tracemalloc``, started at text N, filtered to allocations made on a line of ``mechlens/``: Python objects
and numpy buffers; torch's CPU tensor storage is not traced, its Python objects are). Growth is compared
between 2N and 4N, so one-off allocations after N (caches filled once) cancel."""

from __future__ import annotations

import gc
import pathlib
import tracemalloc

import pytest
import torch
from conftest import TEXTS, _param_count

from mechlens.lens.corpus import corpus_lens
from mechlens.lens.readings import QUANTITIES
from mechlens.stats import streaming

N, BATCH, RESERVOIR = 256, 128, 64  # the reservoir is full after 64 texts, long before text N

# Held by mechlens' code from text 2N to 4N, per text read in between: at most 0.5 new allocations and 24 B.
# Anything kept per text is at least one new allocation per text (a float 24 B + its list slot, an int 28 B,
# a tensor's Python object ~70 B, a numpy row of the per-text means >= 15 x 8 B). Measured on 2N = 512 texts:
# 26-88 allocations (0.05-0.17 per text) and 1.5-5.7 KB (3-11 B per text), all ~67 B objects that torch makes
# and keeps inside the indexing and reduction calls of lens_reduce and encode (per call, not per text).
OBJECTS_PER_TEXT, BYTES_PER_TEXT = 0.5, 24
# RSS from text N to 4N: glibc keeps freed blocks and maps new arena chunks for the batches' tensors, and
# tracemalloc's own tables grow while it runs (measured: 0.7-18 MiB), so the bound is 32 MiB: it catches only
# ~40 KB kept per text; the accumulators' bytes and tracemalloc above are the fine checks.
RSS_BOUND = 32 * 2**20


def _rss() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def make_word_gpt2():
    """A random 2-layer GPT-2 (d_model 32) over the words of the test texts: the corpus lens' readout of a
    50,257-token vocabulary would make 1,024 texts take minutes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from mechlens import load_model

    words = sorted({w for t in TEXTS for w in t.split()})
    eot = "<|endoftext|>"
    tk = Tokenizer(models.WordLevel(vocab={eot: 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                    unk_token="<unk>"))  # fmt: skip
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot, pad_token=eot, unk_token="<unk>",
                                  name_or_path="test-words")  # fmt: skip
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64, bos_token_id=0,
                     eos_token_id=0)  # fmt: skip
    cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(cfg).eval()
    v = len(tok)  # embeddings (tied unembedding) + positions + 2 blocks + final LN
    assert _param_count(hf) == v * 32 + 32 * 32 + 2 * (4 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 64 + 64 + 64 * 32
                                                      + 32) + 2 * 32  # fmt: skip
    return load_model(hf, tokenizer=tok)


@pytest.fixture(scope="module")
def word_gpt2():
    return make_word_gpt2()


def _noisy_lens(model):
    """An identity tuned lens plus seeded noise: the corpus lens reads it as a trained one."""
    from mechlens.lens.tuned import TunedLens, identity_lens

    base = identity_lens(model)
    g = torch.Generator().manual_seed(0)
    return TunedLens(base.weight + 0.01 * torch.randn(base.weight.shape, generator=g), base.bias, base.card)


def _held_by_mechlens() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/mechlens/*")])


def _growth(model, tuned, monkeypatch) -> dict:
    """Run the corpus lens over 4N texts: what it holds at texts N, 2N and 4N."""
    made = []

    class Recorded(streaming.Reservoir):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(streaming, "Reservoir", Recorded)
    marks: dict[int, tuple[int, int]] = {}
    held: dict[int, tracemalloc.Snapshot] = {}

    def stream():
        for i in range(4 * N + 1):
            if i in (N, 2 * N, 4 * N):  # texts 0..i-1 read (i is a multiple of BATCH): the same point of the cycle
                gc.collect()  # what is unreachable is not kept (transformers' forwards leave reference cycles)
                marks[i] = (made[0].nbytes, _rss())
                if i == N:
                    tracemalloc.start()
                else:
                    held[i] = _held_by_mechlens()
            if i < 4 * N:
                yield i, TEXTS[i % len(TEXTS)]

    try:
        c = corpus_lens(model, stream(), batch_size=BATCH, n_samples=RESERVOIR, max_tokens=16, tuned=tuned)
    finally:
        tracemalloc.stop()
    assert c.n_texts == 4 * N and c.n_samples == RESERVOIR and set(marks) == {N, 2 * N, 4 * N}
    size = {i: sum(t.size for t in h.traces) for i, h in held.items()}
    return {
        "reservoir": (marks[N][0], marks[4 * N][0]),
        "bytes": size[4 * N] - size[2 * N],
        "objects": len(held[4 * N].traces) - len(held[2 * N].traces),
        "rss": marks[4 * N][1] - marks[N][1],
        "lens": c,
        "top": held[4 * N].compare_to(held[2 * N], "lineno")[:3],
    }


@pytest.mark.parametrize(("which", "tuned"), [("causal", False), ("causal", True), ("masked", True)])
def test_corpus_lens_memory_is_flat_in_texts(which, tuned, word_gpt2, bert_pair, monkeypatch):
    """(The masked LM with a tuned lens reads both lenses: its logit lens is the logit-only path.)"""
    model = word_gpt2 if which == "causal" else bert_pair.bridge
    g = _growth(model, _noisy_lens(model) if tuned else None, monkeypatch)
    n_values = len(QUANTITIES) * (2 if tuned else 1) * (model.cfg.n_layers + 1)
    # the reservoir holds RESERVOIR texts in fixed slots: its stated cost, 16 + 8 x values bytes per text
    assert g["reservoir"] == (RESERVOIR * (16 + 8 * n_values),) * 2, g["reservoir"]
    assert g["lens"].per_text.shape == (RESERVOIR, len(QUANTITIES), model.cfg.n_layers + 1)
    why = ("held by mechlens from text 2N to 4N", g["top"])
    assert g["objects"] <= OBJECTS_PER_TEXT * 2 * N, (g["objects"], "allocations", *why)
    assert g["bytes"] <= BYTES_PER_TEXT * 2 * N, (g["bytes"], "bytes", *why)
    assert g["rss"] <= RSS_BOUND, (g["rss"], "RSS grew from text N to 4N")
