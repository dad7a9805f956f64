"""The training corpus of the embedded models, read from packages anyone can install offline.

Sources (none of their text is committed to this repository):

* ``wiki``  -- PyPI ``gensim`` test data: the first English Wikipedia articles
  (``enwiki-latest-pages-articles1...-shortened.bz2``, CC BY-SA), markup stripped with gensim's own
  ``filter_wiki``;
* ``news``  -- PyPI ``gensim`` test data: the Lee news corpus (``lee_background.cor``);
* ``wordnet`` -- Debian ``wordnet-base``: every synset's gloss with its example sentences
  (WordNet 3.0 licence, permissive);
* ``fortunes`` -- Debian ``fortunes``: the non-offensive collections (public domain / free).

Every document gets a stable id; a document is held out (never trained on) when the hash of its id
falls in the held-out fraction, so the split does not depend on reading order.

    python -m training.corpus --out .cache/corpus   # or: python training/corpus.py --out ...
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import pathlib
import re
from collections.abc import Iterator

import numpy as np

HELDOUT_FRACTION = 0.03
WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
# Collections of the Debian package that hold everyday prose; 'off/' (offensive) is never read.
FORTUNE_FILES = (
    "education", "food", "fortunes", "humorists", "kids", "law", "literature", "love", "magic",
    "medicine", "men-women", "miscellaneous", "news", "people", "pets", "platitudes", "politics",
    "science", "songs-poems", "sports", "wisdom", "work",
)  # fmt: skip


def _gensim_data() -> pathlib.Path:
    import gensim

    return pathlib.Path(gensim.__file__).parent / "test" / "test_data"


_WIKI_JUNK = re.compile(r"^\s*([|!{}]|thumb|right\||left\||\d+px)")


def wiki_docs() -> Iterator[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_data() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f):
            body = filter_wiki(text)
            if body.lstrip().upper().startswith("#REDIRECT"):
                continue
            paras = []
            for para in body.split("\n"):
                para = re.sub(r"\s+", " ", para).strip()
                if len(para) < 40 or _WIKI_JUNK.match(para) or para.count("|") > 2:
                    continue
                paras.append(para)
            if paras:
                yield f"wiki:{title}", "\n".join(paras)


def news_docs() -> Iterator[tuple[str, str]]:
    path = _gensim_data() / "lee_background.cor"
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.strip():
            yield f"news:{i}", line.strip()


def wordnet_docs() -> Iterator[tuple[str, str]]:
    for pos in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{pos}"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            offset, n_words = fields[0], int(fields[3], 16)
            lemmas = [fields[4 + 2 * k].replace("_", " ") for k in range(n_words)]
            parts = [p.strip() for p in gloss.split(";") if p.strip()]
            definition = [p for p in parts if not p.startswith('"')]
            examples = [p.strip('"').strip() for p in parts if p.startswith('"')]
            text = f"{', '.join(lemmas)}: {'; '.join(definition)}."
            if examples:
                text += " " + " ".join(e[0].upper() + e[1:] + ("" if e[-1] in ".!?" else ".") for e in examples if e)
            yield f"wordnet:{pos}:{offset}", text


def fortune_docs() -> Iterator[tuple[str, str]]:
    for name in FORTUNE_FILES:
        path = FORTUNES_DIR / name
        if not path.exists():
            continue
        for i, chunk in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n%\n")):
            chunk = re.sub(r"[ \t]+", " ", chunk).strip()
            if len(chunk) > 20:
                yield f"fortunes:{name}:{i}", chunk


SOURCES = {"wiki": wiki_docs, "news": news_docs, "wordnet": wordnet_docs, "fortunes": fortune_docs}


def is_heldout(doc_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def build(out: pathlib.Path) -> dict:
    """Tokenise every source with GPT-2's BPE into ``train.bin`` / ``heldout.bin`` (uint16 ids,
    documents separated by ``<|endoftext|>``), write the same documents as ``train.jsonl`` /
    ``heldout.jsonl`` (column ``text``, one document per line, in a seeded shuffled order so that any
    prefix mixes the sources: the tuned lenses train on them through ``mechlens.data``) and ``stats.json``."""
    from tqdm import tqdm

    from mechlens.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    eot = tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    split_ids: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    split_texts: dict[str, list[str]] = {"train": [], "heldout": []}
    stats: dict = {"sources": {}, "heldout_fraction": HELDOUT_FRACTION}
    for name, gen in SOURCES.items():
        docs = list(gen())
        n_tok = {"train": 0, "heldout": 0}
        texts = [t for _, t in docs]
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        for (doc_id, text), ids in tqdm(zip(docs, enc, strict=True), total=len(docs), desc=name):
            split = "heldout" if is_heldout(doc_id) else "train"
            split_ids[split].append(np.asarray([*ids, eot], dtype=np.uint16))
            split_texts[split].append(text)
            n_tok[split] += len(ids) + 1
        stats["sources"][name] = {"documents": len(docs), "tokens": n_tok}
    for split, arrs in split_ids.items():
        arr = np.concatenate(arrs)
        arr.tofile(out / f"{split}.bin")
        stats[f"{split}_tokens"] = int(arr.size)
    for split, texts in split_texts.items():  # the same documents as text, for mechlens.data (tuned lenses)
        order = np.random.default_rng(0).permutation(len(texts))  # sources interleaved: any prefix is a mix
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for i in order:
                f.write(json.dumps({"text": texts[i]}) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(".cache/corpus"))
    print(json.dumps(build(ap.parse_args().out), indent=2))


if __name__ == "__main__":
    main()
