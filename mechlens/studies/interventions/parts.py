"""The maths of study 6: prompt pairs, the batched intervention engine and the four parts.

Every part is a plain function of ``(model, pairs, ...)`` returning a frozen dataclass with
jaxtyping-annotated fields. Interventions go through TransformerLens hook points only
(``model.hooks(fwd_hooks=...)`` around a forward; ``run_cached`` for the unmodified runs).

Conventions: a pair is ``(clean, corrupt, target, foil)``; both prompts tokenize to the same length;
the **answer column** is where the prediction is read: the last token for a causal LM (the token after
it is predicted), the ``<mask>`` for a masked LM. The metric is the logit difference
``LD = logit[target] - logit[foil]`` at the answer column, read through the model's own readout
(:func:`mechlens.arch.readout`). Causal LMs get BOS prepended, masked LMs ``<s> ... </s>``; batches are
right-padded, so a column is a position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechlens import arch
from mechlens.encoding import TokenBatch, encode, single_token_id
from mechlens.errors import DataError
from mechlens.forward import run_cached
from mechlens.result import none_where, not_in_metrics
from mechlens.stats.streaming import priorities

# -- prompt pairs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RawPair:
    """One pair as given: texts (or text token ids) and the target/foil (strings of one token, or ids)."""

    clean: str | tuple[int, ...]
    corrupt: str | tuple[int, ...]
    target: str | int
    foil: str | int


@dataclasses.dataclass(frozen=True)
class PromptPairs:
    """Encoded pairs: ``clean`` and ``corrupt`` batches of equal shape (pair ``i`` is row ``i`` of both,
    of equal length), the ``target``/``foil`` ids and the ``answer`` column of each pair."""

    clean: TokenBatch
    corrupt: TokenBatch
    target: Int[Tensor, " pair"]
    foil: Int[Tensor, " pair"]
    answer: Int[Tensor, " pair"]
    source: str

    def __len__(self) -> int:
        return len(self.target)

    @property
    def valid(self) -> Bool[Tensor, "pos pair"]:
        """Columns each pair has (not padding), transposed to ``[pos, pair]``."""
        return self.clean.attention_mask.bool().T


def token_pool(model, source: str = "reviews", limit: int = 2000) -> list[int]:
    """Word tokens (a leading space, then letters) seen in a built-in text source, sorted by id: the
    vocabulary the induction pairs are drawn from (tokens the embedded models have seen in training text)."""
    from mechlens.data import load_texts

    tok = model.tokenizer
    ids = sorted({i for t in load_texts(source) for i in tok(t, add_special_tokens=False)["input_ids"]})
    special = set(getattr(tok, "all_special_ids", None) or [])
    decoded = {i: tok.decode([i]) for i in ids if i not in special}
    words = [i for i, s in decoded.items() if s.startswith(" ") and s[1:].isalpha()]
    if len(words) < 50:  # a tokenizer without space-prefixed words (WordPiece): whole alphabetic tokens
        words = [i for i, s in decoded.items() if s.strip().isalpha() and not s.startswith("##")]
    return words[:limit]


def induction_pairs(model, n_pairs: int, segment_length: int, seed: int) -> list[RawPair]:
    """Seeded induction pairs: a random segment ``S`` of ``segment_length`` word tokens, then ``S`` again
    without its last token; the target is that last token (what induction copies). The corrupt prompt
    replaces the first occurrence by another segment ``S'`` (disjoint from ``S``); the foil is ``S'``'s
    last token. A masked LM gets ``<mask>`` in the target's place. Token ids, so every model with the
    same tokenizer sees the same pairs."""
    return list(iter_induction_pairs(model, n_pairs, segment_length, seed))


def iter_induction_pairs(model, n_pairs: int | None, segment_length: int, seed: int) -> Iterator[RawPair]:
    """:func:`induction_pairs` as a stream (``n_pairs`` None: without end): the first ``k`` pairs of any
    stream are ``induction_pairs(model, k, ...)``, and nothing is held but the token pool."""
    pool = np.asarray(token_pool(model))
    if len(pool) < 2 * segment_length:
        raise DataError(f"--segment-length {segment_length}: the token pool holds only {len(pool)} tokens")
    rng = np.random.default_rng(seed)
    tail = [arch.mask_id(model)] if arch.kind_of(model) == "masked" else []
    for _ in itertools.count() if n_pairs is None else range(n_pairs):
        draw = rng.choice(pool, 2 * segment_length, replace=False).tolist()
        s, s2 = draw[:segment_length], draw[segment_length:]
        yield RawPair(tuple(s + s[:-1] + tail), tuple(s2 + s[:-1] + tail), s[-1], s2[-1])


def _ids(model, text: str | tuple[int, ...]) -> list[int]:
    if isinstance(text, str):
        return model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(text)


def encode_pairs(model, raw: Sequence[RawPair], source: str, offset: int = 0) -> PromptPairs:
    """Check and encode pairs; one :class:`DataError` / ``TokenError`` line naming the first bad pair
    (unequal lengths, a target or foil that is not one token, target == foil, a masked-LM prompt without
    exactly one ``<mask>`` at the same place in both; pair ``i`` is named ``#offset + i``, its place in
    the stream). No forward pass is run."""
    masked = arch.kind_of(model) == "masked"
    clean, corrupt, target, foil, answer = [], [], [], [], []
    for i, p in enumerate(raw):
        name = f"pair #{offset + i} (clean {p.clean!r})"
        a, b = _ids(model, p.clean), _ids(model, p.corrupt)
        if len(a) != len(b) or not a:
            raise DataError(
                f"{name}: clean and corrupt tokenize to {len(a)} and {len(b)} tokens: the prompts of a "
                "pair must tokenize to the same (non-zero) length"
            )
        t = single_token_id(model, p.target, flag=f"{name}: target")
        f = single_token_id(model, p.foil, flag=f"{name}: foil")
        if t == f:
            raise DataError(f"{name}: target and foil are the same token {t}: give a different foil")
        head = 1  # BOS, or <s>
        if masked:
            m = arch.mask_id(model)
            where_a, where_b = [j for j, x in enumerate(a) if x == m], [j for j, x in enumerate(b) if x == m]
            if len(where_a) != 1 or where_a != where_b:
                raise DataError(
                    f"{name}: a masked LM needs exactly one {model.tokenizer.mask_token} in each prompt, "
                    f"at the same token (found {len(where_a)} and {len(where_b)})"
                )
            answer.append(head + where_a[0])
        else:
            answer.append(head + len(a) - 1)
        clean.append(a)
        corrupt.append(b)
        target.append(t)
        foil.append(f)
    if not raw:
        raise DataError("no prompt pairs: the data holds no rows")
    cb = encode(model, clean, bos=True, fix="use shorter pairs")
    kb = encode(model, corrupt, bos=True, fix="use shorter pairs")
    return PromptPairs(cb, kb, torch.tensor(target), torch.tensor(foil), torch.tensor(answer), source)


PAIR_COLUMNS = ("clean", "corrupt", "target", "foil")


def read_pairs(path: str, n_pairs: int | None) -> list[RawPair]:
    """The first ``n_pairs`` rows of a .jsonl / .csv / .parquet file with the columns clean, corrupt,
    target, foil (:func:`mechlens.data.load_records`)."""
    from mechlens.data.records import load_records

    rows = load_records(path, PAIR_COLUMNS, n_pairs)
    return [RawPair(*(str(r[c]) for c in PAIR_COLUMNS)) for r in rows]


def iter_pairs(path: str, n_pairs: int | None) -> Iterator[RawPair]:
    """:func:`read_pairs` as a stream (:func:`mechlens.data.records.iter_records`): memory does not grow
    with the file."""
    from mechlens.data.records import iter_records

    for r in iter_records(path, PAIR_COLUMNS, n_pairs):
        yield RawPair(*(str(r[c]) for c in PAIR_COLUMNS))


# -- hooks and the batched engine ------------------------------------------------------------------------


def component_hooks(model) -> list[str]:
    """``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out`` of every block, in forward order."""
    return [f"blocks.{layer}.hook_{c}_out" for layer in range(model.cfg.n_layers) for c in ("attn", "mlp")]


def component_names(model) -> list[str]:
    return [f"L{layer} {c}" for layer in range(model.cfg.n_layers) for c in ("attn", "mlp")]


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def has_heads(model) -> bool:
    return all(z_hook(layer) in model.hook_dict for layer in range(model.cfg.n_layers))


def all_hooks(model) -> list[str]:
    heads = [z_hook(layer) for layer in range(model.cfg.n_layers)] if has_heads(model) else []
    return [resid_hook(layer) for layer in range(model.cfg.n_layers)] + component_hooks(model) + heads


class _Stop(Exception):
    """Raised by the last hook once the final residual stream is captured: no unembedding is computed."""


@dataclasses.dataclass(frozen=True)
class Edit:
    """One intervention: replace ``hook``'s activation (of head ``head`` only, when given) at column
    ``col`` (every column when None) by the source's. ``hook`` None: the unmodified forward."""

    hook: str | None
    head: int | None = None
    col: int | None = None


