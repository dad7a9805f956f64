"""Study 6 at corpus scale: pairs stream in batches, per-pair values feed accumulators whose memory does
not grow with the number of pairs, ranks merge them, and the bootstrap reads the kept pairs.

Each batch of pairs (``--batch-size``, this rank's share: :func:`mechlens.data.shard`) runs the four parts
of :mod:`.parts`; every per-pair value (DLA contributions, ablation effects, the patching and attribution
grids padded to the stream's widest pair with NaN) is packed into one float64 row per pair. The rows
feed a :class:`~mechlens.stats.streaming.Moments` (means over every pair; NaN = the pair lacks the cell),
a fixed-slot :class:`~mechlens.stats.streaming.Reservoir` of ``--reservoir`` rows (the pairs the
bootstrap intervals and ``samples()`` read; seeded by global pair index, so every model of a run and
every world size keeps the same pairs), the largest errors (:class:`Maxima`) and the sufficient
statistics of the attribution-vs-exact correlation over every cell of every pair
(:class:`~mechlens.stats.streaming.NormalEquations`). :func:`mechlens.distributed.share_then_merge`
merges them across ranks under torchrun.

The mean and resample ablations read a fixed **reference batch**: the first ``--batch-size`` pairs of
the stream (:func:`.parts.ablation_sources`), the same for every batch and rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechlens import distributed
from mechlens.data import batched, shard
from mechlens.result import none_where, not_in_metrics
from mechlens.stats.bootstrap import mean_intervals, ratio_intervals
from mechlens.stats.streaming import Moments, NormalEquations, Reservoir
from mechlens.studies.interventions.parts import (
    ABLATIONS,
    GRIDS,
    Ablation,
    AttributionPatching,
    DirectLogitAttribution,
    Patching,
    PromptPairs,
    RawPair,
    ablation,
    activation_patching,
    activations,
    all_hooks,
    attribution_patching,
    component_names,
    direct_logit_attribution,
    encode_pairs,
    has_heads,
)

CONFIDENCE = 0.95
BOOTSTRAP_METHOD = "percentile"  # as mechlens.comparison's default


class Maxima:
    """The largest value seen of each named quantity (NaN propagates: a NaN is an error, never skipped);
    merged across ranks by gathering (``reduce = "gather"``, :func:`mechlens.distributed.merge`)."""

    reduce: ClassVar[str] = "gather"

    def __init__(self, names: Iterable[str]):
        self.values = dict.fromkeys(names, 0.0)

    def update(self, **values: float) -> Maxima:
        for k, v in values.items():
            cur, v = self.values[k], float(v)
            self.values[k] = math.nan if math.isnan(cur) or math.isnan(v) else max(cur, v)
        return self

    def merge(self, other: Maxima) -> Maxima:
        return self.update(**other.values)

    def state(self) -> dict[str, Any]:
        return {"values": dict(self.values)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Maxima:
        out = cls(state["values"])
        out.values = dict(state["values"])
        return out


# -- one batch -> one row per pair --------------------------------------------------------------------------


def _pad(x: Tensor, width: int, axis: int) -> Tensor:
    """``x`` padded with NaN to ``width`` along ``axis`` (a batch narrower than the stream's widest pair)."""
    if x.shape[axis] >= width:
        return x
    shape = list(x.shape)
    shape[axis] = width - x.shape[axis]
    return torch.cat([x, torch.full(shape, torch.nan, dtype=x.dtype)], axis)


def pair_values(
    dla, abl: Ablation, den: Patching, noi: Patching, att: AttributionPatching, pp: PromptPairs, width: int
) -> dict[str, Tensor]:
    """Every per-pair value of one batch's parts, pair axis first, positions padded to ``width``."""
    valid = pp.valid.T  # [pair, pos]
    gap = den.ld_clean - den.ld_corrupt
    out = {
        "answer": pp.answer.double(),
        "ld_clean": den.ld_clean,
        "ld_corrupt": den.ld_corrupt,
        "gap_pos": _pad(torch.where(valid, gap[:, None], torch.nan), width, 1),
        "abl_drop": abl.logprob_drop.permute(2, 0, 1),
        "abl_kl": abl.kl.permute(2, 0, 1),
    }
    if abl.head_logprob_drop is not None:
        out["abl_head_drop"] = abl.head_logprob_drop.permute(3, 0, 1, 2)
        out["abl_head_kl"] = abl.head_kl.permute(3, 0, 1, 2)
    if dla is not None:
        out.update(
            dla_contribution=dla.contribution,
            dla_readout_bias=dla.readout_bias,
            dla_remainder=dla.remainder,
            dla_logit_diff=dla.logit_diff,
        )
        if dla.head is not None:
            out.update(dla_head=dla.head, dla_head_bias=dla.head_bias)
    for name, part in (("denoise", den), ("noise", noi), ("attribution", att)):
        for g in GRIDS:
            out[f"{name}_{g}"] = _pad(part.dld[g].permute(2, 0, 1), width, 2)
        if part.head_dld is not None:
            out[f"{name}_head"] = part.head_dld.permute(2, 0, 1)
    return {k: v.detach().double().cpu() for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each per-pair quantity sits in a packed row: name -> (start, shape)."""

    slots: dict[str, tuple[int, tuple[int, ...]]]
    size: int

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> Layout:
        slots, start = {}, 0
        for k, shape in shapes.items():
            slots[k] = (start, tuple(shape))
            start += math.prod(shape)
        return cls(slots, start)

    def pack(self, values: dict[str, Tensor], n: int) -> np.ndarray:
        """``[pair, size]``: NaN where a batch lacks a quantity (e.g. a head map it could not verify)."""
        rows = np.full((n, self.size), np.nan)
        for k, (start, shape) in self.slots.items():
            if k in values:
                rows[:, start : start + math.prod(shape)] = values[k].reshape(n, -1).numpy()
        return rows

    def unpack(self, rows: np.ndarray) -> dict[str, Tensor]:
        """``rows[..., size]`` -> name -> ``[..., *shape]``."""
        lead = rows.shape[:-1]
        return {
            k: torch.from_numpy(np.ascontiguousarray(rows[..., s : s + math.prod(sh)])).reshape((*lead, *sh))
            for k, (s, sh) in self.slots.items()
        }


def layout_for(model, width: int, with_dla: bool, dla_heads: bool) -> Layout:
    """The packed row of :func:`pair_values` for ``model`` and a stream ``width`` columns wide."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    c, lh, heads = 2 * n_layers, (n_layers, n_heads), has_heads(model)
    shapes: dict[str, tuple[int, ...]] = {
        "answer": (),
        "ld_clean": (),
        "ld_corrupt": (),
        "gap_pos": (width,),
        "abl_drop": (3, c),
        "abl_kl": (3, c),
    }
    if heads:
        shapes.update(abl_head_drop=(3, *lh), abl_head_kl=(3, *lh))
    if with_dla:
        shapes.update(dla_contribution=(c + 1,), dla_readout_bias=(), dla_remainder=(), dla_logit_diff=())
        if dla_heads:
            shapes.update(dla_head=lh, dla_head_bias=(n_layers,))
    for name in ("denoise", "noise", "attribution"):
        shapes.update({f"{name}_{g}": (n_layers, width) for g in GRIDS})
        if heads:
            shapes[f"{name}_head"] = lh
    return Layout.of(shapes)


# -- the stream ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Costs:
    """Summed over this rank's batches (timings are local: not merged)."""

    rows: dict[str, int] = dataclasses.field(default_factory=lambda: {"denoise": 0, "noise": 0})
    forwards: dict[str, int] = dataclasses.field(default_factory=lambda: {"denoise": 0, "noise": 0})
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"denoise": 0.0, "noise": 0.0, "attribution": 0.0}
    )


