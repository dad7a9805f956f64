"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned
Lens"): one affine translator per readout point, trained so that the model's own head applied to the
translated residual matches the final layer's distribution.

At readout point ``l`` (:func:`mechlens.arch.readout_hook_names`: the embeddings, then each block's
output) the tuned lens reads ``readout(h_l @ W_l + b_l)`` where ``readout`` is the model's own logit map
(:func:`mechlens.arch.readout`: final norm with its statistics recomputed + unembedding + the family's
post-processing; the full MLM head for masked LMs). ``W_l`` is ``d_model x d_model`` and starts at the
identity, ``b_l`` at zero, so an untrained tuned lens *is* the logit lens (tested bit for bit).

Save / load: :meth:`TunedLens.save` writes ``tuned_lens.safetensors`` (``weight [point, d_model,
d_model]``, ``bias [point, d_model]``, float32) and ``tuned_lens.json`` (the card: model fingerprint,
data, split, steps, recipe, final training KL per readout point, held-out KL of both lenses); the names
sit beside an embedded model's weights (``mechlens/zoo/weights/<name>/``), so ``load_tuned_lens("tiny-gpt2",
model)`` reads the shipped lens. Loading onto a model whose fingerprint differs is refused in one line.

Training, with the held-out evaluation of its card, is :mod:`mechlens.lens.training`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechlens import arch
from mechlens.encoding import TokenBatch, encode
from mechlens.errors import ConfigError, MechlensError

WEIGHTS_FILE = "tuned_lens.safetensors"
CARD_FILE = "tuned_lens.json"
FORMAT = "mechlens-tuned-lens/1"


class TunedLensError(MechlensError):
    """A tuned lens that cannot be used: missing or corrupt files, or made for another model."""


# -- the model fingerprint -----------------------------------------------------------------------


