"""Tensor utilities vs independent computations (numpy / scipy / a materialised readout)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch

from mechlens.ops import (
    lens_reduce,
    next_token_loss,
    vector_norm,
)
from mechlens.ops.lens_reduce import LinearReadout, tile_shape


def _rng_mask(gen, shape, p=0.7):
    return torch.rand(shape, generator=gen) < p


def test_next_token_loss_matches_numpy_and_masks_with_nan():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 3:] = False
    loss = next_token_loss(logits, tokens, valid)
    lp = scipy.special.log_softmax(logits.numpy().astype(np.float64), axis=-1)
    ref = -np.take_along_axis(lp[:, :-1], tokens.numpy()[:, 1:, None], -1)[..., 0]
    ok = np.isfinite(loss.numpy())
    assert ok.sum() == 3 * 4 - 2  # row 1 loses the predictions of columns 3 and 4
    np.testing.assert_allclose(loss.numpy()[ok], ref[ok], atol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_vector_norm_matches_numpy(p):
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(vector_norm(x, p).numpy(), np.linalg.norm(x.numpy(), ord=p, axis=-1), rtol=1e-6)


def _materialised(resid, w, targets):
    logits = torch.einsum("lbpd,dv->lbpv", resid.double(), w.double())
    lp = torch.log_softmax(logits, -1)
    return lp


@pytest.mark.parametrize("linear", [True, False], ids=["tiled-matmul", "callable"])
def test_lens_reduce_equals_materialised_readout_and_is_chunk_independent(linear):
    g = torch.Generator().manual_seed(4)
    n_layers, batch, pos, d, v = 4, 3, 7, 8, 50
    resid = torch.randn(n_layers, batch, pos, d, generator=g)
    w = torch.randn(d, v, generator=g)
    targets = torch.randint(0, v, (batch, pos), generator=g)
    targets[0, 0] = -1
    rows = torch.ones(batch, pos, dtype=torch.bool)
    rows[2, 5:] = False
    lp = _materialised(resid, w, targets)

    readout = LinearReadout(pre=lambda x: x, weight=w) if linear else (lambda x: x @ w)
    # tiles of 1 position x 1 column; 1 x 21 (a partial last tile); 3 positions x all 50; one tile
    budgets = (1, 3 * 4 * 4 * 21, 3 * 4 * 4 * 3 * 50, 10**9)
    results = [
        lens_reduce(resid, readout, targets=targets, rows=rows, k=3, kl_to_final=True, max_chunk_bytes=b)
        for b in budgets
    ]
    assert tile_shape(n_layers, v, 1, "cpu") == (1, 1)
    assert tile_shape(n_layers, v, budgets[1], "cpu") == (1, 21)
    assert tile_shape(n_layers, v, budgets[2], "cpu") == (3, 50)
    # few positions in all: wider vocabulary tiles within the same 4 MiB CPU tile (tiny-mlm's lens)
    assert tile_shape(7, 50262, 128 * 2**20, "cpu") == (146, 1024)
    assert tile_shape(7, 50262, 128 * 2**20, "cpu", n_positions=16) == (16, 2**20 // (7 * 16))
    for st in results:
        keep = rows[None].expand(n_layers, -1, -1)
        ref_lp, ref_id = lp.topk(3, -1)
        assert torch.equal(st.topk_ids[keep], ref_id[keep])
        torch.testing.assert_close(st.topk_logprobs[keep].double(), ref_lp[keep], atol=1e-5, rtol=0)
        ent = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(st.entropy[keep].double(), ent[keep], atol=1e-5, rtol=0)
        t = targets.clamp(min=0)[None, ..., None].expand(n_layers, -1, -1, 1)
        t_lp = lp.gather(-1, t)[..., 0]
        has = keep & (targets >= 0)[None]
        torch.testing.assert_close(st.target_logprob[has].double(), t_lp[has], atol=1e-5, rtol=0)
        # rank by sorting: position of the target in the descending order (no ties in random data)
        order = lp.argsort(-1, descending=True)
        rank = (order == t).nonzero()[:, -1].reshape(n_layers, batch, pos)
        assert torch.equal(st.target_rank[has], rank[has])
        assert torch.isnan(st.target_logprob[:, 0, 0]).all() and (st.target_rank[:, 0, 0] == -1).all()
        kl = scipy.special.rel_entr(lp[-1].exp().numpy(), lp.exp().numpy()).sum(-1)
        np.testing.assert_allclose(st.kl_to_final[keep].numpy(), kl[keep.numpy()], atol=1e-5)
        assert torch.isnan(st.entropy[:, 2, 5:]).all() and (st.topk_ids[:, 2, 5:] == -1).all()
    for other in results[1:]:
        assert torch.equal(results[0].topk_ids, other.topk_ids)
        assert torch.equal(results[0].target_rank, other.target_rank)


@pytest.mark.parametrize("scale", [1 / 64, 1 / 8, 1.0, 8.0, 64.0])
def test_lens_reduce_online_statistics_match_float64_on_exact_logits(scale):
    """Small-integer inputs and power-of-two scales make every logit exact in fp32 whatever the
    summation order, so only the online softmax itself is measured: near-uniform (scale 1/64: entropy
    ~8 nats, KL ~1e-3) to one-hot (scale 64: entropy ~0, KL up to ~600 nats). Tolerance: 2e-6 absolute
    + 1e-6 relative (measured worst: 1.4e-6 absolute at scale 1; 2.1e-5 at KL = 640, i.e. 3e-8
    relative). The same fp32 statistics computed from materialised logits are no closer."""
    g = torch.Generator().manual_seed(0)
    n_layers, batch, pos, d, v = 5, 4, 9, 16, 3000
    base = torch.randint(-3, 4, (1, batch, pos, d), generator=g).float()
    differ = (
        torch.rand(n_layers, batch, pos, d, generator=g) < 0.1 * torch.arange(n_layers).flip(0)[:, None, None, None]
    )
    resid = base + differ.float()  # earlier layers further from the final one
    w = torch.randint(-3, 4, (d, v), generator=g).float() * scale
    b = torch.randint(-3, 4, (v,), generator=g).float() * scale
    targets = torch.randint(0, v, (batch, pos), generator=g)
    z = resid.double() @ w.double() + b.double()
    assert torch.equal((resid @ w + b).double(), z)  # exact in fp32
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp).sum(-1)
    kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
    t_lp = lp.gather(-1, targets[None, ..., None].expand(n_layers, -1, -1, 1))[..., 0]
    st = lens_reduce(resid, LinearReadout(lambda x: x, w, b), targets=targets, k=3, kl_to_final=True,
                     max_chunk_bytes=3 * 4 * n_layers * 2 * 256)  # 2 positions x 256 columns per tile  # fmt: skip

    def close(got, ref):
        torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-6)

    close(st.entropy, ent)
    close(st.kl_to_final, kl)
    assert (st.kl_to_final[-1] == 0).all()  # exactly, not just within rounding
    close(st.target_logprob, t_lp)
    close(st.max_logprob, lp.max(-1).values)
    close(st.topk_logprobs, lp.topk(3, -1).values)


def test_lens_reduce_computes_only_what_is_asked():
    """k=0 / entropy=False skip those statistics; what remains still equals the float64 materialised
    readout (target log-prob and max log-prob 1e-5; rank by sorting, exactly)."""
    g = torch.Generator().manual_seed(1)
    resid, w = torch.randn(3, 2, 4, 8, generator=g), torch.randn(8, 40, generator=g)
    targets = torch.randint(0, 40, (2, 4), generator=g)
    bare = lens_reduce(resid, LinearReadout(lambda x: x, w), targets=targets, k=0, entropy=False)
    assert bare.topk_ids is None and bare.topk_logprobs is None and bare.entropy is None
    assert bare.kl_to_final is None
    lp = _materialised(resid, w, targets)
    t = targets[None, ..., None].expand(3, -1, -1, 1)
    torch.testing.assert_close(bare.target_logprob.double(), lp.gather(-1, t)[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(bare.max_logprob.double(), lp.max(-1).values, atol=1e-5, rtol=0)
    rank = (lp.argsort(-1, descending=True) == t).nonzero()[:, -1].reshape(3, 2, 4)
    assert torch.equal(bare.target_rank, rank)
    with pytest.raises(ValueError, match="k >= 1"):
        _ = bare.predicted
    with pytest.raises(ValueError, match="k must be >= 0"):
        lens_reduce(resid, LinearReadout(lambda x: x, w), k=-1)


def test_shape_annotations_are_checked_at_runtime_under_pytest():
    """pyproject passes --jaxtyping-packages=mechlens,beartype.beartype: a pos mismatch between logits
    and tokens must be refused by the annotation, not broadcast."""
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        next_token_loss(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_lens_reduce_reads_each_row_once():
    """Every kept row goes through the readout exactly once (plus one probe row for the vocab size)."""
    resid = torch.randn(3, 4, 5, 8)
    w = torch.randn(8, 20)
    seen = []

    def readout(x):
        seen.append(x.shape[1])
        return x @ w

    lens_reduce(resid, readout, max_chunk_bytes=3 * 20 * 4 * 3 * 6)  # 6 rows per chunk
    assert seen[0] == 1 and sum(seen[1:]) == 4 * 5 and max(seen[1:]) == 6


@pytest.mark.parametrize("budget", [3 * 4 * 4 * 21, 10**9], ids=["partial-tiles", "one-tile"])
def test_lens_reduce_applies_the_softcap_to_every_logit(budget):
    """``LinearReadout(softcap=c)``: logits ``c * tanh((x @ w + b) / c)`` (Gemma2). Every statistic
    equals the float64 materialised capped readout (1e-5 absolute: fp32 tiles of logits up to ~10
    nats, the same bound as the uncapped test; ranks and top-k ids exactly, no ties in random data),
    and the cap moves the log-probs by nats, so skipping it anywhere fails these checks."""
    g = torch.Generator().manual_seed(7)
    n_layers, batch, pos, d, v, cap = 4, 3, 7, 8, 50, 6.0
    resid = torch.randn(n_layers, batch, pos, d, generator=g)
    w = 3 * torch.randn(d, v, generator=g)  # raw logits of std ~8: tanh(z / 6) bends them by nats
    b = torch.randn(v, generator=g)
    targets = torch.randint(0, v, (batch, pos), generator=g)
    targets[1, 2] = -1
    rows = torch.ones(batch, pos, dtype=torch.bool)
    rows[0, 4:] = False
    raw = torch.einsum("lbpd,dv->lbpv", resid.double(), w.double()) + b.double()
    z = cap * torch.tanh(raw / cap)
    lp = torch.log_softmax(z, -1)
    assert (lp - torch.log_softmax(raw, -1)).abs().amax() > 1.0  # the cap matters here
    readout = LinearReadout(pre=lambda x: x, weight=w, bias=b, softcap=cap)
    torch.testing.assert_close(readout(resid).double(), z, atol=1e-5, rtol=0)
    st = lens_reduce(resid, readout, targets=targets, rows=rows, k=3, kl_to_final=True, max_chunk_bytes=budget)

    keep = rows[None].expand(n_layers, -1, -1)
    ref_lp, ref_id = lp.topk(3, -1)
    assert torch.equal(st.topk_ids[keep], ref_id[keep])
    torch.testing.assert_close(st.topk_logprobs[keep].double(), ref_lp[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(st.max_logprob[keep].double(), ref_lp[..., 0][keep], atol=1e-5, rtol=0)
    ent = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(st.entropy[keep].double(), ent[keep], atol=1e-5, rtol=0)
    t = targets.clamp(min=0)[None, ..., None].expand(n_layers, -1, -1, 1)
    has = keep & (targets >= 0)[None]
    torch.testing.assert_close(st.target_logprob[has].double(), lp.gather(-1, t)[..., 0][has], atol=1e-5, rtol=0)
    rank = (lp.argsort(-1, descending=True) == t).nonzero()[:, -1].reshape(n_layers, batch, pos)
    assert torch.equal(st.target_rank[has], rank[has])
    kl = (lp[-1].exp() * (lp[-1] - lp)).sum(-1)
    torch.testing.assert_close(st.kl_to_final[keep].double(), kl[keep], atol=1e-5, rtol=0)
    assert torch.isnan(st.entropy[:, 0, 4:]).all() and (st.target_rank[:, 1, 2] == -1).all()


def test_linear_readout_refuses_a_non_positive_softcap():
    with pytest.raises(ValueError, match="softcap"):
        LinearReadout(pre=lambda x: x, weight=torch.zeros(2, 3), softcap=0.0)
