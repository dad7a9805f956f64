"""The load-time generate check (issue 21): TransformerLens' KV-cache ``generate`` against the model's
own greedy steps, the no-cache fallback recorded in provenance, and the refusal.

transformers 5.24 hands attention the KV cache as ``cache=``, which TransformerLens 4.3's
``AttentionBridge._update_kv_cache`` does not read: every cached decoding step attends to itself only.
The tests reproduce exactly that by replacing ``_update_kv_cache`` with one that returns K and V
unchanged, whatever transformers is installed. The reference is an untouched HF copy's own
``generate`` (greedy, HF's own KV cache), independent of TransformerLens and of mechlens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from arch_matrix import CASES, build
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from mechlens import UnsupportedArchitectureError, encode, load_model, provenance_of
from mechlens.studies import logits
from mechlens.validate import GreedySteps, _departure

PROMPT = "I like oat milk in my"
N_NEW = 12


def _drop_kv_cache(self, k, v, **kwargs):  # what TransformerLens 4.3 does under transformers 5.24
    return k, v


def _hf_greedy(hf, tokens: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          attention_mask=torch.ones_like(tokens), pad_token_id=50256)  # fmt: skip
    return out[0, tokens.shape[1] :].tolist()


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt-neox"])
@pytest.mark.parametrize("broken_cache", [False, True])
def test_study_2_generate_is_what_the_model_produces(name, broken_cache, tmp_path, monkeypatch):
    """With TransformerLens' cache working, generate keeps it (provenance ``generate_kv_cache`` True);
    with the 5.24 breakage, the load-time check finds it and generation runs without the cache. Either
    way study 2's ``generate`` tokens equal HF's own greedy generation on an untouched copy, token for
    token (the same fp32 model; the seeded logits have no near-ties in these 12 steps)."""
    hf, tok = build(CASES[name], str(tmp_path))
    ref = copy.deepcopy(hf)
    if broken_cache:
        monkeypatch.setattr(AttentionBridge, "_update_kv_cache", _drop_kv_cache)
    m = load_model(hf, tokenizer=tok)
    p = provenance_of(m)
    assert p.generate_kv_cache is (not broken_cache)
    assert ("runs without the KV cache" in p.generate_check) is broken_cache
    batch = encode(m, [PROMPT], bos=True)
    r = logits.greedy_vs_generate(m, batch, N_NEW)
    want = _hf_greedy(ref, batch.tokens, N_NEW)
    assert r.generate_tokens.tolist() == want
    assert r.greedy_tokens.tolist() == want and r.greedy_equals_generate is True
    if broken_cache:  # the breakage is real: cached log-probs leave the uncached ones by far more than
        # rounding (the random GPT-2 still repeats one token, so its tokens alone would not show it)
        def step_logprobs(kv_cache):
            out = m.generate(batch.tokens, max_new_tokens=N_NEW, do_sample=False, verbose=False,
                             stop_at_eos=False, use_past_kv_cache=kv_cache, output_logits=True)  # fmt: skip
            return torch.stack([z[0] for z in out.logits]).log_softmax(-1)

        assert (step_logprobs(True) - step_logprobs(False)).abs().max().item() > 0.1


def test_a_model_whose_generate_fails_both_ways_is_refused(tmp_path, monkeypatch):
    """If neither cached nor uncached generate reproduces the model's greedy steps, load_model refuses
    the model in one line naming the step, rather than let study 2 report tokens it did not produce."""
    from transformer_lens import TransformerBridge
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    hf, tok = build(CASES["gpt2"], str(tmp_path))

    def wrong(self, tokens, max_new_tokens, **kwargs):  # always continues with token 0, certain of it
        z = torch.full((1, 50257), -30.0)
        z[0, 0] = 30.0
        seq = torch.cat([tokens, torch.zeros(tokens.shape[0], max_new_tokens, dtype=tokens.dtype)], dim=1)
        return GenerateDecoderOnlyOutput(sequences=seq, logits=(z,) * max_new_tokens)

    monkeypatch.setattr(TransformerBridge, "generate", wrong)
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_model(hf, tokenizer=tok)
    msg = str(e.value)
    assert "\n" not in msg and "with or without the KV cache" in msg and "at step 0 (log-probs off by" in msg


def _ref(z: torch.Tensor, tokens: list[int]) -> GreedySteps:
    return GreedySteps(prompt=[0], tokens=tokens, logits=z)


def test_departure_closed_form():
    """Closed form (fp32 tolerance 1e-3 x max(1, max |logit|), here 1e-2 nats): equal logits follow the
    reference; a log-prob drift above the tolerance departs even with the same argmax (a cache that drops
    the prompt); a different token departs unless its reference logit is within 2 x tolerance of the
    argmax (a near-tie), after which nothing more is compared."""
    z = torch.zeros(3, 5)
    z[0, 1], z[1, 2], z[2, 4] = 10.0, 10.0, 10.0
    ref = _ref(z, [1, 2, 4])
    assert _departure(ref, [1, 2, 4], z.clone()) is None
    drifted = z.clone()
    drifted[1, 0] = 3.0  # same argmax, log-probs moved by ~1e-3 .. 3 nats
    assert _departure(ref, [1, 2, 4], drifted).startswith("at step 1 (log-probs off by")
    tiny = z.clone()
    tiny[1, 0] = 5e-3  # log-probs move by ~5e-3 < 1e-2: within rounding
    assert _departure(ref, [1, 2, 4], tiny) is None
    tie = z.clone()
    tie[1, 3] = tie[1, 2] = 10.0  # the generation's logits: token 3 tied with 2 ...
    z_tie = z.clone()
    z_tie[1, 3] = 10.0 - 1e-2  # ... and within 2e-2 of the argmax in the reference
    assert _departure(_ref(z_tie, [1, 2, 4]), [1, 3, 0], tie) is None
    z_far = z.clone()
    z_far[1, 3] = 10.0 - 5e-2  # 5e-2 below the argmax: no tie; the log-prob drift is 5e-2 > 1e-2 as well
    assert _departure(_ref(z_far, [1, 2, 4]), [1, 3, 0], tie).startswith("at step 1")


class _RecordingCache:
    """A stand-in KV cache: records which object ``_update_kv_cache`` extended."""

    def __init__(self, name: str):
        self.name, self.calls = name, []

    def update(self, k, v, layer_idx):
        self.calls.append(layer_idx)
        return k + 1, v + 1


def test_kv_cache_keyword_fix_is_idempotent_and_a_no_op_elsewhere():
    """``arch.read_kv_cache_keyword`` wraps ``AttentionBridge._update_kv_cache`` once (a second call leaves
    it as it is); ``cache=`` is read only when neither ``past_key_values`` nor ``layer_past`` is given, and a
    call with neither cache returns K and V untouched (the path of every uncached forward)."""
    from mechlens import arch

    arch.read_kv_cache_keyword()
    wrapped = AttentionBridge._update_kv_cache
    arch.read_kv_cache_keyword()
    assert AttentionBridge._update_kv_cache is wrapped
    assert not getattr(wrapped.__wrapped__, arch._READS_CACHE_KEYWORD, False)  # one layer of wrapping

    class Attn:
        _layer_idx = 3
        name = "blocks.3.attn"

    k, v = torch.zeros(1, 2), torch.zeros(1, 2)
    new, old = _RecordingCache("cache"), _RecordingCache("past_key_values")
    out_k, _ = wrapped(Attn(), k, v, cache=new)
    assert new.calls == [3] and out_k.eq(1).all()  # transformers >= 5.24's keyword is read
    wrapped(Attn(), k, v, cache=new, past_key_values=old)
    wrapped(Attn(), k, v, cache=new, layer_past=old)
    assert new.calls == [3] and old.calls == [3, 3]  # the keywords TransformerLens reads take precedence
    out_k, out_v = wrapped(Attn(), k, v, attention_mask=None)
    assert out_k is k and out_v is v  # no cache: unchanged


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cached_generate_equals_greedy_loop_and_hf_generate(name, tmp_path):
    """With mechlens' fix, TransformerLens' KV-cache ``generate`` reproduces, token for token and per-step
    log-probs within 1e-3 nats, (a) an argmax loop of full uncached bridge forwards and (b) an untouched HF
    copy's own ``generate`` (HF's KV cache); and the load-time check keeps the cached path
    (``generate_kv_cache`` True). On transformers >= 5.24 without the fix every assertion here fails (the
    cached steps attend to themselves only: 0.69 nats on GPT-2, 25.8 on Llama, measured). 1e-3 nats: fp32
    cached vs uncached attention differ by ~1e-5 in log-probs; a broken cache moves them by >= 0.1."""
    hf, tok = build(CASES[name], str(tmp_path))
    ref = copy.deepcopy(hf)
    m = load_model(hf, tokenizer=tok)
    assert provenance_of(m).generate_kv_cache is True
    batch = encode(m, [PROMPT], bos=True)
    n = batch.tokens.shape[1]
    with torch.no_grad():
        out = m.generate(batch.tokens, max_new_tokens=N_NEW, do_sample=False, verbose=False, stop_at_eos=False,
                         use_past_kv_cache=True, output_logits=True)  # fmt: skip
        cached = torch.stack([z[0] for z in out.logits]).double().log_softmax(-1)
        seq, loop = batch.tokens, []
        for _ in range(N_NEW):  # the reference: argmax of full forwards, no cache
            z = m(seq, return_type="logits")[0, -1]
            loop.append(z.double().log_softmax(-1))
            seq = torch.cat([seq, z.argmax().view(1, 1)], dim=1)
        loop = torch.stack(loop)
        hf_out = ref.generate(batch.tokens, attention_mask=torch.ones_like(batch.tokens), max_new_tokens=N_NEW,
                              min_new_tokens=N_NEW, do_sample=False, pad_token_id=50256, output_logits=True,
                              return_dict_in_generate=True)  # fmt: skip
        hf_lp = torch.stack([z[0] for z in hf_out.logits]).double().log_softmax(-1)
    assert out.sequences[0, n:].tolist() == seq[0, n:].tolist() == hf_out.sequences[0, n:].tolist()
    assert (cached - loop).abs().max().item() < 1e-3
    assert (hf_lp - loop).abs().max().item() < 1e-3
