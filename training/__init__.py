"""How the embedded models (``tiny-gpt2``, ``tiny-mlm``) were built. Not part of the mechlens package.

The wheel ships only the registry and the weights (:mod:`mechlens.zoo`); this folder holds the
pipeline that produced them, run from the repository root after ``pip install -e '.[train]'``:

    python -m training.corpus --out .cache/corpus                           # token files from offline text
    python -m training.train --model tiny-gpt2 --data .cache/corpus          # -> .cache/train/tiny-gpt2
    python -m training.train --model tiny-mlm --data .cache/corpus           # -> .cache/train/tiny-mlm
    python -m training.fp16 .cache/train/tiny-gpt2 mechlens/zoo/weights/tiny-gpt2  # fp16 storage copy
    python -m training.tuned_lens --data .cache/corpus                      # shipped tuned lenses + evaluation
    python -m training.card --data .cache/corpus                            # held-out metrics + model cards

Nothing under ``mechlens/`` imports this folder.
"""
