"""Built-in texts meet their size requirements; loaders read local files and fail fast offline."""

from __future__ import annotations

import json
import time

import pytest

from mechlens import DataError
from mechlens.data import load_texts, split_train_test
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
