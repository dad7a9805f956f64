"""Train the shipped tuned lenses of the embedded models and evaluate them on held-out text.

    python -m training.tuned_lens --data .cache/corpus                  # both models
    python -m training.tuned_lens --data .cache/corpus --models tiny-gpt2

For each model: :func:`mechlens.lens.training.train_tuned_lens` on ``DATA/train.jsonl`` (the model's own
training documents as text, written by :mod:`training.corpus` in a seeded shuffled order) with the
default recipe; the first ``--heldout`` texts of that file are held out from the lens' training. The
lens is written beside the weights (``mechlens/zoo/weights/<name>/tuned_lens.safetensors`` and
``tuned_lens.json``; 7 x 128 x 128 + 7 x 128 floats). Then both lenses are evaluated with the corpus
lens (:func:`mechlens.lens.corpus.corpus_lens`) on (a) those held-out texts and (b) the model's own
held-out documents (``DATA/heldout.jsonl``, never seen by the model nor the lens), with 95% bootstrap
intervals over texts; the numbers go to ``tuned_lens_eval.json`` and the model card's "Tuned lens"
section (:func:`training.card.tuned_lens_section`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import shlex
import sys
import time

if not __package__:  # run as a script (python training/tuned_lens.py): make the repository root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from mechlens.lens.corpus import corpus_lens
from mechlens.lens.readings import QUANTITIES
from mechlens.lens.training import TrainConfig, train_tuned_lens
from mechlens.loading import load_model
from mechlens.studies import lens as lens_study
from mechlens.zoo import EMBEDDED
from training.card import write_tuned_lens_section

EVAL_FILE = "tuned_lens_eval.json"


def evaluate(model, lens, source: str, n_texts: int, cfg: TrainConfig) -> dict:
    """Both lenses on the first ``n_texts`` texts of ``source``: per readout point, the mean over lensed
    positions and the mean over texts of each text's mean with its 95% percentile bootstrap interval."""
    from mechlens.data import iter_indexed

    c = corpus_lens(model, iter_indexed(source, n_texts), bos=cfg.bos, max_tokens=cfg.max_tokens,
                    tuned=lens, n_samples=n_texts, mask_prob=cfg.mask_prob, seed=cfg.seed)  # fmt: skip
    out = {"source": source, "n_texts": c.n_texts, "n_positions": c.n_predictions}
    for name, part in (("logit", c), ("tuned", c.tuned)):
        q = QUANTITIES.index("kl_to_final")
        mean, lo, hi = lens_study.lens_intervals(part.per_text[:, q])
        out[name] = {
            "kl_to_final_by_layer": [float(v) for v in part.kl_to_final_by_layer],
            "kl_per_text_mean_by_layer": mean.tolist(),
            "kl_per_text_ci95": [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)],
            "target_logprob_by_layer": [float(v) for v in part.target_logprob_by_layer],
            "top1_agreement_by_layer": [float(v) for v in part.top1_agreement_by_layer],
        }
    d = c.per_text[:, 3] - c.tuned.per_text[:, 3]  # paired: logit minus tuned KL, per text
    mean, lo, hi = lens_study.lens_intervals(d)
    out["logit_minus_tuned_kl_ci95"] = [[float(m), float(a), float(b)] for m, a, b in zip(mean, lo, hi, strict=True)]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=pathlib.Path, default=pathlib.Path(".cache/corpus"))
    ap.add_argument("--models", nargs="*", default=list(EMBEDDED))
    ap.add_argument("--heldout", type=int, default=200, help="texts of train.jsonl held out from the lens")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--eval-texts", type=int, default=400, help="documents of heldout.jsonl evaluated")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    command = shlex.join(["python", "-m", "training.tuned_lens", *(sys.argv[1:] if argv is None else argv)])
    train_source = str(args.data / "train.jsonl")
    for name in args.models:
        model = load_model(name)
        cfg = TrainConfig(data=train_source, heldout=args.heldout, steps=args.steps, evaluate=False)
        t0 = time.perf_counter()
        lens = train_tuned_lens(model, train_source, cfg, command=command)
        seconds = time.perf_counter() - t0
        print(f"{name}: trained {cfg.steps} steps in {seconds:.0f} s", flush=True)
        held = evaluate(model, lens, train_source, args.heldout, cfg)  # the lens' own held-out texts
        lens = dataclasses.replace(lens, card=dataclasses.replace(
            lens.card, heldout_kl_logit=held["logit"]["kl_to_final_by_layer"],
            heldout_kl_tuned=held["tuned"]["kl_to_final_by_layer"], heldout_n_texts=held["n_texts"]))  # fmt: skip
        lens.save(EMBEDDED[name].path)
        report = {
            "model": name,
            "command": command,
            "train_seconds": seconds,
            "trained_on": platform.platform(),
            "torch": torch.__version__,
            "card": json.loads((EMBEDDED[name].path / "tuned_lens.json").read_text()),
            "lens_heldout": held,
            "model_heldout": evaluate(model, lens, str(args.data / "heldout.jsonl"), args.eval_texts, cfg),
        }
        (EMBEDDED[name].path / EVAL_FILE).write_text(json.dumps(report, indent=1) + "\n")
        write_tuned_lens_section(name)
        for split in ("lens_heldout", "model_heldout"):
            r = report[split]
            print(f"{name} {split} ({r['n_texts']} texts): logit {np.round(r['logit']['kl_to_final_by_layer'], 3)} "
                  f"tuned {np.round(r['tuned']['kl_to_final_by_layer'], 3)}")  # fmt: skip


if __name__ == "__main__":
    main()