def stream_width(model, raw: Callable[[], Iterable[RawPair]], batch_size: int, source: str) -> int:
    """The widest pair of the stream (every pair is checked and encoded, batch by batch; no forward)."""
    width, start = 0, 0
    for chunk in batched(raw(), batch_size):
        pp = encode_pairs(model, chunk, source, offset=start)
        width, start = max(width, pp.clean.tokens.shape[1]), start + len(chunk)
    return width


@dataclasses.dataclass
class Stream:
    """The accumulated statistics of a stream of pairs (after :func:`accumulate`, merged over ranks)."""

    layout: Layout
    moments: Moments
    kept: Reservoir
    maxima: Maxima
    cells: NormalEquations
    costs: Costs
    head_note: str


def accumulate(
    model,
    raw: Callable[[], Iterable[RawPair]],
    source: str,
    *,
    batch_size: int,
    reservoir: int,
    seed: int,
    rows_per_forward: int,
    with_dla: bool,
) -> Stream:
    """Run the four parts on this rank's share of the pairs, batch by batch, and merge across ranks."""
    width = stream_width(model, raw, batch_size, source)
    names = all_hooks(model)
    ref = encode_pairs(model, list(itertools.islice(raw(), batch_size)), source)
    reference = (activations(model, ref.clean, names), ref.clean.text_mask.cpu())

    def batch_values(pp: PromptPairs, index: np.ndarray) -> tuple[dict[str, Tensor], Any, AttributionPatching]:
        dla = direct_logit_attribution(model, pp) if with_dla else None
        clean, corrupt = activations(model, pp.clean, names), activations(model, pp.corrupt, names)
        abl = ablation(model, pp, clean, seed=seed, rows_per_forward=rows_per_forward, index=index, reference=reference)
        den = activation_patching(model, pp, clean, corrupt, "denoise", rows_per_forward)
        noi = activation_patching(model, pp, clean, corrupt, "noise", rows_per_forward)
        att = attribution_patching(model, pp, clean, den)
        for name, part in (("denoise", den), ("noise", noi)):
            costs.rows[name] += part.n_rows
            costs.forwards[name] += part.n_forwards
            costs.seconds[name] += part.seconds
        costs.seconds["attribution"] += att.seconds
        return pair_values(dla, abl, den, noi, att, pp, width), dla, att

    costs = Costs()
    first_dla = direct_logit_attribution(model, ref) if with_dla else None
    layout = layout_for(model, width, with_dla, first_dla is not None and first_dla.head is not None)
    moments, kept = Moments((layout.size,)), Reservoir(reservoir, seed)
    maxima, cells = Maxima(("identity_error", "remainder_max", "max_abs_error_cells")), NormalEquations(1)
    with distributed.share_then_merge(moments, kept, maxima, cells):
        for chunk in batched(shard(raw()), batch_size):
            index = np.asarray([i for i, _ in chunk], dtype=np.int64)
            pp = encode_pairs(model, [p for _, p in chunk], source, offset=int(index[0]))
            values, dla, _ = batch_values(pp, index)
            rows = layout.pack(values, len(pp))
            moments.update(rows, mask=~np.isnan(rows))
            kept.update(index, rows)
            if dla is not None:
                maxima.update(identity_error=dla.identity_error, remainder_max=dla.remainder_max)
            a = torch.cat(
                [values[f"attribution_{g}"].flatten() for g in GRIDS]
                + ([values["attribution_head"].flatten()] if "attribution_head" in values else [])
            )
            e = torch.cat(
                [values[f"denoise_{g}"].flatten() for g in GRIDS]
                + ([values["denoise_head"].flatten()] if "denoise_head" in values else [])
            )
            ok = ~torch.isnan(e)
            cells.update(a[ok], e[ok])
            maxima.update(max_abs_error_cells=float((a[ok] - e[ok]).abs().max()) if ok.any() else 0.0)
    note = first_dla.head_note if first_dla is not None else ""
    return Stream(layout, moments, kept, maxima, cells, costs, note)


