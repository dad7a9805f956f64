"""The reference tuned lens (the ``tuned-lens`` package 0.2.0, Belrose et al.'s code) trained on given token
ids, run by ``benchmarks/tuned_lens.py`` inside a scratch virtual environment that has the package (this file
imports nothing from mechlens).

    python benchmarks/tuned_lens_reference.py SPEC.json OUT.json

SPEC: ``model_dir`` (a save_pretrained GPT-2), ``train`` (one list of token-id lists per step: the same texts,
BOS + at most 128 tokens, that mechlens trains on), ``heldout`` (token-id lists), ``mechlens_lens`` (optional:
a ``tuned_lens.safetensors`` to evaluate beside the package's lens), ``batch_eval`` (texts per forward), ``eval_texts``
(the first held-out texts evaluated, default 64: float64 readouts of 50,257 words are slow on a CPU),
``autocast`` (default true: the package's bfloat16 autocast; false runs its loop body in float32, the
precision of ``mechlens --readout-dtype float32``, to compare the two implementations at equal precision).

Training follows the package's own loop (``tuned_lens.scripts.train_loop.Train.execute``) with its default
recipe from its ``Optimizer`` ingredient (SGD, Nesterov momentum 0.9, lr scale 1.0 times (1 - momentum),
weight decay 1e-3, linear decay, no warm-up) and its loop body: one forward with ``output_hidden_states``,
per readout point the lens under bfloat16 autocast and the KL to the final distribution, backward per point,
``clip_grad_norm_(lens.parameters(), 1.0)``, step. One difference: the lens reads only the next-token
positions (padding and last positions are dropped before it, not after), so the package does no work on
padding; each point's loss is the mean over those positions, as mechlens' is.

Evaluation, the same for every lens (the package's, mechlens' and the logit lens = identity translators):
the model and translators in float64, KL(final || lens) per position, mean over the held-out next-token
positions per readout point.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time


def _batch(th, seqs):
    n = max(len(s) for s in seqs)
    ids = th.zeros(len(seqs), n, dtype=th.long)
    mask = th.zeros(len(seqs), n, dtype=th.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = th.tensor(s)
        mask[i, : len(s)] = 1
    rows = th.zeros(len(seqs), n, dtype=th.bool)
    rows[:, :-1] = mask[:, :-1].bool() & mask[:, 1:].bool()
    return ids, mask, rows


def main(spec_path: str, out_path: str) -> None:
    import torch as th
    from transformers import AutoModelForCausalLM
    from tuned_lens import TunedLens
    from tuned_lens.scripts.ingredients import Optimizer

    spec = json.loads(pathlib.Path(spec_path).read_text())
    th.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], attn_implementation="eager").eval()
    model.requires_grad_(False)
    lens = TunedLens.from_model(model)
    params = [p for p in lens.parameters() if p.requires_grad]
    ingredient = Optimizer()  # the package's defaults
    opt = ingredient.create_optim(params)
    sched = ingredient.create_scheduler(opt, len(spec["train"]))
    positions = 0
    wall, cpu = time.perf_counter(), time.process_time()
    autocast = spec.get("autocast", True)
    for seqs in spec["train"]:
        ids, mask, rows = _batch(th, seqs)
        with th.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        labels = out.logits[rows].float().log_softmax(dim=-1)
        for i, h in enumerate(out.hidden_states[:-1]):
            with th.autocast("cpu", dtype=th.bfloat16, enabled=autocast):
                logits = lens(h[rows], idx=i)
                loss = th.sum(labels.exp() * (labels - logits.log_softmax(-1)), dim=-1).mean()
            loss.backward()
        th.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        positions += int(rows.sum())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    # evaluation in float64, the same code for every lens
    model.double()
    lens.double()
    n_layers = model.config.n_layer
    translators = {"package": lambda h, i: lens.transform_hidden(h, i), "logit": lambda h, i: h}
    if spec.get("mechlens_lens"):
        from safetensors.torch import load_file

        t = load_file(spec["mechlens_lens"])
        w, b = t["weight"].double(), t["bias"].double()
        translators["mechlens"] = lambda h, i: h @ w[i] + b[i]
    sums = {k: th.zeros(n_layers, dtype=th.float64) for k in translators}
    count = 0
    heldout = spec["heldout"][: spec.get("eval_texts", 64)]
    with th.no_grad():
        for s in range(0, len(heldout), spec.get("batch_eval", 16)):
            ids, mask, rows = _batch(th, heldout[s : s + spec.get("batch_eval", 16)])
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            lp_f = out.logits[rows].log_softmax(-1)
            p_f = lp_f.exp()
            for i, h in enumerate(out.hidden_states[:-1]):
                for k, f in translators.items():
                    lq = model.lm_head(model.transformer.ln_f(f(h[rows], i))).log_softmax(-1)
                    sums[k][i] += (p_f * (lp_f - lq)).sum()
            count += int(rows.sum())
    result = {
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "train_positions": positions,
        "steps": len(spec["train"]),
        "heldout_positions": count,
        "torch_threads": th.get_num_threads(),
        "autocast": autocast,
        **{f"heldout_kl_{k}": [*(v / count).tolist(), 0.0] for k, v in sums.items()},
    }
    pathlib.Path(out_path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
