"""Tuned-lens benchmarks (issue 23), CPU: training throughput and peak memory vs depth, and the memory of
the evaluation (both lenses through ``lens_reduce``) against the ``[layer, rows, vocab]`` logits it never
holds.

    HF_HUB_OFFLINE=1 python benchmarks/tuned_lens.py          # -> prints the rows; paste into RESULTS.md

Models: seeded random GPT-2s (d_model 128, 4 heads, the real 50,257-token vocabulary) of 2, 4 and 8 blocks.
Training: ``train_tuned_lens`` on ``contexts`` (16 texts of at most 32 tokens per step), 1 warm-up step then
timed steps; throughput counts loss positions (next-token positions) per second. Memory: whole-process
peak RSS above the loaded model, in a fresh child with large allocations straight from mmap
(:func:`bench.in_child` with ``exact_peak``), as the other benchmarks measure it. Training materialises
one readout point's chunk of ``[rows, d_vocab]`` logits at a time (``max_chunk_bytes``), so its peak
should follow the chunk budget, not the depth; evaluation goes through ``lens_reduce`` tiles.
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch
from bench import bridge_of, in_child

GIB = 2**30


def _gpt2(n_layers: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layers, n_embd=128, n_head=4, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).eval()


def train_job(n_layers: int, steps: int, chunk_mb: int = 256):
    def setup():
        from mechlens.data import load_texts

        return bridge_of(_gpt2(n_layers)), load_texts("contexts")

    def work(state):
        from mechlens.lens import training as tl

        model, texts = state
        kw = dict(batch_size=16, heldout=0, max_tokens=32, evaluate=False, max_chunk_bytes=chunk_mb * 2**20)
        tl.train_tuned_lens(model, texts, tl.TrainConfig(steps=1, **kw))  # warm-up
        t0 = time.perf_counter()
        lens = tl.train_tuned_lens(model, texts, tl.TrainConfig(steps=steps, **kw))
        return {"seconds": time.perf_counter() - t0, "positions": lens.card.tokens_per_step * steps}

    return setup, work


def eval_job(n_layers: int, tuned: bool, n_texts: int = 32):
    def setup():
        from mechlens.data import load_texts
        from mechlens.lens import tuned as tlens

        model = bridge_of(_gpt2(n_layers))
        return model, load_texts("contexts")[:n_texts], tlens.identity_lens(model) if tuned else None

    def work(state):
        from mechlens.lens.corpus import corpus_lens

        model, texts, t = state
        c = corpus_lens(model, texts, max_tokens=32, batch_size=16, tuned=t, n_samples=1)
        return {"positions": c.n_predictions}

    return setup, work


REFERENCE_PINS = ("torch==2.13.0", "tuned-lens==0.2.0", "transformers==4.57.6", "datasets==4.0.0",
                  "huggingface-hub==0.36.2", "torchdata==0.8.0")  # fmt: skip
# what the pins above need (installed under them as constraints; newer torchdata/transformers break the package)
REFERENCE_NEEDS = ("typing_extensions", "numpy", "filelock", "sympy", "networkx", "jinja2", "fsspec[http]<=2025.3.0",
                   "tokenizers>=0.22,<=0.23.0", "safetensors", "regex", "pyyaml", "packaging", "requests", "tqdm",
                   "accelerate", "simple-parsing", "flatten-dict", "dill<0.3.9", "multiprocess<0.70.17", "pyarrow",
                   "xxhash", "pandas")  # fmt: skip


def reference_venv(root: pathlib.Path) -> tuple[pathlib.Path | None, str]:
    """A scratch virtual environment with the ``tuned-lens`` package (``root/venv``, made once): its python, or
    None and why it could not be installed."""
    import subprocess

    py = root / "venv" / "bin" / "python"
    probe = [str(py), "-c", "import tuned_lens.scripts.ingredients, transformers"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py, ""
    root.mkdir(parents=True, exist_ok=True)
    (root / "constraints.txt").write_text("\n".join(REFERENCE_PINS) + "\n")
    steps = [[sys.executable, "-m", "venv", str(root / "venv")],
             [str(py), "-m", "pip", "install", "-q", "--no-deps", *REFERENCE_PINS],
             [str(py), "-m", "pip", "install", "-q", "-c", str(root / "constraints.txt"),
              *REFERENCE_NEEDS]]  # fmt: skip
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"{' '.join(cmd[:4])}... failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    r = subprocess.run(probe, capture_output=True, text=True)
    return (py, "") if r.returncode == 0 else (None, f"the package does not import: {r.stderr.strip()[-300:]}")


def reference_comparison(data: pathlib.Path, steps: int = 80, heldout: int = 200, eval_texts: int = 64,
                         root=pathlib.Path(".cache/bench-tl"), readout_dtype: str = "auto",
                         package_autocast: bool = True):  # fmt: skip
    """tiny-gpt2's tuned lens, mechlens against the package, on the same token ids: the first ``heldout`` texts
    of ``data`` held out, then ``steps`` steps of 16 texts (BOS + at most 128 tokens) for both. mechlens trains
    in this process, the package in its scratch venv (``benchmarks/tuned_lens_reference.py``), one after the
    other; each times its own training loop (wall and this process' CPU time). Every lens is evaluated by the
    reference script in float64 on the held-out texts (and mechlens' also by its corpus lens). With
    ``package_autocast`` false the package's loop body runs in float32 (no bfloat16 autocast): beside
    ``readout_dtype="float32"`` the two implementations then compute the same recipe at the same precision."""
    import json
    import subprocess

    from mechlens.data import iter_indexed
    from mechlens.lens import training as tl
    from mechlens.lens.corpus import corpus_lens
    from mechlens.lens.tuned import WEIGHTS_FILE, lens_inputs
    from mechlens.loading import load_model
    from mechlens.zoo.export import export_model

    py, why = reference_venv(root)
    if py is None:
        print(f"reference tuned-lens row skipped: the package could not be installed ({why})", flush=True)
        return None
    model_dir = root / "tiny-gpt2-hf"
    if not (model_dir / "config.json").exists():
        export_model("tiny-gpt2", model_dir)
    model = load_model("tiny-gpt2")
    texts = [t for _, t in iter_indexed(str(data), heldout + 16 * steps)]

    def ids(chunk, start):
        x = lens_inputs(model, chunk, range(start, start + len(chunk)), bos=True, max_tokens=128)
        return [row[m.bool()].tolist() for row, m in zip(x.batch.tokens, x.batch.attention_mask, strict=True)]

    train = [ids(texts[heldout + 16 * s : heldout + 16 * (s + 1)], heldout + 16 * s) for s in range(steps)]
    spec = {"model_dir": str(model_dir), "train": train, "heldout": ids(texts[:heldout], 0),
            "mechlens_lens": str(root / "mechlens" / WEIGHTS_FILE), "eval_texts": eval_texts,
            "autocast": package_autocast}  # fmt: skip
    cfg = tl.TrainConfig(steps=steps, heldout=heldout, batch_size=16, max_tokens=128, evaluate=False,
                         readout_dtype=readout_dtype)  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    lens = tl.train_tuned_lens(model, texts, cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    lens.save(root / "mechlens")
    positions = lens.card.tokens_per_step * steps
    (root / "spec.json").write_text(json.dumps(spec))
    # -P: this folder's tuned_lens.py must not shadow the package
    script = pathlib.Path(__file__).with_name("tuned_lens_reference.py")
    subprocess.run([str(py), "-P", str(script), str(root / "spec.json"), str(root / "reference.json")], check=True)
    ref = json.loads((root / "reference.json").read_text())
    c = corpus_lens(model, texts[:eval_texts], bos=True, max_tokens=128, tuned=lens, n_samples=1)
    out = {
        "steps": steps, "positions": positions, "readout_dtype": lens.card.readout_dtype,
        "package_autocast": "bfloat16" if package_autocast else "none (float32)",
        "torch_threads": torch.get_num_threads(), "package_torch_threads": ref["torch_threads"],
        "package_positions": ref["train_positions"],
        "mechlens_pos_per_s": positions / wall, "mechlens_pos_per_cpu_s": positions / cpu,
        "package_pos_per_s": ref["train_positions"] / ref["train_wall_s"],
        "package_pos_per_cpu_s": ref["train_positions"] / ref["train_cpu_s"],
        "heldout_positions": ref["heldout_positions"],
        "kl_logit": ref["heldout_kl_logit"], "kl_package": ref["heldout_kl_package"],
        "kl_mechlens": ref["heldout_kl_mechlens"],
        "corpus_lens_kl_logit": [float(v) for v in c.kl_to_final_by_layer],
        "corpus_lens_kl_mechlens": [float(v) for v in c.tuned.kl_to_final_by_layer],
    }  # fmt: skip
    out["wall_ratio"] = out["mechlens_pos_per_s"] / out["package_pos_per_s"]
    out["cpu_ratio"] = out["mechlens_pos_per_cpu_s"] / out["package_pos_per_cpu_s"]
    name = f"comparison_{steps}steps_mechlens-{out['readout_dtype']}_package-{'bf16' if package_autocast else 'fp32'}"
    (root / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"reference comparison, tiny-gpt2, {steps} steps of 16 texts, held-out KL (nats) on the first "
          f"{eval_texts} of {heldout} held-out texts ({out['heldout_positions']} positions), in float64:",
          flush=True)  # fmt: skip
    print(f"(mechlens' readout products in {out['readout_dtype']}, the package's autocast {out['package_autocast']})")
    print("| point | logit lens | tuned-lens 0.2.0 | mechlens | mechlens - package |\n| --- | --- | --- | --- | --- |")
    for i in range(len(out["kl_logit"]) - 1):
        a, b = out["kl_package"][i], out["kl_mechlens"][i]
        print(f"| {i} | {out['kl_logit'][i]:.4f} | {a:.5f} | {b:.5f} | {b - a:+.1e} |")
    print(f"training throughput: mechlens {out['mechlens_pos_per_s']:.1f} positions/s "
          f"({out['mechlens_pos_per_cpu_s']:.1f} per CPU-s), package {out['package_pos_per_s']:.1f} "
          f"({out['package_pos_per_cpu_s']:.1f} per CPU-s), mechlens' readout products in "
          f"{out['readout_dtype']}: "
          f"{out['wall_ratio']:.2f}x wall, {out['cpu_ratio']:.2f}x CPU", flush=True)  # fmt: skip
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--reference-only", action="store_true", help="only the comparison with the tuned-lens package")
    ap.add_argument("--data", type=pathlib.Path, default=pathlib.Path(".cache/corpus/train.jsonl"),
                    help="texts of the comparison (python -m training.corpus writes it)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--eval-texts", type=int, default=64)
    ap.add_argument("--readout-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="mechlens' --readout-dtype in the comparison")  # fmt: skip
    ap.add_argument("--package-autocast", default="bfloat16", choices=("bfloat16", "none"),
                    help="the package's autocast (its own: bfloat16; none: float32, to pair with --readout-dtype "
                         "float32)")  # fmt: skip
    args = ap.parse_args()
    if args.data.exists():
        reference_comparison(args.data, steps=args.steps, eval_texts=args.eval_texts, readout_dtype=args.readout_dtype,
                             package_autocast=args.package_autocast == "bfloat16")  # fmt: skip
    else:
        print(f"reference tuned-lens row skipped: {args.data} is missing (python -m training.corpus)", flush=True)
    if args.reference_only:
        return
    rows = []
    depths = (2, 4, 8)
    for n in depths:
        timed = in_child("tuned_lens:train_job", n_layers=n, steps=4)["out"]
        peak = in_child("tuned_lens:train_job", exact_peak=True, n_layers=n, steps=2)["peak_bytes"]
        rows.append(("training", n, timed["positions"] / timed["seconds"], peak))
        print(f"train depth {n}: {timed['positions'] / timed['seconds']:.0f} positions/s, peak {peak / GIB:.3f} GiB",
              flush=True)  # fmt: skip
    small = in_child("tuned_lens:train_job", exact_peak=True, n_layers=4, steps=2, chunk_mb=64)["peak_bytes"]
    print(f"train depth 4 with a 64 MiB chunk budget: peak {small / GIB:.3f} GiB", flush=True)
    for n in depths:
        a = in_child("tuned_lens:eval_job", exact_peak=True, n_layers=n, tuned=False)
        b = in_child("tuned_lens:eval_job", exact_peak=True, n_layers=n, tuned=True)
        rows_n = b["out"]["positions"]
        materialised = (n + 1) * rows_n * 50257 * 4
        print(f"eval depth {n}: logit only {a['peak_bytes'] / GIB:.3f} GiB, both lenses "
              f"{b['peak_bytes'] / GIB:.3f} GiB; [layer, rows, vocab] fp32 would be {materialised / GIB:.2f} GiB "
              f"({rows_n} rows)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