@torch.no_grad()
def fingerprint(model) -> str:
    """A short hash that changes with the model's weights, shapes, weight processing and tokenizer: a
    strided sample of every parameter (at most 4,096 values each, in float32), every parameter's name
    and shape, and the tokenizer signature. Cheap on large models (a few thousand values per tensor),
    and any training step or a different checkpoint changes it."""
    from mechlens.encoding import tokenizer_signature

    h = hashlib.sha256()
    h.update(f"{arch.kind_of(model)}|{model.cfg.n_layers}|{model.cfg.d_model}|{model.cfg.d_vocab}".encode())
    h.update(tokenizer_signature(model.tokenizer).encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


# -- the result ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TunedLensCard:
    """What produced a tuned lens (``tuned_lens.json``): the model it belongs to, the data and split, the
    recipe and the training curve's end. ``final_kl_by_layer`` is the mean training KL(final ||
    translated) per readout point over the last ``max(1, steps // 10)`` steps (nats); ``heldout_*`` the
    held-out evaluation (logit and tuned lens, per readout point), when one ran."""

    model: str
    fingerprint: str
    kind: str
    n_points: int
    d_model: int
    data: str
    heldout: int  # the first `heldout` texts of `data` are held out, never trained on
    n_train_texts: int  # training texts read (with repeats when the source was cycled)
    epochs: int  # passes over the training texts started
    steps: int
    tokens_per_step: float  # mean number of loss positions per step (next-token or masked positions)
    batch_size: int
    max_tokens: int
    lr: float
    momentum: float
    weight_decay: float
    mask_prob: float | None
    bos: bool
    seed: int
    world_size: int
    trained_points: list[int]
    final_kl_by_layer: list[float]
    loss_curve: list[float]  # mean over trained points of the per-step KL, every step
    max_grad_norm: float | None = None  # None: a lens trained before clipping was part of the recipe
    readout_dtype: str | None = None  # training's vocabulary products; None: before the option (float32)
    heldout_kl_logit: list[float] | None = None
    heldout_kl_tuned: list[float] | None = None
    heldout_n_texts: int | None = None
    # the training source's identity (mechlens.data.identity): a local file's resolved path, and the content
    # fingerprint of its first `data_fingerprint_texts` texts (the held-out ones and the first training text)
    data_path: str | None = None
    data_fingerprint: str | None = None
    data_fingerprint_texts: int | None = None
    command: str = ""
    format: str = FORMAT


@dataclasses.dataclass(frozen=True)
class TunedLens:
    """One affine translator per readout point: readout point ``l`` is read as ``readout(h @ weight[l] +
    bias[l])``. ``weight[-1]`` is the identity and ``bias[-1]`` zero (the last point is not trained)."""

    weight: Float[Tensor, "point d_model d_model"]
    bias: Float[Tensor, "point d_model"]
    card: TunedLensCard

    @property
    def n_points(self) -> int:
        return self.weight.shape[0]

    def translate(self, resid: Float[Tensor, "point *rows d_model"]) -> Float[Tensor, "point *rows d_model"]:
        """``resid[l] @ weight[l] + bias[l]`` for every readout point (on ``resid``'s device and dtype)."""
        if resid.shape[0] != self.n_points or resid.shape[-1] != self.weight.shape[-1]:
            raise TunedLensError(
                f"the tuned lens has {self.n_points} readout points of width {self.weight.shape[-1]}, the "
                f"residual stream {resid.shape[0]} of width {resid.shape[-1]}: load the lens of this model"
            )
        w = self.weight.to(resid.device, resid.dtype)
        b = self.bias.to(resid.device, resid.dtype)
        flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])
        out = torch.baddbmm(b[:, None, :], flat, w)
        return out.reshape(resid.shape)

    def is_identity(self) -> bool:
        eye = torch.eye(self.weight.shape[-1], dtype=self.weight.dtype)
        return bool((self.weight == eye).all() and (self.bias == 0).all())

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write ``tuned_lens.safetensors`` and ``tuned_lens.json`` into ``directory`` (created if
        missing). Existing files of those two names are replaced; nothing else there is touched (the
        command line writes into a checked new directory, :mod:`mechlens.outputs`)."""
        from safetensors.torch import save_file

        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().contiguous()},
            str(d / WEIGHTS_FILE),
            metadata={"format": FORMAT, "fingerprint": self.card.fingerprint},
        )
        (d / WEIGHTS_FILE).chmod(0o644)  # an ordinary file (safetensors writes it owner-only)
        (d / CARD_FILE).write_text(json.dumps(dataclasses.asdict(self.card), indent=1, allow_nan=False) + "\n")
        return d


def identity_lens(model, **card: Any) -> TunedLens:
    """The untrained tuned lens (identity translators, zero biases): it reads exactly what the logit lens reads."""
    n, d = model.cfg.n_layers + 1, model.cfg.d_model
    base = dict(
        model=model_label(model),
        fingerprint=fingerprint(model),
        kind=arch.kind_of(model),
        n_points=n,
        d_model=d,
        data="",
        heldout=0,
        n_train_texts=0,
        epochs=0,
        steps=0,
        tokens_per_step=0.0,
        batch_size=0,
        max_tokens=0,
        lr=0.0,
        momentum=0.0,
        weight_decay=0.0,
        mask_prob=None,
        bos=True,
        seed=0,
        world_size=1,
        trained_points=[],
        final_kl_by_layer=[0.0] * n,
        loss_curve=[],
    )
    return TunedLens(torch.eye(d).expand(n, d, d).clone(), torch.zeros(n, d), TunedLensCard(**{**base, **card}))


def model_label(model) -> str:
    return getattr(getattr(model, "_mechlens_provenance", None), "model", None) or model.cfg.model_name


def resolve_dir(spec: str | os.PathLike) -> pathlib.Path:
    """The directory ``--tuned spec`` names: a path that holds a tuned lens (``tuned_lens.safetensors`` and
    ``tuned_lens.json``), else the name of an embedded model that ships one (its weights directory), else the
    path as given (:func:`load_tuned_lens` then says there is no lens there). A local directory that merely
    has an embedded model's name (what ``mechlens export tiny-gpt2 tiny-gpt2`` creates) does not shadow the
    shipped lens; a name that is both a directory holding a lens and an embedded model is refused in one
    line. A spec with a path separator (``./tiny-gpt2``) is always a path."""
    from mechlens.zoo import EMBEDDED

    s = os.fspath(spec)
    local = pathlib.Path(s).expanduser()
    embedded = s in EMBEDDED and os.sep not in s and (EMBEDDED[s].path / WEIGHTS_FILE).is_file()
    if holds_lens(local):
        if embedded:
            raise TunedLensError(
                f"--tuned {s} is ambiguous: ./{s} holds a tuned lens and {s} is an embedded model that ships one; "
                f"pass ./{s} for the directory or {EMBEDDED[s].path} for the shipped lens"
            )
        return local
    return EMBEDDED[s].path if embedded else local


def holds_lens(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a tuned lens written by :meth:`TunedLens.save`."""
    d = pathlib.Path(directory)
    return (d / WEIGHTS_FILE).is_file() and (d / CARD_FILE).is_file()


