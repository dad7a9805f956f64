"""The bad-input table: every input here must give exit code 2 and one line on stderr that names a flag
or a fix, with no traceback, nothing written anywhere, and an earlier run in ``--out`` left untouched.

Each case runs ``mechlens`` in-process from inside a scratch directory; the scratch directory's whole
tree (files and bytes) is compared before and after, so a stray write anywhere under it fails the case.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil

import pytest
import torch

from mechlens.cli import main

PREVIOUS = "previous-run"  # an earlier mechlens run, the default --out of every case


def _tree(root: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def scratch_template(tmp_path_factory) -> pathlib.Path:
    """Input files for the cases, and an earlier run in PREVIOUS."""
    from conftest import make_gpt2, make_short_gpt2

    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "short.txt").write_text("Hi.\n")
    (d / "latin1.txt").write_bytes("café au lait\nun autre café\n".encode("latin-1"))
    (d / "blank.txt").write_text("   \n\n \t \n")
    (d / "notes.txt").write_text("my notes\n")
    (d / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (d / "rows.csv").write_text("title,body\na,b\n")
    # prompt pairs (study interventions): unequal lengths in pair #1, a two-token target, a missing column
    good = {"clean": "The cat sat on the mat", "corrupt": "The dog sat on the mat", "target": " and", "foil": " or"}
    pairs = [good, {**good, "corrupt": "The big dog sat on the mat"}]
    (d / "unequal_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (d / "two_token_target.jsonl").write_text(json.dumps({**good, "target": " and then"}) + "\n")
    (d / "no_foil.csv").write_text("clean,corrupt,target\nThe cat,The dog, sat\n")
    (d / "precious").mkdir()
    (d / "precious" / "thesis.txt").write_text("three years of work\n")
    hf, tok = make_gpt2()
    hf.save_pretrained(d / "truncated")
    tok.save_pretrained(d / "truncated")
    st = d / "truncated" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    hf.save_pretrained(d / "no-tokenizer")
    with torch.no_grad():  # finite weights whose first MLP overflows fp32: inf, then NaN, in the activations
        hf.transformer.h[0].mlp.c_fc.weight.fill_(3e38)
    hf.save_pretrained(d / "overflow")
    tok.save_pretrained(d / "overflow")
    with torch.no_grad():
        hf.transformer.h[0].attn.c_proj.weight.fill_(float("nan"))
    hf.save_pretrained(d / "nan-weights")
    tok.save_pretrained(d / "nan-weights")
    assert main(["run", "logits", "--n-samples", "10", "--n-new-tokens", "2", "--out", str(d / PREVIOUS)]) == 0
    assert json.loads((d / PREVIOUS / "results.json").read_text())["logits"]
    # round 3 (issue 28): an earlier run with an edited report, one-text sources, short-context models, and a
    # tuned lens trained on every text of fx/one.txt (no held-out texts)
    shutil.copytree(d / PREVIOUS, d / "edited-run")
    with (d / "edited-run" / "report.html").open("a") as f:
        f.write("<p>my notes on this run</p>\n")
    (d / "fx").mkdir()
    (d / "fx" / "one.txt").write_text("The only text in this file is a sentence about coffee and rain.\n")
    shutil.copy(d / "fx" / "one.txt", d / "copy-of-one.txt")
    for n in (16, 32):
        short, short_tok = make_short_gpt2(n)
        short.save_pretrained(d / f"short{n}")
        short_tok.save_pretrained(d / f"short{n}")
    one, lens = str(d / "fx" / "one.txt"), str(d / "lens-one")
    train = ["train-lens", "--model", "tiny-gpt2", "--data", one, "--heldout", "0", "--steps", "2",
             "--batch-size", "1", "--max-tokens", "8", "--quiet", "--out", lens]  # fmt: skip
    assert main(train) == 0
    return d


# (arguments, a piece of the one-line message: the flag or the fix it names)
CASES = [
    # options out of range: refused when the config is built, before any model is loaded
    ("run position --seqlen -3", "--seqlen"),
    ("run position --batch-size 0", "--batch-size"),
    ("run position --n-train 0", "--n-train"),
    ("run position --solver adam", "--solver"),
    ("run position --C 0", "--C"),
    ("run logits --n-samples 0", "--n-samples"),
    ("run logits --top-k 0", "--top-k"),
    ("run logits --temperature 0", "--temperature"),
    ("run logits --temperature -1", "--temperature"),
    ("run logits --delta nan", "--delta"),
    ("run logits --prompt ''", "--prompt"),
    ("run lens --max-chunk-bytes 0", "--max-chunk-bytes"),
    ("run magnitudes --hist-bins 0", "--hist-bins"),
    ("run magnitudes --hist-range 8 -4", "--hist-range"),
    ("run magnitudes --n-texts -5", "--n-texts"),
    ("run magnitudes --padding-side middle", "--padding-side"),
    ("run distances --n-context 0", "--n-context"),
    ("run distances --mi-bins 1", "--mi-bins"),
    ("run distances --n-targets 2", "--n-targets"),
    ("run logits --seed -1", "--seed"),
    # options that need the model: checked after loading, before any forward pass
    ("run lens --layer 99", "--layer"),
    ("run distances --layer 6", "--layer"),
    ("run lens --position 50", "--position"),
    ("run logits --target ' coffee cup'", "--target"),
    ("run magnitudes --max-tokens 5000", "--max-tokens"),
    # the command line itself
    ("run attention", "unknown study"),
    ("run logits --weights folded", "--weights"),
    ("run logits --hist-bins 3", "unrecognized arguments"),
    ("run logits --data contexts", "--data does not apply"),
    ("run logits --model tiny-gpt2 --model tiny-gpt2", "--model tiny-gpt2 is given twice"),
    ("run logits --device cuda", "--device cuda"),
    ("run logits --device tpu9", "--device"),
    # models
    ("run logits --model ./no-such-dir", "not a model directory"),
    ("run logits --model notes.txt", "not a model directory"),
    ("run logits --model truncated", "corrupt or truncated"),
    ("run logits --model no-tokenizer", "tokenizer.save_pretrained"),
    ("run magnitudes --model nan-weights", "NaN or infinite weights in transformer.h.0.attn.c_proj.weight"),
    ("run logits --model gpt2-xxl-not-cached", "not in the local Hugging Face cache"),
    ("run magnitudes --model overflow", "NaN or infinite activations in model 'overflow', first at blocks.0.mlp."),
    # study and model kinds
    ("run logits --model tiny-mlm --top-k 60000", "the vocabulary size"),
    ("run position --model tiny-mlm --seqlen 600", "--seqlen"),
    # data
    ("run magnitudes --data short.txt", "use more or longer texts"),
    ("run magnitudes --data latin1.txt", "#encoding=latin-1"),
    ("run magnitudes --data blank.txt", "holds no text"),
    ("run magnitudes --data no-such.txt", "no such file"),
    ("run magnitudes --data bad.jsonl", "line 2 is not JSON"),
    ("run magnitudes --data rows.csv", "#<column>"),
    ("run magnitudes --data 'latin1.txt#encoding=klingon'", "unknown text encoding"),
    ("run position --data hellaswag", "needs the Hugging Face hub"),
    ("run position --n-train 400 --n-test 400", "lower --n-train/--n-test"),
    ("run distances --target ' piano'", "choose another --target"),
    ("run interventions --data unequal_pairs.jsonl", "pair #1 (clean 'The cat sat on the mat'): clean and corrupt"),
    ("run interventions --data two_token_target.jsonl", "pair #0 (clean 'The cat sat on the mat'): target"),
    ("run interventions --data no_foil.csv", "has no column 'foil'"),
    ("run interventions --data no-such-pairs.jsonl", "no such file"),
    ("run interventions --n-pairs 0", "--n-pairs"),
    ("run interventions --segment-length 1", "--segment-length"),
    # output directories mechlens must not write
    ("run logits --out notes.txt", "is an existing file"),
    ("run logits --out precious", "non-empty directory that mechlens did not write"),
    ("run logits --out .", "current directory"),
    ("run logits --out ..", "current directory"),
    ("run logits --out notes.txt/sub", "is not a directory"),
    (f"compare {PREVIOUS} {PREVIOUS} --out {PREVIOUS}", "input"),
    (f"compare {PREVIOUS} {PREVIOUS} --out {PREVIOUS}/inside", "input"),
    (f"compare precious {PREVIOUS} --out new-dir", "has no results.json"),
    (f"compare {PREVIOUS} --out new-dir", "compare needs two or more run directories"),
    # options that would be silently ignored: refused where no study and model of the run uses them (before
    # loading where that does not depend on the model)
    (
        "run lens --n-texts 5",
        "--n-texts (n_texts) does not apply to study 'lens' on tiny-mlm, tiny-gpt2: it sets "
        "the corpus lens, which runs only with --data SOURCE",
    ),
    ("run lens --max-tokens 10", "--max-tokens (max_tokens) does not apply"),
    ("run lens --reservoir 10", "--reservoir (reservoir) does not apply"),
    ("run lens --mask-prob 0.3", "--mask-prob (mask_prob) does not apply"),
    (
        "run lens --data contexts --position 3",
        "--position (position) does not apply to study 'lens' on tiny-mlm, tiny-gpt2: with --data the corpus lens runs",
    ),
    ("run lens --data contexts --top-k 3", "--top-k (top_k) does not apply"),
    ("run lens --data contexts --text 'Hello there.'", "--text (text) does not apply"),
    (
        "run lens --model tiny-gpt2 --layer 2",
        "--layer (layer) does not apply to study 'lens' on tiny-gpt2: it applies to masked LMs only",
    ),
    ("run lens --model tiny-gpt2 --heatmap-specials", "--heatmap-specials (heatmap_specials) does not apply"),
    (
        "run lens --model tiny-gpt2 --data contexts --mask-prob 0.3",
        "--mask-prob (mask_prob) does not apply to study 'lens' on tiny-gpt2: it applies to masked LMs only",
    ),
    (
        "run lens --model tiny-mlm --no-bos",
        "--bos (bos) does not apply to study 'lens' on tiny-mlm: a masked LM always gets <s> ... </s>",
    ),
    ("run position --model tiny-mlm --bos", "--bos (bos) does not apply to study 'position'"),
    ("run logits --model tiny-mlm --no-bos", "--bos (bos) does not apply to study 'logits'"),
    # your own checkpoint's tokenizer
    ("add-tokenizer gpt2-bpe no-such-dir", "has no config.json"),
    ("add-tokenizer gpt2-bpe overflow", "already holds a tokenizer ("),
    ("add-tokenizer bert-wordpiece no-tokenizer", "invalid choice"),
    # round 3 (issue 28). Data loss: an earlier run whose report the user edited is not replaced
    ("run logits --out edited-run", "'report.html' was edited since mechlens wrote it"),
    # silent wrong results: the held-out guard compares identity (resolved path, content), not spelling
    ("run lens --model tiny-gpt2 --tuned lens-one --data fx/../fx/one.txt", "trained on every text"),
    ("run lens --model tiny-gpt2 --tuned lens-one --data ./fx/one.txt", "trained on every text"),
    ("run lens --model tiny-gpt2 --tuned lens-one --data copy-of-one.txt", "trained on every text"),
    # every limit before the expensive work: generation length against the context, short contexts
    ("run logits --n-new-tokens 5000", "--n-new-tokens (n_new_tokens) must be <= "),
    ("run logits --model short16", "--n-new-tokens (n_new_tokens) must be <= "),  # loads (the probe fits), then refused
    ("run logits --model short32 --n-new-tokens 30", "--n-new-tokens (n_new_tokens) must be <= "),
    ("run logits --model short16 --prompt 'a b c d e f g h i j k l m n o p q'", "shorten --prompt"),
    ("run position --model short16 --seqlen 20", "--seqlen"),
    ("run lens --model short16 --data contexts --max-tokens 64", "--max-tokens"),
    ("run magnitudes --model short32 --max-tokens 64", "--max-tokens"),
    # sample counts against memory
    ("run logits --n-samples 1000000000000000", "--n-samples"),
    # every path the run reads, before any model is loaded
    ("run logits --model tiny-gpt2 --model ./no-such-dir", "not a model directory"),
    ("run lens --model tiny-gpt2 --tuned ./no-such-lens", "no tuned lens there"),
    ("run lens --model tiny-gpt2 --tuned precious", "no tuned lens there"),
    ("train-lens --model ./no-such-dir --data fx/one.txt --out new-lens", "not a model directory"),
    ("train-lens --model tiny-gpt2 --data no-such.txt --out new-lens", "no such file"),
    # messages name the flag of the study at hand
    ("run position --data fx/one.txt", "--n-train training texts and --n-test"),
    ("run position --data fx/one.txt --n-train 1", "--n-test"),
]


@pytest.mark.parametrize(("args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(scratch_template, tmp_path, monkeypatch, capsys, args, message):
    import shlex

    scratch = tmp_path / "scratch"
    shutil.copytree(scratch_template, scratch, symlinks=True)
    monkeypatch.chdir(scratch)
    before = _tree(scratch)
    argv = shlex.split(args)
    if argv[0] == "run" and "--out" not in argv:
        argv += ["--out", PREVIOUS]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (args, code, err[-2000:])
    assert len(lines) == 1, (args, err[-2000:])
    assert lines[0].startswith("mechlens: error: ") and "Traceback" not in err
    assert message in lines[0], (args, lines[0])
    assert out == ""
    assert _tree(scratch) == before  # nothing written, nothing removed, the earlier run untouched