# -- the merged statistics -> the typed parts, with intervals ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Intervals:
    """Bootstrap intervals over pairs (:func:`scipy.stats.bootstrap`, ``method`` at ``confidence``) of every
    effect that is a mean over pairs, from the ``n_kept`` pairs the reservoir kept (all pairs when
    ``n_kept == n_pairs``; otherwise a seeded uniform sample of them, so the intervals are those of
    ``n_kept`` pairs: wider than the means' true uncertainty). Each interval is ``[low, high]``
    (``None`` where undefined: fewer than 2 pairs, a constant gap of 0). ``dla`` ``[component]``,
    ``dla_head`` ``[layer, head]``; ``ablation_logprob_drop`` / ``ablation_kl`` ``[method, component]``,
    ``ablation_head_logprob_drop`` ``[method, layer, head]``; ``{denoise,noise}_restored[grid]``
    ``[layer, pos]`` and ``*_head_restored`` ``[layer, head]``: the fraction restored (a ratio of means:
    numerator and gap resampled together); ``attribution_dld[grid]`` ``[layer, pos]`` and
    ``attribution_head_dld`` ``[layer, head]``: part 4's estimate of the change of ``LD``."""

    confidence: float
    method: str
    n_resamples: int
    n_kept: int
    pair_index: Int[Tensor, " kept"] = not_in_metrics()
    dla: list | None
    dla_head: list | None
    ablation_logprob_drop: list
    ablation_kl: list
    ablation_head_logprob_drop: list | None
    denoise_restored: dict[str, list]
    denoise_head_restored: list | None
    noise_restored: dict[str, list]
    noise_head_restored: list | None
    attribution_dld: dict[str, list]
    attribution_head_dld: list | None


