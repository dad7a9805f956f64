"""Load-time check that the lens readout is the model's own logit map: nothing silently wrong.

:func:`validate_readout` runs one short probe forward through the bridge, applies
:func:`mechlens.arch.readout` to the last residual-stream readout point and compares the log-probs with
those of the model's own logits (HF's forward, post-processing included: the bridge returns what the
HF model returns). A mismatch means mechlens does not reproduce something the model applies after its
final norm (a logit scale, a soft-cap, a head it does not know); the lens would then report wrong
log-probs, entropies and KL while ranks look fine, so the model is refused
(:class:`~mechlens.errors.UnsupportedArchitectureError`) unless the caller overrides explicitly.

Tolerance (:func:`readout_tolerance`): both sides compute the same logits from the same residual and
weights, only in a different summation order (``h @ W_U`` vs ``F.linear``) and, for half precision,
with the output rounded to the model's dtype. For a logit ``z = h . w`` an fp32 dot product of length
``d`` summed blockwise has a rounding error of about ``sqrt(d) * u * |h| |w|`` (``u = 2**-24``; the
worst case ``d * u`` is never reached by blocked sums); we allow 4x that, with ``|h| |w|`` bounded by
the largest ``|h|`` on the probe times the largest column norm of ``W_U`` (Cauchy-Schwarz), plus 4x the
rounding of the output logit to the model's dtype (``u_dtype * max |z|``: bf16/fp16 matmuls accumulate
in fp32 and round once). A log-prob ``z - lse(z)``
carries at most twice the largest logit error. For a d_model-64 fp32 model with logits of ~10 this is
~1e-4 nats; for bf16 with logits of ~30, ~0.25 nats. The gaps this check exists for are tens of nats
(Gemma2's soft-cap ~113, Granite's ``logits_scaling`` ~66, Cohere's ``logit_scale`` ~64 on realistic
logits) or, for a forgotten bias or norm, well above these bounds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import torch

from mechlens import arch
from mechlens.errors import MechlensError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge

PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and then it sleeps."
_SAFETY = 4.0  # margin over the typical sqrt(d) * u rounding error of a blocked fp32 dot product


@dataclasses.dataclass(frozen=True)
class ReadoutCheck:
    """The result of comparing the lens readout with the model's logits on the probe."""

    max_logprob_diff: float  # max over probe positions and vocabulary, in nats
    tolerance: float  # nats
    n_positions: int
    seconds: float  # wall time of the check (one probe forward + one readout)
    readout: str  # what the readout applies (arch.readout_description)
    gap_found: str = ""  # for a mismatch: what the model's logits look like relative to the readout's

    @property
    def ok(self) -> bool:
        return self.max_logprob_diff <= self.tolerance

    def gap(self) -> str:
        """A phrase naming what the model seems to apply that the readout does not."""
        return self.gap_found or "a post-processing of the logits the readout does not reproduce"


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def readout_tolerance(
    dtype: torch.dtype, d_in: int, max_h_norm: float, max_w_col_norm: float, max_abs_logit: float
) -> float:
    """Allowed max |log-prob difference| between two fp computations of the same logits (module
    docstring): ``2 * 4 * (sqrt(d_in) * u_acc * |h|max |w|max + u_dtype * |z|max)``, where matmuls of
    half-precision tensors accumulate in fp32 (``u_acc``) and round their output to ``dtype``."""
    u_out = _unit_roundoff(dtype)
    u_acc = min(u_out, _unit_roundoff(torch.float32))
    dot = _SAFETY * math.sqrt(d_in) * u_acc * max_h_norm * max_w_col_norm
    return 2.0 * (dot + _SAFETY * u_out * max_abs_logit)


