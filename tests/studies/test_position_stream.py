"""Study 1 at corpus scale: the texts are streamed batch by batch, the loss by position and the OLS are
accumulated over every text (Moments, NormalEquations) and a seeded reservoir of whole texts feeds the
logistic regression, the confusion matrices, sklearn's line and the per-text samples.

Checked here: with the reservoir holding the whole splits, ``run`` equals the parts composed by hand on
the whole splits' loss matrices (today's results, exactly); the normal equations equal statsmodels to
1e-10; a sampled run keeps the seeded texts (whatever the batching), whose losses, logistic fit and
samples are those of the full run restricted to them; the typed result's arrays keep their shapes from
40 to 400 texts (memory constant); 2 gloo processes under torchrun give the statistics of one; a bad
text fails on every rank, naming its global index.

Run as a script (by torchrun), this file is the worker: ``python tests/studies/test_position_stream.py DATA OUT``.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import sys

import numpy as np

ADJ = ["quiet", "bright", "narrow", "crowded", "ancient", "modern", "small", "famous"]
NOUN = ["kitchen", "station", "garden", "library", "market", "harbour", "bakery", "museum"]
VERB = ["opened", "closed", "changed", "filled", "emptied", "waited", "shone", "grew"]


def lines(n: int) -> list[str]:
    """``n`` distinct sentences of at least 10 GPT-2 tokens."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b, c, d = rng.integers(0, 8, 4)
        out.append(f"On day {i} the {ADJ[a]} {NOUN[b]} {VERB[c]} early, and the {NOUN[d]} stayed {ADJ[(a + c) % 8]}.")
    return out


# the configurations the 2-process worker and the single-process reference both run
N_TRAIN, N_TEST, SHORT_AT = 48, 32, 37  # the short text's global index is odd: rank 1 of 2 meets it


def configs(data: str) -> dict[str, dict]:
    return {
        "full": {"data": data, "n_train": N_TRAIN, "n_test": N_TEST, "batch_size": 8},
        "sampled": {"data": data, "n_train": N_TRAIN, "n_test": N_TEST, "batch_size": 8, "reservoir": 12},
        "python": {"n_train": 30, "n_test": 20, "batch_size": 8, "reservoir": 10},
    }


def outcome(model, data: str) -> dict:
    """Every configuration's results (what is compared across process counts), and the bad-text error."""
    from mechlens.errors import DataError
    from mechlens.studies import position

    out = {}
    for name, kw in configs(data).items():
        texts = lines(60) if name == "python" else None
        res = position.run(model, position.Config(**kw), texts=texts)
        out[name] = {
            "metrics": res.metrics,
            "tables": res.tables,
            "train_index": res.parts.train_index,
            "test_index": res.parts.test_index,
            "train_loss": res.parts.train.loss.numpy(),
        }
    bad = lines(N_TRAIN + N_TEST)
    bad[SHORT_AT] = "Too short."
    try:
        position.run(model, position.Config(n_train=N_TRAIN, n_test=N_TEST, batch_size=8), texts=bad)
        out["error"] = None
    except DataError as e:
        out["error"] = str(e)
    return out


def _worker(data: str, out: str) -> None:
    from mechlens import distributed as D
    from mechlens import load_model

    _, world_size = D.init_from_env(timeout_s=900)  # generous: a loaded CI machine can stall one rank for minutes
    assert world_size == 2
    got = outcome(load_model("tiny-gpt2"), data)
    errors = D.all_gather_object(got.pop("error"))  # every rank raised, none hung
    if D.is_main():
        with open(out + ".tmp", "wb") as f:
            pickle.dump({"results": got, "errors": errors}, f)
        os.replace(out + ".tmp", out)
    D.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    sys.exit(0)


import dataclasses  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import statsmodels.api as sm  # noqa: E402
import torch  # noqa: E402

from mechlens.data import load_texts  # noqa: E402
from mechlens.errors import DataError  # noqa: E402
from mechlens.result import metrics_of  # noqa: E402
from mechlens.stats.streaming import NormalEquations, priorities  # noqa: E402
from mechlens.studies import position  # noqa: E402


def _without_time(metrics: dict) -> dict:
    """The metrics without statsmodels' summary (it prints the wall-clock date and time)."""
    return {**metrics, "ols": {k: v for k, v in metrics["ols"].items() if k != "summary"}}


def _by_hand(model, cfg: position.Config, texts: list) -> position.PositionResult:
    """The four parts composed on the whole splits' loss matrices: what ``run`` computed before streaming."""
    train_texts, test_texts = position.split_texts(cfg, texts)
    train = position.loss_matrix(model, position.encode_texts(model, train_texts, cfg), cfg.batch_size)
    test = position.loss_matrix(model, position.encode_texts(model, test_texts, cfg), cfg.batch_size)
    lin = position.fit_position_ols(train.loss)
    logit = position.fit_position_logistic(train.loss, test.loss, cfg)
    word = position.word_of(model, train_texts, train)
    return position.PositionResult.of(train, test, lin, logit, position.confusion(logit), word)


