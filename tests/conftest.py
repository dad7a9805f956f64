"""Shared fixtures: seeded random-init HF models from real configs, each asserting its size, and the
same weights loaded through mechlens. ``HF_HUB_OFFLINE=1`` for the whole suite."""

from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub access must fail at once, not retry for a minute
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from mechlens.tokenizer import GPT2_VOCAB_SIZE, MLM_VOCAB_SIZE, gpt2_tokenizer, mlm_tokenizer

torch.set_num_threads(2)

# exact parameter counts: a misspelled config key silently builds a different (e.g. full-size) model
# GPT-2: 2 layers, d_model 64, vocab 50257, 1024 positions (room for the coffee article), tied unembed
GPT2_PARAMS = (
    50257 * 64 + 1024 * 64 + 2 * (128 + 64 * 192 + 192 + 64 * 64 + 64 + 128 + 64 * 256 + 256 + 256 * 64 + 64) + 128
)  # 3,382,080
_LAYER = 4 * (64 * 64 + 64) + 128 + 64 * 256 + 256 + 256 * 64 + 64 + 128  # q,k,v,o + LN + MLP + LN
# 2 layers, hidden 64, vocab 128 (word-level), 64 positions; head: dense + LN + decoder bias (tied)
BERT_PARAMS = (128 * 64 + 64 * 64 + 2 * 64 + 128) + 2 * _LAYER + (64 * 64 + 64 + 128 + 128)  # 116,928
# 2 layers, hidden 64, vocab 50262 (GPT-2 BPE + specials), 130 positions
ROBERTA_PARAMS = (50262 * 64 + 130 * 64 + 64 + 128) + 2 * _LAYER + (64 * 64 + 64 + 128 + 50262)  # 3,379,798

TEXTS = [
    "I like oat milk in my coffee every morning.",
    "The cat sat on the warm windowsill and watched the rain.",
    "She opened the fridge, took out the eggs, and started cooking breakfast.",
    "Hello world",
]
BERT_WORDS = sorted(
    {w for t in TEXTS for w in t.lower().replace(",", " ,").replace(".", " .").split()}
    | {"a", "the", "is", "of", "and", "to", "in", "it", "was"}
)


def _param_count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def make_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=GPT2_VOCAB_SIZE, n_positions=1024, n_embd=64, n_layer=2, n_head=4, n_inner=256)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    assert _param_count(model) == GPT2_PARAMS, _param_count(model)
    return model, gpt2_tokenizer()


def _bert_tokenizer(tmp_dir):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    vocab += [f"[unused{i}]" for i in range(128 - len(vocab))]
    path = os.path.join(tmp_dir, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(vocab))
    tok = BertTokenizerFast(vocab=path, name_or_path="tiny-bert-test")  # vocab_file= builds an empty one
    assert len(tok) == 128
    return tok


def make_bert(tmp_dir, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, type_vocab_size=2,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = BertForMaskedLM(cfg).eval()
    assert _param_count(model) == BERT_PARAMS, _param_count(model)
    return model, _bert_tokenizer(tmp_dir)


def make_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=MLM_VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = RobertaForMaskedLM(cfg).eval()
    assert _param_count(model) == ROBERTA_PARAMS, _param_count(model)
    return model, mlm_tokenizer()


class Pair:
    """An HF reference model (eager attention, as the bridge uses: SDPA differs by up to ~5e-4) and
    the same weights loaded through mechlens (a separate copy: the bridge
    modifies the model it adopts)."""

    def __init__(self, name, hf, tok, weights="raw"):
        from mechlens import load_model

        self.name, self.hf, self.tok = name, hf, tok
        self.bridge = load_model(copy.deepcopy(hf), tokenizer=tok, weights=weights)


@pytest.fixture(scope="session")
def gpt2_pair():
    hf, tok = make_gpt2()
    return Pair("gpt2-random", hf, tok)


@pytest.fixture(scope="session")
def bert_pair(tmp_path_factory):
    hf, tok = make_bert(str(tmp_path_factory.mktemp("bert")))
    return Pair("bert-random", hf, tok)


@pytest.fixture(scope="session")
def roberta_pair():
    hf, tok = make_roberta()
    return Pair("roberta-random", hf, tok)


def _embedded_pair(name):
    from transformers import GPT2LMHeadModel, RobertaForMaskedLM

    from mechlens.zoo import EMBEDDED

    m = EMBEDDED[name]
    cls = GPT2LMHeadModel if m.kind == "causal" else RobertaForMaskedLM
    hf = cls.from_pretrained(m.path, dtype=torch.float32, attn_implementation="eager").eval()
    tok = gpt2_tokenizer() if m.tokenizer == "gpt2" else mlm_tokenizer()
    return Pair(name, hf, tok)


@pytest.fixture(scope="session")
def tiny_gpt2_pair():
    return _embedded_pair("tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_mlm_pair():
    return _embedded_pair("tiny-mlm")


@pytest.fixture(params=["gpt2", "bert", "roberta", "tiny-gpt2", "tiny-mlm"])
def any_pair(request):
    name = {"gpt2": "gpt2_pair", "bert": "bert_pair", "roberta": "roberta_pair"}.get(
        request.param, request.param.replace("-", "_") + "_pair"
    )
    return request.getfixturevalue(name)


@pytest.fixture(params=["gpt2", "tiny-gpt2"])
def causal_pair(request):
    return request.getfixturevalue({"gpt2": "gpt2_pair", "tiny-gpt2": "tiny_gpt2_pair"}[request.param])


@pytest.fixture(params=["bert", "roberta", "tiny-mlm"])
def masked_pair(request):
    return request.getfixturevalue(
        {"bert": "bert_pair", "roberta": "roberta_pair", "tiny-mlm": "tiny_mlm_pair"}[request.param]
    )


def short_gpt2_params(n_positions: int) -> int:
    """The parameter count of :func:`make_gpt2`'s model with ``n_positions`` positions instead of 1024."""
    return GPT2_PARAMS - (1024 - n_positions) * 64


def make_short_gpt2(n_positions: int, seed: int = 0):
    """:func:`make_gpt2`'s model with a short context (``n_positions`` 16 or 32: shorter than the load probe
    with its greedy steps, than the default prompt plus --n-new-tokens...), seeded, its size asserted."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=GPT2_VOCAB_SIZE, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4, n_inner=256)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    assert _param_count(model) == short_gpt2_params(n_positions), _param_count(model)
    return model, gpt2_tokenizer()
