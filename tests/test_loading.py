"""load_model: specs, provenance, and the fast errors that name their fix."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import GPT2_PARAMS, TEXTS, make_gpt2

from mechlens import (
    MechlensError,
    ModelNotAvailableError,
    TokenizerError,
    UnsupportedArchitectureError,
    encode,
    load_model,
    provenance_of,
    run_cached,
)


def test_provenance_of_an_in_memory_model(gpt2_pair):
    p = provenance_of(gpt2_pair.bridge)
    assert (p.architecture, p.kind, p.n_params, p.n_layers, p.d_model, p.d_vocab) == (
        "GPT2LMHeadModel", "causal", GPT2_PARAMS, 2, 64, 50257,
    )  # fmt: skip
    assert (p.weights, p.dtype, p.device, p.padding_side) == ("raw", "float32", "cpu", "right")
    assert p.transformer_lens.startswith("4.3") and p.torch and p.transformers
    assert not gpt2_pair.bridge.training


def test_hub_name_offline_fails_fast_naming_alternatives():
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as e:
        load_model("gpt2-not-cached-anywhere")
    assert time.perf_counter() - t0 < 2.0  # the bound: no minute of hub retries
    assert "tiny-gpt2" in str(e.value) and "save_pretrained" in str(e.value)


def test_local_directory_round_trip(tmp_path, gpt2_pair):
    gpt2_pair.hf.save_pretrained(tmp_path)
    with pytest.raises(ModelNotAvailableError, match=r"tokenizer\.save_pretrained"):
        load_model(tmp_path)
    gpt2_pair.tok.save_pretrained(tmp_path)
    m = load_model(str(tmp_path))
    batch = encode(m, TEXTS[:1], bos=True)
    logits, _ = run_cached(m, batch, [], logits=True)
    with torch.no_grad():
        ref = gpt2_pair.hf(batch.tokens).logits
    assert (logits - ref).abs().max() <= 5e-5
    assert provenance_of(m).model == str(tmp_path)


def test_unsupported_architectures(tmp_path):
    from transformers import GPT2Config, GPT2Model

    bare = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError, match="ForCausalLM"):
        load_model(bare, tokenizer=make_gpt2()[1])
    bare.save_pretrained(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedArchitectureError):
        load_model(tmp_path)
    assert time.perf_counter() - t0 < 2.0


def test_bad_specs(gpt2_pair):
    with pytest.raises(MechlensError, match="tokenizer=tok"):
        load_model(copy.deepcopy(gpt2_pair.hf))
    with pytest.raises(MechlensError, match="weights="):
        load_model("tiny-gpt2", weights="folded")
    with pytest.raises(ModelNotAvailableError, match="not a model directory"):
        load_model("./no/such/dir")
    from transformers import GPT2TokenizerFast

    from mechlens.tokenizer import _bpe_dir

    d = _bpe_dir()
    empty = GPT2TokenizerFast(vocab_file=str(d / "encoder.json"), merges_file=str(d / "vocab.bpe"))
    with pytest.raises(TokenizerError):
        load_model(copy.deepcopy(gpt2_pair.hf), tokenizer=empty)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map_passes_through_to_from_pretrained(device_map, tmp_path):
    """device_map goes to Hugging Face's from_pretrained (accelerate places the blocks): on this CPU-only
    machine every placement is the CPU, and the logits equal an ordinary load exactly (same weights, same
    kernels). A model split over GPUs is the same code path with a different map."""
    from mechlens import encode, load_model
    from mechlens.zoo.export import export_model

    export_model("tiny-gpt2", tmp_path / "m")
    plain, mapped = load_model(tmp_path / "m"), load_model(tmp_path / "m", device_map=device_map)
    batch = encode(plain, ["I like oat milk in my coffee"], bos=True)
    a = plain(batch.tokens, attention_mask=batch.attention_mask)
    b = mapped(batch.tokens, attention_mask=batch.attention_mask)
    assert torch.equal(a, b)


def test_device_map_refused_for_an_in_memory_model(tiny_gpt2_pair):
    from mechlens import load_model
    from mechlens.errors import MechlensError

    with pytest.raises(MechlensError, match="dispatch an in-memory model yourself"):
        load_model(tiny_gpt2_pair.hf, tokenizer=tiny_gpt2_pair.tok, device_map="auto")
