"""Cast a trained checkpoint to fp16 safetensors (storage only; mechlens loads it as fp32).

    python -m training.fp16 .cache/train/tiny-gpt2 mechlens/zoo/weights/tiny-gpt2

This is how the shipped weights were made. To get an embedded model back out as a plain
``save_pretrained`` checkpoint with its tokenizer, use ``mechlens export NAME DIR`` instead.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

import torch
from safetensors.torch import load_file, save_file


def export_fp16(src: pathlib.Path, dst: pathlib.Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt", "storage_dtype": "float16"})
    for name in ("config.json", "train_report.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=pathlib.Path, help="a training output directory (model.safetensors, config.json)")
    ap.add_argument("dst", type=pathlib.Path, help="where the fp16 copy goes, e.g. mechlens/zoo/weights/NAME")
    args = ap.parse_args(argv)
    export_fp16(args.src, args.dst)


if __name__ == "__main__":
    main()