def final_hook(model) -> str:
    return arch.readout_hook_names(model)[-1]


def _edit_masks(chunk: Sequence[Edit], n: int, sources: dict[str, Tensor], device) -> dict[str, Tensor]:
    """Per hook, which ``[edit, pair, pos(, head)]`` entries a chunk of edits replaces."""
    masks: dict[str, Tensor] = {}
    for e, ed in enumerate(chunk):
        if ed.hook is None:
            continue
        src = sources[ed.hook]
        shape = (len(chunk), n, *src.shape[1 : 3 if src.ndim == 4 else 2])
        m = masks.setdefault(ed.hook, torch.zeros(shape, dtype=torch.bool, device=device))
        c = slice(None) if ed.col is None else ed.col
        if ed.head is None:
            m[e, :, c] = True
        else:
            m[e, :, c, ed.head] = True
    return masks


def _patch_hook(mask: Tensor, source: Tensor) -> Callable:
    """A forward hook writing ``source`` (``[pair, ...]``, repeated for every edit) where ``mask`` is set."""
    e_n, n = mask.shape[:2]
    m = mask.reshape(e_n * n, *mask.shape[2:])[..., None]

    def hook(act: Tensor, hook) -> Tensor:
        src = source.to(act.device, act.dtype).repeat(e_n, *([1] * (source.ndim - 1)))
        return torch.where(m, src, act)

    return hook


