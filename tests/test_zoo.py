"""Embedded models: load by name offline, sizes match their cards, and show real (trained) behaviour; the
training pipeline (top-level ``training/``) stays outside the package and agrees with what shipped."""

from __future__ import annotations

import ast
import json
import pathlib

import numpy as np
import pytest
import torch

from mechlens import arch, encode, load_model, next_token_loss, provenance_of, run_cached
from mechlens.data import load_texts
from mechlens.zoo import EMBEDDED


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name in EMBEDDED}


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_embedded_model_matches_its_card(models, name):
    card = json.loads((EMBEDDED[name].path / "card.json").read_text())
    p = provenance_of(models[name])
    assert p.n_params == card["parameters"]
    assert p.kind == EMBEDDED[name].kind and p.model == name
    assert (p.n_layers, p.d_model) == (6, 128)
    assert (EMBEDDED[name].path / "MODEL_CARD.md").exists()
    size = (EMBEDDED[name].path / "model.safetensors").stat().st_size
    assert size < 20 * 2**20  # both together within the 40 MB budget


def test_card_quality_bars():
    g = json.loads((EMBEDDED["tiny-gpt2"].path / "card.json").read_text())
    m = json.loads((EMBEDDED["tiny-mlm"].path / "card.json").read_text())
    assert g["heldout_cross_entropy"] <= 0.75 * g["unigram_cross_entropy"]
    assert np.mean(g["loss_by_position"][3:6]) < g["loss_by_position"][0]
    assert m["heldout_top1_accuracy"] >= 3 * m["most_frequent_token_accuracy"]


def test_tiny_gpt2_loss_falls_with_position_on_builtin_contexts(models):
    m = models["tiny-gpt2"]
    batch = encode(m, load_texts("contexts"), bos=False, max_tokens=7)
    logits, _ = run_cached(m, batch, [], logits=True, batch_size=64)
    loss = next_token_loss(logits, batch.tokens, batch.valid_mask())
    by_pos = loss.nanmean(0)
    assert by_pos[3:6].mean() < by_pos[0] - 1.0  # more context, clearly lower loss
    # an independent check of the same numbers: log-softmax of the HF model's logits
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(EMBEDDED["tiny-gpt2"].path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = -torch.log_softmax(hf(batch.tokens).logits[:, :-1], -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=0)


def test_tiny_gpt2_greedy_continuation_is_english_words(models):
    m = models["tiny-gpt2"]
    prompt = encode(m, ["I like oat milk in my"], bos=True)
    out = m.generate(prompt.tokens, max_new_tokens=8, do_sample=False, verbose=False, stop_at_eos=False)
    words = m.tokenizer.decode(out[0, prompt.tokens.shape[1] :]).replace("<|endoftext|>", " ").split()
    vocab = set(" ".join(load_texts("contexts") + load_texts("coffee")).lower().replace(".", " ").split())
    known = [w for w in words if w.strip(".,!?'").lower() in vocab | {"i'm", "man", "milk"}]
    assert len(known) >= len(words) // 2 > 0, words


def test_tiny_mlm_fills_masks_better_than_chance(models):
    """Every text position of 40 built-in contexts masked in turn (short everyday sentences, harder
    than the held-out corpus text of the card): top-1 accuracy 1.5x above always guessing the most
    frequent target token (measured 0.118 vs 0.063), and the true token's mean log-prob far above
    uniform chance, log(1/50262) = -10.8 (measured -7.1)."""
    m = models["tiny-mlm"]
    base = encode(m, load_texts("contexts")[:40], bos=True)
    rows, cols = torch.nonzero(base.text_mask, as_tuple=True)
    tokens = base.tokens[rows].clone()
    targets = tokens[torch.arange(len(rows)), cols].clone()
    tokens[torch.arange(len(rows)), cols] = arch.mask_id(m)
    variants = type(base)(tokens, base.attention_mask[rows], base.text_mask[rows], True, "right")
    logits, _ = run_cached(m, variants, [], logits=True, batch_size=128)
    at = logits[torch.arange(len(rows)), cols]
    acc = (at.argmax(-1) == targets).float().mean().item()
    most_common = torch.bincount(targets).max().item() / len(targets)
    assert acc >= 1.5 * most_common and acc >= 0.1, (acc, most_common)
    true_lp = at.log_softmax(-1).gather(-1, targets[:, None]).mean().item()
    assert true_lp > np.log(1 / m.cfg.d_vocab) + 3, true_lp  # measured -7.1: e^3.7 = 40x more likely


# -- the training pipeline (top-level training/, outside the package) ------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def training(monkeypatch):
    """The repository's training/ folder as a package (it is not installed: the wheel ships mechlens only)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import training.card
    import training.train

    return training


def test_training_code_is_outside_the_package():
    from setuptools import find_packages

    assert find_packages(ROOT, include=["mechlens*"]) and not any(
        p.startswith("training") for p in find_packages(ROOT, include=["mechlens*"])
    )
    assert not any((ROOT / "mechlens" / "zoo" / f).exists() for f in ("train.py", "corpus.py", "card.py"))
    for path in (ROOT / "mechlens").rglob("*.py"):  # the runtime never imports the training code
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "training" or n.startswith(("training.", "mechlens.zoo.train")) for n in names), path


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_training_builds_the_shipped_architecture(training, name):
    """train.build_model with its defaults gives the shipped config and parameter count."""
    cfg = training.train.parse_args(["--model", name, "--device", "cpu"])
    model = training.train.build_model(cfg)
    shipped = json.loads((EMBEDDED[name].path / "config.json").read_text())
    assert type(model).__name__ == EMBEDDED[name].architecture == shipped["architectures"][0]
    keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "hidden_size",
            "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")  # fmt: skip
    ours = model.config.to_dict()
    assert {k: ours[k] for k in keys if k in shipped} == {k: shipped[k] for k in keys if k in shipped}
    card = json.loads((EMBEDDED[name].path / "card.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def test_training_ids_follow_the_mlm_tokenizer(training):
    """The MLM was trained on GPT-2 ids mapped by train.gpt2_ids_to_mlm: the same ids mechlens'
    mlm_tokenizer gives the text, <|endoftext|> -> </s>, and the same <mask> id and vocabulary."""
    from mechlens.tokenizer import gpt2_tokenizer, mlm_tokenizer

    t = training.train
    text = "Turkish coffee is brewed slowly, in a cezve."
    g = gpt2_tokenizer()(text, add_special_tokens=False)["input_ids"]
    m = mlm_tokenizer()
    mapped = t.gpt2_ids_to_mlm(np.asarray([*g, 50256], dtype=np.uint16)).tolist()
    assert mapped == [*m(text, add_special_tokens=False)["input_ids"], m.eos_token_id]
    assert (m.mask_token_id, len(m), m.pad_token_id, m.bos_token_id) == (t.MLM_MASK, t.MLM_VOCAB, t.MLM_PAD, t.MLM_BOS)


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_training_card_regenerates_the_shipped_model_card(training, name):
    """card.py's text (with the commands to reproduce) from the shipped training report and metrics is
    the shipped MODEL_CARD.md; the corpus sizes come from the corpus' stats.json, not shipped, so they
    are read back from the card."""
    shipped = (EMBEDDED[name].path / "MODEL_CARD.md").read_text()
    assert training.card.regenerated_card(name) == shipped
    assert f"python -m training.train --data .cache/corpus --out .cache/train/{name}" in shipped
