"""Forward passes through TransformerLens hook points: the one place that calls ``run_with_cache``.

Every call passes the batch's attention mask (correct position ids under left padding; encoders need
it with right padding too), caches only the requested hook points, and runs in mini-batches with a
progress bar when asked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from mechlens import progress as _progress
from mechlens.encoding import TokenBatch
from mechlens.errors import MechlensError, NonFiniteError

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge


def iter_cached(
    model: TransformerBridge,
    batch: TokenBatch,
    names: Sequence[str],
    *,
    batch_size: int | None = None,
    logits: bool = False,
    progress: bool | str = False,
) -> Iterator[tuple[slice, Float[Tensor, "batch pos d_vocab"] | None, dict[str, Tensor]]]:
    """Yield ``(rows, logits or None, {name: activation})`` per mini-batch of ``batch``."""
    n = len(batch)
    size = batch_size or n
    device = next(model.parameters()).device
    wanted = list(dict.fromkeys(names))
    unknown = [w for w in wanted if w not in model.hook_dict]
    if unknown:
        from mechlens import arch

        raise MechlensError(
            f"unknown hook point(s) {unknown}: {arch.missing_hooks(model, unknown)}; see model.hook_dict for the "
            "names this model has"
        )
    starts = range(0, n, size)
    desc = progress if isinstance(progress, str) else "forward"
    bar = _progress.bar(starts, desc, show=bool(progress) and len(starts) > 1, unit="batch")
    with torch.no_grad():
        for start in bar:
            rows = slice(start, min(start + size, n))
            sub = batch.select(rows).to(device)
            out, cache = model.run_with_cache(
                sub.tokens,
                attention_mask=sub.attention_mask,
                names_filter=wanted,
                return_type="logits" if logits else None,
            )
            acts = {w: cache[w] for w in wanted}
            if not all(torch.isfinite(a).all() for a in acts.values()) or (
                out is not None and not torch.isfinite(out).all()
            ):
                raise NonFiniteError(_nonfinite_message(model, sub))
            yield rows, out, acts


def _nonfinite_message(model: TransformerBridge, batch: TokenBatch) -> str:
    """Name the model and the first hook point (in forward order) whose activation is not finite:
    one more forward of the offending mini-batch, caching every hook point."""
    label = getattr(getattr(model, "_mechlens_provenance", None), "model", None) or model.cfg.model_name
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    first = next((name for name, a in cache.items() if not torch.isfinite(a).all()), "the logits")
    return (
        f"NaN or infinite activations in model {label!r}, first at {first}: check the model's weights "
        "and dtype (float16 overflows; load in float32)"
    )


def run_cached(
    model: TransformerBridge,
    batch: TokenBatch,
    names: Sequence[str],
    *,
    batch_size: int | None = None,
    logits: bool = False,
    progress: bool | str = False,
) -> tuple[Float[Tensor, "batch pos d_vocab"] | None, dict[str, Tensor]]:
    """All of :func:`iter_cached`, concatenated along the batch axis."""
    outs, acts = [], {}
    for _, out, a in iter_cached(model, batch, names, batch_size=batch_size, logits=logits, progress=progress):
        if out is not None:
            outs.append(out)
        for k, v in a.items():
            acts.setdefault(k, []).append(v)
    return (torch.cat(outs) if outs else None), {k: torch.cat(v) for k, v in acts.items()}