def _capture_hook(rows: Tensor, cols: Tensor, captured: list[Tensor]) -> Callable:
    """A forward hook keeping ``act[rows, cols]`` and stopping the forward (no unembedding is computed)."""

    def hook(act: Tensor, hook) -> Tensor:
        captured.append(act[rows, cols])
        raise _Stop

    return hook


def run_edits(
    model,
    batch: TokenBatch,
    answer: Int[Tensor, " pair"],
    edits: Sequence[Edit],
    sources: dict[str, Tensor],
    rows_per_forward: int = 512,
) -> Float[Tensor, "edit pair d_model"]:
    """The final residual stream at each pair's answer column after each edit: every edit applies to
    every pair, and one forward carries ``rows_per_forward // n_pairs`` edits (rows ``e * n + i``). The
    forward stops at the last block (the caller reads out only what it needs). ``sources[hook]``:
    ``[pair, pos, ...]``, what an edit writes."""
    n = len(batch)
    device = next(model.parameters()).device
    per = max(1, rows_per_forward // n)
    out = []
    with torch.no_grad():
        for start in range(0, len(edits), per):
            chunk = list(edits[start : start + per])
            e_n = len(chunk)
            masks = _edit_masks(chunk, n, sources, device)
            captured: list[Tensor] = []
            hooks = [(name, _patch_hook(m, sources[name])) for name, m in masks.items()]
            rows, cols = torch.arange(e_n * n, device=device), answer.to(device).repeat(e_n)
            hooks.append((final_hook(model), _capture_hook(rows, cols, captured)))
            with model.hooks(fwd_hooks=hooks), contextlib.suppress(_Stop):
                model(
                    batch.tokens.to(device).repeat(e_n, 1),
                    attention_mask=batch.attention_mask.to(device).repeat(e_n, 1),
                )
            out.append(captured[0].reshape(e_n, n, -1))
    return torch.cat(out).float().cpu()


def logits_at(model, x: Float[Tensor, "... d_model"], ids: Int[Tensor, "... k"]) -> Float[Tensor, "... k"]:
    """The logits of the tokens ``ids`` from residual vectors ``x`` through the model's own readout
    (final norm recomputed on ``x``, unembedding, post-processing), without the full vocabulary."""
    ro = arch.readout(model)
    with torch.no_grad():
        h = ro.pre(x.to(ro.weight.device, ro.weight.dtype))
        w = ro.weight[:, ids.to(ro.weight.device)]  # [d, ..., k]
        z = torch.einsum("...d,d...k->...k", h, w)
        if ro.bias is not None:
            z = z + ro.bias[ids.to(ro.weight.device)]
        if ro.softcap is not None:
            z = ro.softcap * torch.tanh(z / ro.softcap)
    return z.float().cpu()


def logit_diff(model, x: Float[Tensor, "... pair d_model"], pairs: PromptPairs) -> Float[Tensor, "... pair"]:
    ids = torch.stack([pairs.target, pairs.foil], -1).expand(*x.shape[:-1], 2)
    z = logits_at(model, x, ids)
    return z[..., 0] - z[..., 1]


def log_probs(model, x: Float[Tensor, "row d_model"], rows: int = 256) -> Float[Tensor, "row d_vocab"]:
    ro = arch.readout(model)
    with torch.no_grad():
        return torch.cat(
            [ro(x[i : i + rows].to(ro.weight.device)).float().log_softmax(-1).cpu() for i in range(0, len(x), rows)]
        )


# -- part 1: direct logit attribution ----------------------------------------------------------------------


def dla_refusal(model) -> str | None:
    """Why direct logit attribution does not apply to ``model`` (one line), or None."""
    if arch.kind_of(model) == "masked":
        return (
            "direct logit attribution refused: a post-LN encoder's residual stream is renormalised after "
            "every block (hook_attn_out is after the residual add and LayerNorm), so no sum of component "
            "outputs reaches the readout"
        )
    if arch.logit_map(model).softcap is not None:
        return (
            "direct logit attribution refused: the logits are soft-capped (tanh), so the readout is not "
            "linear in the residual stream"
        )
    if "ln_final.hook_scale" not in model.hook_dict:
        return "direct logit attribution refused: the final norm exposes no ln_final.hook_scale to freeze"
    ro = arch.readout(model)
    probe = torch.zeros(1, 1, model.cfg.d_model, dtype=ro.weight.dtype, device=ro.weight.device)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda t, hook: torch.ones_like(t))]):
            ro.pre(probe)
    except AttributeError as e:  # e.g. OLMo's non-parametric LayerNorm bridge
        why = str(e).splitlines()[0][:100]
        return f"direct logit attribution refused: the final norm cannot be applied with a frozen scale ({why})"
    return None


