"""The tuned lens (:mod:`mechlens.lens.tuned`, :mod:`mechlens.lens.training`): identity translators are the
logit lens, training lowers held-out KL at every readout point, the last translator stays the identity, the
training gradient is the true gradient, save/load round-trips and refuses a foreign model, and the lens study
reads it beside the logit lens (single text, masked text, held-out corpus)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mechlens.cli import main
from mechlens.data import load_texts
from mechlens.lens import readings
from mechlens.lens import training as tl
from mechlens.lens import tuned as tlens
from mechlens.ops import LinearReadout
from mechlens.studies import lens

CONTEXTS = load_texts("contexts")
BIN = pathlib.Path(sys.executable).parent


def _mechlens(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    """The mechlens command in a subprocess, under torchrun with ``nproc`` gloo processes when > 1."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [str(BIN / "mechlens"), *args]
    if nproc > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(sock.getsockname()[1])
        torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc-per-node={nproc}", "--no-python", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _fields(st):
    return {f.name: getattr(st, f.name) for f in dataclasses.fields(st) if getattr(st, f.name) is not None}


@pytest.mark.parametrize("name", ["gpt2_pair", "roberta_pair"])
def test_identity_translators_reproduce_the_logit_lens_exactly(request, name):
    """An untrained (identity) tuned lens read through the translator matmul gives bit-identical statistics
    to the logit lens: x @ I + 0 is exact in floating point (each output is x_k plus exact zeros), and the
    same vocabulary reduction then runs on identical inputs. Tolerance: none (assert_array_equal)."""
    model = request.getfixturevalue(name).bridge
    inputs = tlens.lens_inputs(model, CONTEXTS[:5], range(5))
    ident = tlens.identity_lens(model)
    assert ident.is_identity()
    a, b = readings.pair_stats(model, inputs.batch, inputs.targets, ident, rows=inputs.rows, k=3)
    for key, v in _fields(a).items():
        torch.testing.assert_close(getattr(b, key), v, rtol=0, atol=0, equal_nan=True, msg=key)
    assert torch.isfinite(a.kl_to_final[:, inputs.rows]).all()


@pytest.fixture(scope="module")
def trained(gpt2_pair):
    """40 steps on the seeded random GPT-2 fixture (2 blocks, 3 readout points, real 50,257-token
    vocabulary), the first 40 contexts held out."""
    cfg = tl.TrainConfig(steps=40, batch_size=8, heldout=40, max_tokens=16)
    return tl.train_tuned_lens(gpt2_pair.bridge, CONTEXTS, cfg)


def test_training_lowers_heldout_kl_at_every_readout_point(trained):
    """On the held-out texts (never trained on), the tuned lens' mean KL to the final readout is below the
    logit lens' at every readout point before the last (where both are 0 by construction). The margin asked
    for, 10% of the logit lens' KL, is far above the fp32 noise of a mean KL (~1e-6 relative)."""
    c = trained.card
    assert c.heldout_n_texts == 40 and c.steps == 40 and c.trained_points == [0, 1]
    logit, tuned = np.array(c.heldout_kl_logit), np.array(c.heldout_kl_tuned)
    assert (tuned[:-1] < 0.9 * logit[:-1]).all(), (logit, tuned)
    assert logit[-1] == 0.0 and tuned[-1] == 0.0
    assert c.loss_curve[-1] < c.loss_curve[0]


def _word_texts(words, n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(6, 14)))) for _ in range(n)]


@pytest.mark.slow  # ~30 s on 2 cores: 200 optimiser steps, each a bridge forward
def test_a_few_hundred_steps_on_a_random_model(bert_pair):
    """200 steps on the seeded random BERT fixture (2 blocks, MLM head, word-level vocabulary of 128) lower
    the held-out KL at every readout point but the last by at least 10%. A random model's outputs are near
    uniform, so the logit lens' KL is small (~2e-5 nats measured) but far above its fp32 noise (~1e-7:
    log-softmax over 128 logits of size ~1); the tuned lens reached ~0.6x of it. In float32: a bfloat16
    step resolves a row's KL to ~1e-3 nats (test_kl_points_in_bfloat16), far above this model's 2e-5."""
    model = bert_pair.bridge
    words = [w for w in model.tokenizer.get_vocab() if w.isalpha() and not w.startswith("[")]
    texts = _word_texts(sorted(words), 400)
    cfg = tl.TrainConfig(steps=200, batch_size=8, heldout=50, max_tokens=16, readout_dtype="float32")
    t = tl.train_tuned_lens(model, texts, cfg)
    logit, tuned = np.array(t.card.heldout_kl_logit), np.array(t.card.heldout_kl_tuned)
    assert t.card.heldout_n_texts == 50 and t.card.epochs >= 2  # 350 training texts, 1,600 read: cycled
    assert (tuned[:-1] < 0.9 * logit[:-1]).all(), (logit, tuned)
    assert tuned[-1] == 0.0 and np.mean(t.card.loss_curve[-10:]) < np.mean(t.card.loss_curve[:10])


