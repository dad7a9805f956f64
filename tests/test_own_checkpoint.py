"""Bring your own checkpoint (README "Your own checkpoint, step by step"): a model saved without a
tokenizer gets mechlens' offline GPT-2 / RoBERTa-style tokenizer in one step (``mechlens add-tokenizer`` or
``load_model(dir, tokenizer="gpt2-bpe")``), then runs and compares like any model."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from mechlens.cli import main
from mechlens.loading import load_model
from mechlens.tokenizer import TOKENIZER_FILES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "tokenizer"), [("tiny-gpt2", "gpt2-bpe"), ("tiny-mlm", "roberta-bpe")])
def test_add_tokenizer_gives_a_bare_checkpoint_the_embedded_models_tokenizer(tmp_path, name, tokenizer):
    """An exported embedded model, stripped of its tokenizer files, is a checkpoint trained with that BPE:
    with the offline tokenizer added it computes exactly what the embedded model computes (same ids, same
    weights: bit for bit), through the command and through load_model's argument."""
    from transformers import AutoTokenizer

    bare = tmp_path / "ckpt"
    assert main(["export", name, str(bare)]) == 0
    for f in [*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt"]:
        (bare / f).unlink(missing_ok=True)
    with_arg = load_model(bare, tokenizer=tokenizer)  # in Python, no files written
    assert main(["add-tokenizer", tokenizer, str(bare)]) == 0
    from_files, embedded = load_model(bare), load_model(name)
    text = " The coffee is hot, said Ana."
    ids = embedded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert from_files.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert with_arg.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert len(from_files.tokenizer) == len(embedded.tokenizer)
    want = embedded(torch.tensor([ids]))
    for m in (from_files, with_arg):
        torch.testing.assert_close(m(torch.tensor([ids])), want, rtol=0, atol=0)  # same weights, same ids
    auto = AutoTokenizer.from_pretrained(bare)(" coffee")["input_ids"]
    assert auto == ([6891] if tokenizer == "gpt2-bpe" else [0, 6891 + 4, 2])  # no silent BOS for GPT-2
    assert main(["add-tokenizer", tokenizer, str(bare)]) == 2  # nothing overwritten


def test_readme_walk_through_save_add_tokenizer_run_compare(tmp_path, monkeypatch, capsys):
    """The README's steps: save your model, add the tokenizer, run a study on it and on tiny-gpt2, compare."""
    from conftest import make_gpt2

    monkeypatch.chdir(tmp_path)
    model, _ = make_gpt2()  # stands for your trained GPT2LMHeadModel (GPT-2's 50257-token BPE)
    model.save_pretrained("my-gpt2")
    assert main(["add-tokenizer", "gpt2-bpe", "my-gpt2"]) == 0
    assert main(["run", "lens", "--model", "tiny-gpt2", "--out", "runs/base", "--quiet"]) == 0
    assert main(["run", "lens", "--model", "my-gpt2", "--out", "runs/mine", "--quiet"]) == 0
    assert main(["compare", "runs/base", "runs/mine", "--out", "runs/cmp"]) == 0
    frame = pd.read_csv("runs/cmp/comparison.csv")
    diffs = frame[frame["reference"].notna()]
    assert not diffs.empty and set(diffs["reference"]) == {"tiny-gpt2 (runs/base)"}  # same inputs: paired
    assert set(diffs["model"]) == {"my-gpt2 (runs/mine)"}
    doc = json.loads((tmp_path / "runs/mine/results.json").read_text())
    assert doc["lens"]["my-gpt2"]["provenance"]["kind"] == "causal" and doc["_notes"] == []