@torch.no_grad()
def check_readout(model: TransformerBridge, text: str = PROBE_TEXT) -> ReadoutCheck:
    """Readout of the last residual point vs the model's own logits on ``text`` (see module docstring)."""
    from mechlens.encoding import encode
    from mechlens.forward import run_cached

    t0 = time.perf_counter()
    masked = arch.kind_of(model) == "masked"
    room = model.cfg.n_ctx - (2 if masked else 0)  # a short context: the probe's first tokens only
    batch = encode(model, [text], bos=masked, max_tokens=max(1, room))
    names = arch.readout_hook_names(model)
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise UnsupportedArchitectureError(
            f"TransformerBridge exposes no residual-stream hook point {missing[0]} for {model.cfg.architecture} "
            f"({len(missing)} of the {len(names)} readout points missing): mechlens cannot read this model out"
        )
    last = names[-1]
    try:
        logits, acts = run_cached(model, batch, [last], logits=True)
    except MechlensError:
        raise
    except KeyError as e:  # registered but never run: the cache has no entry for it
        if e.args != (last,):
            raise
        raise UnsupportedArchitectureError(
            f"TransformerBridge's hook point {e.args[0]} never fires for {model.cfg.architecture}: mechlens "
            "cannot read this model out"
        ) from None
    except Exception as e:  # the bridge's own forward fails (e.g. an adapter and transformers out of step)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UnsupportedArchitectureError(
            f"TransformerBridge cannot run {model.cfg.architecture} here: its probe forward fails with "
            f"{type(e).__name__}: {first}"
        ) from e
    r = arch.readout(model)
    resid = acts[last][0]
    mine = r(resid).float()
    theirs = logits[0].float()
    diff = (mine.log_softmax(-1) - theirs.log_softmax(-1)).abs().max().item()
    # the tolerance's scale: |h| after the readout's pre-map, column norms of W_U (a reduction: no copy)
    h = r.pre(resid).float()
    w_norm = torch.linalg.vector_norm(r.weight.float(), dim=0).max().item()
    bias = 0.0 if r.bias is None else r.bias.float().abs().max().item()
    tol = readout_tolerance(
        resid.dtype,
        h.shape[-1],
        h.norm(dim=-1).max().item(),
        w_norm,
        max(theirs.abs().max().item(), mine.abs().max().item()) + bias,
    )
    gap = "" if diff <= tol else _diagnose(mine.double(), theirs.double(), tol)
    return ReadoutCheck(
        max_logprob_diff=diff,
        tolerance=tol,
        n_positions=int(resid.shape[0]),
        seconds=time.perf_counter() - t0,
        readout=arch.readout_description(model),
        gap_found=gap,
    )


def _lp_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.log_softmax(-1) - b.log_softmax(-1)).abs().max().item()


def _diagnose(mine: torch.Tensor, theirs: torch.Tensor, tol: float) -> str:
    """Name the gap between the readout's logits ``mine`` and the model's ``theirs`` (float64): a scalar
    scale (least squares on per-position centred logits: a shift changes no log-prob), a soft-cap
    ``c tanh(z / c)`` (``c`` searched on a grid above the model's largest |logit|), or neither."""
    a_c = mine - mine.mean(-1, keepdim=True)
    b_c = theirs - theirs.mean(-1, keepdim=True)
    scale = ((a_c * b_c).sum() / (a_c * a_c).sum().clamp_min(1e-300)).item()
    if math.isfinite(scale) and _lp_diff(mine * scale, theirs) <= 10 * tol:
        return f"the model's logits are {scale:.6g} x the readout's (a logit scale the readout does not apply)"

    # soft-cap: golden-section search of log(c) on the largest raw-logit error, c in [max|z|, 100 max|z|]
    def err(log_c: float) -> float:
        c = math.exp(log_c)
        return (c * torch.tanh(mine / c) - theirs).abs().max().item()

    lo = math.log(max(theirs.abs().max().item(), 1e-6))
    hi, g = lo + math.log(100.0), (math.sqrt(5) - 1) / 2
    for _ in range(60):
        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, x2) if err(x1) <= err(x2) else (x1, hi)
    cap = math.exp((lo + hi) / 2)
    if _lp_diff(cap * torch.tanh(mine / cap), theirs) <= 10 * tol:
        return f"the model soft-caps its logits at ~{cap:.4g} (cap * tanh(z / cap); the readout does not)"
    return (
        "the model's logits are neither a scale nor a soft-cap of the readout's (an unknown head or "
        f"post-processing; best scale fit {scale:.4g})"
    )


def validate_readout(model: TransformerBridge, *, allow_mismatch: bool = False) -> ReadoutCheck:
    """:func:`check_readout`, refusing a mismatch with :class:`UnsupportedArchitectureError` unless
    ``allow_mismatch`` (the caller records the override in provenance)."""
    check = check_readout(model)
    if not check.ok and not allow_mismatch:
        raise UnsupportedArchitectureError(
            f"the lens readout of {model.cfg.architecture} ({check.readout}) differs from the model's own "
            f"log-probs by {check.max_logprob_diff:.3g} nats (tolerance {check.tolerance:.2g}) on a probe: "
            f"{check.gap()}. Lens log-probs, entropy and KL would be wrong. Pass allow_readout_mismatch=True "
            "(load_model) to analyse it anyway; the override is recorded in provenance."
        )
    return check


# -- generate: TransformerLens' KV-cache decoding against the model's own greedy steps --------------

GENERATE_PROBE_TOKENS = 4
# Two computations of the same next-token logits (HF's forward before adoption vs the bridge's; eager vs
# the model's own attention kernel: fp32 SDPA differs from eager by up to ~5e-4, TransformerLens' own
# parity floor; bf16 up to ~1e-2 of the logits) agree in log-probs to 1e-3 x max(1, max |logit|) in
# fp32 and 2e-2 x that in half precision; an argmax may then swap only between near-tied tokens,
# after which the sequences may legitimately differ and the comparison stops. A KV cache that drops
# the prompt (what transformers 5.24 did to TransformerLens 4.3) moves log-probs by whole nats even
# where the argmax happens to survive.
_DRIFT_REL = {torch.float32: 1e-3, torch.float64: 1e-3}
_DRIFT_REL_HALF = 2e-2