def test_the_last_translator_is_not_trained(trained, gpt2_pair):
    """The last readout point's translator is held at the identity (not trained): exactly I and 0 after
    training, while the others moved (a random model's KL is ~5e-3 nats, so they move little: any change)."""
    d = gpt2_pair.bridge.cfg.d_model
    assert torch.equal(trained.weight[-1], torch.eye(d)) and torch.equal(trained.bias[-1], torch.zeros(d))
    assert all(not torch.equal(trained.weight[i], torch.eye(d)) for i in range(trained.n_points - 1))
    assert all(not torch.equal(trained.bias[i], torch.zeros(d)) for i in range(trained.n_points - 1))


def _tiny_readout(d=4, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ln = torch.nn.LayerNorm(d).double()
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64))
        ln.bias.copy_(0.1 * torch.randn(d, generator=g, dtype=torch.float64))
    for p in ln.parameters():
        p.requires_grad_(False)
    return LinearReadout(pre=ln, weight=torch.randn(d, vocab, generator=g, dtype=torch.float64),
                         bias=torch.randn(vocab, generator=g, dtype=torch.float64))  # fmt: skip


def test_gradient_matches_gradcheck_and_chunking():
    """The training loss' gradient in the translator (weight, bias) passes torch.autograd.gradcheck against
    finite differences on a tiny float64 case (LayerNorm + unembedding, d 4, vocab 11; gradcheck's defaults,
    eps 1e-6, atol 1e-5, rtol 1e-3), and the chunked backward of kl_rows (one row per chunk) accumulates the
    same gradient as one backward of the whole sum (float64: 1e-12)."""
    g = torch.Generator().manual_seed(1)
    readout = _tiny_readout()
    h_final, h = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    w = (torch.eye(4, dtype=torch.float64) + 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w_, b_: tl.kl_sum(readout, h_final, h, w_, b_), (w, b))
    gw, gb = torch.autograd.grad(tl.kl_sum(readout, h_final, h, w, b), (w, b))
    total = tl.kl_rows(readout, h_final, h, w, b, max_chunk_bytes=1)  # rows_per_chunk -> 1
    assert tl.rows_per_chunk(11, 1) == 1
    torch.testing.assert_close(w.grad, gw, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, gb, rtol=0, atol=1e-12)
    assert abs(float(total) - float(tl.kl_sum(readout, h_final, h, w, b))) < 1e-12
    # KL(p || p) = 0 with a zero gradient: the identity translator on the final vector itself
    eye = torch.eye(4, dtype=torch.float64, requires_grad=True)
    assert abs(float(tl.kl_sum(readout, h_final, h_final, eye, torch.zeros(4, dtype=torch.float64)))) < 1e-12


def test_save_load_round_trip_and_foreign_model(trained, gpt2_pair, tiny_gpt2_pair, tmp_path):
    """save() then load_tuned_lens() gives the same translators (float32 both ways: exact) and card; loading
    onto a different model is refused in one line naming both models' fingerprints."""
    trained.save(tmp_path / "lens")
    back = tlens.load_tuned_lens(tmp_path / "lens", gpt2_pair.bridge)
    assert torch.equal(back.weight, trained.weight) and torch.equal(back.bias, trained.bias)
    assert back.card == trained.card
    doc = json.loads((tmp_path / "lens" / tlens.CARD_FILE).read_text())
    assert doc["fingerprint"] == tlens.fingerprint(gpt2_pair.bridge) and doc["steps"] == 40
    with pytest.raises(tlens.TunedLensError, match="fingerprint") as e:
        tlens.load_tuned_lens(tmp_path / "lens", tiny_gpt2_pair.bridge)
    assert "\n" not in str(e.value)