def load_tuned_lens(directory: str | os.PathLike, model) -> TunedLens:
    """Read a tuned lens written by :meth:`TunedLens.save` (a directory, or an embedded model's name for
    its shipped lens) for ``model``; a lens made for another model (its fingerprint differs) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = resolve_dir(directory)
    shown = os.fspath(directory)
    if not (d / WEIGHTS_FILE).is_file() or not (d / CARD_FILE).is_file():
        raise TunedLensError(
            f"--tuned {shown}: no tuned lens there (expected {WEIGHTS_FILE} and {CARD_FILE}): pass a directory "
            "written by 'mechlens train-lens' or an embedded model's name (tiny-gpt2, tiny-mlm)"
        )
    try:
        doc = json.loads((d / CARD_FILE).read_text())
        fields = {f.name for f in dataclasses.fields(TunedLensCard)}
        card = TunedLensCard(**{k: v for k, v in doc.items() if k in fields})
        tensors = load_file(str(d / WEIGHTS_FILE))
        weight, bias = tensors["weight"], tensors["bias"]
    except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:
        raise TunedLensError(f"--tuned {shown}: the tuned lens cannot be read ({type(e).__name__}: {e})") from None
    mine = fingerprint(model)
    if card.fingerprint != mine:
        raise TunedLensError(
            f"--tuned {shown} was trained on model {card.model!r} (fingerprint {card.fingerprint}), not on "
            f"{model_label(model)!r} (fingerprint {mine}): train one for this model with 'mechlens train-lens'"
        )
    n, dm = model.cfg.n_layers + 1, model.cfg.d_model
    if tuple(weight.shape) != (n, dm, dm) or tuple(bias.shape) != (n, dm):
        raise TunedLensError(f"--tuned {shown}: translators of shape {tuple(weight.shape)}, expected {(n, dm, dm)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise TunedLensError(f"--tuned {shown}: the translators hold NaN or infinite values")
    return TunedLens(weight.float(), bias.float(), card)


# -- inputs: the positions a lens is read at --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LensInputs:
    """A batch as the lens reads it: ``batch`` the model input (masked LMs: with the chosen positions
    replaced by the mask token), ``targets[b, p]`` the token to predict there (-1: no loss at that cell),
    ``index`` the global index of each text."""

    batch: TokenBatch
    targets: Int[Tensor, "batch pos"]
    index: Int[Tensor, " batch"]

    @property
    def rows(self) -> Bool[Tensor, "batch pos"]:
        return self.targets >= 0


def _mask_choice(index: int, n: int, mask_prob: float, seed: int) -> Tensor:
    """Which of a text's ``n`` text tokens are masked: a seeded draw per (seed, global index), so the choice
    does not depend on batching or sharding; at least one token."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    u = torch.rand(n, generator=g)
    chosen = u < mask_prob
    if not chosen.any():
        chosen[int(u.argmin())] = True
    return chosen


