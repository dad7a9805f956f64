"""Every path a run will read, checked before any model is loaded (one line, exit 2).

Data sources are checked by :func:`mechlens.data.check_source`; this module checks the model
directories and the tuned-lens directories named on the command line, so that the second of two
``--model`` flags, or a ``--tuned`` directory, that does not exist is refused before the first model
spends minutes loading. Names that are not paths (embedded models, hub names, ``auto``/``none``) are
left to the loaders, which refuse them with the same messages.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec or pathlib.Path(spec).expanduser().exists()


def check_model_paths(specs: Iterable[str]) -> None:
    """A model spec that is a path must be a directory holding ``config.json`` (as :mod:`mechlens.loading`)."""
    from mechlens.errors import ModelNotAvailableError
    from mechlens.zoo import EMBEDDED

    for spec in specs:
        if spec in EMBEDDED or not _looks_like_path(spec):
            continue
        path = pathlib.Path(spec).expanduser()
        if not path.is_dir():
            if path.exists() or spec.startswith((".", "/", "~")):
                raise ModelNotAvailableError(
                    f"{spec!r} is not a model directory: pass a directory saved with save_pretrained"
                )
            continue  # an owner/name hub id: the loader looks in the cache
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} has no config.json: save the model there with model.save_pretrained(dir)"
            )


def check_tuned_paths(specs: Iterable[str]) -> None:
    """A ``--tuned`` value that is a path must be a directory holding a tuned lens (as
    :func:`mechlens.lens.tuned.load_tuned_lens`)."""
    from mechlens.lens.tuned import CARD_FILE, WEIGHTS_FILE, TunedLensError
    from mechlens.zoo import EMBEDDED

    for spec in specs:
        explicit = spec.startswith((".", "/", "~")) or pathlib.Path(spec).expanduser().exists()
        if spec in ("auto", "none") or spec in EMBEDDED or not explicit:
            continue  # a name: resolved (and refused, if need be) by the lens study when it loads the lens
        d = pathlib.Path(spec).expanduser()
        if not (d / WEIGHTS_FILE).is_file() or not (d / CARD_FILE).is_file():
            raise TunedLensError(
                f"--tuned {spec}: no tuned lens there (expected {WEIGHTS_FILE} and {CARD_FILE}): pass a directory "
                "written by 'mechlens train-lens' or an embedded model's name (tiny-gpt2, tiny-mlm)"
            )
