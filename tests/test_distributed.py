"""Data parallel on torch.distributed: 2 CPU ranks on gloo (``torchrun --standalone --nproc-per-node 2`` of
this very file) stream their shards of a local .jsonl file through ``datasets``, accumulate, merge, and
must equal one process over the whole stream: the shards are disjoint and cover the first n_texts, the
Reservoir and the Histogram are identical, the float64 sums agree to 1e-12 relative (the same terms in
another order: <= n * 2**-53 ~ 1e-12 for n ~ 5,000, typically far less), and the OLS from them to 1e-10.

Run as a script (by torchrun), this file is the worker: ``python tests/test_distributed.py DATA OUT``.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import torch

N_TEXTS = 250  # of 300 rows, some blank: the cut falls inside the file
MAXLEN = 48  # word positions per text
WORDS = ["a", "in", "the", "coffee", "milk", "morning", "sat", "window", "extraordinarily", "rain", "of", "piano"]


def _corpus(d: pathlib.Path) -> str:
    rng = np.random.default_rng(0)
    path = d / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(300):
            n = int(rng.integers(1, 70))  # some texts longer than MAXLEN
            text = "" if i % 17 == 5 else " ".join(rng.choice(WORDS, n))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return str(path)


def accumulate(source: str, rank: int, world_size: int) -> dict:
    """Per-position moments of a float feature of each word, an OLS of it on the position, a reservoir of
    (feature, position) rows keyed by (global text index, position), a histogram; and what this rank saw."""
    from mechlens.data import batched, iter_indexed
    from mechlens.stats.streaming import Histogram, Moments, NormalEquations, Reservoir

    acc = {
        "moments": Moments(MAXLEN),
        "ols": NormalEquations(1),
        "reservoir": Reservoir(40, seed=3),
        "hist": Histogram(np.linspace(0, 3, 13)),
        "seen": [],
    }
    for batch in batched(iter_indexed(source, N_TEXTS, rank=rank, world_size=world_size), 7):
        idx = np.array([i for i, _ in batch])
        feat = np.zeros((len(batch), MAXLEN))
        mask = np.zeros((len(batch), MAXLEN), dtype=bool)
        for j, (i, text) in enumerate(batch):
            words = text.split()[:MAXLEN]
            # not integers: sums of these depend on the order of the terms in the last bits
            feat[j, : len(words)] = [np.log1p(len(w)) + 0.001 * (i % 7) for w in words]
            mask[j, : len(words)] = True
        pos = np.broadcast_to(np.arange(MAXLEN, dtype=np.float64), feat.shape)
        acc["moments"].update(torch.from_numpy(feat), mask)
        acc["ols"].update(pos[mask], feat[mask])
        acc["reservoir"].update((idx[:, None] * MAXLEN + pos.astype(np.int64))[mask], np.stack([feat, pos], -1)[mask])
        acc["hist"].update(feat[mask])
        acc["seen"] += [(int(i), t) for i, t in batch]
    return acc


def _worker(data: str, out: str) -> None:
    from mechlens import distributed as D
    from mechlens.data import check_source
    from mechlens.errors import DataError

    rank, world_size = D.init_from_env(timeout_s=900)
    assert (rank, world_size) == D.world() and world_size == 2 and D.is_main() == (rank == 0)
    acc = accumulate(data, rank, world_size)
    for key in ("moments", "ols", "reservoir", "hist"):
        assert D.merge(acc[key]) is acc[key]
    shards = D.all_gather_object(acc["seen"])
    x32, i64 = torch.full((3,), rank + 1.5, dtype=torch.float32), torch.tensor([rank, 10], dtype=torch.int64)
    D.all_reduce_sum(x32, i64)
    told = D.broadcast_object(f"from rank {rank}")
    errors = []
    try:  # rank 0 checks a bad source; every rank raises its one-line error
        D.on_main(check_source, data + "#no_such_column")
    except DataError as e:
        errors.append(str(e))
    errors = D.all_gather_object(errors)
    D.barrier()
    if D.is_main():
        result = {
            "moments": acc["moments"].state(),
            "ols": acc["ols"].fit(),
            "reservoir": acc["reservoir"].state(),
            "hist": acc["hist"].state(),
            "shards": shards,
            "x32": x32.tolist(),
            "i64": i64.tolist(),
            "told": told,
            "errors": errors,
            "cuda": torch.cuda.is_available(),
        }
        with open(out + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(out + ".tmp", out)
    D.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


import pytest  # noqa: E402

from mechlens import distributed as D  # noqa: E402
from mechlens.data import iter_texts  # noqa: E402
from mechlens.errors import DataError, MechlensError  # noqa: E402
from mechlens.stats.streaming import Moments, Reservoir  # noqa: E402


def test_two_gloo_ranks_equal_one_process(tmp_path):
    data, out = _corpus(tmp_path), str(tmp_path / "result.pkl")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run([*cmd, __file__, data, out], env=env, capture_output=True, text=True, timeout=900)  # hang guard
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    with open(out, "rb") as f:
        got = pickle.load(f)
    one = accumulate(data, 0, 1)
    assert not got["cuda"]  # gloo on CPU, as forced

    # the data: disjoint round-robin shards whose union, in global order, is the single-process stream
    single = one["seen"]
    assert [i for i, _ in single] == list(range(N_TEXTS)) and [t for _, t in single] == list(iter_texts(data, N_TEXTS))
    assert all(i % 2 == r for r, shard in enumerate(got["shards"]) for i, _ in shard)
    assert sorted(got["shards"][0] + got["shards"][1]) == single

    # the accumulators
    m = Moments.from_state(got["moments"])
    np.testing.assert_array_equal(m.count.numpy(), one["moments"].count.numpy())
    np.testing.assert_allclose(m.sum.numpy(), one["moments"].sum.numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.sumsq.numpy(), one["moments"].sumsq.numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.std, one["moments"].std, rtol=1e-10)
    fit = one["ols"].fit()
    for k in ("params", "bse", "tvalues", "pvalues", "r2", "r2_adj"):
        np.testing.assert_allclose(got["ols"][k], fit[k], rtol=1e-10, err_msg=k)
    assert got["ols"]["nobs"] == fit["nobs"] == int(one["moments"].count.sum())
    res = Reservoir.from_state(got["reservoir"])
    np.testing.assert_array_equal(res.index, one["reservoir"].index)  # exactly the single-process sample
    np.testing.assert_array_equal(res.values, one["reservoir"].values)
    assert res.seen == one["reservoir"].seen and len(res) == 40
    for k in ("counts", "below", "above", "nan"):
        np.testing.assert_array_equal(got["hist"][k].numpy(), one["hist"].state()[k].numpy())

    # the collectives themselves
    assert got["x32"] == [4.0] * 3 and got["i64"] == [1, 20]
    assert got["told"] == "from rank 0"
    assert len(got["errors"]) == 2 and got["errors"][0] == got["errors"][1] and len(got["errors"][0]) == 1
    assert "no column 'no_such_column'" in got["errors"][0][0]


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_from_env() == (0, 1) == D.world() and D.is_main()
    t = torch.arange(3.0)
    D.all_reduce_sum(t)
    assert t.tolist() == [0.0, 1.0, 2.0]
    m = Moments(2).update(np.ones((2, 2)))
    assert D.merge(m) is m and m.count.tolist() == [2.0, 2.0]
    assert D.broadcast_object("x") == "x" and D.all_gather_object(5) == [5]
    assert D.on_main(lambda a, b: a + b, 2, b=3) == 5
    with pytest.raises(DataError):
        D.on_main(iter_texts, "imdb")
    D.barrier()
    D.shutdown()
    assert D.local_device("cpu") == "cpu"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    # torchrun's environment without a process group: an error, never a silent 1/4 shard merged with nothing
    with pytest.raises(MechlensError, match="init_from_env"):
        D.world()
    with pytest.raises(TypeError, match="not an accumulator"):
        monkeypatch.setattr(D, "_active", lambda: True)
        D.merge(object())


def test_ranks_wait_for_each_other_before_leaving_only_after_success(monkeypatch, tmp_path):
    """A successful run leaves the process group after a barrier (no gloo rank tears its connections down
    while another still writes; one such rank aborted with SIGABRT at exit), a failed one without it
    (another rank may never reach the barrier)."""
    from mechlens import cli

    calls = []
    monkeypatch.setattr(D, "_initialized", lambda: True)
    monkeypatch.setattr(D, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(D, "_dist", lambda: type("dist", (), {"destroy_process_group": lambda: calls.append("left")}))
    monkeypatch.setattr(D, "on_main", lambda fn, *a, **k: fn(*a, **k))
    cli._into_output(tmp_path / "ok", lambda dest: None)
    assert calls == ["barrier", "left"]
    calls.clear()

    def fail(dest):
        raise DataError("bad text")

    with pytest.raises(DataError, match="bad text"):
        cli._into_output(tmp_path / "bad", fail)
    assert calls == ["left"]
