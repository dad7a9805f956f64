"""Train the embedded models ``tiny-gpt2`` (causal) and ``tiny-mlm`` (RoBERTa masked LM).

Reads the token files written by :mod:`training.corpus` and needs only torch, transformers,
numpy and tqdm (so it runs on a bare GPU image too; it imports nothing from mechlens). The last
``--val-fraction`` of ``train.bin`` is a validation slice that picks the best checkpoint;
``heldout.bin`` is evaluated once, at the end, and never influences training.

    python -m training.corpus --out .cache/corpus
    python -m training.train --model tiny-gpt2 --data .cache/corpus --out .cache/train/tiny-gpt2
    python -m training.train --model tiny-mlm  --data .cache/corpus --out .cache/train/tiny-mlm
    python -m training.fp16 .cache/train/tiny-gpt2 mechlens/zoo/weights/tiny-gpt2  # fp16 storage copy
    python -m training.card --data .cache/corpus  # held-out metrics + model cards beside the weights

(run from the repository root; ``python training/train.py ...`` works as well.)

Seeded (data order, masking, init). On CUDA it trains in bf16 autocast; bit-exact reproduction
across GPU models or against CPU is not guaranteed, the metrics are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import time

import numpy as np
import torch

GPT2_EOT = 50256
MLM_OFFSET, MLM_BOS, MLM_PAD, MLM_EOS, MLM_MASK, MLM_VOCAB = 4, 0, 1, 2, 50261, 50262


@dataclasses.dataclass
class TrainConfig:
    model: str = "tiny-gpt2"
    data: pathlib.Path = pathlib.Path(".cache/corpus")
    out: pathlib.Path = pathlib.Path(".cache/train/tiny-gpt2")
    d_model: int = 128
    n_layers: int = 6
    n_heads: int = 4
    d_mlp: int = 512
    seq_len: int = 512
    batch_size: int = 64
    steps: int = 4000
    lr: float = 2e-3
    warmup: int = 300
    weight_decay: float = 0.1
    dropout: float = 0.1
    mask_prob: float = 0.15
    val_fraction: float = 0.03
    eval_every: int = 250
    eval_batches: int = 40
    max_seconds: float = 1e9
    init_embeddings: str = ""  # MLM only: a trained tiny-gpt2 checkpoint dir whose token embeddings seed ours
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.model == "tiny-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        conf = GPT2Config(
            vocab_size=50257, n_positions=1024, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_mlp, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, tie_word_embeddings=True,
        )  # fmt: skip
        return GPT2LMHeadModel(conf)
    if cfg.model == "tiny-mlm":
        from transformers import RobertaConfig, RobertaForMaskedLM

        conf = RobertaConfig(
            vocab_size=MLM_VOCAB, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp, max_position_embeddings=514,
            type_vocab_size=1, pad_token_id=MLM_PAD, bos_token_id=MLM_BOS, eos_token_id=MLM_EOS,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout, tie_word_embeddings=True,
        )  # fmt: skip
        model = RobertaForMaskedLM(conf)
        if cfg.init_embeddings:
            _copy_gpt2_embeddings(model, pathlib.Path(cfg.init_embeddings))
        return model
    raise ValueError(f"unknown model {cfg.model!r}: expected 'tiny-gpt2' or 'tiny-mlm'")


def _copy_gpt2_embeddings(model: torch.nn.Module, src: pathlib.Path) -> None:
    """Seed the MLM's token embeddings with tiny-gpt2's (same BPE; MLM id = GPT-2 id + 4)."""
    from safetensors.torch import load_file

    wte = load_file(src / "model.safetensors")["transformer.wte.weight"].float()
    emb = model.roberta.embeddings.word_embeddings.weight
    if wte.shape[1] != emb.shape[1]:
        raise ValueError(f"--init-embeddings: d_model {wte.shape[1]} != {emb.shape[1]}")
    with torch.no_grad():
        emb[MLM_OFFSET : MLM_OFFSET + wte.shape[0] - 1] = wte[:-1]  # all but <|endoftext|>
        emb[MLM_EOS] = wte[GPT2_EOT]


def gpt2_ids_to_mlm(ids: np.ndarray) -> np.ndarray:
    """GPT-2 ids -> the MLM vocabulary: ordinary tokens shift by 4, ``<|endoftext|>`` becomes ``</s>``."""
    out = ids.astype(np.int64) + MLM_OFFSET
    out[ids == GPT2_EOT] = MLM_EOS
    return out


class Batches:
    """Random windows of a token stream, and the deterministic windows used for evaluation."""

    def __init__(self, tokens: np.ndarray, cfg: TrainConfig, seed: int):
        self.tokens, self.cfg = tokens, cfg
        self.rng = np.random.default_rng(seed)
        self.width = cfg.seq_len - (2 if cfg.model == "tiny-mlm" else -1)  # MLM adds <s>..</s>; LM needs +1

    def _window(self, starts: np.ndarray) -> np.ndarray:
        return np.stack([self.tokens[s : s + self.width] for s in starts]).astype(np.int64)

    def sample(self) -> np.ndarray:
        return self._window(self.rng.integers(0, len(self.tokens) - self.width, self.cfg.batch_size))

    def fixed(self, n_batches: int) -> list[np.ndarray]:
        n = min(n_batches * self.cfg.batch_size, len(self.tokens) // self.width)
        starts = np.arange(n) * self.width
        return [self._window(starts[i : i + self.cfg.batch_size]) for i in range(0, n, self.cfg.batch_size)]


def mlm_inputs(win: np.ndarray, cfg: TrainConfig, rng: np.random.Generator, eval_mode: bool = False):
    """BERT masking on GPT-2-id windows: 15% of ordinary tokens are targets; of those 80% -> <mask>,
    10% -> a random token, 10% kept (all -> <mask> in eval)."""
    ids = gpt2_ids_to_mlm(win)
    b = ids.shape[0]
    ids = np.concatenate([np.full((b, 1), MLM_BOS), ids, np.full((b, 1), MLM_EOS)], axis=1)
    maskable = ids >= MLM_OFFSET
    target = maskable & (rng.random(ids.shape) < cfg.mask_prob)
    labels = np.where(target, ids, -100)
    r = rng.random(ids.shape)
    to_mask = target & ((r < 0.8) | eval_mode)
    to_rand = target & (r >= 0.8) & (r < 0.9) & (not eval_mode)
    ids = np.where(to_mask, MLM_MASK, ids)
    ids = np.where(to_rand, rng.integers(MLM_OFFSET, MLM_MASK, ids.shape), ids)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def lm_inputs(win: np.ndarray):
    t = torch.from_numpy(win)
    return t[:, :-1], t[:, 1:]


@torch.no_grad()
def evaluate(model, windows: list[np.ndarray], cfg: TrainConfig, seed: int = 1234) -> dict:
    """Mean cross-entropy (nats/token) and, for the MLM, top-1 accuracy on masked positions."""
    model.eval()
    rng = np.random.default_rng(seed)
    tot_loss = tot_n = tot_correct = 0.0
    for win in windows:
        if cfg.model == "tiny-mlm":
            x, y = mlm_inputs(win, cfg, rng, eval_mode=True)
        else:
            x, y = lm_inputs(win)
        x, y = x.to(cfg.device), y.to(cfg.device)
        with _autocast(cfg):
            logits = model(input_ids=x).logits.float()
        valid = y != -100
        lp = torch.log_softmax(logits[valid], -1)
        tgt = y[valid]
        tot_loss += -lp.gather(-1, tgt[:, None]).sum().item()
        tot_correct += (lp.argmax(-1) == tgt).sum().item()
        tot_n += valid.sum().item()
    model.train()
    return {"loss": tot_loss / tot_n, "accuracy": tot_correct / tot_n, "n_targets": int(tot_n)}


def _autocast(cfg: TrainConfig):
    if cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train(cfg: TrainConfig) -> dict:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    tokens = np.fromfile(cfg.data / "train.bin", dtype=np.uint16)
    heldout = np.fromfile(cfg.data / "heldout.bin", dtype=np.uint16)
    n_val = int(len(tokens) * cfg.val_fraction)
    train_tok, val_tok = tokens[:-n_val], tokens[-n_val:]
    model = build_model(cfg).to(cfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n and "wte" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n and "wte" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    batches = Batches(train_tok, cfg, cfg.seed)
    val_windows = Batches(val_tok, cfg, 0).fixed(cfg.eval_batches)
    rng = np.random.default_rng(cfg.seed + 1)
    history, best = [], {"val_loss": math.inf}
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.train()
    bar = tqdm(range(1, cfg.steps + 1), desc=cfg.model, mininterval=5)
    step = 0
    for step in bar:
        progress = max(step / cfg.steps, (time.time() - t0) / cfg.max_seconds)
        lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        win = batches.sample()
        if cfg.model == "tiny-mlm":
            x, y = mlm_inputs(win, cfg, rng)
            x, y = x.to(cfg.device), y.to(cfg.device)
            with _autocast(cfg):
                loss = model(input_ids=x, labels=y).loss
        else:
            x = torch.from_numpy(win).to(cfg.device)
            with _autocast(cfg):
                loss = model(input_ids=x, labels=x).loss  # HF shifts the labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
        last = step == cfg.steps or time.time() - t0 > cfg.max_seconds
        if step % cfg.eval_every == 0 or last:
            ev = evaluate(model, val_windows, cfg)
            history.append(
                {
                    "step": step,
                    "tokens": step * cfg.batch_size * cfg.seq_len,
                    "train_loss": loss.item(),
                    "val_loss": ev["loss"],
                    "val_accuracy": ev["accuracy"],
                    "seconds": time.time() - t0,
                }
            )
            print(json.dumps(history[-1]), flush=True)
            if ev["loss"] < best["val_loss"]:
                best = {"val_loss": ev["loss"], "step": step}
                model.save_pretrained(cfg.out)
        if last:
            break
    wall = time.time() - t0
    model = type(model).from_pretrained(cfg.out).to(cfg.device)  # the best checkpoint
    held = evaluate(model, Batches(heldout, cfg, 0).fixed(10**9), cfg)
    report = {
        "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
        "parameters": n_params,
        "steps_run": step,
        "best_step": best["step"],
        "tokens_seen": best["step"] * cfg.batch_size * cfg.seq_len,
        "train_tokens_available": len(train_tok),
        "wall_seconds": wall,
        "hardware": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "heldout": held,
        "history": history,
    }
    (cfg.out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        typ = type(default) if not isinstance(default, pathlib.Path) else pathlib.Path
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=None)
    ns = ap.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    cfg = TrainConfig(**given)
    if cfg.model == "tiny-mlm" and "lr" not in given:
        cfg.lr = 1e-3
    if cfg.model == "tiny-mlm" and "seq_len" not in given:
        cfg.seq_len = 256
    if cfg.model == "tiny-mlm" and "batch_size" not in given:
        cfg.batch_size = 128
    if "out" not in given:
        cfg.out = pathlib.Path(".cache/train") / cfg.model
    return cfg


def main(argv=None) -> None:
    report = train(parse_args(argv))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
