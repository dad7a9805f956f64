"""Study 2 -- logits and next-token prediction, and a logit intervention through a hook point.

For a prompt: the logit vector at its last position; softmax computed naively (exp / sum), stably
(max-subtracted) and as log-softmax, with the naive form overflowing on large logits; the top-k
table; rank, logit and probability of a chosen token. Seeded multinomial sampling; a manual greedy
loop (equal to the bridge's own ``generate``) and a manual sampling loop. Then an intervention on
``unembed.hook_out`` that lifts the chosen token's logit to the current maximum + ``delta``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechlens.loading import provenance_of
from mechlens.studies.result import StudyResult
from mechlens.tokens import encode, single_token_id

HOOK = "unembed.hook_out"  # the logits


@dataclasses.dataclass
class Config:
    prompt: str = "I like oat milk in my"
    target: str = " coffee"
    bos: bool = True
    top_k: int = 10
    n_samples: int = 1000
    n_new_tokens: int = 12
    temperature: float = 1.0
    delta: float = 1.0
    overflow_scale: float = 100.0  # naive softmax of logits * scale overflows in fp32
    seed: int = 0


def naive_softmax(x: Tensor) -> Tensor:
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def stable_softmax(x: Tensor) -> Tensor:
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def last_logits(model, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, " d_vocab"]:
    with torch.no_grad():
        return model(tokens, return_type="logits")[0, -1].float()


def rank_of(logits: Float[Tensor, " d_vocab"], token: int) -> int:
    """0-based rank: how many tokens have a strictly larger logit."""
    return int((logits > logits[token]).sum())


def lift_hook(token: int, delta: float) -> Callable:
    """A forward hook for ``unembed.hook_out`` setting ``token``'s logit at the last position to the
    current maximum + ``delta``; nothing else changes."""

    def hook(logits: Tensor, hook) -> Tensor:
        last = logits[:, -1]
        last[:, token] = last.max(-1).values + delta
        return logits

    return hook


def greedy_loop(model, tokens: Int[Tensor, "1 pos"], n: int, fwd_hooks=()) -> list[int]:
    """argmax decoding, one full forward per new token (no KV cache), hooks active at every step."""
    out = tokens
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(n):
            nxt = model(out, return_type="logits")[0, -1].argmax()
            out = torch.cat([out, nxt.view(1, 1)], 1)
    return out[0, tokens.shape[1] :].tolist()


def sampling_loop(model, tokens: Int[Tensor, "1 pos"], n: int, temperature: float, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    out = tokens
    with torch.no_grad():
        for _ in range(n):
            probs = torch.softmax(model(out, return_type="logits")[0, -1].float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            out = torch.cat([out, nxt.view(1, 1)], 1)
    return out[0, tokens.shape[1] :].tolist()


def run(model, cfg: Config | None = None) -> StudyResult:
    cfg = cfg or Config()
    torch.manual_seed(cfg.seed)
    tok = model.tokenizer
    batch = encode(model, [cfg.prompt], bos=cfg.bos)
    tokens = batch.tokens
    target = single_token_id(model, cfg.target)
    logits = last_logits(model, tokens)
    logp = torch.log_softmax(logits, -1)
    probs = stable_softmax(logits)
    naive = naive_softmax(logits)
    big = logits * cfg.overflow_scale
    top = torch.topk(logits, cfg.top_k)
    topk = [
        {"rank": i, "id": int(t), "token": tok.decode([int(t)]), "logit": float(logits[t]), "prob": float(probs[t])}
        for i, t in enumerate(top.indices)
    ]
    gen = torch.Generator().manual_seed(cfg.seed)
    samples = torch.multinomial(probs, cfg.n_samples, replacement=True, generator=gen)
    counts = torch.bincount(samples, minlength=len(probs))
    greedy = greedy_loop(model, tokens, cfg.n_new_tokens)
    with torch.no_grad():
        generated = model.generate(
            tokens, max_new_tokens=cfg.n_new_tokens, do_sample=False, verbose=False, stop_at_eos=False
        )[0, tokens.shape[1] :].tolist()
    sampled = sampling_loop(model, tokens, cfg.n_new_tokens, cfg.temperature, cfg.seed)

    hooks = [(HOOK, lift_hook(target, cfg.delta))]
    with torch.no_grad():
        intervened = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")[0, -1].float()
    after = last_logits(model, tokens)
    changed = torch.nonzero(intervened != logits).flatten().tolist()
    steered = greedy_loop(model, tokens, cfg.n_new_tokens, fwd_hooks=hooks)

    metrics = {
        "prompt_tokens": tokens[0].tolist(),
        "logits_max": float(logits.max()),
        "logits_mean": float(logits.mean()),
        "softmax_naive_vs_stable_max_abs_diff": float((naive - probs).abs().max()),
        "log_softmax_vs_log_of_softmax_max_abs_diff": float((logp - probs.log()).abs().max()),
        "overflow_scale": cfg.overflow_scale,
        "naive_softmax_finite_on_scaled_logits": bool(torch.isfinite(naive_softmax(big)).all()),
        "stable_softmax_finite_on_scaled_logits": bool(torch.isfinite(stable_softmax(big)).all()),
        "log_softmax_finite_on_scaled_logits": bool(torch.isfinite(torch.log_softmax(big, -1)).all()),
        "topk": topk,
        "target": {"string": cfg.target, "id": target},
        "target_rank": rank_of(logits, target),
        "target_logit": float(logits[target]),
        "target_prob": float(probs[target]),
        "target_logprob": float(logp[target]),
        "sample_counts_top": {tok.decode([int(i)]): int(counts[i]) for i in counts.argsort(descending=True)[:10]},
        "sample_freq_vs_prob_max_abs_diff_topk": float(
            (counts[top.indices] / cfg.n_samples - probs[top.indices]).abs().max()
        ),
        "greedy_tokens": greedy,
        "greedy_text": tok.decode(greedy),
        "generate_tokens": generated,
        "greedy_equals_generate": greedy == generated,
        "sampled_text": tok.decode(sampled),
        "intervention_delta": cfg.delta,
        "intervention_argmax_is_target": int(intervened.argmax()) == target,
        "intervention_changed_logits": changed,
        "intervention_exactly_one_logit_changed": changed == [target],
        "logits_restored_after_hooks": bool(torch.equal(after, logits)),
        "steered_text": tok.decode(steered),
        "steered_tokens": steered,
    }  # fmt: skip
    prov = provenance_of(model).replace(bos=batch.bos_policy(), padding_side=batch.padding_side, seed=cfg.seed)
    tables = {
        "topk": topk,
        "logits": [{"id": i, "logit": v} for i, v in enumerate(logits.tolist())],
    }
    res = StudyResult("logits", prov.model, metrics, prov.to_dict(), dataclasses.asdict(cfg), tables)
    res.figures = figures(logits, logp, intervened, target, tokens, model, cfg)
    return res


def figures(logits, logp, intervened, target, tokens, model, cfg) -> dict[str, go.Figure]:
    ids = np.arange(len(logits))
    nxt = int(logits.argmax())
    tok = model.tokenizer
    f = go.Figure(go.Scattergl(x=ids, y=logits.numpy(), mode="markers", marker={"size": 2}, name="logits"))
    for t, name in ((nxt, "argmax"), (target, "target")):
        f.add_scatter(x=[t], y=[float(logits[t])], mode="markers+text", text=[f"{name}: {tok.decode([t])!r}"],
                      textposition="top center", marker={"size": 10}, name=name)  # fmt: skip
    f.update_layout(title=f"Logits after {cfg.prompt!r}", xaxis_title="token id", yaxis_title="logit")
    figs = {"logits": f}
    order = torch.argsort(logits, descending=True)[:200]
    f = go.Figure()
    f.add_scatter(x=np.arange(200), y=torch.softmax(logits, -1)[order].numpy(), name="softmax (probability)")
    f.add_scatter(x=np.arange(200), y=logp[order].numpy(), name="log-softmax (nats)", yaxis="y2")
    f.update_layout(
        title="Softmax vs log-softmax over the 200 most likely tokens",
        xaxis_title="rank",
        yaxis={"title": "probability"},
        yaxis2={"title": "log-prob", "overlaying": "y", "side": "right"},
    )
    figs["softmax_vs_log_softmax"] = f
    top = torch.topk(intervened, 20).indices
    f = go.Figure([go.Bar(x=[tok.decode([int(t)]) for t in top], y=logits[top].numpy(), name="before"),
                   go.Bar(x=[tok.decode([int(t)]) for t in top], y=intervened[top].numpy(), name="after")])  # fmt: skip
    f.update_layout(title=f"Logits before/after lifting {cfg.target!r} via {HOOK}", barmode="group")
    figs["intervention"] = f
    return figs
