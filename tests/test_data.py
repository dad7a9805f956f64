"""Built-in texts meet their size requirements; sources stream through datasets (every file type, options,
errors with file offsets, n_texts, shards by rank, constant memory) and fail fast offline."""

from __future__ import annotations

import itertools
import json
import pathlib
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from mechlens import DataError
from mechlens.data import (
    batched,
    check_source,
    iter_indexed,
    iter_texts,
    load_texts,
    parse_hf,
    split_train_test,
    stream,
)
from mechlens.data import sources as src
from mechlens.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _n(tok, s):
    return len(tok(s, add_special_tokens=False)["input_ids"])


def test_builtin_contexts(tok):
    ctx = load_texts("contexts")
    assert len(ctx) >= 300 and len(set(ctx)) == len(ctx)
    assert min(_n(tok, c) for c in ctx) >= 8


def test_builtin_reviews(tok):
    rev = load_texts("reviews")
    lengths = [_n(tok, r) for r in rev]
    assert len(rev) >= 64 and max(lengths) >= 3 * min(lengths)  # varied length


def test_builtin_coffee_article(tok):
    (article,) = load_texts("coffee")
    ids = tok(article, add_special_tokens=False)["input_ids"]
    assert len(article.split()) >= 600
    assert ids.count(6891) >= 16  # " coffee" as a single token
    assert len(ids) <= 1024


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    (tmp_path / "c.csv").write_text("review,label\ngood film,1\nbad film,0\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first line", "second line"]
    assert load_texts(f"{tmp_path / 'a.txt'}#document") == ["first line\n\nsecond line"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x y", "z"]
    assert load_texts(f"{tmp_path / 'c.csv'}#review") == ["good film", "bad film"]
    with pytest.raises(DataError, match="#<column>"):
        load_texts(str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match="no such file"):
        load_texts(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(("source", "builtin"), [("hellaswag", "contexts"), ("rotten_tomatoes", "reviews"),
                                                 ("wikipedia:Turkish coffee", "coffee")])  # fmt: skip
def test_web_sources_fail_fast_offline_naming_the_builtin(source, builtin):
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=f"--data {builtin}"):
        load_texts(source)
    assert time.perf_counter() - t0 < 2.0


def test_split_without_overlap_and_too_few_texts():
    texts = [f"t{i}" for i in range(10)]
    train, test = split_train_test(texts, 6, 4)
    assert not set(train) & set(test) and len(train) == 6 and len(test) == 4
    with pytest.raises(DataError, match="only 10"):
        split_train_test(texts, 8, 8)
    with pytest.raises(DataError, match="unknown data source"):
        load_texts("imdb")


# ------------------------------------------------------------------------------------- streams through datasets


# lines of a .txt corpus with blanks, padding and non-ASCII text; the expected texts are computed without
# datasets, by the rule the docs state: each line stripped, empty lines dropped
RAW = ["  first line ", "", "second line", " \t ", "café au lait", "third\tline", "", "fourth", "fifth  ", "sixth"]
EXPECTED = [ln.strip() for ln in RAW if ln.strip()]


def _write_all(d: pathlib.Path, lines: list[str], stem: str = "c", row_group_size: int = 3) -> dict[str, str]:
    """The same texts as .txt, .jsonl, .csv and .parquet (column 'text' plus an unrelated column)."""
    (d / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(d / f"{stem}.jsonl", "w", encoding="utf-8") as f:
        for i, ln in enumerate(lines):
            f.write(json.dumps({"id": i, "text": ln}) + "\n")
    frame = pd.DataFrame({"id": range(len(lines)), "text": lines})
    frame.to_csv(d / f"{stem}.csv", index=False)
    frame.to_parquet(d / f"{stem}.parquet", row_group_size=row_group_size)  # several row groups
    return {ext: str(d / f"{stem}.{ext}") for ext in ("txt", "jsonl", "csv", "parquet")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_all(tmp_path_factory.mktemp("corpus"), RAW)


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv", "parquet"])
def test_every_file_type_streams_the_same_texts(corpus, ext):
    it = iter_texts(corpus[ext])
    assert not isinstance(it, list | tuple) and iter(it) is it  # a stream, not a list
    assert list(it) == EXPECTED
    assert load_texts(corpus[ext]) == EXPECTED
    assert load_texts(corpus[ext], n_texts=3) == EXPECTED[:3]  # the first n of the cleaned stream
    assert load_texts(corpus[ext], n_texts=100) == EXPECTED  # more than there are: all of them
    check_source(corpus[ext])


def test_file_options(tmp_path, corpus):
    assert load_texts(f"{corpus['csv']}#column=id") == [str(i) for i in range(len(RAW))]
    assert load_texts(f"{corpus['parquet']}#id")[:3] == ["0", "1", "2"]
    assert load_texts(f"{corpus['jsonl']}#id", n_texts=2) == ["0", "1"]
    assert load_texts(f"{corpus['txt']}#document") == ["\n".join(RAW).strip()]
    # csv cells are texts as written: no number parsing, no 'NA' -> missing
    (tmp_path / "v.csv").write_text('text,x\n1.50,a\nNA,b\n"multi\nline",c\n,d\n')
    assert load_texts(str(tmp_path / "v.csv")) == ["1.50", "NA", "multi\nline"]
    # jsonl: a row without the column or with null is skipped, a number becomes its text, blank lines skipped
    # (not both at once: datasets 5.2's json reader fails on blank lines in a first chunk with mixed types)
    (tmp_path / "v.jsonl").write_text('{"text": "a"}\n{"other": 1}\n{"text": null}\n{"text": 5}\n{"text": " b "}\n')
    assert load_texts(str(tmp_path / "v.jsonl")) == ["a", "5", "b"]
    (tmp_path / "w.jsonl").write_text('{"text": "a"}\n\n  \n{"text": "b"}\n')
    assert load_texts(str(tmp_path / "w.jsonl")) == ["a", "b"]
    # latin-1, decoded by the builder
    (tmp_path / "l.txt").write_bytes("café au lait\n\nun autre café\n".encode("latin-1"))
    (tmp_path / "l.csv").write_bytes("text\ncafé\n".encode("latin-1"))
    (tmp_path / "l.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    assert load_texts(f"{tmp_path / 'l.txt'}#encoding=latin-1") == ["café au lait", "un autre café"]
    assert load_texts(f"{tmp_path / 'l.csv'}#encoding=latin-1") == ["café"]
    assert load_texts(f"{tmp_path / 'l.jsonl'}#encoding=latin-1") == ["café"]
    # a file name that is a glob pattern is read as the literal file
    (tmp_path / "we[ir]d*.txt").write_text("x\ny\n")
    assert load_texts(str(tmp_path / "we[ir]d*.txt")) == ["x", "y"]


def _error(source, n_texts=None) -> str:
    with pytest.raises(DataError) as e:
        list(iter_texts(source, n_texts))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_file_errors_name_the_fix(tmp_path, corpus):
    d = tmp_path
    (d / "l.txt").write_bytes("café au lait\n".encode("latin-1"))
    assert "byte 3 is not valid utf-8" in _error(str(d / "l.txt")) and "#encoding=latin-1" in _error(str(d / "l.txt"))
    for ext in ("csv", "jsonl"):
        (d / f"l.{ext}").write_bytes(("text\ncafé\n" if ext == "csv" else '{"text": "café"}\n').encode("latin-1"))
        assert f"byte {8 if ext == 'csv' else 13} is not valid utf-8" in _error(str(d / f"l.{ext}"))
    (d / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    assert "line 2 is not JSON" in _error(str(d / "bad.jsonl"))
    (d / "arr.jsonl").write_text('{"text": "fine"}\n[1, 2]\n')
    assert "line 2 is not a JSON object" in _error(str(d / "arr.jsonl"))
    for path in (corpus["jsonl"], corpus["csv"], corpus["parquet"]):
        msg = _error(f"{path}#body")
        assert "no column 'body'" in msg and "'text'" in msg and "#<column>" in msg
    (d / "blank.txt").write_text("  \n\n\t\n")
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("text,x\n")
    pd.DataFrame({"text": ["", "  ", None]}).to_parquet(d / "blank.parquet")
    for name in ("blank.txt", "empty.csv", "header.csv", "blank.parquet"):
        assert "holds no text" in _error(str(d / name))
    (d / "a.tsv").write_text("x\n")
    assert ".parquet" in _error(str(d / "a.tsv")) and "unsupported file type" in _error(str(d / "a.tsv"))
    (d / "fake.parquet").write_text("not parquet\n")
    assert "not a valid Parquet file" in _error(str(d / "fake.parquet"))
    assert "drop #encoding" in _error(f"{corpus['parquet']}#encoding=latin-1")
    assert "unknown text encoding" in _error(f"{corpus['txt']}#encoding=klingon")
    assert "not valid utf-16" in _error(f"{corpus['txt']}#encoding=utf-16")  # no BOM: a UnicodeError, not Decode
    assert "no such file" in _error(str(d / "missing.parquet"))
    assert "--n-texts" in _error(corpus["txt"], 0) and "--n-texts" in _error(corpus["txt"], -2)


def test_errors_deep_in_a_file_give_file_offsets_and_line_numbers(tmp_path):
    """Past the first chunk the builders' own positions are chunk-relative: the messages must not be."""
    n = 3 * stream.CHUNK_BYTES // 8 + 5  # > 3 chunks of 8-byte lines
    (tmp_path / "late.txt").write_bytes(b"ok line\n" * n + "café\n".encode("latin-1"))
    assert f"byte {8 * n + 3} is not valid utf-8" in _error(str(tmp_path / "late.txt"))
    line = '{"text": "a line of json"}\n'
    m = 2 * stream.CHUNK_BYTES // len(line) + 7
    (tmp_path / "late.jsonl").write_text(line * m + "{oops\n" + line)
    assert f"line {m + 1} is not JSON" in _error(str(tmp_path / "late.jsonl"))
    # the cheap check reads the first text only: it passes these files, whose errors are past the first chunk
    check_source(str(tmp_path / "late.txt"))
    assert load_texts(str(tmp_path / "late.txt"), n_texts=10) == ["ok line"] * 10


def test_check_source_is_cheap_and_catches_first_chunk_errors(tmp_path, corpus):
    (tmp_path / "l.txt").write_bytes("café\n".encode("latin-1") + b"fine\n" * 10)
    for bad, message in [
        (str(tmp_path / "l.txt"), "#encoding=latin-1"),
        (str(tmp_path / "missing.txt"), "no such file"),
        (f"{corpus['csv']}#body", "#<column>"),
        ("imdb", "unknown data source"),
        ("hf:stanfordnlp/imdb", "hf:REPO[:CONFIG]:SPLIT[:COLUMN]"),
    ]:
        with pytest.raises(DataError, match=message.replace("[", r"\[")):
            check_source(bad)
    for ok in ("contexts", "reviews", "coffee", *corpus.values()):
        check_source(ok)


def test_datasets_logs_nothing_on_stderr(tmp_path, capfd):
    """datasets logs its reader failures ('Failed to load JSON ...'): the CLI's errors must stay one line."""
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    capfd.readouterr()
    _error(str(tmp_path / "bad.jsonl"))
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("source", ["txt", "jsonl", "csv", "parquet", "contexts", "coffee", "list"])
def test_shards_are_disjoint_and_their_union_is_the_first_n(corpus, source, world_size):
    src_ = {"contexts": "contexts", "coffee": "coffee", "list": [f"t{i}" for i in range(11)]}.get(source)
    src_ = corpus[source] if src_ is None else src_
    for n in (None, 5):
        single = list(iter_texts(src_, n))
        shards = [list(iter_indexed(src_, n, rank=r, world_size=world_size)) for r in range(world_size)]
        indices = sorted(i for s in shards for i, _ in s)
        assert indices == list(range(len(single)))  # disjoint, and together every index once
        for r, s in enumerate(shards):
            assert all(i % world_size == r and single[i] == t for i, t in s)  # round robin by global index
    with pytest.raises(ValueError, match="rank"):
        iter_texts("contexts", rank=2, world_size=2)


def test_hub_style_dataset_with_several_shards_keeps_the_global_order(tmp_path):
    """A dataset of 2 parquet shards and 2 ranks: datasets' 'auto' split would give each rank one shard
    (and a different n_texts cut); the stream splits by examples so ranks interleave the global order.
    The 'hub' is a local dataset folder, which load_dataset reads like a hub repo, offline."""
    (tmp_path / "data").mkdir()
    texts = [f"shard{k} text {i}" for k in range(2) for i in range(7)]
    for k in range(2):
        pd.DataFrame({"sentence": texts[7 * k : 7 * k + 7]}).to_parquet(
            tmp_path / "data" / f"train-0000{k}-of-00002.parquet"
        )
    repo = str(tmp_path)

    def hub(n, rank, world_size, column="sentence"):
        return list(stream.hub_stream("hf:x:train", repo, None, "train", column, n, rank, world_size, "HINT"))

    assert hub(None, 0, 1) == texts
    assert hub(9, 0, 2) == texts[0:9:2] and hub(9, 1, 2) == texts[1:9:2]
    with pytest.raises(DataError, match=r"no column 'text'.*HINT"):
        hub(None, 0, 1, column=None)
    with pytest.raises(DataError, match="Bad split"):
        list(stream.hub_stream("hf:x:test", repo, None, "test", "sentence", None, 0, 1, "HINT"))


def test_hf_spec_parsing():
    def p(s):
        h = parse_hf(s)
        return h.repo, h.config, h.split, h.column

    assert p("hf:stanfordnlp/imdb:test") == ("stanfordnlp/imdb", None, "test", None)
    assert p("hf:stanfordnlp/imdb:test:text") == ("stanfordnlp/imdb", None, "test", "text")
    assert p("hf:Salesforce/wikitext:wikitext-2-raw-v1:train") == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "train",
        None,
    )
    assert p("hf:HuggingFaceH4/ultrachat_200k:train_sft:prompt") == (
        "HuggingFaceH4/ultrachat_200k",
        None,
        "train_sft",
        "prompt",
    )
    assert p("hf:nyu-mll/glue:sst2:validation:sentence") == ("nyu-mll/glue", "sst2", "validation", "sentence")
    assert parse_hf("hf:nyu-mll/glue:sst2:validation").column_hint == "hf:nyu-mll/glue:sst2:validation:<column>"
    for bad in ("hf:", "hf:repo", "hf:repo::train", "hf:a:b:c:d:e"):
        with pytest.raises(DataError, match="hf:REPO"):
            parse_hf(bad)


def test_hf_fails_at_once_offline_naming_local_files_and_builtins():
    t0 = time.perf_counter()
    for spec in ("hf:stanfordnlp/imdb:test:text", "hf:nyu-mll/glue:sst2:validation"):
        with pytest.raises(DataError) as e:
            iter_texts(spec)  # at the call, before any iteration
        assert "needs the Hugging Face hub" in str(e.value)
        assert ".parquet" in str(e.value) and "--data contexts" in str(e.value)
        with pytest.raises(DataError, match="needs the Hugging Face hub"):
            check_source(spec)
    assert time.perf_counter() - t0 < 2.0


def test_batched_and_its_fallback(monkeypatch):
    want = [(0, 1, 2), (3, 4, 5), (6,)]
    assert list(batched(range(7), 3)) == want
    monkeypatch.delattr(itertools, "batched", raising=False)  # Python 3.11
    assert list(src.batched(range(7), 3)) == want and list(src.batched([], 3)) == []
    with pytest.raises(ValueError):
        list(src.batched(range(3), 0))


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv", "parquet"])
def test_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch, ext):
    """tracemalloc peak (Python allocations: the strings and lists a reader builds) while streaming 20,000
    lines is < 2x that for 2,000 lines; reading the whole file into a list would make it ~10x. The reading
    chunk is made small here (64 KiB, 200 csv rows, 200-row parquet groups; 1 MiB and 1000 rows in use)
    so that 2,000 lines of ~130 bytes already fill several chunks, and the files stay small."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(stream, "CSV_ROWS", 200)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    rng = np.random.default_rng(0)
    lines = [" ".join(w) for w in rng.choice(words, (20_000, 22))]
    paths = {n: _write_all(tmp_path, lines[:n], f"m{n}", row_group_size=200)[ext] for n in (2_000, 20_000)}
    sum(1 for _ in iter_texts(paths[2_000]))  # warm-up: lazy imports and caches are not the stream's memory
    peaks = {}
    for n, p in paths.items():
        tracemalloc.start()
        try:
            it = iter_texts(p)
            assert iter(it) is it and not isinstance(it, list | tuple)
            count = sum(1 for _ in it)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == n
    assert peaks[20_000] < 2 * peaks[2_000], peaks


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_records_stream_in_chunks_as_load_records_reads_them(tmp_path, ext):
    """iter_records (chunked pandas / pyarrow batches) yields load_records' rows: all of them, the first n,
    across chunk boundaries, values as strings; a missing column is the same one-line error."""
    from mechlens.data.records import iter_records, load_records

    frame = pd.DataFrame({"clean": [f"a {i}" for i in range(7)], "corrupt": [f"b {i}" for i in range(7)],
                          "target": [str(i) for i in range(7)], "extra": list(range(7))})  # fmt: skip
    path = tmp_path / f"rows.{ext}"
    if ext == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif ext == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    cols = ("clean", "corrupt", "target")
    for n in (None, 3, 7, 20):
        want = load_records(str(path), cols, n)
        assert list(iter_records(str(path), cols, n, chunk_rows=2)) == want
        assert len(want) == (7 if n is None else min(n, 7))
    with pytest.raises(DataError, match="no column 'foil'"):
        next(iter_records(str(path), (*cols, "foil")))
