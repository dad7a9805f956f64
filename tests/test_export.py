"""``mechlens export``: the embedded models as plain Hugging Face checkpoints that load without mechlens
(``AutoModelFor*`` + ``AutoTokenizer``, offline) and encode and compute exactly as mechlens does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mechlens import encode, load_model, provenance_of, run_cached
from mechlens.cli import main
from mechlens.errors import MechlensError, OutputError
from mechlens.outputs import MARKER
from mechlens.tokenizer import gpt2_tokenizer, mlm_tokenizer
from mechlens.zoo import EMBEDDED, export_model

# The exported weights are the embedded ones upcast to fp32 and mechlens computes in fp32, so
# mechlens on the export vs mechlens on the embedded model, and plain HF on the export vs plain HF
# on the embedded files, are the same arithmetic on the same numbers: equal bit for bit (atol 0).
# Plain HF with eager attention (the kernels TransformerBridge runs) vs mechlens: the suite's fp32
# tolerance on logits (README, "Tests"), 5e-5 (measured 0). Plain HF with its default attention (SDPA:
# a different summation order in every attention layer) vs mechlens: fp32 rounding (eps 1.2e-7) of
# 6 layers of sums over 128 dimensions, amplified by LayerNorm (tiny-mlm is post-LN), measured 8e-7
# (tiny-gpt2) and 9e-6 (tiny-mlm) of the largest |logit| (about 20); bound: 1e-4 of it. A wrong weight,
# token id or mask moves logits by O(1).
HF_VS_BRIDGE_ATOL = 5e-5
SDPA_REL = 1e-4

TEXTS = [
    "I like oat milk in my coffee every morning.",
    "Turkish coffee is brewed slowly, in a cezve.",
    "Hello world",
]
# strings whose ids must agree: BPE corner cases (leading space, newlines, digits, unicode, a special
# token as text, repeated spaces)
STRINGS = [
    " coffee",
    "I like oat milk in my",
    "Hello world",
    "  two  spaces\nand a newline\n\n",
    "Café au lait costs 3.50 €, naïvely.",
    "emoji ☕ and 日本語",
    "<|endoftext|> after text",
    "",
]
AUTO = {"causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {name: export_model(name, root / name) for name in EMBEDDED}


def _auto(name, path, **kw):
    import transformers

    model = getattr(transformers, AUTO[EMBEDDED[name].kind]).from_pretrained(path, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def test_hub_is_offline_for_these_tests():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: nothing below may reach the hub


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_export_is_a_plain_fp32_checkpoint_of_the_shipped_weights(exported, name):
    d = exported[name]
    files = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert MARKER in files  # a mechlens output: a later export may replace it
    modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir() if p.name != MARKER}
    assert len(set(modes.values())) == 1, modes  # transformers writes the weights 0600; the export is shareable
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == [EMBEDDED[name].architecture]
    ours = load_file(d / "model.safetensors")
    shipped = load_file(EMBEDDED[name].path / "model.safetensors")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert {t.dtype for t in shipped.values()} == {torch.float16}
    assert set(ours) == set(shipped)
    for k, v in shipped.items():  # the fp16 -> fp32 upcast is exact
        assert torch.equal(ours[k], v.float()), k
    card = (d / "README.md").read_text()
    assert f"mechlens export {name} DIR" in card and AUTO[EMBEDDED[name].kind] in card
    assert "## Corpus and licence" in card  # the shipped model card follows


@pytest.mark.parametrize("text", STRINGS)
def test_auto_tokenizer_gpt2_encodes_as_mechlens_and_adds_no_bos(exported, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["tiny-gpt2"])
    ours = gpt2_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ours
    assert tok(text)["input_ids"] == ours  # defaults: no silent <|endoftext|> (50256) in front
    assert tok.decode(ours) == text


def test_auto_tokenizer_gpt2_known_ids(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["tiny-gpt2"])
    assert tok(" coffee")["input_ids"] == [6891]
    assert tok("I like oat milk in my")["input_ids"] == [40, 588, 267, 265, 7545, 287, 616]
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (50257, 50256, 50256, 50256)
    assert tok.model_max_length == 1024
    # batches pad like mechlens' own (pad = <|endoftext|>, right side, mask 0 there)
    batch = tok(["Hello world", " coffee"], padding=True)
    assert batch["input_ids"] == [[15496, 995], [6891, 50256]] and batch["attention_mask"][1] == [1, 0]


@pytest.mark.parametrize("text", [*STRINGS, " my <mask>.", "The <mask> is hot."])
def test_auto_tokenizer_mlm_encodes_as_mechlens(exported, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["tiny-mlm"])
    ours = mlm_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ours
    assert tok(text)["input_ids"] == [0, *ours, 2]  # RoBERTa's standard <s> ... </s>, as mechlens adds


def test_auto_tokenizer_mlm_known_ids(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["tiny-mlm"])
    assert tok(" my <mask>.")["input_ids"] == [0, 616 + 4, 50261, 13 + 4, 2]  # " <mask>" is one token
    assert (len(tok), tok.pad_token_id, tok.mask_token_id, tok.cls_token_id, tok.sep_token_id) == (
        50262,
        1,
        50261,
        0,
        2,
    )
    assert tok.model_max_length == 512


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_auto_model_logits_match_mechlens(exported, name):
    """Plain transformers on the export vs mechlens on the embedded model, on the same ids (mechlens'
    own batch: BOS / <s> ... </s>, right padding, attention mask)."""
    import transformers

    model, _ = _auto(name, exported[name])  # as a user would: no dtype, default attention
    assert type(model).__name__ == EMBEDDED[name].architecture and model.dtype == torch.float32
    eager, _ = _auto(name, exported[name], attn_implementation="eager")
    mech = load_model(name)
    batch = encode(mech, TEXTS, bos=True)
    ref, _ = run_cached(mech, batch, [], logits=True)
    with torch.no_grad():
        got = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        got_eager = eager(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(got_eager[valid], ref[valid], atol=HF_VS_BRIDGE_ATOL, rtol=0)
    scale = ref[valid].abs().max().item()
    torch.testing.assert_close(got[valid], ref[valid], atol=SDPA_REL * scale, rtol=0)
    assert torch.equal(got[valid].argmax(-1), ref[valid].argmax(-1))
    # and the same class read from the package's fp16 files: identical (same code, same fp32 numbers)
    original = getattr(transformers, EMBEDDED[name].architecture).from_pretrained(
        EMBEDDED[name].path, dtype=torch.float32
    )
    with torch.no_grad():
        same = original.eval()(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, same, atol=0, rtol=0)


def test_auto_model_generates_like_the_model_card(exported):
    model, tok = _auto("tiny-gpt2", exported["tiny-gpt2"])
    card = json.loads((EMBEDDED["tiny-gpt2"].path / "card.json").read_text())
    ids = torch.tensor([[50256, *tok("I like oat milk in my")["input_ids"]]])  # BOS by hand, as mechlens does
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    generated = tok.decode(out[0, ids.shape[1] :])
    assert generated == card["greedy_generation"][: len(generated)] and len(generated) >= 10


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_load_model_on_export_equals_embedded(exported, name):
    a, b = load_model(name), load_model(exported[name])
    pa, pb = provenance_of(a), provenance_of(b)
    assert (pb.architecture, pb.kind, pb.n_params, pb.d_vocab) == (pa.architecture, pa.kind, pa.n_params, pa.d_vocab)
    ba, bb = encode(a, TEXTS, bos=True), encode(b, TEXTS, bos=True)
    assert torch.equal(ba.tokens, bb.tokens) and torch.equal(ba.attention_mask, bb.attention_mask)
    names = ["blocks.2.hook_resid_post"]
    la, acts_a = run_cached(a, ba, names, logits=True)
    lb, acts_b = run_cached(b, bb, names, logits=True)
    torch.testing.assert_close(lb, la, atol=0, rtol=0)
    torch.testing.assert_close(acts_b[names[0]], acts_a[names[0]], atol=0, rtol=0)


def test_export_model_is_public_and_lazy():
    import mechlens
    import mechlens.zoo

    assert mechlens.export_model is mechlens.zoo.export_model and "export_model" in mechlens.__all__


def test_unknown_name_is_refused_naming_the_embedded_models(tmp_path):
    with pytest.raises(MechlensError, match="tiny-gpt2, tiny-mlm"):
        export_model("gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_export_into_a_foreign_directory_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"export directory .*mine is a non-empty directory"):
        export_model("tiny-gpt2", tmp_path / "mine")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary sibling left behind
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["export", "tiny-gpt2", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", MARKER} <= {
        p.name for p in out.iterdir()
    }
    assert f"wrote {out}" in capsys.readouterr().out
    # a second export replaces the first (a mechlens output): a file removed from it comes back
    (out / "card.json").unlink()
    assert main(["export", "tiny-gpt2", str(out)]) == 0
    assert (out / "card.json").exists()
    # ... unless something foreign was added to it: refused, exit 2, nothing touched
    (out / "mine.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["export", "tiny-mlm", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mechlens: error: export directory") and "mine.txt" in err
    assert (out / "mine.txt").read_text() == "keep me"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    # unknown names: exit 2, one line naming the embedded models
    assert main(["export", "gpt2", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny-gpt2, tiny-mlm" in err and not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