@dataclasses.dataclass(frozen=True)
class DirectLogitAttribution:
    """Part 1: each component's direct contribution to ``LD`` at the answer column of the clean prompt:
    ``(pre(c) - pre(0)) . (W_U[:, target] - W_U[:, foil])`` with the final norm's scale frozen at its
    value in the unmodified run (``ln_final.hook_scale``), so the readout is affine and the contributions
    add up. ``components``: ``embed`` (``blocks.0.hook_resid_pre``), then each block's attention and MLP
    output; ``readout_bias`` the norm's and unembedding's biases; ``remainder`` the contribution of what
    the hooks do not account for (final residual minus the components: ~0 for the additive families of
    :mod:`mechlens.arch`). ``logit_diff`` is the model's own; ``identity_error`` the largest
    ``|sum + readout_bias + remainder - logit_diff|`` over pairs. ``head[pair, layer, head]``: each head's
    ``z @ W_O`` (``head_bias`` the ``b_O`` term), when the heads add up to ``hook_attn_out`` (else None,
    ``head_note`` says why)."""

    components: tuple[str, ...]
    contribution: Float[Tensor, "pair component"] = not_in_metrics()
    readout_bias: Float[Tensor, " pair"] = not_in_metrics()
    remainder: Float[Tensor, " pair"] = not_in_metrics()
    logit_diff: Float[Tensor, " pair"] = not_in_metrics()
    head: Float[Tensor, "pair layer head"] | None = not_in_metrics()
    head_bias: Float[Tensor, "pair layer"] | None = not_in_metrics()
    contribution_mean: Float[Tensor, " component"]
    head_mean: Float[Tensor, "layer head"] | None
    identity_error: float
    remainder_max: float
    head_note: str


@torch.no_grad()
def direct_logit_attribution(model, pairs: PromptPairs) -> DirectLogitAttribution:
    """Part 1 (causal LMs with a linear readout: see :func:`dla_refusal`)."""
    n_layers = model.cfg.n_layers
    fin = final_hook(model)
    heads = has_heads(model)
    names = [resid_hook(0), *component_hooks(model), fin, "ln_final.hook_scale"]
    names += [z_hook(layer) for layer in range(n_layers)] if heads else []
    _, acts = run_cached(model, pairs.clean, names)
    r = torch.arange(len(pairs))
    at = {k: v[r, pairs.answer] for k, v in acts.items()}  # [pair, ...]
    comps = torch.stack([at[resid_hook(0)]] + [at[h] for h in component_hooks(model)], 1)  # [pair, comp, d]
    total = at[fin]
    scale = at["ln_final.hook_scale"].reshape(len(pairs), 1, -1)[..., :1]  # [pair, 1, 1]
    ro = arch.readout(model)
    dw = (ro.weight[:, pairs.target] - ro.weight[:, pairs.foil]).T.float()  # [pair, d]
    db = torch.zeros(len(pairs)) if ro.bias is None else (ro.bias[pairs.target] - ro.bias[pairs.foil]).float()

    def frozen(x: Tensor) -> Tensor:  # [pair, k, d] -> pre(x) with the scale of the clean run
        with torch.no_grad(), model.hooks(fwd_hooks=[("ln_final.hook_scale", lambda t, hook: scale)]):
            return ro.pre(x).float()

    zero = frozen(torch.zeros_like(comps[:, :1]))  # [pair, 1, d]
    contrib = torch.einsum("pkd,pd->pk", frozen(comps) - zero, dw)
    rest = (total - comps.sum(1))[:, None]
    remainder = torch.einsum("pkd,pd->pk", frozen(rest) - zero, dw)[:, 0]
    bias = torch.einsum("pkd,pd->pk", zero, dw)[:, 0] + db
    ld = logit_diff(model, total, pairs)
    head = head_bias = head_mean = None
    note = "" if heads else "no per-head hook points (attn.hook_z)"
    if heads:
        z = torch.stack([at[z_hook(layer)] for layer in range(n_layers)], 1)  # [pair, layer, head, d_head]
        attn = torch.stack([at[f"blocks.{layer}.hook_attn_out"] for layer in range(n_layers)], 1)
        try:
            w_o = model.W_O.detach().float().cpu()  # [layer, head, d_head, d_model]
            outs = torch.einsum("plhe,lhed->plhd", z.float(), w_o)
        except (AttributeError, RuntimeError) as e:  # no stacked W_O of the expected shape
            outs, note = None, f"no per-head output map W_O ({str(e).splitlines()[0][:80]})"
        try:
            b_o = model.b_O.detach().float().cpu()  # [layer, d_model]
        except AttributeError:  # a bias-free output projection
            b_o = torch.zeros(n_layers, model.cfg.d_model)
        err = torch.tensor(float("inf"))
        if outs is not None:
            err = (outs.sum(2) + b_o - attn).abs().max() / attn.abs().max().clamp(min=1e-12)
        if outs is None:
            pass
        elif err <= 1e-4:  # fp32 sums of d_head products: ~1e-6 relative; anything larger is a different map
            flat = outs.reshape(len(pairs), -1, outs.shape[-1])
            head = torch.einsum("pkd,pd->pk", frozen(flat) - zero, dw).reshape(outs.shape[:3])
            head_bias = torch.einsum("pkd,pd->pk", frozen(b_o.expand(len(pairs), -1, -1)) - zero, dw)
            head_mean = head.mean(0)
        else:
            note = f"the heads' z @ W_O + b_O differ from hook_attn_out by {float(err):.2g} (relative): not shown"
    total_err = (contrib.sum(1) + bias + remainder - ld).abs().max()
    return DirectLogitAttribution(
        components=("embed", *component_names(model)),
        contribution=contrib,
        readout_bias=bias,
        remainder=remainder,
        logit_diff=ld,
        head=head,
        head_bias=head_bias,
        contribution_mean=contrib.mean(0),
        head_mean=head_mean,
        identity_error=float(total_err),
        remainder_max=float(remainder.abs().max()),
        head_note=note,
    )