def lens_inputs(
    model,
    texts: Sequence[str],
    index: Sequence[int],
    *,
    bos: bool = True,
    max_tokens: int | None = None,
    mask_prob: float = 0.15,
    seed: int = 0,
) -> LensInputs:
    """Encode ``texts`` (global indices ``index``) for the lens: causal LMs read every position that has a
    next token (target = that token); masked LMs read a seeded ``mask_prob`` of each text's tokens, each
    replaced by the mask token (target = the original token)."""
    batch = encode(
        model, list(texts), bos=bos or arch.kind_of(model) == "masked", max_tokens=max_tokens, fix="lower --max-tokens"
    )
    idx = torch.as_tensor(list(index), dtype=torch.long)
    if arch.kind_of(model) != "masked":
        t = torch.full_like(batch.tokens, -1)
        both = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
        t[:, :-1] = torch.where(both, batch.tokens[:, 1:], t[:, :-1])
        return LensInputs(batch, t, idx)
    tokens, targets = batch.tokens.clone(), torch.full_like(batch.tokens, -1)
    for b in range(len(batch)):
        cols = torch.nonzero(batch.text_mask[b]).squeeze(-1)
        chosen = cols[_mask_choice(int(idx[b]), len(cols), mask_prob, seed)]
        targets[b, chosen] = batch.tokens[b, chosen]
        tokens[b, chosen] = arch.mask_id(model)
    return LensInputs(dataclasses.replace(batch, tokens=tokens), targets, idx)


def residuals(model, inputs: LensInputs, *, batch_size: int | None = None) -> Float[Tensor, "point batch pos d_model"]:
    """The ``n_layers + 1`` readout points of ``inputs.batch`` (one forward through the hook points)."""
    from mechlens.forward import run_cached
    from mechlens.ops import stack_layers

    names = arch.readout_hook_names(model)
    _, acts = run_cached(model, inputs.batch, names, batch_size=batch_size)
    return stack_layers(acts, names)


def same_data(card: TunedLensCard, data) -> bool:
    """Whether ``data`` (a source spec or texts given in Python) is the lens' training source: the same
    spelling, the same resolved file, or the same content fingerprint of its first texts (a copy, a link,
    another spelling). A card without a fingerprint (an older mechlens) is compared by spelling and path."""
    from mechlens.data.identity import resolved, source_fingerprint

    if data is None:
        return False
    if isinstance(data, str):
        if data == card.data:
            return True
        path = resolved(data)
        if path is not None and path == card.data_path:
            return True
    if card.data_fingerprint is None or not card.data_fingerprint_texts:
        return False
    return source_fingerprint(data, card.data_fingerprint_texts) == card.data_fingerprint


def check_for(lens: TunedLens, cfg_data, n_texts: int | None) -> tuple[int | None, str]:
    """The evaluation's ``--n-texts`` and a note on the split: on the lens' own training source (the same
    texts however spelled, :func:`same_data`; ``cfg_data`` a source spec or texts given in Python) only the
    held-out texts (the first ``heldout``) are read; another source is unseen by construction."""
    if not same_data(lens.card, cfg_data):
        shown = cfg_data if isinstance(cfg_data, str) else "the given texts"
        return n_texts, f"evaluated on {shown}, not the tuned lens' training data ({lens.card.data})"
    if not isinstance(cfg_data, str):
        cfg_data = "the given texts"
    if lens.card.heldout == 0:
        raise ConfigError(
            f"--tuned: the tuned lens was trained on every text of {cfg_data} (no held-out texts): evaluate it "
            "on another --data source",
            flag="--tuned",
        )
    if n_texts is not None and n_texts > lens.card.heldout:
        raise ConfigError(
            f"--n-texts must be <= {lens.card.heldout}: the tuned lens was trained on the texts after the first "
            f"{lens.card.heldout} of {cfg_data}, got {n_texts}",
            flag="--n-texts",
        )
    n = lens.card.heldout if n_texts is None else n_texts
    return n, f"evaluated on the first {n} texts of {cfg_data}, held out from the tuned lens' training"
