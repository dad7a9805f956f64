"""Data-parallel runs: ``torchrun --standalone --nproc-per-node 2 --no-python mechlens run STUDY ...`` on
gloo (2 CPU processes) gives the same results.json statistics as one process, rank 0 alone writes, and
provenance records the world size. Studies that do not run data-parallel are refused in one line."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

BIN = pathlib.Path(sys.executable).parent
LINES = [f"Review {i}: the film was {'good' if i % 3 else 'slow'} and the cast {'shone' if i % 2 else 'tried'}."
         for i in range(60)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _mechlens(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "mechlens"), *args]
    if nproc > 1:
        torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc-per-node={nproc}", "--no-python", *cmd]
        env = dict(_env(), MASTER_PORT=str(_free_port()))
    else:
        env = _env()
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _numbers(x, prefix=""):
    """Every numeric leaf of a metrics tree, by dotted path."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _numbers(val, f"{prefix}.{key}").items()}
    if (
        isinstance(x, list)
        and x
        and all(isinstance(v, int | float) or v is None for v in np.ravel(np.array(x, dtype=object)))
    ):
        return {prefix: np.array(x, dtype=np.float64)}
    if isinstance(x, int | float) and not isinstance(x, bool):
        return {prefix: np.array(x, dtype=np.float64)}
    return {}


@pytest.mark.parametrize(
    ("study", "extra"),
    [
        ("magnitudes", ["--n-texts", "50", "--batch-size", "8"]),
        ("lens", ["--n-texts", "50", "--batch-size", "8"]),
        ("position", ["--n-train", "30", "--n-test", "20", "--batch-size", "8"]),
    ],
)
def test_two_processes_equal_one(study, extra, tmp_path):
    """Every statistic of results.json from 2 gloo processes equals the 1-process run. Tolerance: each rank
    pads its own batches, which moves fp32 activations by ~1e-6 relative; the float64 sums then differ in
    order only, so 1e-5 of each statistic's scale (and exact counts) is ample."""
    data = tmp_path / "reviews.txt"
    data.write_text("\n".join(LINES))
    args = ["run", study, "--model", "tiny-gpt2", "--data", str(data), "--quiet", *extra]
    one = _mechlens([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _mechlens([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "results.json").read_text())[study]["tiny-gpt2"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())[study]["tiny-gpt2"]
    assert (a["provenance"]["world_size"], b["provenance"]["world_size"]) == (1, 2)
    na, nb = _numbers(a["metrics"]), _numbers(b["metrics"])
    assert na.keys() == nb.keys() and len(na) > 5
    for key in na:
        x, y = na[key], nb[key]
        scale = 1e-5 * max(1.0, float(np.nanmax(np.abs(x))) if x.size else 1.0)
        np.testing.assert_allclose(y, x, rtol=0, atol=scale, err_msg=key)
    assert not list(tmp_path.glob("two*.tmp*"))  # rank 1 wrote nothing beside rank 0's output


def test_interventions_two_processes_equal_one(tmp_path):
    """Study 6 on the built-in pairs, 2 pairs per batch: each rank runs its share of the pairs (pair i on
    rank i % 2), and the merged means, maxima, correlations and bootstrap intervals (the same kept pairs:
    the reservoir keys them by global pair index) equal the 1-process run. Tolerance: each rank batches
    different pairs together, which moves fp32 logits by ~1e-6 relative (as padding does above); ratios
    (the fraction restored) divide by a gap of order 1, so 1e-5 of each statistic's scale is ample."""
    args = ["run", "interventions", "--model", "tiny-gpt2", "--n-pairs", "6", "--segment-length", "2",
            "--batch-size", "2", "--n-resamples", "200", "--quiet"]  # fmt: skip
    one = _mechlens([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _mechlens([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "results.json").read_text())["interventions"]["tiny-gpt2"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())["interventions"]["tiny-gpt2"]
    assert (a["provenance"]["world_size"], b["provenance"]["world_size"]) == (1, 2)
    assert a["metrics"]["n_pairs"] == b["metrics"]["n_pairs"] == 6
    assert a["metrics"]["intervals"]["n_kept"] == b["metrics"]["intervals"]["n_kept"] == 6
    na, nb = _numbers(a["metrics"]), _numbers(b["metrics"])
    assert na.keys() == nb.keys() and len(na) > 20
    for key in na:
        x, y = na[key], nb[key]
        assert np.array_equal(np.isnan(x), np.isnan(y)), key  # the same cells undefined (None)
        scale = 1e-5 * max(1.0, float(np.nanmax(np.abs(x))) if np.isfinite(x).any() else 1.0)
        np.testing.assert_allclose(y, x, rtol=0, atol=scale, err_msg=key)


def test_serial_study_is_refused_under_torchrun(tmp_path):
    run = _mechlens(["run", "distances", "--out", str(tmp_path / "x"), "--quiet"], nproc=2)
    assert run.returncode != 0
    assert "does not run data-parallel" in run.stderr
    assert not (tmp_path / "x").exists()