# -- sources: clean and corrupt activations, ablation values ------------------------------------------------


def activations(model, batch: TokenBatch, names: Sequence[str]) -> dict[str, Tensor]:
    """Activations of the unmodified run at ``names`` (``[pair, pos, ...]``, on the CPU)."""
    _, acts = run_cached(model, batch, names)
    return {k: v.detach().float().cpu() for k, v in acts.items()}


ABLATIONS = ("zero", "mean", "resample")


def donors(index, n_reference: int, seed: int) -> np.ndarray:
    """The reference pair (``0 .. n_reference - 1``: the first pairs of the stream) each pair (by global
    ``index``) takes its resample-ablation activations from: a seeded hash of the pair's global index
    (:func:`mechlens.stats.streaming.priorities`), never the pair itself, so a pair's donor does not
    depend on its batch or rank."""
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    h = priorities(idx, seed)
    if n_reference < 2:
        return np.zeros(len(idx), dtype=np.int64)
    own = idx < n_reference  # a reference pair: one of the other n_reference - 1
    other = (h % np.uint64(n_reference - 1)).astype(np.int64)
    other = np.where(other >= idx, other + 1, other)
    return np.where(own, other, (h % np.uint64(n_reference)).astype(np.int64))


def _to_width(x: Tensor, width: int, fill) -> Tensor:
    """``x[pair, pos, ...]`` cut or padded (with ``fill``, broadcast) to ``width`` columns."""
    if x.shape[1] >= width:
        return x[:, :width]
    pad = torch.as_tensor(fill, dtype=x.dtype).expand(x.shape[0], width - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], 1)