CASES = [
    ("tiny-gpt2", {"n_train": 70, "n_test": 50, "batch_size": 32}),
    ("tiny-mlm", {"seqlen": 4, "n_train": 12, "n_test": 9, "batch_size": 5}),
]


@pytest.mark.parametrize(("name", "kw"), CASES)
def test_stream_equals_the_whole_splits_parts(request, name, kw):
    """With every text in the reservoirs, the streamed run is exactly the parts on the whole splits'
    matrices (the same mini-batches are forwarded): today's results, statsmodels' table included."""
    m = request.getfixturevalue(name.replace("-", "_") + "_pair").bridge
    cfg = position.Config(**kw)
    texts = load_texts("contexts")
    res = position.run(m, cfg, texts=texts)
    ref = _by_hand(m, cfg, texts)
    assert not res.parts.sampled and res.metrics["ols"]["method"] == "statsmodels"
    assert _without_time(res.metrics) == _without_time(metrics_of(ref))
    summary, ref_summary = res.metrics["ols"]["summary"].splitlines(), ref.ols.summary.splitlines()
    assert [x for x in summary if "Time:" not in x] == [x for x in ref_summary if "Time:" not in x]
    for f in ("loss", "column", "token", "target"):
        assert torch.equal(getattr(res.parts.train, f), getattr(ref.train, f)), f
    assert torch.equal(res.parts.train.batch.tokens, ref.train.batch.tokens)
    assert torch.equal(res.parts.train.batch.text_mask, ref.train.batch.text_mask)
    assert torch.equal(res.parts.test.loss, ref.test.loss)
    np.testing.assert_array_equal(res.parts.word, ref.word)
    np.testing.assert_array_equal(res.parts.train_index, np.arange(cfg.n_train))
    assert res.config["n_train"] == cfg.n_train and res.config["reservoir"] == 10_000


def test_default_split_is_unchanged():
    """The default data (310 contexts) splits 155 + 155, as before; counting stops at 1000 texts."""
    assert position.split_sizes(position.Config()) == (155, 155)
    assert position.split_sizes(position.Config(n_train=100)) == (100, 155)
    assert position.split_sizes(position.Config(), texts=lines(3000)) == (500, 500)
    with pytest.raises(DataError, match="only 310"):
        position.split_sizes(position.Config(n_train=300, n_test=20))


def test_normal_equations_equal_statsmodels(tiny_gpt2_pair):
    """NormalEquations accumulated batch by batch give statsmodels' OLS on the same rows to 1e-10, and
    fit_position_ols takes them when the matrix is a sample of their rows."""
    m = tiny_gpt2_pair.bridge
    cfg = position.Config(n_train=80, n_test=2)
    loss = position.loss_matrix(m, position.encode_texts(m, load_texts("contexts")[:80], cfg)).loss.numpy()
    x, y = loss.reshape(-1).astype(np.float64), np.tile(np.arange(loss.shape[1]), len(loss)).astype(np.float64)
    ne = NormalEquations(1)
    for rows in np.array_split(np.arange(len(loss)), 7):
        ne.update(loss[rows].reshape(-1), np.tile(np.arange(loss.shape[1]), len(rows)))
    ref = sm.OLS(y, sm.add_constant(x)).fit()
    fit = position.fit_position_ols(loss[:9], ne)  # a sample of 9 texts: the numbers are every row's
    assert fit.method == "normal equations" and fit.nobs == ref.nobs == len(y)
    pairs = [(fit.params, ref.params), (fit.bse, ref.bse), (fit.tvalues, ref.tvalues), (fit.pvalues, ref.pvalues),
             (fit.r2, ref.rsquared), (fit.r2_adj, ref.rsquared_adj)]  # fmt: skip
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fit.predictions, ref.params[0] + ref.params[1] * loss[:9].reshape(-1), rtol=1e-10)
    assert "Normal equations" in fit.summary and "Durbin-Watson" in fit.summary  # named as not computed
    whole = position.fit_position_ols(loss, ne)  # the equations cover exactly these rows: statsmodels itself
    assert whole.method == "statsmodels" and "Omnibus" in whole.summary
    np.testing.assert_allclose(whole.params, fit.params, rtol=1e-10)


@pytest.fixture(scope="module")
def full_and_sampled(tiny_gpt2_pair):
    m, texts = tiny_gpt2_pair.bridge, load_texts("contexts")
    kw = {"n_train": 100, "n_test": 60, "batch_size": 32}
    full = position.run(m, position.Config(**kw), texts=texts)
    sampled = position.run(m, position.Config(**kw, reservoir=16), texts=texts)
    return full, sampled