def test_the_study_reads_both_lenses(trained, gpt2_pair, tmp_path):
    """lens.run with --tuned: the single-text comparison's logit side equals the study's own causal lens and
    the tuned side differs; samples() carries tuned_* rows and the figures one per statistic with both
    lenses. Tolerance 5e-6 nats: the two reductions read different row sets (the comparison only the
    lensed cells, the study every position), so lens_reduce picks other tile shapes and sums in another
    order; KL and log-probs are differences of fp32 log-sum-exps of size ~10 (ulp ~1e-6), measured
    differences 1.7e-7."""
    trained.save(tmp_path / "lens")
    model = gpt2_pair.bridge
    r = lens.run(model, lens.Config(tuned=str(tmp_path / "lens")))
    t = r.parts.tuned
    np.testing.assert_allclose(t.logit.kl_to_final, r.parts.kl_to_final, rtol=0, atol=5e-6)
    np.testing.assert_allclose(t.logit.target_logprob, r.parts.target_logprob, rtol=0, atol=5e-6)
    assert not np.array_equal(t.tuned.kl_to_final[:-1], t.logit.kl_to_final[:-1])
    np.testing.assert_array_equal(t.tuned.kl_to_final[-1], 0.0)
    s = lens.samples(r)
    assert {"tuned_kl_to_final", "tuned_target_logprob", "kl_to_final"} <= set(s["quantity"])
    assert {f"tuned_{q}" for q in readings.QUANTITIES} <= set(r.figures)
    assert "tuned" in r.metrics and "tuned lens" in " ".join(lens.headline(r.metrics))
    assert "tuned_lens" in r.tables
    none = lens.run(model, lens.Config(tuned="none"))
    assert none.parts.tuned is None and "tuned" not in " ".join(none.figures)


def test_corpus_evaluation_reads_only_heldout_texts(trained, gpt2_pair, tmp_path):
    """On the lens' own training source the corpus lens reads exactly the held-out texts (the first 40), and
    an --n-texts that would reach training texts is refused; the tuned lens' KL is below the logit lens'
    there at every readout point but the last (the same margin as above)."""
    model = gpt2_pair.bridge
    path = tmp_path / "contexts.txt"
    path.write_text("\n".join(CONTEXTS))
    card = dataclasses.replace(trained.card, data=str(path))
    dataclasses.replace(trained, card=card).save(tmp_path / "lens")
    cfg = lens.Config(data=str(path), tuned=str(tmp_path / "lens"), batch_size=16, max_tokens=16)
    r = lens.run(model, cfg)
    assert r.metrics["n_texts"] == 40 and "held out" in r.metrics["tuned_note"]
    logit, tuned = np.array(r.metrics["kl_to_final_by_layer"]), np.array(r.metrics["tuned"]["kl_to_final_by_layer"])
    # the same texts and statistic as the training's own held-out evaluation, batched differently (16 vs 64
    # texts: other padding, other tile shapes): fp32 KL of ~5e-3 nats from log-sum-exps of size ~10, 1e-6
    np.testing.assert_allclose(logit, trained.card.heldout_kl_logit, rtol=0, atol=1e-6)
    assert (tuned[:-1] < 0.9 * logit[:-1]).all()
    with pytest.raises(Exception, match="--n-texts must be <= 40"):
        lens.Config(data=str(path), tuned=str(tmp_path / "lens"), n_texts=41).check_model(model)


def test_masked_lm_tuned_lens_and_corpus(roberta_pair):
    """A masked LM trains on masked positions (a seeded 15% of each text's tokens) with the full MLM head as
    readout; the study's sliding-mask comparison and the masked corpus lens both read it."""
    model = roberta_pair.bridge
    cfg = tl.TrainConfig(steps=10, batch_size=8, heldout=10, max_tokens=24)
    t = tl.train_tuned_lens(model, CONTEXTS, cfg)
    assert t.card.kind == "masked" and t.card.mask_prob == 0.15
    assert np.isfinite(t.card.heldout_kl_tuned).all() and t.card.heldout_kl_tuned[-1] == 0.0
    inputs = tlens.lens_inputs(model, CONTEXTS[:3], [0, 1, 2])
    again = tlens.lens_inputs(model, CONTEXTS[1:3], [1, 2])  # the choice depends on the text's index only
    assert torch.equal(inputs.targets[1:, : again.targets.shape[1]], again.targets)
    assert (inputs.batch.tokens[inputs.rows] == model.tokenizer.mask_token_id).all()


