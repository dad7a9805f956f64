"""The mechlens command end to end on the embedded models: every study, all, a two-model comparison,
compare; each listed bad input gives exit code 2, a one-line error, and no output at all."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mechlens.cli import main
from mechlens.runner import STUDIES


def _no_partial_files(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "all"
    assert main(["run", "all", "--out", str(out)]) == 0
    return out


def test_run_all_writes_every_study(all_run):
    doc = json.loads((all_run / "results.json").read_text())
    assert set(doc) - {"_notes", "_run"} == set(STUDIES)
    assert doc["_run"]["command"] == f"mechlens run all --out {all_run}" and doc["_run"]["date"].startswith("20")
    assert set(doc["lens"]) == {"tiny-mlm", "tiny-gpt2"}
    for study, entries in doc.items():
        if study.startswith("_"):
            continue
        for e in entries.values():
            assert e["provenance"]["transformer_lens"].startswith("4.3") and e["provenance"]["seed"] == 0
    html = (all_run / "report.html").read_text()
    assert html.count("plotly.js v") == 1  # the library once, inline: works offline from file://
    assert html.count('class="plotly-graph-div"') >= 20 and "<script src=" not in html
    # the tidy CSV agrees with results.json
    with (all_run / "position__tiny-gpt2__loss_matrix.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    by_pos = [np.mean([float(r["loss"]) for r in rows if int(r["position"]) == p]) for p in range(5)]
    # both are float64 means of the same fp32 losses (the CSV holds them exactly): only the order of
    # the float64 additions may differ, ~1e-16 relative
    np.testing.assert_allclose(by_pos, doc["position"]["tiny-gpt2"]["metrics"]["loss_mean_by_position"], rtol=1e-12)


@pytest.mark.parametrize("study", list(STUDIES))
def test_each_study_runs_alone(tmp_path, study):
    out = tmp_path / study
    assert main(["run", study, "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc) == [study, "_notes", "_run"]
    assert (out / "report.html").stat().st_size > 3_000_000  # plotly.js inline


def test_two_model_comparison_and_compare(tmp_path, all_run):
    from conftest import make_gpt2

    hf, tok = make_gpt2()
    local = tmp_path / "random-gpt2"
    hf.save_pretrained(local)
    tok.save_pretrained(local)
    out = tmp_path / "two"
    assert main(["run", "position", "--model", "tiny-gpt2", "--model", str(local), "--n-train", "40",
                 "--n-test", "40", "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    a, b = doc["position"]["tiny-gpt2"], doc["position"][str(local)]
    assert a["config"] == b["config"]  # same inputs
    assert a["metrics"]["loss_mean_by_position"] != b["metrics"]["loss_mean_by_position"]
    assert "Loss by position, per model" in (out / "report.html").read_text()
    cmp_out = tmp_path / "cmp"
    assert main(["compare", str(all_run), str(out), "--out", str(cmp_out)]) == 0
    merged = json.loads((cmp_out / "results.json").read_text())
    assert len(merged["position"]) == 3


def test_study_options_become_flags(tmp_path):
    out = tmp_path / "opt"
    assert main(["run", "logits", "--prompt", "I drink my", "--top-k", "3", "--no-bos", "--out", str(out)]) == 0
    m = json.loads((out / "results.json").read_text())["logits"]["tiny-gpt2"]
    assert len(m["metrics"]["topk"]) == 3 and m["config"]["bos"] is False and m["provenance"]["bos"] == "none"


def _nan_model_dir(tmp_path):
    from conftest import make_gpt2

    hf, tok = make_gpt2()
    with torch.no_grad():
        hf.transformer.h[0].attn.c_proj.weight.fill_(float("nan"))
    d = tmp_path / "nan-gpt2"
    hf.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "attention"], "unknown study"),
        (["run", "position", "--model", "gpt2-xxl-not-cached"], "not in the local Hugging Face cache"),
        (["run", "position", "--data", "hellaswag"], "needs the Hugging Face hub"),
        (["run", "position", "--n-train", "400", "--n-test", "400"], "only 310"),
        (["run", "distances", "--target", " piano"], "occurs 0"),
        (["run", "magnitudes", "--model", "tiny-gpt2", "--model", "tiny-mlm"], "vocabulary mismatch"),
        (["run", "magnitudes", "--model", "NAN_MODEL"], "NaN or infinite weights"),
    ],
)
def test_bad_input_exit_code_and_no_output(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [str(_nan_model_dir(tmp_path)) if a == "NAN_MODEL" else a for a in argv]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mechlens: error:") and message in err
    _no_partial_files(tmp_path, out)


def test_console_script_exit_code(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mechlens")
    r = subprocess.run([exe, "run", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == 2 and "unknown study 'nope'" in r.stderr
    r = subprocess.run([exe, "list"], capture_output=True, text=True)
    assert r.returncode == 0 and "tiny-mlm" in r.stdout and "hellaswag" in r.stdout


def test_help_list_and_unknown_study_do_not_import_torch():
    """They answer at once: torch (about 2 s to import) is loaded only when a model is needed."""
    code = (
        "import sys, contextlib, io\n"
        "from mechlens.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    codes = [main(['--help']), main(['list']), main(['run', 'attention']), main(['run', '--help'])]\n"
        "assert codes == [0, 0, 2, 0], codes\n"
        "assert 'torch' not in sys.modules and 'transformer_lens' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_study_help_shows_meaning_default_and_range(capsys):
    assert main(["run", "magnitudes", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--hist-bins HIST_BINS bins of the log-norm histograms (default: 60; >= 1)" in text
    assert "(default: runs/latest)" in text


def test_options_before_and_after_the_study(tmp_path):
    out = tmp_path / "a"
    argv = ["run", "--out", str(out), "--top-k", "3", "logits", "--n-samples", "10", "--n-new-tokens", "2"]
    assert main(argv) == 0
    m = json.loads((out / "results.json").read_text())["logits"]["tiny-gpt2"]
    assert len(m["metrics"]["topk"]) == 3 and m["config"]["n_samples"] == 10
    out = tmp_path / "b"
    assert main(["run", "--model", "tiny-gpt2", "--out", str(out), "lens", "--text", "Hot coffee is hot."]) == 0
    m = json.loads((out / "results.json").read_text())["lens"]["tiny-gpt2"]
    assert m["config"]["text"] == "Hot coffee is hot." and m["metrics"]["text_tokens"][1] == "Hot"


def test_rerun_replaces_its_own_run_and_keeps_nothing_stale(tmp_path):
    out = tmp_path / "r"
    assert main(["run", "logits", "--n-samples", "10", "--n-new-tokens", "2", "--out", str(out)]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert main(["run", "lens", "--model", "tiny-gpt2", "--out", str(out)]) == 0
    second = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith("logits__") for n in second) and any(n.startswith("lens__") for n in second)
    assert first != second and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