def test_a_sampled_run_keeps_the_seeded_texts_and_every_texts_statistics(full_and_sampled):
    full, sampled = full_and_sampled
    p, q, m = full.parts, sampled.parts, sampled.metrics
    assert (m["sampled"], m["n_texts_train"], m["n_texts_test"]) == (True, 100, 60)
    assert (m["logistic_sample_texts"], m["logistic_sample_texts_test"]) == (16, 16)
    assert m["ols"]["method"] == "normal equations" and m["ols"]["nobs"] == 100 * 5
    # the reservoir: the 16 smallest priorities of hash(seed, global index), in global order
    expect = np.sort(np.argsort(priorities(np.arange(100), 0), kind="stable")[:16])
    np.testing.assert_array_equal(q.train_index, expect)
    expect_test = np.sort(100 + np.argsort(priorities(np.arange(100, 160), 0), kind="stable")[:16]) - 100
    np.testing.assert_array_equal(q.test_index, expect_test)
    # the loss by position and the OLS are every text's: Moments (float64 sums) and the normal equations
    np.testing.assert_allclose(q.loss_mean_by_position, p.loss_mean_by_position, rtol=1e-12)
    np.testing.assert_allclose(q.loss_mean_by_position_test, p.loss_mean_by_position_test, rtol=1e-12)
    np.testing.assert_allclose(q.loss_std_by_position, p.loss_std_by_position, rtol=1e-9)  # sumsq/n - mean²
    for key in ("params", "bse", "tvalues", "pvalues", "r2", "r2_adj"):
        np.testing.assert_allclose(m["ols"][key], full.metrics["ols"][key], rtol=1e-10, atol=1e-14, err_msg=key)
    assert m["ols"]["nobs"] == full.metrics["ols"]["nobs"]
    # the kept texts' rows are the full run's (the same mini-batches were forwarded), and the reservoir-based
    # parts are the parts on those rows
    assert torch.equal(q.train.loss, p.train.loss[q.train_index])
    assert torch.equal(q.test.loss, p.test.loss[q.test_index])
    np.testing.assert_array_equal(q.word, p.word[q.train_index])
    logit = position.fit_position_logistic(q.train.loss, q.test.loss, position.Config())
    assert metrics_of(logit) == metrics_of(q.logistic)
    np.testing.assert_array_equal(q.confusion_test, position.confusion(logit).counts_test)
    assert len(q.linear_predictions) == 16 * 5 and q.confusion_train.sum() == 16 * 5
    # samples(): the kept texts, by their index in the training split
    df = position.samples(sampled)
    assert df["sample"].tolist() == np.repeat(q.train_index, 5).tolist() and len(df) == 16 * 5
    rows = sampled.tables["loss_matrix"]
    assert len(rows) == 32 * 5 and {r["text"] for r in rows if r["split"] == "test"} == set(q.test_index.tolist())
    assert "on a seeded sample of 16 of 100 training" in position.headline(m)[2]
    assert "seeded sample" not in position.headline(full.metrics)[2]
    assert list(sampled.figures) == list(position.FIGURES)


def test_the_sample_does_not_depend_on_the_batching(full_and_sampled, tiny_gpt2_pair):
    _, sampled = full_and_sampled
    cfg = position.Config(n_train=100, n_test=60, batch_size=7, reservoir=16)
    other = position.run(tiny_gpt2_pair.bridge, cfg, texts=load_texts("contexts")).parts
    np.testing.assert_array_equal(other.train_index, sampled.parts.train_index)
    np.testing.assert_array_equal(other.test_index, sampled.parts.test_index)
    # other mini-batch shapes move fp32 losses by a few ulps (measured <= 1e-6), not the texts
    torch.testing.assert_close(other.train.loss, sampled.parts.train.loss, rtol=0, atol=1e-5)


