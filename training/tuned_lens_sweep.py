"""The learning-rate sweep behind the tuned lens' default ``--lr`` (issue 29), on both embedded models.

    python -m training.tuned_lens_sweep --data .cache/corpus --steps 20 --lrs 0.3 1 3

For each model and learning-rate scale: :func:`mechlens.lens.training.train_tuned_lens` with the default
recipe otherwise (gradient norm clipped at 1.0, SGD with Nesterov momentum 0.9, linear decay) for
``--steps`` steps on ``DATA/train.jsonl`` after its first ``--heldout`` texts, then the held-out KL of the
tuned lens per readout point on the first ``--eval-texts`` of those held-out texts (the corpus lens). The
rows (JSON lines) go to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

if not __package__:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch

from mechlens.data import iter_indexed
from mechlens.lens.corpus import corpus_lens
from mechlens.lens.training import TrainConfig, train_tuned_lens
from mechlens.loading import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=pathlib.Path, default=pathlib.Path(".cache/corpus"))
    ap.add_argument("--models", nargs="*", default=["tiny-gpt2", "tiny-mlm"])
    ap.add_argument("--lrs", nargs="*", type=float, default=[0.3, 1.0, 3.0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--eval-texts", type=int, default=64)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(".cache/tuned_lens_sweep.jsonl"))
    args = ap.parse_args(argv)
    source = str(args.data / "train.jsonl")
    for name in args.models:
        model = load_model(name)
        for lr in args.lrs:
            torch.manual_seed(0)
            cfg = TrainConfig(data=source, heldout=args.heldout, steps=args.steps, lr=lr,
                              max_grad_norm=args.max_grad_norm, evaluate=False)  # fmt: skip
            t0 = time.process_time()
            lens = train_tuned_lens(model, source, cfg)
            c = corpus_lens(model, iter_indexed(source, args.eval_texts), bos=cfg.bos,
                                       max_tokens=cfg.max_tokens, tuned=lens, n_samples=1, mask_prob=cfg.mask_prob,
                                       seed=cfg.seed)  # fmt: skip
            row = {"model": name, "lr": lr, "steps": args.steps, "max_grad_norm": args.max_grad_norm,
                   "eval_texts": c.n_texts, "heldout_kl_logit": [round(float(v), 4) for v in c.kl_to_final_by_layer],
                   "heldout_kl_tuned": [round(float(v), 4) for v in c.tuned.kl_to_final_by_layer],
                   "train_kl_last": round(lens.card.loss_curve[-1], 4),
                   "cpu_s": round(time.process_time() - t0, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