def _cells(x: Tensor) -> list[np.ndarray]:
    """``x[kept, *shape]`` -> one array of the pairs that have it per cell (NaN left out), cells in C order."""
    flat = x.reshape(x.shape[0], -1).numpy()
    return [col[~np.isnan(col)] for col in flat.T]


def _shaped(cis: Sequence[tuple[float | None, float | None]], shape: tuple[int, ...]) -> list:
    arr = np.empty((len(cis), 2), dtype=object)
    arr[:] = [list(c) for c in cis] if cis else arr
    return arr.reshape(*shape, 2).tolist()


def _mean_ci(x: Tensor | None, n_resamples: int, seed: int) -> list | None:
    if x is None:
        return None
    return _shaped(mean_intervals(_cells(x), CONFIDENCE, n_resamples, BOOTSTRAP_METHOD, seed), tuple(x.shape[1:]))


def _ratio_ci(dld: Tensor | None, gap: Tensor, noise: bool, n_resamples: int, seed: int) -> list | None:
    """Intervals of the fraction restored per cell: ``mean(num) / mean(gap)`` over the pairs that have the
    cell, ``num = dld`` (denoise) or ``gap + dld`` (noise)."""
    if dld is None:
        return None
    g = gap.reshape(-1, *([1] * (dld.ndim - 1))).expand_as(dld)
    num = g + dld if noise else dld
    keep = ~torch.isnan(dld)
    nums = [
        n[k] for n, k in zip(num.reshape(len(num), -1).T.numpy(), keep.reshape(len(num), -1).T.numpy(), strict=True)
    ]
    dens = [d[k] for d, k in zip(g.reshape(len(g), -1).T.numpy(), keep.reshape(len(num), -1).T.numpy(), strict=True)]
    return _shaped(ratio_intervals(nums, dens, CONFIDENCE, n_resamples, BOOTSTRAP_METHOD, seed), tuple(dld.shape[1:]))


def _pearson_of(ne: NormalEquations) -> float:
    n, sa, saa = (float(v) for v in (ne.xtx[0, 0], ne.xtx[0, 1], ne.xtx[1, 1]))
    se, sae, see = float(ne.xty[0]), float(ne.xty[1]), float(ne.yty)
    if n == 0:
        return math.nan
    va, ve, cov = saa / n - (sa / n) ** 2, see / n - (se / n) ** 2, sae / n - sa * se / n**2
    if va <= 0 or ve <= 0:
        return 1.0 if va <= 0 and ve <= 0 else 0.0
    return cov / math.sqrt(va * ve)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return (1.0 if np.array_equal(a, b) else 0.0) if den == 0.0 else float((a * b).sum()) / den


