"""Offline GPT-2 BPE tokenizers and the empty-tokenizer trap of transformers 5."""

from __future__ import annotations

import pytest

from mechlens.tokenizer import (
    MLM_ID_OFFSET,
    TokenizerError,
    _bpe_dir,
    check_tokenizer,
    gpt2_tokenizer,
    mlm_tokenizer,
)


def test_gpt2_tokenizer_ids_match_gpt2():
    tok = gpt2_tokenizer()
    assert len(tok) == 50257
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc(" coffee") == [6891]
    assert enc("I like oat milk in my") == [40, 588, 267, 265, 7545, 287, 616]
    assert enc("Hello world") == [15496, 995]
    assert enc("<|endoftext|>") == [50256]


def test_mlm_tokenizer_layout():
    g, m = gpt2_tokenizer(), mlm_tokenizer()
    text = "Turkish coffee is brewed slowly."
    g_ids = g(text, add_special_tokens=False)["input_ids"]
    assert m(text)["input_ids"] == [0, *[i + MLM_ID_OFFSET for i in g_ids], 2]
    assert (m.pad_token_id, m.mask_token_id, len(m)) == (1, 50261, 50262)
    assert m(" my <mask>.", add_special_tokens=False)["input_ids"] == [616 + 4, 50261, 13 + 4]


def test_empty_tokenizer_from_vocab_file_is_refused():
    from transformers import GPT2TokenizerFast

    d = _bpe_dir()
    empty = GPT2TokenizerFast(vocab_file=str(d / "encoder.json"), merges_file=str(d / "vocab.bpe"))
    assert len(empty) < 2  # the transformers 5 trap this check exists for
    with pytest.raises(TokenizerError, match="vocab=") as e:
        check_tokenizer(empty)
    assert "merges=" in str(e.value)


def test_gpt2_tokenizer_bos_flag():
    """mechlens' own tokenizer is marked BOS-adding (TransformerBridge reloads any other by name from the
    hub), so a default call prepends <|endoftext|>; the exported one (add_bos_token=False) adds
    nothing, like the hub's gpt2. mechlens always encodes with add_special_tokens=False: same ids."""
    own, plain = gpt2_tokenizer(), gpt2_tokenizer(add_bos_token=False)
    assert own.init_kwargs["add_bos_token"] is True
    assert own(" coffee")["input_ids"] == [50256, 6891]
    assert plain(" coffee")["input_ids"] == [6891]
    for text in ("I like oat milk in my", "  spaces\n", "<|endoftext|>x"):
        assert own(text, add_special_tokens=False)["input_ids"] == plain(text)["input_ids"]


def test_readme_recipe_tokenizer_for_an_offline_checkpoint(tmp_path):
    """README, 'A tokenizer for your own offline checkpoint': GPT2TokenizerFast from local files with
    vocab=/merges= (paths), saved next to the model, loads with load_model(dir) and encodes as GPT-2."""
    from conftest import make_gpt2
    from transformers import AutoTokenizer, GPT2TokenizerFast

    from mechlens import encode, load_model

    d = _bpe_dir()
    tok = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"), name_or_path="my-model")
    tok.pad_token = tok.eos_token
    tok.model_max_length = 1024
    check_tokenizer(tok)
    ref = gpt2_tokenizer()
    for text in ("I like oat milk in my", " coffee", "Café ☕\n\n  x", "<|endoftext|>"):
        assert tok(text)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    model, _ = make_gpt2()
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpt")(" coffee")["input_ids"] == [6891]
    m = load_model(tmp_path / "ckpt")
    assert encode(m, ["Hello world"], bos=True).tokens.tolist() == [[50256, 15496, 995]]
