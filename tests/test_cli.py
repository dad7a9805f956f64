"""The mechlens command end to end on the embedded models: every study, all, a two-model comparison,
compare; each listed bad input gives exit code 2, a one-line error, and no output at all."""

from __future__ import annotations

import csv
import json
import os
import re
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


def test_same_command_twice_gives_byte_identical_results_and_csvs(all_run):
    """Reproducible outputs: the same command, seed and versions write byte-identical results.json and CSVs.
    The one time in them is the run's date, ``_run.date``, excluded here by name (statsmodels' OLS summary
    printed its date and time too: it no longer does)."""
    kept = (".json", ".csv")  # results.json and the CSVs; not the run marker .mechlens-run.json (mechlens'
    # bookkeeping: it holds the SHA-256 of each file written, results.json with its date included)
    first = {p.name: p.read_bytes() for p in all_run.iterdir() if p.suffix in kept and not p.name.startswith(".")}
    assert main(["run", "all", "--out", str(all_run)]) == 0  # the same command line (--out included)
    second = {p.name: p.read_bytes() for p in all_run.iterdir() if p.suffix in kept and not p.name.startswith(".")}
    assert sorted(first) == sorted(second) and len(first) > 20

    def without_date(raw: bytes) -> bytes:
        date = json.loads(raw)["_run"]["date"]
        assert date.startswith("20") and raw.count(json.dumps(date).encode()) == 1
        return raw.replace(json.dumps(date).encode(), b'"(date)"')

    for name in sorted(first):
        a, b = first[name], second[name]
        if name == "results.json":
            a, b = without_date(a), without_date(b)
        assert a == b, f"{name} differs between two identical runs"
    ols = json.loads(first["results.json"])["position"]["tiny-gpt2"]["metrics"]["ols"]["summary"]
    assert "OLS Regression Results" in ols and "Date:" not in ols and "Time:" not in ols and "R-squared:" in ols


def test_options_that_apply_to_some_models_only_are_noted(tmp_path, capsys):
    """--layer reads the masked LM's lens only: applied to tiny-mlm, and the run says, in the terminal and in
    results.json, that tiny-gpt2 ignored it (with no model that uses it, it is refused: test_bad_inputs)."""
    out = tmp_path / "l"
    assert main(["run", "lens", "--layer", "2", "--quiet", "--out", str(out)]) == 0
    note = "lens on tiny-gpt2: --layer not applied: it applies to masked LMs only"
    assert f"mechlens: note: {note}" in capsys.readouterr().err.splitlines()
    doc = json.loads((out / "results.json").read_text())
    assert note in doc["_notes"] and note in (out / "report.html").read_text()
    assert doc["lens"]["tiny-mlm"]["metrics"]["layer"] == 2


def test_compare_help_describes_the_command(capsys):
    assert main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Combine two or more earlier runs" in text and "comparison.csv" in text


@pytest.mark.parametrize(
    ("configs", "given", "kinds", "refused", "notes"),
    [
        # lens without --data: the corpus-lens options are refused before any model is loaded (kind None)
        ({"lens": {}}, {"n_texts"}, {"lens": {"a": None}}, "--n-texts (n_texts) does not apply", []),
        ({"lens": {}}, {"mask_prob"}, {"lens": {"a": None}}, "--mask-prob (mask_prob) does not apply", []),
        ({"lens": {"data": "contexts"}}, {"n_texts", "max_tokens"}, {"lens": {"a": "causal"}}, None, []),
        ({"lens": {"data": "contexts"}}, {"position"}, {"lens": {"a": None}}, "with --data the corpus lens", []),
        # the masked lens' options: refused on a causal LM alone, noted beside a masked one
        ({"lens": {}}, {"layer"}, {"lens": {"g": None}}, None, []),  # kind not known yet: decided after loading
        ({"lens": {}}, {"layer"}, {"lens": {"g": "causal"}}, "applies to masked LMs only", []),
        ({"lens": {}}, {"heatmap_specials", "position"}, {"lens": {"m": "masked", "g": "causal"}}, None,
         ["lens on g: --heatmap-specials not applied: it applies to masked LMs only",
          "lens on g: --position not applied: it applies to masked LMs only"]),
        ({"lens": {"data": "contexts"}}, {"mask_prob"}, {"lens": {"g": "causal"}}, "masked LMs only", []),
        ({"lens": {"data": "contexts"}}, {"mask_prob", "bos"}, {"lens": {"m": "masked"}}, "--bos (bos)", []),
        # BOS: masked LMs always get <s> ... </s> in position, logits and lens; magnitudes and distances use it
        ({"position": {}}, {"bos"}, {"position": {"m": "masked"}}, "a masked LM always gets <s> ... </s>", []),
        ({"logits": {}}, {"bos"}, {"logits": {"m": "masked", "g": "causal"}}, None,
         ["logits on m: --bos not applied: a masked LM always gets <s> ... </s>"]),
        ({"magnitudes": {}, "distances": {}}, {"bos"}, {"magnitudes": {"m": "masked"}, "distances": {"m": "masked"}},
         None, []),
        # run all: an option one study uses is applied there and noted where another study ignores it
        ({"lens": {}, "magnitudes": {}}, {"n_texts"}, {"lens": {"m": None}, "magnitudes": {"g": None}}, None,
         ["lens on m: --n-texts not applied: it sets the corpus lens, which runs only with --data SOURCE (without "
          "it the lens reads the one --text)"]),
        # options every model uses
        ({"position": {}, "distances": {}, "magnitudes": {}}, {"seqlen", "n_context", "padding_side"},
         {"position": {"m": "masked"}, "distances": {"m": "masked"}, "magnitudes": {"g": "causal"}}, None, []),
    ],
)  # fmt: skip
def test_unused_options_are_refused_or_noted(configs, given, kinds, refused, notes):
    from mechlens.cli import unused_options
    from mechlens.errors import ConfigError

    built = {s: STUDIES[s].module.Config(**kw) for s, kw in configs.items()}
    if refused:
        with pytest.raises(ConfigError, match=re.escape(refused)):
            unused_options(built, given, kinds)
    else:
        assert unused_options(built, given, kinds) == notes
