"""Evaluate the shipped embedded models on held-out text (through mechlens, on CPU) and write their
model cards (``MODEL_CARD.md`` + machine-readable ``card.json``) beside the weights.

    python -m training.card --data .cache/corpus   # from the repository root

Needs the corpus built by :mod:`training.corpus` (held-out split) and the ``train_report.json``
that :mod:`training.train` wrote.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys

if not __package__:  # run as a script (python training/card.py): make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from mechlens import arch
from mechlens.encoding import TokenBatch, encode
from mechlens.forward import run_cached
from mechlens.loading import load_model, provenance_of
from mechlens.ops import next_token_loss
from mechlens.zoo import EMBEDDED
from training.train import GPT2_EOT, MLM_MASK, gpt2_ids_to_mlm

PROMPT = "I like oat milk in my"
TUNED_LENS_COMMAND = "python -m training.tuned_lens --data .cache/corpus"  # the shipped tuned lenses


def _docs(tokens: np.ndarray) -> list[np.ndarray]:
    cuts = np.flatnonzero(tokens == GPT2_EOT)
    return [d for d in np.split(tokens, cuts + 1) if len(d) > 1]


def _batch(tokens: torch.Tensor) -> TokenBatch:
    ones = torch.ones_like(tokens)
    return TokenBatch(tokens=tokens, attention_mask=ones, text_mask=ones.bool(), bos=False, padding_side="right")


def unigram_ce(train: np.ndarray, heldout: np.ndarray) -> float:
    """Cross-entropy (nats) of an add-one unigram model fitted on the training split."""
    counts = np.bincount(train, minlength=50257).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


@torch.no_grad()
def evaluate_gpt2(data: pathlib.Path, seq_len: int = 512) -> dict:
    model = load_model("tiny-gpt2")
    train = np.fromfile(data / "train.bin", dtype=np.uint16).astype(np.int64)
    held = np.fromfile(data / "heldout.bin", dtype=np.uint16).astype(np.int64)
    n = len(held) // (seq_len + 1)
    windows = torch.from_numpy(held[: n * (seq_len + 1)].reshape(n, seq_len + 1))
    total, count = 0.0, 0
    for start in tqdm(range(0, n, 16), desc="tiny-gpt2 held-out"):
        b = _batch(windows[start : start + 16])
        logits, _ = run_cached(model, b, [], logits=True)
        loss = next_token_loss(logits, b.tokens)
        total, count = total + loss.sum().item(), count + loss.numel()
    ce = total / count
    uni = unigram_ce(train, windows[:, 1:].reshape(-1).numpy())
    # per-position loss on the first 7 tokens of held-out documents (no BOS: position 0 = first token)
    docs = [d[:7] for d in _docs(held) if len(d) >= 8]
    b = _batch(torch.from_numpy(np.stack(docs)))
    logits, _ = run_cached(model, b, [], logits=True)
    by_pos = next_token_loss(logits, b.tokens).mean(0).tolist()
    prompt = encode(model, [PROMPT], bos=True)
    out = model.generate(prompt.tokens, max_new_tokens=12, do_sample=False, verbose=False, stop_at_eos=False)
    return {
        "heldout_cross_entropy": ce,
        "unigram_cross_entropy": uni,
        "ratio_to_unigram": ce / uni,
        "heldout_tokens": count,
        "loss_by_position": by_pos,
        "n_position_docs": len(docs),
        "greedy_generation": model.tokenizer.decode(out[0, prompt.tokens.shape[1] :]),
        "parameters": provenance_of(model).n_params,
    }


@torch.no_grad()
def evaluate_mlm(data: pathlib.Path, width: int = 126, mask_prob: float = 0.15, seed: int = 1234) -> dict:
    model = load_model("tiny-mlm")
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    held = np.fromfile(data / "heldout.bin", dtype=np.uint16)
    ordinary = train[train != GPT2_EOT]
    most_frequent = int(np.bincount(ordinary, minlength=50257).argmax()) + 4  # MLM ids
    n = len(held) // width
    ids = torch.from_numpy(gpt2_ids_to_mlm(held[: n * width].reshape(n, width)))
    ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), ids, torch.full((n, 1), 2)], 1)
    gen = torch.Generator().manual_seed(seed)
    target = (ids >= 4) & (torch.rand(ids.shape, generator=gen) < mask_prob)
    inputs = ids.masked_fill(target, MLM_MASK)
    correct = base = total = 0
    last = arch.readout_hook_names(model)[-1]
    max_head_diff = 0.0
    for start in tqdm(range(0, n, 32), desc="tiny-mlm held-out"):
        rows = slice(start, start + 32)
        b = _batch(inputs[rows])
        logits, acts = run_cached(model, b, [last], logits=True)
        t = target[rows]
        pred = logits.argmax(-1)
        correct += (pred[t] == ids[rows][t]).sum().item()
        base += (ids[rows][t] == most_frequent).sum().item()
        total += t.sum().item()
        max_head_diff = max(max_head_diff, (arch.readout(model)(acts[last]) - logits).abs().max().item())
    return {
        "heldout_top1_accuracy": correct / total,
        "most_frequent_token": model.tokenizer.decode([most_frequent]),
        "most_frequent_token_accuracy": base / total,
        "ratio_to_baseline": (correct / total) / (base / total),
        "masked_targets": total,
        "last_layer_head_vs_logits_max_abs_diff": max_head_diff,
        "parameters": provenance_of(model).n_params,
    }


CORPUS = """Trained on English text read from packages anyone can install offline (none of it is in this
repository): PyPI `gensim` test data -- the first English Wikipedia articles (CC BY-SA 3.0) with markup
stripped by gensim's `filter_wiki`, and the Lee news corpus; Debian `wordnet-base` -- every WordNet 3.0
gloss with its example sentences (WordNet 3.0 licence, permissive); Debian `fortunes` -- the
non-offensive collections. 3% of documents (chosen by a hash of the document id) are held out and
never trained on: {heldout_tokens:,} held-out tokens, {train_tokens:,} training tokens."""


def _card(name: str, report: dict, metrics: dict, stats: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# {name}",
        "",
        EMBEDDED[name].description + ".",
        "",
        "## Corpus and licence",
        CORPUS.format(heldout_tokens=stats["heldout_tokens"], train_tokens=stats["train_tokens"]),
        "",
        "## Training",
        f"- parameters: {metrics['parameters']:,} (weights stored as fp16 safetensors, loaded as fp32)",
        f"- layers {cfg['n_layers']}, d_model {cfg['d_model']}, heads {cfg['n_heads']}, d_mlp {cfg['d_mlp']}, "
        f"sequence length {cfg['seq_len']}, batch {cfg['batch_size']}, peak lr {cfg['lr']}, dropout {cfg['dropout']}",
        f"- steps run: {report['steps_run']:,}; best validation step (checkpoint shipped): {report['best_step']:,}",
        f"- tokens seen up to that checkpoint: {report['tokens_seen']:,}",
        f"- wall time: {report['wall_seconds']:.0f} s on {report['hardware']} (torch {report['torch']}, bf16 autocast)",
        "- seed 0; the time-based cosine schedule (`--max-seconds`) and GPU kernels make bit-exact "
        "reproduction hardware-dependent, the metrics below reproduce to within noise",
        "",
        "## Held-out metrics (computed on CPU through mechlens by `python -m training.card`)",
    ]
    if name == "tiny-gpt2":
        by = metrics["loss_by_position"]
        lines += [
            f"- held-out cross-entropy: **{metrics['heldout_cross_entropy']:.3f} nats/token** over "
            f"{metrics['heldout_tokens']:,} tokens",
            f"- unigram model fitted on the training split: {metrics['unigram_cross_entropy']:.3f} nats/token; "
            f"ratio {metrics['ratio_to_unigram']:.3f} (bar: <= 0.75)",
            f"- loss by position on the first 7 tokens of {metrics['n_position_docs']:,} held-out documents (no BOS): "
            + ", ".join(f"{v:.2f}" for v in by)
            + f"; position 0 {by[0]:.2f} vs mean of positions 3-5 {np.mean(by[3:6]):.2f}",
            f"- greedy continuation of {PROMPT!r}: {metrics['greedy_generation']!r}",
        ]
    else:
        lines += [
            f"- masked-token top-1 accuracy (15% of held-out tokens replaced by `<mask>`, "
            f"{metrics['masked_targets']:,} targets): **{metrics['heldout_top1_accuracy']:.3f}**",
            f"- always predicting the most frequent training token ({metrics['most_frequent_token']!r}): "
            f"{metrics['most_frequent_token_accuracy']:.3f}; ratio {metrics['ratio_to_baseline']:.2f} (bar: >= 3)",
            f"- the MLM head applied to the last layer's residual stream equals the logits: max |diff| "
            f"{metrics['last_layer_head_vs_logits_max_abs_diff']:.1e}",
        ]
    flags = " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in cfg.items() if k not in ("data", "out", "device") and v != ""
    )
    lines += ["", *tuned_lens_section(name)] if (EMBEDDED[name].path / "tuned_lens_eval.json").exists() else []
    lines += [
        "",
        "## Reproduce",
        "```bash",
        "pip install -e '.[train]' && apt-get install wordnet-base fortunes",
        "python -m training.corpus --out .cache/corpus",
        f"python -m training.train --data .cache/corpus --out .cache/train/{name} {flags}",
        f"python -m training.fp16 .cache/train/{name} mechlens/zoo/weights/{name}",
        TUNED_LENS_COMMAND + f" --models {name}",
        "python -m training.card --data .cache/corpus",
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt_ci(mean: float, ci: list[float]) -> str:
    return f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def tuned_lens_section(name: str) -> list[str]:
    """The model card's "Tuned lens" section from ``tuned_lens_eval.json`` (written by
    :mod:`training.tuned_lens`); empty when the model has no shipped tuned lens."""
    path = EMBEDDED[name].path / "tuned_lens_eval.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    c = r["card"]
    lines = [
        "## Tuned lens",
        f"`tuned_lens.safetensors` + `tuned_lens.json`: one affine translator per readout point ({c['n_points']} x "
        f"{c['d_model']} x {c['d_model']} + {c['n_points']} x {c['d_model']} floats; the last one the identity, "
        "not trained), read by `mechlens run lens --tuned " + name + "` (and by default, `--tuned auto`).",
        f"- trained by `{r['command']}` ({c['steps']} steps of {c['batch_size']} texts, "
        f"{c['tokens_per_step']:.0f} {'masked' if c['kind'] == 'masked' else 'next-token'} positions per step, "
        f"lr scale {c['lr']}, Nesterov momentum {c['momentum']}, weight decay {c['weight_decay']}, linear decay"
        + (f", gradient norm clipped at {c['max_grad_norm']}" if c.get("max_grad_norm") else "")
        + (f", readout products in {c['readout_dtype']}" if c.get("readout_dtype") else "")
        + "; "
        f"{r['train_seconds']:.0f} s on {r['trained_on']}) on `train.jsonl` (the model's training documents as "
        f"text); the first {c['heldout']} texts of it are held out from the lens",
        "- mean KL(final || lens) per readout point (nats), logit lens vs tuned lens, each as the mean over "
        "texts of the per-text mean with its 95% percentile bootstrap interval over texts:",
        "",
        "| readout point | " + " | ".join(
            f"{split} logit | {split} tuned" for split in ("lens held-out", "model held-out")) + " |",
        "|---|" + "---:|" * 4,
    ]  # fmt: skip
    a, b = r["lens_heldout"], r["model_heldout"]
    for i in range(c["n_points"]):
        cells = []
        for e in (a, b):
            for lens in ("logit", "tuned"):
                cells.append(_fmt_ci(e[lens]["kl_per_text_mean_by_layer"][i], e[lens]["kl_per_text_ci95"][i]))
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"(lens held-out: the first {a['n_texts']} texts of `train.jsonl`, {a['n_positions']:,} positions; model "
        f"held-out: the first {b['n_texts']} documents of `heldout.jsonl`, never seen by the model nor the lens, "
        f"{b['n_positions']:,} positions.)",
    ]
    return lines


def regenerated_card(name: str) -> str:
    """The model card :func:`_card` writes from the shipped training report and metrics; the corpus sizes
    (from the corpus' stats.json, not shipped) are read back from the shipped card."""
    import re

    path = EMBEDDED[name].path
    shipped = (path / "MODEL_CARD.md").read_text()
    held, train = re.search(r"never trained on: ([\d,]+) held-out tokens, ([\d,]+) training tokens", shipped).groups()
    stats = {"heldout_tokens": int(held.replace(",", "")), "train_tokens": int(train.replace(",", ""))}
    report = json.loads((path / "train_report.json").read_text())
    metrics = json.loads((path / "card.json").read_text())
    return _card(name, report, metrics, stats)


def write_tuned_lens_section(name: str) -> None:
    """Rewrite the model card with its "Tuned lens" section (:func:`regenerated_card`)."""
    (EMBEDDED[name].path / "MODEL_CARD.md").write_text(regenerated_card(name))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=pathlib.Path, default=pathlib.Path(".cache/corpus"))
    ap.add_argument("--models", nargs="*", default=list(EMBEDDED))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    stats = json.loads((args.data / "stats.json").read_text())
    for name in args.models:
        path = EMBEDDED[name].path
        report = json.loads((path / "train_report.json").read_text())
        metrics = evaluate_gpt2(args.data) if name == "tiny-gpt2" else evaluate_mlm(args.data)
        metrics["evaluated_on"] = platform.platform()
        (path / "card.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (path / "MODEL_CARD.md").write_text(_card(name, report, metrics, stats))
        print(json.dumps({name: metrics}, indent=2))


if __name__ == "__main__":
    main()
