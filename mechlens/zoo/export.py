"""Cast a trained checkpoint to fp16 safetensors (storage only; mechlens loads it as fp32)."""

from __future__ import annotations

import pathlib
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def export_fp16(src: pathlib.Path, dst: pathlib.Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt", "storage_dtype": "float16"})
    for name in ("config.json", "train_report.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


if __name__ == "__main__":
    export_fp16(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