def ablation_sources(
    acts: dict[str, Tensor],
    batch: TokenBatch,
    method: str,
    seed: int,
    index=None,
    reference: tuple[dict[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """What each ablation writes: ``zero``; ``mean``: the mean over the reference batch's (the clean
    prompts of the first pairs of the stream; default: this batch) text tokens; ``resample``: the
    activation at the same column of a donor pair of the reference batch (:func:`donors` of the pairs'
    global ``index``, default ``0 .. n - 1``; a column the donor lacks gets the mean). ``reference``:
    ``(activations, text_mask)`` of the reference batch."""
    ref_acts, ref_valid = reference if reference is not None else (acts, batch.text_mask)
    ref_valid = ref_valid.cpu()
    n, width = batch.tokens.shape
    index = np.arange(n) if index is None else np.asarray(index)
    donor = torch.as_tensor(donors(index, ref_valid.shape[0], seed))
    out = {}
    for k, a in acts.items():
        ref = ref_acts[k]
        mean = ref[ref_valid].mean(0).expand_as(a)
        if method == "zero":
            out[k] = torch.zeros_like(a)
        elif method == "mean":
            out[k] = mean.clone()
        else:
            other = _to_width(ref[donor], width, 0.0)
            has = _to_width(ref_valid[donor], width, False).reshape(n, width, *([1] * (a.ndim - 2)))
            out[k] = torch.where(has, other, mean)
    return out


# -- part 2: ablation --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ablation:
    """Part 2: each block's attention and MLP output, and each head's ``z``, ablated at every position
    of the clean prompt (zero, mean, resample: :func:`ablation_sources`). ``logprob_drop``: the target's
    log-prob at the answer column, unablated minus ablated (nats; > 0: the component helped); ``kl``:
    ``KL(unablated || ablated)`` of the next-token (or mask) distribution there (nats). Means over pairs
    in ``*_mean``; per pair ``[method, component|layer, (head), pair]``."""

    methods: tuple[str, ...]
    components: tuple[str, ...]
    logprob_drop: Float[Tensor, "method component pair"] = not_in_metrics()
    kl: Float[Tensor, "method component pair"] = not_in_metrics()
    head_logprob_drop: Float[Tensor, "method layer head pair"] | None = not_in_metrics()
    head_kl: Float[Tensor, "method layer head pair"] | None = not_in_metrics()
    logprob_drop_mean: Float[Tensor, "method component"]
    kl_mean: Float[Tensor, "method component"]
    head_logprob_drop_mean: Float[Tensor, "method layer head"] | None
    head_kl_mean: Float[Tensor, "method layer head"] | None


def _effects(model, base: Float[Tensor, "pair d_model"], x: Float[Tensor, "edit pair d_model"], target: Tensor):
    """(target log-prob drop, KL(base || x)) for every edit and pair."""
    ref = log_probs(model, base)  # [pair, vocab]
    lp = log_probs(model, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)
    r = torch.arange(len(target))
    drop = ref[r, target][None] - lp[:, r, target]
    kl = (ref.exp()[None] * (ref[None] - lp)).sum(-1)
    return drop, kl


def ablation(
    model,
    pairs: PromptPairs,
    clean: dict[str, Tensor],
    *,
    seed: int = 0,
    rows_per_forward: int = 512,
    index=None,
    reference: tuple[dict[str, Tensor], Tensor] | None = None,
) -> Ablation:
    """Part 2 on the clean prompts (``clean``: their activations at :func:`all_hooks`; ``index`` and
    ``reference``: the pairs' global indices and the reference batch, :func:`ablation_sources`)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = has_heads(model)
    base = run_edits(model, pairs.clean, pairs.answer, [Edit(None)], {})[0]
    drops, kls, hdrops, hkls = [], [], [], []
    edits = [Edit(h) for h in component_hooks(model)]
    hedits = [Edit(z_hook(layer), head) for layer in range(n_layers) for head in range(n_heads)] if heads else []
    for method in ABLATIONS:
        src = ablation_sources(clean, pairs.clean, method, seed, index, reference)
        x = run_edits(model, pairs.clean, pairs.answer, edits + hedits, src, rows_per_forward)
        d, k = _effects(model, base, x, pairs.target)
        drops.append(d[: len(edits)])
        kls.append(k[: len(edits)])
        if heads:
            hdrops.append(d[len(edits) :].reshape(n_layers, n_heads, -1))
            hkls.append(k[len(edits) :].reshape(n_layers, n_heads, -1))
    drop, kl = torch.stack(drops), torch.stack(kls)
    hd = torch.stack(hdrops) if heads else None
    hk = torch.stack(hkls) if heads else None
    return Ablation(
        methods=ABLATIONS,
        components=tuple(component_names(model)),
        logprob_drop=drop,
        kl=kl,
        head_logprob_drop=hd,
        head_kl=hk,
        logprob_drop_mean=drop.mean(-1),
        kl_mean=kl.mean(-1),
        head_logprob_drop_mean=None if hd is None else hd.mean(-1),
        head_kl_mean=None if hk is None else hk.mean(-1),
    )


# -- part 3: activation patching ----------------------------------------------------------------------------

GRIDS = ("resid_pre", "attn_out", "mlp_out")


def grid_hook(grid: str, layer: int) -> str:
    return resid_hook(layer) if grid == "resid_pre" else f"blocks.{layer}.hook_{grid}"


@dataclasses.dataclass(frozen=True)
class Patching:
    """Part 3, one direction. ``denoise``: the corrupt prompt is run with one clean activation patched in;
    ``noise``: the clean prompt with one corrupt activation. ``dld[grid][layer, pos, pair]``: the change
    of ``LD`` at the answer column (patched minus unpatched run; NaN at columns a pair does not have),
    for ``blocks.{l}.hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out`` at one position each, and
    ``head_dld[layer, head, pair]`` for one head's ``z`` at every position. ``restored`` is the fraction of
    the clean-minus-corrupt gap restored, ``(mean LD_patched - mean LD_corrupt) / (mean LD_clean - mean
    LD_corrupt)`` over the pairs that have the cell (1: the patched run behaves like the clean one, 0:
    like the corrupt one; ratio of means, stable when single pairs have small gaps). ``n_rows``,
    ``n_forwards``, ``seconds``: the cost (patched rows, forward passes, wall time)."""

    direction: str
    answer: Int[Tensor, " pair"] = not_in_metrics()
    ld_clean: Float[Tensor, " pair"] = not_in_metrics()
    ld_corrupt: Float[Tensor, " pair"] = not_in_metrics()
    dld: dict[str, Float[Tensor, "layer pos pair"]] = not_in_metrics()
    head_dld: Float[Tensor, "layer head pair"] | None = not_in_metrics()
    restored: dict[str, list]
    head_restored: Float[Tensor, "layer head"] | None
    gap: float
    n_rows: int = not_in_metrics()
    n_forwards: int = not_in_metrics()
    seconds: float = not_in_metrics()
    dld_mean: dict[str, Float[Tensor, "layer pos"]] | None = not_in_metrics(default=None)
    head_dld_mean: Float[Tensor, "layer head"] | None = not_in_metrics(default=None)


def _restored(dld: Tensor, base_mean: Tensor, ld_clean: Tensor, ld_corrupt: Tensor, valid: Tensor) -> Tensor:
    """Fraction restored per cell over the pairs that have it; ``dld[..., pair]``, ``valid[pos, pair]``."""
    patched = base_mean + dld  # LD of the patched runs
    w = valid.float() if dld.ndim == 3 else torch.ones(dld.shape[-1])
    num = torch.nansum(patched * w, -1) / w.sum(-1) - (ld_corrupt * w).sum(-1) / w.sum(-1)
    den = (ld_clean * w).sum(-1) / w.sum(-1) - (ld_corrupt * w).sum(-1) / w.sum(-1)
    return num / den


def activation_patching(
    model,
    pairs: PromptPairs,
    clean: dict[str, Tensor],
    corrupt: dict[str, Tensor],
    direction: str = "denoise",
    rows_per_forward: int = 512,
) -> Patching:
    """Part 3 (``clean``/``corrupt``: activations at :func:`all_hooks`)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    width = pairs.clean.tokens.shape[1]
    base, src = (pairs.corrupt, clean) if direction == "denoise" else (pairs.clean, corrupt)
    t0 = time.perf_counter()
    ends = run_edits(model, pairs.clean, pairs.answer, [Edit(None)], {})[0]
    endk = run_edits(model, pairs.corrupt, pairs.answer, [Edit(None)], {})[0]
    ld_clean, ld_corrupt = logit_diff(model, ends, pairs), logit_diff(model, endk, pairs)
    ld_base = ld_corrupt if direction == "denoise" else ld_clean
    edits = [Edit(grid_hook(g, layer), None, col) for g in GRIDS for layer in range(n_layers) for col in range(width)]
    heads = has_heads(model)
    if heads:
        edits += [Edit(z_hook(layer), head) for layer in range(n_layers) for head in range(n_heads)]
    x = run_edits(model, base, pairs.answer, edits, src, rows_per_forward)
    dld_all = logit_diff(model, x, pairs) - ld_base
    seconds = time.perf_counter() - t0
    valid = pairs.valid
    n_grid = n_layers * width
    dld, restored = {}, {}
    base_mean = ld_base
    for i, g in enumerate(GRIDS):
        d = dld_all[i * n_grid : (i + 1) * n_grid].reshape(n_layers, width, -1)
        d = torch.where(valid[None], d, torch.nan)
        dld[g] = d
        frac = _restored(d, base_mean, ld_clean, ld_corrupt, valid[None].expand_as(d))
        restored[g] = none_where(frac, torch.isnan(frac))
    head_dld = head_restored = None
    if heads:
        head_dld = dld_all[3 * n_grid :].reshape(n_layers, n_heads, -1)
        head_restored = _restored(head_dld, base_mean, ld_clean, ld_corrupt, torch.ones(1))
    per = max(1, rows_per_forward // len(pairs))
    return Patching(
        direction=direction,
        answer=pairs.answer,
        ld_clean=ld_clean,
        ld_corrupt=ld_corrupt,
        dld=dld,
        head_dld=head_dld,
        restored=restored,
        head_restored=head_restored,
        gap=float((ld_clean - ld_corrupt).mean()),
        n_rows=len(edits) * len(pairs),
        n_forwards=-(-len(edits) // per) + 2,
        seconds=seconds,
        dld_mean={g: torch.nanmean(d, -1) for g, d in dld.items()},
        head_dld_mean=None if head_dld is None else head_dld.mean(-1),
    )


# -- part 4: attribution patching ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttributionPatching:
    """Part 4: the first-order estimate of denoising patching, ``(a_clean - a_corrupt) . dLD/da`` with
    the gradient of the corrupt run's ``LD`` at each hook point (one clean forward, one corrupt forward
    and backward): ``dld[grid][layer, pos, pair]`` on part 3's grid (summed over ``d_model``) and
    ``head_dld[layer, head, pair]`` (summed over positions and ``d_head``). ``error``: against exact
    denoising on the same cells, the Pearson correlation and the largest absolute error of the means
    over pairs (``*_cells``: of every cell of every pair); ``speedup``: the exact grid's wall time over
    this part's."""

    dld: dict[str, Float[Tensor, "layer pos pair"]] = not_in_metrics()
    head_dld: Float[Tensor, "layer head pair"] | None = not_in_metrics()
    correlation: float
    max_abs_error: float
    correlation_cells: float
    max_abs_error_cells: float
    n_cells: int
    seconds: float = not_in_metrics()
    speedup: float = not_in_metrics()
    dld_mean: dict[str, Float[Tensor, "layer pos"]] | None = not_in_metrics(default=None)
    head_dld_mean: Float[Tensor, "layer head"] | None = not_in_metrics(default=None)


def attribution_patching(model, pairs: PromptPairs, clean: dict[str, Tensor], exact: Patching) -> AttributionPatching:
    """Part 4, with its error against ``exact`` (part 3, denoising)."""
    n_layers = model.cfg.n_layers
    heads = has_heads(model)
    t0 = time.perf_counter()
    names = [grid_hook(g, layer) for g in GRIDS for layer in range(n_layers)]
    names += [z_hook(layer) for layer in range(n_layers)] if heads else []
    device = next(model.parameters()).device
    store: dict[str, Tensor] = {}

    def keep(act: Tensor, hook, name: str) -> Tensor:
        if not act.requires_grad:
            act = act.detach().requires_grad_(True)
        store[name] = act
        return act

    captured: list[Tensor] = []
    capture = _capture_hook(torch.arange(len(pairs), device=device), pairs.answer.to(device), captured)
    hooks = [(n, lambda a, hook, n=n: keep(a, hook, n)) for n in dict.fromkeys(names)] + [(final_hook(model), capture)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        with contextlib.suppress(_Stop):
            model(pairs.corrupt.tokens.to(device), attention_mask=pairs.corrupt.attention_mask.to(device))
        ro = arch.readout(model)
        h = ro.pre(captured[0])
        w = ro.weight[:, pairs.target.to(device)] - ro.weight[:, pairs.foil.to(device)]
        ld = (h * w.T).sum()
        keys = list(store)
        grads = dict(zip(keys, torch.autograd.grad(ld, [store[k] for k in keys]), strict=True))
    grads = {k: v.detach().float().cpu() for k, v in grads.items()}
    cor = {k: v.detach().float().cpu() for k, v in store.items()}
    valid = pairs.valid
    dld = {}
    for g in GRIDS:
        per_layer = [
            ((clean[grid_hook(g, layer)] - cor[grid_hook(g, layer)]) * grads[grid_hook(g, layer)]).sum(-1)
            for layer in range(n_layers)
        ]  # [pair, pos] each
        d = torch.stack(per_layer).transpose(1, 2)  # [layer, pos, pair]
        dld[g] = torch.where(valid[None], d, torch.nan)
    head_dld = None
    if heads:
        head_dld = torch.stack(
            [
                ((clean[z_hook(layer)] - cor[z_hook(layer)]) * grads[z_hook(layer)]).sum((1, 3)).T
                for layer in range(n_layers)
            ]
        )
    seconds = time.perf_counter() - t0
    approx = torch.cat([dld[g].flatten(0, 1) for g in GRIDS] + ([head_dld.flatten(0, 1)] if heads else []))
    ex = torch.cat([exact.dld[g].flatten(0, 1) for g in GRIDS] + ([exact.head_dld.flatten(0, 1)] if heads else []))
    ok = ~torch.isnan(ex).any(-1)  # cells every pair has
    a_mean, e_mean = approx[ok].mean(-1).double(), ex[ok].mean(-1).double()
    cells = ~torch.isnan(ex)
    a_all, e_all = approx[cells].double(), ex[cells].double()
    return AttributionPatching(
        dld=dld,
        head_dld=head_dld,
        correlation=_pearson(a_mean, e_mean),
        max_abs_error=float((a_mean - e_mean).abs().max()),
        correlation_cells=_pearson(a_all, e_all),
        max_abs_error_cells=float((a_all - e_all).abs().max()),
        n_cells=int(ok.sum()),
        seconds=seconds,
        speedup=exact.seconds / max(seconds, 1e-9),
        dld_mean={g: torch.nanmean(d, -1) for g, d in dld.items()},
        head_dld_mean=None if head_dld is None else head_dld.mean(-1),
    )


def _pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation; 1.0 when both are constant and equal, 0.0 when one is constant."""
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    if den == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float((a * b).sum()) / den