def test_cli_train_lens_and_run_lens_tuned(tmp_path, capsys, monkeypatch):
    """The command line offline: train-lens writes the lens into a new --out (and refuses a foreign
    directory), run lens --tuned DIR writes both lenses into results.json and the CSVs, and a lens of
    another model is exit 2 with one line."""
    monkeypatch.chdir(tmp_path)
    args = ["train-lens", "--model", "tiny-mlm", "--data", "contexts", "--steps", "3", "--heldout", "10",
            "--batch-size", "4", "--max-tokens", "16", "--quiet"]  # fmt: skip
    assert main([*args, "--out", "lens"]) == 0
    assert (tmp_path / "lens" / tlens.WEIGHTS_FILE).is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert main([*args, "--out", "mine"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["run", "lens", "--model", "tiny-mlm", "--tuned", "lens", "--out", "run", "--quiet"]) == 0
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    m = doc["lens"]["tiny-mlm"]["metrics"]
    assert len(m["tuned"]["tuned"]["kl_to_final_by_layer"]) == 7
    assert (tmp_path / "run" / "lens__tiny-mlm__tuned_lens.csv").is_file()
    capsys.readouterr()
    assert main(["run", "lens", "--model", "tiny-gpt2", "--tuned", "lens", "--out", "run2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fingerprint" in err[0] and not (tmp_path / "run2").exists()


@pytest.mark.slow  # ~40 s on 2 cores: three mechlens processes start (import torch, load the model)
def test_two_processes_train_the_same_lens_as_one(tmp_path):
    """torchrun with 2 gloo processes trains the same translators as 1 process: each step covers the same
    window of texts, gradients and counts are all-reduced before the step. Tolerance 1e-6 on translator
    entries of size ~1: the ranks sum their fp32 gradients in another order and pad their own batches
    (~1e-7 relative on activations), over 6 steps of size <= 0.01. In float32: with bfloat16 products the
    two ranks' different batch shapes round differently (~4e-6 measured), which says nothing about the
    all-reduce."""
    from safetensors.torch import load_file

    args = ["train-lens", "--model", "tiny-mlm", "--data", "contexts", "--steps", "6", "--heldout", "8",
            "--batch-size", "8", "--max-tokens", "24", "--no-evaluate", "--quiet",
            "--readout-dtype", "float32"]  # fmt: skip
    one = _mechlens([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _mechlens([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    a, b = load_file(str(tmp_path / "one" / tlens.WEIGHTS_FILE)), load_file(str(tmp_path / "two" / tlens.WEIGHTS_FILE))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = float((a["weight"][0] - torch.eye(a["weight"].shape[-1])).abs().max())
    assert diff < 1e-6 and moved > 1e-4, (diff, moved)
    ca = json.loads((tmp_path / "one" / tlens.CARD_FILE).read_text())
    cb = json.loads((tmp_path / "two" / tlens.CARD_FILE).read_text())
    assert cb["world_size"] == 2 and ca["world_size"] == 1 and ca["n_train_texts"] == cb["n_train_texts"]
    np.testing.assert_allclose(ca["loss_curve"], cb["loss_curve"], rtol=1e-5)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "lens", "--model", "tiny-gpt2", "--tuned", "nowhere"], "--tuned nowhere: no tuned lens there"),
        (["train-lens", "--model", "tiny-gpt2", "--out", "x"], "--data is required"),
        (["train-lens", "--model", "tiny-gpt2", "--data", "contexts", "--out", "x", "--lr", "0"], "--lr"),
        (
            ["train-lens", "--model", "tiny-gpt2", "--data", "contexts", "--out", "x", "--max-tokens", "5000"],
            "--max-tokens",
        ),
        (
            [
                "train-lens",
                "--model",
                "tiny-gpt2",
                "--data",
                "contexts",
                "--out",
                "x",
                "--heldout",
                "100000",
                "--no-evaluate",
            ],
            "no training text",
        ),
    ],
)
def test_bad_inputs_are_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    """Bad tuned-lens input: exit 2, one line on stderr naming the flag or the fix, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--quiet"] if argv[0] == "run" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_shipped_lenses_run_offline(tmp_path, monkeypatch):
    """`mechlens run lens --tuned tiny-gpt2` with the study's default models (tiny-mlm and tiny-gpt2): the
    named lens applies to tiny-gpt2, tiny-mlm reads its own shipped lens (auto); both are identity at the
    last point and were trained with the command in their card."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "lens", "--tuned", "tiny-gpt2", "--out", "run", "--quiet"]) == 0
    doc = json.loads((tmp_path / "run" / "results.json").read_text())["lens"]
    assert doc["tiny-gpt2"]["metrics"]["tuned"]["source"] == "tiny-gpt2"
    assert doc["tiny-mlm"]["metrics"]["tuned"]["source"] == "auto"
    from mechlens.zoo import EMBEDDED

    for name in EMBEDDED:
        card = json.loads((EMBEDDED[name].path / tlens.CARD_FILE).read_text())
        assert card["command"].startswith("python -m training.tuned_lens") and card["steps"] == 250
        assert "training.tuned_lens" in (EMBEDDED[name].path / "MODEL_CARD.md").read_text()


def _kl_points_case(model):
    """The setting of the kl_points tests: tiny-gpt2's own readout (LayerNorm + 50,257-word unembedding), 24
    seeded rows, 3 readout points with seeded near-identity translators (``params(dtype)`` makes a fresh copy
    of them), and the float64 reference: kl_sum's autograd per point, its gradients in ``w64``/``b64``."""
    from mechlens import arch

    ro = arch.readout(model)
    ro64 = LinearReadout(pre=lambda x: ro.pre(x.float()).double(), weight=ro.weight.double(), bias=ro.bias.double())
    g = torch.Generator().manual_seed(3)
    d, n = model.cfg.d_model, 24
    h_final = torch.randn(n, d, generator=g)
    hs = [torch.randn(n, d, generator=g) * (j + 1) for j in range(3)]

    def params(dtype):
        g2 = torch.Generator().manual_seed(4)
        ws = [(torch.eye(d) + 0.05 * torch.randn(d, d, generator=g2)).to(dtype).requires_grad_() for _ in hs]
        bs = [(0.1 * torch.randn(d, generator=g2)).to(dtype).requires_grad_() for _ in hs]
        return ws, bs

    w64, b64 = params(torch.float64)
    ref = torch.stack(
        [tl.kl_sum(ro64, h_final.double(), h.double(), w, b) for h, w, b in zip(hs, w64, b64, strict=True)]
    )
    ref.sum().backward()
    return ro, h_final, hs, params, w64, b64, ref


def test_kl_points_is_the_kl_and_its_gradient(tiny_gpt2_pair):
    """kl_points (the training step: the final distribution read once for all points, the closed-form
    gradient softmax(z) - p_final) against kl_sum's autograd in float64, on tiny-gpt2's own readout (LayerNorm
    + 50,257-word unembedding), 3 points, 24 rows, in chunks of 5 rows and whole. Sums: within 3e-5 nats per
    row of float64, i.e. ~4e-6 of these ~8-nat KLs (fp32 logits carry ~1e-6 absolute rounding, and the fused
    softmax's fp32 sum of 50,257 exponentials ~1e-6 to 1e-5 relative: measured 6.5e-6 per row with the
    avx512 kernels, which accumulate in 16 lanes, 1.5e-5 with the avx2 and default ones). Gradients: within
    1e-4 of their scale (fp32 products over the vocabulary; measured 9e-6 avx512, 1.6e-5 avx2/default)."""
    ro, h_final, hs, params, w64, b64, ref = _kl_points_case(tiny_gpt2_pair.bridge)
    n = len(h_final)
    row_bytes = (len(hs) + 2) * 4 * ro.d_vocab
    for chunk in (5 * row_bytes, 2**30):
        w32, b32 = params(torch.float32)
        got = tl.kl_points(ro, h_final, hs, w32, b32, max_chunk_bytes=chunk)
        assert (got - ref.detach()).abs().max() < 3e-5 * n, (got, ref)
        for a, b in zip([*w32, *b32], [*w64, *b64], strict=True):
            assert (a.grad.double() - b.grad).abs().max() < 1e-4 * b.grad.abs().max()


def test_tuned_names_resolve_to_a_lens_or_an_embedded_model(tmp_path, monkeypatch, capsys):
    """--tuned NAME: a local directory named like an embedded model but holding no lens (what `mechlens export
    tiny-gpt2 tiny-gpt2` creates) does not shadow the shipped lens; one holding a lens makes the name
    ambiguous, refused in one line (exit 2) that says how to pick either; ./NAME is always the directory."""
    from mechlens.zoo import EMBEDDED

    monkeypatch.chdir(tmp_path)
    shipped = EMBEDDED["tiny-gpt2"].path
    (tmp_path / "tiny-gpt2").mkdir()
    (tmp_path / "tiny-gpt2" / "config.json").write_text("{}")
    assert tlens.resolve_dir("tiny-gpt2") == shipped
    assert tlens.resolve_dir("elsewhere") == pathlib.Path("elsewhere")
    for f in (tlens.WEIGHTS_FILE, tlens.CARD_FILE):
        shutil.copy(shipped / f, tmp_path / "tiny-gpt2" / f)
    with pytest.raises(tlens.TunedLensError, match="ambiguous"):
        tlens.resolve_dir("tiny-gpt2")
    assert tlens.resolve_dir(f".{os.sep}tiny-gpt2") == pathlib.Path("tiny-gpt2")
    assert main(["run", "lens", "--model", "tiny-gpt2", "--tuned", "tiny-gpt2", "--out", "run", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mechlens: error: --tuned tiny-gpt2 is ambiguous"), err
    assert not (tmp_path / "run").exists()


def test_an_embedded_lens_named_for_another_model(tmp_path, monkeypatch, capsys, gpt2_pair):
    """`run lens --model DIR --tuned tiny-gpt2`: the shipped lens applies to a local copy of tiny-gpt2 (same
    fingerprint; the result names its source), and a different model is refused in one line naming --tuned
    (exit 2, nothing written) instead of running silently without a tuned lens."""
    from mechlens.zoo.export import export_model

    monkeypatch.chdir(tmp_path)
    export_model("tiny-gpt2", tmp_path / "mygpt2")
    assert main(["run", "lens", "--model", "mygpt2", "--tuned", "tiny-gpt2", "--out", "run", "--quiet"]) == 0
    doc = json.loads((tmp_path / "run" / "results.json").read_text())["lens"]
    (m,) = doc.values()
    assert m["metrics"]["tuned"]["source"] == "tiny-gpt2"
    gpt2_pair.hf.save_pretrained(tmp_path / "other")
    gpt2_pair.tok.save_pretrained(tmp_path / "other")
    capsys.readouterr()
    assert main(["run", "lens", "--model", "other", "--tuned", "tiny-gpt2", "--out", "run2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tuned tiny-gpt2" in err[0] and "fingerprint" in err[0], err
    assert not (tmp_path / "run2").exists()


def test_corpus_lens_kl_is_the_float64_kl(tiny_gpt2_pair):
    """The corpus lens' KL to the final layer (lens_reduce: fp32 vocabulary tiles, float64 running sums, each
    distribution normalised by its own sum) equals a float64 log_softmax of the same fp32 logits within
    1e-6 nats + 3e-8 relative at every readout point (measured on 40 training texts: <= 2.2e-7 at KL 32.6).
    This is the '5-7e-6 nats below tuned-lens' of issue 29: the package's fp32 formula
    exp(lp_f) * (lp_f - lp_l) with fp32 log_softmax is the one off, upwards (by 2.6e-6 to 2.2e-4 nats on
    those texts: its rounded logsumexp shifts every log-probability, so its exp(lp_f) do not sum to 1)."""
    from mechlens import arch
    from mechlens.lens.corpus import corpus_lens

    model = tiny_gpt2_pair.bridge
    texts = CONTEXTS[:8]
    c = corpus_lens(model, texts, bos=True, max_tokens=32, n_samples=1)
    x = tl.lens_inputs(model, texts, range(len(texts)), bos=True, max_tokens=32)
    with torch.no_grad():
        resid = tl.residuals(model, x)[:, x.rows]
        ro = arch.readout(model)
        lp = [ro(r).double().log_softmax(-1) for r in resid]
    ref = np.array([float((lp[-1].exp() * (lp[-1] - q)).sum(-1).mean()) for q in lp])
    assert c.n_predictions == int(x.rows.sum())
    assert np.all(np.abs(np.asarray(c.kl_to_final_by_layer) - ref) <= 1e-6 + 3e-8 * ref), (c.kl_to_final_by_layer, ref)


def test_kl_points_in_bfloat16(tiny_gpt2_pair):
    """kl_points with bfloat16 vocabulary products (training's default where bf16 is native hardware) against
    kl_sum's autograd in float64, the setting of test_kl_points_is_the_kl_and_its_gradient. bfloat16 keeps 8
    significant bits: every operand and every logit is rounded by up to u = 2^-9 relative, ~0.05 nats on these
    logits of |z| <= 25, and exp(z - max) by u; the errors of different words partly cancel in the p-weighted
    sums, so a row's KL is asked within 1e-2 nats of float64 (measured 3.4e-3) and each gradient within 3% of
    its largest entry and 2% in norm (a few u of (q - p_final) entries, which are 0.1-1 here; measured 1.0% and
    0.8%; float32 is within 3e-5 per row and 1e-4, test_kl_points_is_the_kl_and_its_gradient). Chunked and
    whole calls, with one workspace reused between them, give the same sums."""
    ro, h_final, hs, params, w64, b64, ref = _kl_points_case(tiny_gpt2_pair.bridge)
    n = len(h_final)
    workspace: dict = {}
    sums = []
    for chunk in (5 * (3 * 2 + 2 * 4) * ro.d_vocab, 2**30):
        w, b = params(torch.float32)
        got = tl.kl_points(ro, h_final, hs, w, b, max_chunk_bytes=chunk, dtype=torch.bfloat16, workspace=workspace)
        assert workspace["w_low"].dtype == torch.bfloat16
        assert ((got - ref.detach()) / n).abs().max() < 1e-2, (got, ref)
        for a, r in zip([*w, *b], [*w64, *b64], strict=True):
            err = a.grad.double() - r.grad
            assert err.abs().max() < 0.03 * r.grad.abs().max() and err.norm() < 0.02 * r.grad.norm()
        sums.append(got)
    assert torch.allclose(sums[0], sums[1], rtol=1e-6)  # chunks sum in another order: fp32/float64 rounding only


def test_kl_points_bfloat16_gradient_is_that_of_its_own_forward(tiny_gpt2_pair):
    """In bfloat16 the gradient kl_points accumulates is the derivative of the KL its forward computes (pre(x)
    and W_U rounded to bf16, logits stored in bf16), as the reference implementation's autocast backward: both
    sides of (q - p_final) @ W_U^T use the rounded W_U, and q - p_final is formed in fp32 and rounded once.
    Measured at the final point itself with the identity translator (136 rows of tiny-gpt2's residual stream),
    where the exact gradient is 0 and the bf16 forward's is its rounding's alone (~2 in norm), against that
    forward's float64 autograd: 0.13% to 0.21% of the reference's norm under the avx512, avx2 and default
    kernels (the bf16 rounding of q - p_final, 2^-9 = 0.2% of itself), asked within 1%. The two earlier forms
    fail it (checked): q rounded to bf16 before p_final is subtracted (an error of 2^-9 of q, not of q -
    p_final) at 26.5% / 19.6%; p_final @ W_fp32^T beside q @ W_bf16^T, which adds p_final @ (W_bf16 - W)^T, a
    fixed error no step averages away, at 55%."""
    from mechlens import arch

    model = tiny_gpt2_pair.bridge
    ro = arch.readout(model)
    inputs = tlens.lens_inputs(model, CONTEXTS[:8], range(8), bos=True, max_tokens=32)
    h_final = tl.stream_rows(model, inputs, inputs.rows)[-1]
    assert h_final.shape == (136, model.cfg.d_model)
    d = model.cfg.d_model
    w64 = torch.eye(d, dtype=torch.float64, requires_grad=True)
    b64 = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    u = ro.pre((h_final.double() @ w64 + b64).float()).double()
    z = (u.to(torch.bfloat16).double() @ ro.weight.to(torch.bfloat16).double()).to(torch.bfloat16).double()
    lp_f = torch.log_softmax(ro.pre(h_final).double() @ ro.weight.double(), -1)
    (lp_f.exp() * (lp_f - torch.log_softmax(z, -1))).sum().backward()
    w, b = torch.eye(d, requires_grad=True), torch.zeros(d, requires_grad=True)
    tl.kl_points(ro, h_final, [h_final], [w], [b], 2**30, dtype=torch.bfloat16, workspace={})
    for got, ref in ((w.grad, w64.grad), (b.grad, b64.grad)):
        assert ref.norm() > 0.1  # the rounding's own gradient (measured 2.1 and 0.22), not 0
        assert (got.double() - ref).norm() < 0.01 * ref.norm(), ((got.double() - ref).norm(), ref.norm())


def test_softmax_minus_final_is_the_same_in_any_block_size(monkeypatch):
    """_softmax_minus_final works a block of rows at a time (32 on a CPU, up to 64 MiB of rows on a GPU): every
    block size, partial last blocks included, gives bit for bit the same (q - p_final) and q at the top word
    (each row's softmax is its own), and they are the float64 values within bf16's 2^-9 of (q - p_final) and
    fp32 rounding of q (1e-6 relative)."""
    g = torch.Generator().manual_seed(5)
    n_points, r, d_vocab = 3, 7, 1000
    z0 = (4 * torch.randn(n_points * r, d_vocab, generator=g)).to(torch.bfloat16)
    p_f = torch.softmax(4 * torch.randn(r, d_vocab, generator=g), -1)
    top = p_f.argmax(-1, keepdim=True)
    outs = []
    for block in (1, 3, 7, 32):
        monkeypatch.setattr(tl, "SOFTMAX_BLOCK", block)
        z = z0.clone()
        q_k = tl._softmax_minus_final(z, p_f, top, n_points, r, {})
        outs.append((z, q_k))
    for z, q_k in outs[1:]:
        assert torch.equal(z, outs[0][0]) and torch.equal(q_k, outs[0][1])
    q64 = torch.softmax(z0.double(), -1)
    diff = q64 - p_f.double().repeat(n_points, 1)
    z, q_k = outs[0]
    assert ((z.double() - diff).abs() <= 2**-8 * diff.abs() + 1e-12).all()
    torch.testing.assert_close(q_k, q64.gather(-1, top.repeat(n_points, 1)), rtol=1e-6, atol=0)


def test_stream_rows_is_the_residual_stream(tiny_gpt2_pair):
    """Training's forward (stream_rows: hooks on the readout points, stopped at the last one, no unembedding)
    gives exactly the residual stream of the full forward (residuals through run_cached) at the loss
    positions: the same operations on the same inputs, so equality, not a tolerance."""
    model = tiny_gpt2_pair.bridge
    inputs = tlens.lens_inputs(model, CONTEXTS[:5], range(5), bos=True, max_tokens=32)
    with torch.no_grad():
        full = tlens.residuals(model, inputs)[:, inputs.rows]
    got = tl.stream_rows(model, inputs, inputs.rows)
    assert got.shape == (model.cfg.n_layers + 1, int(inputs.rows.sum()), model.cfg.d_model)
    assert torch.equal(got, full)
    assert not any(h.fwd_hooks for h in model.hook_dict.values() if hasattr(h, "fwd_hooks"))


def test_readout_dtype_auto_follows_the_hardware(monkeypatch):
    """--readout-dtype auto: bfloat16 only where the CPU multiplies it natively (AMX-BF16 or AVX512-BF16),
    float32 elsewhere (emulated bf16 products are slower than fp32); explicit choices are kept."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx2": True})
    assert tl.readout_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert tl.readout_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert tl.readout_dtype("auto", "cpu") == torch.bfloat16
    assert tl.readout_dtype("float32", "cpu") == torch.float32
    assert tl.readout_dtype("bfloat16", "cpu") == torch.bfloat16


def test_kl_points_where_the_finals_top_word_underflows():
    """kl_points reads lse(z) = z_k - log softmax(z)_k at the final's top word k; where that probability is
    below 2^-100 (here exp(-160)), the row's lse is recomputed from its logits. A 4-word readout whose final
    puts its mass on word 0 while the translated readout gives word 0 a logit 160 below the others: the KL
    (~160 nats) equals float64 autograd within 1e-4 relative (fp32 logits of size 160 carry ~1e-5)."""
    eye = torch.eye(4)
    ro = LinearReadout(pre=lambda x: x, weight=eye.clone())
    ro64 = LinearReadout(pre=lambda x: x, weight=eye.double())
    h_final = torch.tensor([[20.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0]])
    h = torch.tensor([[-160.0, 0.0, 1.0, 0.5], [0.0, 1.0, 2.0, 0.0]])
    w, b = eye.clone().requires_grad_(), torch.zeros(4, requires_grad=True)
    got = tl.kl_points(ro, h_final, [h], [w], [b], max_chunk_bytes=2**20)
    ref = tl.kl_sum(ro64, h_final.double(), h.double(), eye.double(), torch.zeros(4, dtype=torch.float64))
    assert float(ref) > 150 and abs(float(got[0]) - float(ref)) < 1e-4 * float(ref), (got, ref)
