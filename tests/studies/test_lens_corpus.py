"""The corpus lens (``mechlens run lens --data SOURCE``): streamed per-layer means over every next-token
position of a corpus, checked against the single-text causal lens (itself checked against HF in
test_lens.py) text by text, and its reservoir of per-text means against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from mechlens.encoding import encode
from mechlens.lens.readings import QUANTITIES
from mechlens.studies import lens

TEXTS = [
    "I like oat milk in my coffee every morning.",
    "The cat sat on the warm windowsill and watched the rain.",
    "She opened the fridge, took out the eggs, and started cooking breakfast.",
    "Hello world",
    "A short one.",
    "The train left the station at noon and reached the coast by evening.",
    "We walked home.",
]


def _by_text(model, texts, bos=True, max_tokens=128):
    """The single-text causal lens of each text: [quantity][text] -> [layer, pos]."""
    out = {q: [] for q in QUANTITIES}
    for t in texts:
        c = lens.causal_lens(model, encode(model, [t], bos=bos, max_tokens=max_tokens))
        for q, v in zip(QUANTITIES, (c.target_logprob, c.rank, c.entropy, c.kl_to_final,
                                                 c.top1_agrees_final), strict=True):  # fmt: skip
            out[q].append(np.asarray(v, dtype=np.float64))
    return out


@pytest.mark.parametrize("batch_size", [3, 64])
def test_corpus_lens_equals_the_per_text_lens_pooled(tiny_gpt2_pair, batch_size):
    """Pooled over all next-token positions of all texts, the corpus means and stds equal those of the
    single-text lens run on each text alone. Tolerance: batching pads texts, which moves fp32 log-probs by
    ~1e-6 relative (padding test in test_tokens); 2e-5 * the quantity's scale covers that (ranks and
    agreements are exact unless a near-tie flips: none does on these texts)."""
    model = tiny_gpt2_pair.bridge
    r = lens.run(model, lens.Config(batch_size=batch_size), TEXTS)
    c = r.parts
    ref = _by_text(model, TEXTS)
    assert r.metrics["n_texts"] == len(TEXTS)
    assert r.metrics["n_predictions"] == sum(v.shape[1] for v in ref["target_logprob"])
    fields = ("target_logprob_by_layer", "rank_mean_by_layer", "entropy_by_layer", "kl_to_final_by_layer",
              "top1_agreement_by_layer")  # fmt: skip
    for q, f in zip(QUANTITIES, fields, strict=True):
        pooled = np.concatenate(ref[q], axis=1)  # [layer, all positions]
        scale = 2e-5 * max(1.0, np.abs(pooled).max())
        np.testing.assert_allclose(r.metrics[f], pooled.mean(1), rtol=0, atol=scale)
        np.testing.assert_allclose(r.metrics["std_by_layer"][q], pooled.std(1), rtol=0, atol=scale)
        # the reservoir holds every text here (7 < 10,000): each text's own mean, in text order
        assert list(c.sample_text_index) == list(range(len(TEXTS)))
        per_text = np.stack([v.mean(1) for v in ref[q]])  # [text, layer]
        np.testing.assert_allclose(c.per_text[:, QUANTITIES.index(q)], per_text, rtol=0, atol=scale)
    assert r.metrics["kl_to_final_by_layer"][-1] == 0.0 and r.metrics["top1_agreement_by_layer"][-1] == 1.0


def test_corpus_reservoir_and_samples(tiny_gpt2_pair):
    """A reservoir smaller than the corpus keeps n_samples texts (the same ones for any batch size), and
    samples() gives one row per kept text, quantity and readout point, depths 0..1.0."""
    model = tiny_gpt2_pair.bridge
    a = lens.run(model, lens.Config(reservoir=4, batch_size=2), TEXTS)
    b = lens.run(model, lens.Config(reservoir=4, batch_size=5), TEXTS)
    assert len(a.parts.sample_text_index) == 4
    assert list(a.parts.sample_text_index) == list(b.parts.sample_text_index)
    s = lens.samples(a)
    n_points = model.cfg.n_layers + 1
    assert len(s) == 4 * n_points * len(QUANTITIES)
    assert set(s["unit"]) == {"text"} and s["relative_depth"].max() == 1.0 and s["relative_depth"].min() == 0.0
    assert set(s["sample"]) == set(a.parts.sample_text_index)


def test_corpus_lens_from_a_parquet_file(tiny_gpt2_pair, tmp_path):
    """--data accepts a .parquet file (through datasets), with --n-texts taking the first N."""
    import pandas as pd

    path = tmp_path / "texts.parquet"
    pd.DataFrame({"text": TEXTS}).to_parquet(path)
    model = tiny_gpt2_pair.bridge
    r = lens.run(model, lens.Config(data=str(path), n_texts=5))
    direct = lens.run(model, lens.Config(), TEXTS[:5])
    assert r.metrics["n_texts"] == 5
    np.testing.assert_array_equal(r.metrics["target_logprob_by_layer"], direct.metrics["target_logprob_by_layer"])


def test_corpus_lens_of_a_masked_lm_reads_masked_positions(tiny_mlm_pair):
    """A masked LM's corpus lens reads a seeded mask_prob of each text's tokens, masked: the number of
    lensed positions equals the masked cells of mechlens.lens.tuned.lens_inputs, and the last readout
    point is the model's own prediction there (KL 0, agreement 1)."""
    from mechlens.lens.tuned import lens_inputs

    model = tiny_mlm_pair.bridge
    r = lens.run(model, lens.Config(tuned="none"), TEXTS)
    inputs = lens_inputs(model, TEXTS, range(len(TEXTS)))
    assert r.metrics["n_predictions"] == int(inputs.rows.sum()) and "masked" in r.metrics["lensed"]
    assert r.metrics["kl_to_final_by_layer"][-1] == 0.0 and r.metrics["top1_agreement_by_layer"][-1] == 1.0