def _shapes(x, path="") -> dict[str, tuple]:
    """The shape of every array of a typed result (nested dataclasses and dicts)."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return {path: tuple(x.shape)}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: v for f in dataclasses.fields(x) for k, v in _shapes(getattr(x, f.name), f"{path}.{f.name}").items()}
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _shapes(val, f"{path}.{key}").items()}
    return {}


def test_memory_is_constant_in_the_number_of_texts(tiny_gpt2_pair):
    """With a reservoir of 20 texts, the typed result of 40 texts and of 400 has the same arrays: nothing
    grows with the corpus but the counts."""
    m = tiny_gpt2_pair.bridge
    results = {}
    for n in (40, 400):
        cfg = position.Config(seqlen=3, n_train=n // 2, n_test=n // 2, batch_size=100, reservoir=20)
        results[n] = position.run(m, cfg, texts=lines(n)).parts
    small, large = _shapes(results[40]), _shapes(results[400])
    assert small == large and len(small) > 20
    # linear_predictions is a view of the OLS part: the array is stored once, at .ols.predictions
    assert (
        small[".train.loss"] == (20, 2) and small[".ols.predictions"] == (40,) == results[40].linear_predictions.shape
    )
    assert (results[40].n_texts_train, results[400].n_texts_train) == (20, 200)
    assert (results[40].sampled, results[400].sampled) == (False, True)


def test_a_short_text_is_named_by_its_index_in_the_source(tiny_gpt2_pair):
    texts = lines(40)
    texts[27] = "Too short."
    with pytest.raises(DataError, match=r"text #27 of the source has fewer than 6 tokens \('Too short.'\)"):
        position.run(tiny_gpt2_pair.bridge, position.Config(n_train=20, n_test=20, batch_size=8), texts=texts)


def test_a_source_shorter_than_the_split_is_refused_after_the_count_stops(tiny_gpt2_pair, tmp_path, monkeypatch):
    """Only the first PEEK texts are counted before the stream; a source that ends before the split is
    refused at the end of the stream with the same message, naming how many texts it has."""
    data = tmp_path / "few.txt"
    data.write_text("\n".join(lines(30)))
    monkeypatch.setattr(position, "PEEK", 10)
    cfg = position.Config(data=str(data), n_train=20, n_test=20, batch_size=16)
    assert position.split_sizes(cfg) == (20, 20)  # 10 counted: not enough to know
    with pytest.raises(DataError, match="asked for 20 train \\+ 20 test texts but the source has only 30"):
        position.run(tiny_gpt2_pair.bridge, cfg)


# -- data parallel: 2 gloo processes under torchrun equal one process ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numbers(x, prefix=""):
    """Every numeric leaf of a metrics tree, by dotted path (booleans and strings left out)."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _numbers(val, f"{prefix}.{key}").items()}
    if (
        isinstance(x, list)
        and x
        and all(isinstance(v, int | float) or v is None for v in np.ravel(np.array(x, object)))
    ):
        return {prefix: np.array(x, dtype=np.float64)}
    if isinstance(x, int | float) and not isinstance(x, bool):
        return {prefix: np.array(x, dtype=np.float64)}
    return {}


# counts: exact whatever the summation order
EXACT = {".confusion_train", ".confusion_test", ".ols.nobs", ".n_texts_train", ".n_texts_test",
         ".logistic_sample_texts", ".logistic_sample_texts_test", ".logistic.classes", ".logistic.chance"}  # fmt: skip


def test_two_gloo_processes_equal_one(tmp_path):
    """torchrun, 2 CPU processes on gloo, each streaming its shard of a local file (and of a Python list):
    every numeric metric within 1e-5 of its scale of the 1-process run (each rank forwards mini-batches
    of other shapes: fp32 losses move by ulps), counts exactly; the reservoirs keep the same texts, and
    the reservoir-based results (accuracies, confusion matrices) are the same. A bad text met by rank 1
    fails on both ranks with the same message."""
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(lines(N_TRAIN + N_TEST + 10)))
    out = str(tmp_path / "two.pkl")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__]
    proc = subprocess.Popen([*cmd, str(data), out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from mechlens import load_model

    one = outcome(load_model("tiny-gpt2"), str(data))  # meanwhile, the same in this process
    stdout, stderr = proc.communicate(timeout=900)  # a guard against hangs, not a timing (~45 s on 2 cores)
    assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
    with open(out, "rb") as f:
        two = pickle.load(f)

    message = f"text #{SHORT_AT} of the source has fewer than 6 tokens"
    assert message in one["error"] and two["errors"] == [one["error"]] * 2
    for name in configs(str(data)):
        a, b = one[name], two["results"][name]
        np.testing.assert_array_equal(b["train_index"], a["train_index"])
        np.testing.assert_array_equal(b["test_index"], a["test_index"])
        np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=0, atol=1e-5)
        ma, mb = a["metrics"], b["metrics"]
        assert (ma["sampled"], ma["ols"]["method"]) == (mb["sampled"], mb["ols"]["method"]) == (
            name != "full", "statsmodels" if name == "full" else "normal equations")  # fmt: skip
        na, nb = _numbers(ma), _numbers(mb)
        assert na.keys() == nb.keys() and na.keys() >= EXACT
        for key in na:
            if key in EXACT or key.startswith((".logistic_accuracy", ".accuracy_by_position", ".confusion_row")):
                np.testing.assert_array_equal(nb[key], na[key], err_msg=f"{name}{key}")
            else:
                scale = 1e-5 * max(1.0, float(np.max(np.abs(na[key]))))
                np.testing.assert_allclose(nb[key], na[key], rtol=0, atol=scale, err_msg=f"{name}{key}")
        assert [r["text"] for r in b["tables"]["loss_matrix"]] == [r["text"] for r in a["tables"]["loss_matrix"]]