def finish(model, s: Stream, *, n_resamples: int, seed: int):
    """The typed parts from the merged statistics: means over every pair, per-pair fields over the kept
    pairs (pair axis = ``intervals.pair_index``), and the :class:`Intervals`."""
    lay = s.layout
    mean = lay.unpack(s.moments.mean)
    count = lay.unpack(s.moments.count.numpy())
    kept = lay.unpack(s.kept.rows)
    n_total = int(count["ld_clean"])
    f32 = {k: v.float() for k, v in mean.items()}
    gap = float(mean["ld_clean"] - mean["ld_corrupt"])
    gap_pos = mean["gap_pos"]  # [pos]
    k_gap = kept["ld_clean"] - kept["ld_corrupt"]

    dla = None
    if "dla_contribution" in kept:
        dla = DirectLogitAttribution(
            components=("embed", *component_names(model)),
            contribution=kept["dla_contribution"].float(),
            readout_bias=kept["dla_readout_bias"].float(),
            remainder=kept["dla_remainder"].float(),
            logit_diff=kept["dla_logit_diff"].float(),
            head=kept["dla_head"].float() if "dla_head" in kept else None,
            head_bias=kept["dla_head_bias"].float() if "dla_head" in kept else None,
            contribution_mean=f32["dla_contribution"],
            head_mean=f32["dla_head"] if "dla_head" in kept else None,
            identity_error=s.maxima.values["identity_error"],
            remainder_max=s.maxima.values["remainder_max"],
            head_note=s.head_note,
        )
    heads = "abl_head_drop" in kept
    abl = Ablation(
        methods=ABLATIONS,
        components=tuple(component_names(model)),
        logprob_drop=kept["abl_drop"].permute(1, 2, 0).float(),
        kl=kept["abl_kl"].permute(1, 2, 0).float(),
        head_logprob_drop=kept["abl_head_drop"].permute(1, 2, 3, 0).float() if heads else None,
        head_kl=kept["abl_head_kl"].permute(1, 2, 3, 0).float() if heads else None,
        logprob_drop_mean=f32["abl_drop"],
        kl_mean=f32["abl_kl"],
        head_logprob_drop_mean=f32["abl_head_drop"] if heads else None,
        head_kl_mean=f32["abl_head_kl"] if heads else None,
    )

    def patching(direction: str) -> Patching:
        dld_mean = {g: mean[f"{direction}_{g}"] for g in GRIDS}
        restored = {}
        for g, m in dld_mean.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = (m / gap_pos + (1.0 if direction == "noise" else 0.0)).float()
            restored[g] = none_where(frac, torch.isnan(frac))
        hm = mean.get(f"{direction}_head")
        hr = None if hm is None else (hm / gap + (1.0 if direction == "noise" else 0.0)).float()
        return Patching(
            direction=direction,
            answer=kept["answer"].long(),
            ld_clean=kept["ld_clean"].float(),
            ld_corrupt=kept["ld_corrupt"].float(),
            dld={g: kept[f"{direction}_{g}"].permute(1, 2, 0).float() for g in GRIDS},
            head_dld=kept[f"{direction}_head"].permute(1, 2, 0).float() if hm is not None else None,
            restored=restored,
            head_restored=hr,
            gap=gap,
            n_rows=s.costs.rows[direction],
            n_forwards=s.costs.forwards[direction],
            seconds=s.costs.seconds[direction],
            dld_mean={g: v.float() for g, v in dld_mean.items()},
            head_dld_mean=None if hm is None else hm.float(),
        )

    den, noi = patching("denoise"), patching("noise")
    keys = [f"{{}}_{g}" for g in GRIDS] + (["{}_head"] if "denoise_head" in mean else [])
    a_mean = torch.cat([mean[k.format("attribution")].flatten() for k in keys]).numpy()
    e_mean = torch.cat([mean[k.format("denoise")].flatten() for k in keys]).numpy()
    full = torch.cat([count[k.format("denoise")].flatten() for k in keys]).numpy() == n_total  # every pair has it
    att = AttributionPatching(
        dld={g: kept[f"attribution_{g}"].permute(1, 2, 0).float() for g in GRIDS},
        head_dld=kept["attribution_head"].permute(1, 2, 0).float() if "attribution_head" in kept else None,
        correlation=_pearson(a_mean[full], e_mean[full]),
        max_abs_error=float(np.abs(a_mean[full] - e_mean[full]).max()),
        correlation_cells=_pearson_of(s.cells),
        max_abs_error_cells=s.maxima.values["max_abs_error_cells"],
        n_cells=int(full.sum()),
        seconds=s.costs.seconds["attribution"],
        speedup=s.costs.seconds["denoise"] / max(s.costs.seconds["attribution"], 1e-9),
        dld_mean={g: f32[f"attribution_{g}"] for g in GRIDS},
        head_dld_mean=f32.get("attribution_head"),
    )
    ci = Intervals(
        confidence=CONFIDENCE,
        method=BOOTSTRAP_METHOD,
        n_resamples=n_resamples,
        n_kept=len(s.kept),
        pair_index=torch.from_numpy(s.kept.index.copy()),
        dla=_mean_ci(kept.get("dla_contribution"), n_resamples, seed),
        dla_head=_mean_ci(kept.get("dla_head"), n_resamples, seed),
        ablation_logprob_drop=_mean_ci(kept["abl_drop"], n_resamples, seed),
        ablation_kl=_mean_ci(kept["abl_kl"], n_resamples, seed),
        ablation_head_logprob_drop=_mean_ci(kept.get("abl_head_drop"), n_resamples, seed),
        denoise_restored={g: _ratio_ci(kept[f"denoise_{g}"], k_gap, False, n_resamples, seed) for g in GRIDS},
        denoise_head_restored=_ratio_ci(kept.get("denoise_head"), k_gap, False, n_resamples, seed),
        noise_restored={g: _ratio_ci(kept[f"noise_{g}"], k_gap, True, n_resamples, seed) for g in GRIDS},
        noise_head_restored=_ratio_ci(kept.get("noise_head"), k_gap, True, n_resamples, seed),
        attribution_dld={g: _mean_ci(kept[f"attribution_{g}"], n_resamples, seed) for g in GRIDS},
        attribution_head_dld=_mean_ci(kept.get("attribution_head"), n_resamples, seed),
    )
    return n_total, float(mean["ld_clean"]), float(mean["ld_corrupt"]), dla, abl, den, noi, att, ci