@dataclasses.dataclass(frozen=True)
class GreedySteps:
    """The model's own greedy continuation of the probe: ``n`` full forwards (no cache), before the
    bridge adopts the model, with the next-token logits of each step (float32, on CPU)."""

    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor  # [n, vocab]
    dtype: torch.dtype = torch.float32  # the model's


@dataclasses.dataclass(frozen=True)
class GenerateCheck:
    """The bridge's ``generate`` against :class:`GreedySteps` on the probe."""

    kv_cache: bool  # generate may use TransformerLens' KV cache (cached generation == greedy steps)
    detail: str  # what was compared, and where a KV-cache generation left the greedy steps


@torch.no_grad()
def hf_greedy_steps(hf_model, prompt: list[int], n: int = GENERATE_PROBE_TOKENS) -> GreedySteps:
    """``n`` greedy tokens by the HF model's own forward (no KV cache): the reference for :func:`check_generate`."""
    device = hf_model.get_input_embeddings().weight.device
    seq = torch.tensor([prompt], device=device)
    tokens, logits = [], []
    for _ in range(n):
        last = hf_model(input_ids=seq, use_cache=False).logits[0, -1].float().cpu()
        tokens.append(int(last.argmax()))
        logits.append(last)
        seq = torch.cat([seq, torch.tensor([[tokens[-1]]], device=device)], dim=1)
    dtype = next(hf_model.parameters()).dtype
    return GreedySteps(prompt=list(prompt), tokens=tokens, logits=torch.stack(logits), dtype=dtype)


def _departure(reference: GreedySteps, tokens: list[int], logits: torch.Tensor) -> str | None:
    """Where a generation (``tokens`` and its per-step ``logits``) leaves the reference's greedy steps, in
    words; ``None`` if it follows them (up to a near-tie, after which nothing more is compared)."""
    rel = _DRIFT_REL.get(reference.dtype, _DRIFT_REL_HALF)
    for step, (want, got) in enumerate(zip(reference.tokens, tokens, strict=True)):
        z = reference.logits[step]
        tol = rel * max(1.0, z.abs().max().item())
        drift = (logits[step].float().cpu().log_softmax(-1) - z.log_softmax(-1)).abs().max().item()
        if drift > tol:
            return (
                f"at step {step} (log-probs off by {drift:.3g} nats, tolerance {tol:.2g}; token {got}, "
                f"the model's {want})"
            )
        if want != got:
            if (z[want] - z[got]).item() <= 2 * tol:
                return None  # a near-tie: both tokens are the model's within rounding
            return f"at step {step} (token {got}, the model's argmax {want})"
    return None


@torch.no_grad()
def check_generate(model: TransformerBridge, reference: GreedySteps) -> GenerateCheck:
    """``model.generate`` (greedy, with TransformerLens' KV cache) must reproduce the model's own greedy
    steps (:func:`hf_greedy_steps`): the same tokens and, step by step, the same log-probs. If it does
    not but generation without the cache does, generation runs without the cache (``kv_cache=False``:
    recorded in provenance, used by study 2); if neither does, the model is refused
    (:class:`UnsupportedArchitectureError`): no study may report a sequence the model did not produce."""
    device = next(model.parameters()).device
    prompt = torch.tensor([reference.prompt], device=device)
    n = len(reference.tokens)

    def departure(kv_cache: bool) -> str | None:
        out = model.generate(
            prompt,
            max_new_tokens=n,
            do_sample=False,
            verbose=False,
            stop_at_eos=False,
            use_past_kv_cache=kv_cache,
            output_logits=True,
        )
        tokens = out.sequences[0, prompt.shape[1] :].tolist()
        return _departure(reference, tokens, torch.stack([z[0] for z in out.logits]))

    cached = departure(True)
    if cached is None:
        return GenerateCheck(kv_cache=True, detail=f"KV-cache generate == the model's greedy steps ({n} tokens)")
    why = f"TransformerLens' KV-cache generate leaves the model's greedy steps {cached}"
    uncached = departure(False)
    if uncached is None:
        return GenerateCheck(kv_cache=False, detail=f"{why}: generate runs without the KV cache")
    raise UnsupportedArchitectureError(
        f"generate through TransformerBridge ({model.cfg.architecture}) does not reproduce the model's own "
        f"greedy steps, with or without the KV cache: {why}; without it {uncached}. Use the tested "
        "transformers and transformer-lens versions (README, 'Tested versions')."
    )
