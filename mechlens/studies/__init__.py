"""The study registry: the one list of studies, name -> :class:`StudyInfo`.

The registry holds what the command line needs without importing a study (so ``mechlens --help``,
``mechlens list`` and an unknown study answer without loading torch): name, title, the model kinds
the study applies to and its default models. ``info.module`` imports the study module.

The study protocol (what a study exposes; nothing outside ``mechlens/studies/`` names a study, asserted by
``tests/test_layers.py``). A study is a module ``mechlens/studies/<name>.py``, or a package of that name
when it is too large to read in one sitting (``lens``: ``parts`` (the maths and its typed results),
``figures`` (figures, findings, comparison figures), ``lesson``; its ``__init__`` composes ``run`` and
re-exports the rest), plus one line in :data:`STUDIES` below. It exposes:

* ``Config``: a :class:`mechlens.options.Options` dataclass (its fields are the command-line flags, their
  documentation the ``--help``); ``Config.check_model(model)`` refuses model-dependent options before
  any forward pass (:func:`mechlens.plan.plan` calls it for every model);
* one public **part function** per part of the original notebook, named after what it computes,
  taking a model and a :class:`~mechlens.encoding.TokenBatch` or tensors and returning a frozen
  dataclass with jaxtyping-annotated fields;
* ``run(model, cfg, inputs=None) -> StudyResult`` (:mod:`mechlens.result`): composes the parts;
  ``result.parts`` is the typed result and ``result.metrics`` (``results.json``) is derived from it
  (:func:`~mechlens.result.metrics_of`); the orchestration (:mod:`mechlens.runner`) checks it for NaN
  and records the world size;
* ``figures(...)``, ``headline(metrics) -> list[str]`` (the findings in words; the first line is the
  terminal summary) and ``compare(entries) -> dict[str, Figure]`` for several models' saved entries;
* ``samples(result) -> pandas.DataFrame``: per-unit statistics with :data:`mechlens.result.SAMPLE_COLUMNS`,
  built with :func:`mechlens.result.sample_table`, from which :mod:`mechlens.comparison` builds
  bootstrap intervals and ``comparison.csv``; optionally ``incomparable(provenances) -> {quantity: why}``;
* ``LESSON``: a tuple of :class:`Step`, the notebook and experiment script, part by part
  (``notebooks/generate.py``).

A data-parallel study (``data_parallel=True``) reads its share of the inputs with
:func:`mechlens.data.shard` and merges its accumulators with :func:`mechlens.distributed.share_then_merge`.
Library machinery a study merely uses (the lens readout, tuned lens, corpus streaming) lives below the
studies (:mod:`mechlens.lens`); see ``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

from mechlens.errors import MechlensError


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    name: str
    title: str
    kinds: frozenset[str]  # model kinds the study applies to: "causal", "masked"
    default_models: tuple[str, ...]
    module_name: str
    data_parallel: bool = False  # runs under torchrun: shards its data by rank and merges its statistics
    # hook points the study reads besides the residual-stream readout points (checked at load), at every
    # block: "{layer}" stands for each layer index
    hooks: tuple[str, ...] = ()

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    def applies_to(self, kind: str) -> bool:
        return kind in self.kinds

    def hook_names(self, model) -> list[str]:
        return [h.format(layer=layer) for layer in range(model.cfg.n_layers) for h in self.hooks]

    def unmet(self, model) -> str | None:
        """Why the study cannot run on ``model`` (its kind, or hook points the model lacks, e.g. a Mamba
        layer's attention output), in words; ``None`` when it can."""
        from mechlens import arch

        if not self.applies_to(arch.kind_of(model)):
            return f"it applies to {' and '.join(sorted(self.kinds))} LMs only"
        return arch.missing_hooks(model, self.hook_names(model))


@dataclasses.dataclass(frozen=True)
class Step:
    """One part of a study's lesson: a markdown cell (what the part computes, on which hook, what to
    look for) and the code cell that calls it. Steps run in order in one namespace that starts with
    ``load_model`` and the study module imported; the last step defines ``result`` (``run``'s)."""

    title: str
    text: str
    code: str


def _study(
    name: str,
    title: str,
    kinds: set[str],
    default_models: tuple[str, ...],
    data_parallel: bool = False,
    hooks: tuple[str, ...] = (),
) -> StudyInfo:
    return StudyInfo(name, title, frozenset(kinds), default_models, f"mechlens.studies.{name}", data_parallel, hooks)


BOTH = {"causal", "masked"}
STUDIES: dict[str, StudyInfo] = {
    s.name: s
    for s in (
        _study("position", "1. Token position from loss", BOTH, ("tiny-gpt2",), data_parallel=True),
        _study("logits", "2. Logits, next-token prediction and a logit intervention", BOTH, ("tiny-gpt2",)),
        _study("lens", "3. Logit lens (masked and causal)", BOTH, ("tiny-mlm", "tiny-gpt2"), data_parallel=True),
        _study(
            "magnitudes",
            "4. Attention-output magnitudes",
            BOTH,
            ("tiny-gpt2",),
            data_parallel=True,
            hooks=("blocks.{layer}.hook_attn_out",),
        ),
        _study(
            "distances",
            "5. Distances, mutual information and token position",
            BOTH,
            ("tiny-gpt2",),
            hooks=("blocks.{layer}.hook_attn_out", "blocks.{layer}.hook_mlp_out"),
        ),
        _study(
            "interventions",
            "6. Interventions: attribution, ablation and patching",
            BOTH,
            ("tiny-gpt2",),
            data_parallel=True,
            hooks=("blocks.{layer}.hook_resid_pre", "blocks.{layer}.hook_attn_out", "blocks.{layer}.hook_mlp_out"),
        ),
    )
}


def get_study(name: str) -> StudyInfo:
    if name not in STUDIES:
        raise MechlensError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)} or 'all'")
    return STUDIES[name]
