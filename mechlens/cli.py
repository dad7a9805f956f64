"""The ``mechlens`` command.

    mechlens list
    mechlens run STUDY|all [--model SPEC ...] [--data SOURCE] [--out DIR] [--device D] [--seed N]
                 [--weights raw|processed] [--allow-different-tokenizers] [--quiet] [study options]
    mechlens compare DIR DIR [DIR ...] --out DIR
    mechlens export tiny-gpt2|tiny-mlm DIR
    mechlens add-tokenizer gpt2-bpe|roberta-bpe DIR
    mechlens train-lens --model SPEC --data SOURCE --out DIR [--device D] [--quiet] [training options]

Options may come before or after the study name. Study options are the fields of the study's
dataclass ``Config`` as flags (``mechlens run position --help`` lists them with their meaning,
default and valid range). ``--out`` must be a new directory or an earlier mechlens run: anything else
is refused, never deleted.

Exit codes: 0 success; 2 bad input (an option out of range, an unknown study, model or data source,
an output directory mechlens may not write, a study that does not apply to the model, NaN in the
weights, activations or results), with one line on stderr naming the flag or the fix, before any
output is written; 1 a bug in mechlens, with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
import typing
from collections.abc import Sequence

EXIT_BAD_INPUT = 2
COMMON = {"data", "seed"}  # study fields that are global flags
GLOBAL_VALUE_FLAGS = {"--model", "--data", "--out", "--device", "--seed", "--weights"}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), naming where help is."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_BAD_INPUT, f"mechlens: error: {message} (see '{self.prog} --help')\n")


def _add_config_flags(parser: argparse._ActionsContainer, config_cls, skip: set[str], seen: set[str]) -> None:
    """One flag per field of a study's dataclass config (bools get --x/--no-x, tuples take lists); the
    help text is the field's documentation, default and valid range."""
    from mechlens.options import _base_type, describe, flag

    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip or f.name in seen:
            continue
        seen.add(f.name)
        t, _ = _base_type(hints[f.name])
        name = flag(f.name)
        helptext = describe(f).replace("%", "%%")
        if t is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif typing.get_origin(t) is tuple:
            args = typing.get_args(t)
            nargs = "+" if args[-1] is Ellipsis else len(args)
            parser.add_argument(name, type=args[0], nargs=nargs, default=None, help=helptext, metavar="X")
        elif isinstance(t, type):
            parser.add_argument(name, type=t, default=None, help=helptext)
        else:  # pragma: no cover - every config field is a bool, number, string or tuple
            raise TypeError(f"unsupported option type {t!r} for {f.name}")


def _find_study(argv: Sequence[str]) -> str | None:
    """The study named after ``run``, wherever it stands among the options."""
    from mechlens.studies import STUDIES

    rest = list(argv[1:])
    for a in rest:
        if a in STUDIES or a == "all":
            return a
    i = 0
    while i < len(rest):  # no known name: the first word that is not an option or a global option's value
        a = rest[i]
        if a.startswith("-"):
            i += 2 if a in GLOBAL_VALUE_FLAGS else 1
            continue
        return a
    return None


def build_parser(study: str | None = None, train_lens: bool = False) -> argparse.ArgumentParser:
    """The parser; ``study`` adds that study's option flags, ``train_lens`` the tuned-lens training flags
    (each imports torch, so plain ``--help`` and ``list`` do not)."""
    from mechlens.studies import STUDIES

    p = Parser(prog="mechlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("list", help="studies, embedded models and data sources")
    r = sub.add_parser(
        "run",
        help="run a study (or all) and write results.json, CSVs and report.html",
        description="Run a study (or all) on one or more models; options may come before or after STUDY.",
    )
    r.add_argument("study", metavar="STUDY", help=f"one of {', '.join(STUDIES)} or 'all'")
    r.add_argument(
        "--model",
        action="append",
        default=None,
        help="model: an embedded name (tiny-gpt2, tiny-mlm), a save_pretrained directory or a hub name; "
        "repeat to compare models (default: the study's own)",
    )
    r.add_argument("--data", default=None, help="text source (see 'mechlens list'; default: the study's built-in)")
    r.add_argument(
        "--out",
        default="runs/latest",
        help="output directory: a new one, or an earlier mechlens run, which is replaced (default: runs/latest)",
    )
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0; >= 0)")
    r.add_argument(
        "--weights",
        choices=("raw", "processed"),
        default="raw",
        help="raw: Hugging Face weights; processed: TransformerLens' folded and centred weights (default: raw)",
    )
    r.add_argument(
        "--allow-different-tokenizers",
        action="store_true",
        help="compare models whose tokenizers differ (same texts, different token ids)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    seen: set[str] = set()
    names = list(STUDIES) if study == "all" else [study] if study in STUDIES else []
    for name in names:
        group = r.add_argument_group(f"{name} options")
        _add_config_flags(group, STUDIES[name].module.Config, COMMON, seen)
    c = sub.add_parser(
        "compare",
        help="combine earlier runs into one comparison report",
        description="Combine two or more earlier runs (directories written by 'mechlens run') into one report: "
        "every study that ran in at least two of them gets comparison figures and a comparison.csv with "
        "bootstrap intervals (paired differences where the runs read the same inputs and options). Writes "
        "results.json, comparison.csv and report.html into --out.",
    )
    c.add_argument("dirs", nargs="+", metavar="DIR", help="two or more directories written by 'mechlens run'")
    c.add_argument("--out", required=True, help="output directory: a new one, or an earlier mechlens run")
    e = sub.add_parser(
        "export",
        help="write an embedded model as a plain save_pretrained checkpoint with its tokenizer",
        description="Write an embedded model (fp32 weights, config, tokenizer, model card) into DIR, loadable "
        "with transformers' AutoModelForCausalLM / AutoModelForMaskedLM and AutoTokenizer.",
    )
    e.add_argument("name", metavar="NAME", help="an embedded model: tiny-gpt2 or tiny-mlm")
    e.add_argument("dir", metavar="DIR", help="output directory: a new one, or an earlier mechlens export (replaced)")
    a = sub.add_parser(
        "add-tokenizer",
        help="save mechlens' offline GPT-2 or RoBERTa-style tokenizer beside your own saved model",
        description="Save one of mechlens' offline tokenizers into DIR, a model saved with save_pretrained that "
        "has no tokenizer (one trained with GPT-2's byte-level BPE): then 'mechlens run --model DIR', "
        "load_model(DIR) and AutoTokenizer.from_pretrained(DIR) read it. Nothing is overwritten; the "
        "tokenizer must fit the model's vocab_size. gpt2-bpe: GPT-2's ids (50257 tokens); roberta-bpe: "
        "<s> <pad> </s> <unk>, GPT-2's BPE shifted by 4, <mask> (50262 tokens).",
    )
    a.add_argument("name", metavar="NAME", choices=("gpt2-bpe", "roberta-bpe"), help="gpt2-bpe or roberta-bpe")
    a.add_argument("dir", metavar="DIR", help="the model's directory (config.json and weights, no tokenizer)")
    t = sub.add_parser(
        "train-lens",
        help="train a tuned lens (one affine translator per readout point) and write it to DIR",
        description="Train a tuned lens (Belrose et al. 2023) for a model on streamed texts: SGD with Nesterov "
        "momentum, linear decay, loss KL(final || translated readout) per readout point. Writes "
        "tuned_lens.safetensors and tuned_lens.json into DIR; read it with 'mechlens run lens --tuned DIR'. "
        "Data-parallel under torchrun.",
    )
    t.add_argument("--model", required=True, help="model: an embedded name, a save_pretrained directory or a hub name")
    t.add_argument("--out", required=True, help="output directory: a new one, or an earlier mechlens run (replaced)")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default: cpu)")
    t.add_argument(
        "--weights",
        choices=("raw", "processed"),
        default="raw",
        help="raw: Hugging Face weights; processed: TransformerLens' folded and centred weights "
        "(default: raw; a lens fits one of them only)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    if train_lens:
        from mechlens.lens.training import TrainConfig

        _add_config_flags(t, TrainConfig, set(), set())
    return p


def cmd_list() -> None:
    from mechlens.data import SOURCES
    from mechlens.studies import STUDIES
    from mechlens.zoo import EMBEDDED

    print("studies:")
    for s in STUDIES.values():
        kinds = " and ".join(sorted(s.kinds))
        dp = "; data-parallel under torchrun" if s.data_parallel else ""
        print(f"  {s.name:<12} {s.title} ({kinds} LMs; default models: {', '.join(s.default_models)}{dp})")
    print("embedded models:")
    for m in EMBEDDED.values():
        print(f"  {m.name:<12} {m.description}")
    print("data sources:")
    width = max(map(len, SOURCES))
    for name, desc in SOURCES.items():
        print(f"  {name:<{width}} {desc}")


def _log(message: str) -> None:
    from mechlens import progress

    progress.status(message)


def cmd_run(args: argparse.Namespace) -> None:
    from mechlens import distributed, progress
    from mechlens.data import check_source
    from mechlens.errors import ConfigError
    from mechlens.studies import STUDIES, get_study

    # under torchrun every rank runs this command: rank 0 alone checks the output, shows progress and writes
    _rank, world_size = distributed.init_from_env(device=args.device)
    progress.QUIET = args.quiet or not distributed.is_main()
    # 1. everything that needs no model: the options, the device, the data, the output directory
    studies = list(STUDIES) if args.study == "all" else [get_study(args.study).name]
    if world_size > 1:
        serial = [s for s in studies if not STUDIES[s].data_parallel]
        if serial:
            raise ConfigError(
                f"study {serial[0]!r} does not run data-parallel (torchrun with {world_size} processes): run it "
                f"in one process; data-parallel studies: {', '.join(s for s in STUDIES if STUDIES[s].data_parallel)}",
                flag="torchrun",
            )
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}", flag="--seed")
    if args.model and len(set(args.model)) != len(args.model):
        dup = next(m for m in args.model if args.model.count(m) > 1)
        raise ConfigError(f"--model {dup} is given twice: name each model once", flag="--model")
    skip = ("command", "command_line", "study", "model", "out", "quiet")
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    if overrides.get("data") is None:
        overrides.pop("data")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}

    from mechlens.plan import make_config

    configs = {s: make_config(STUDIES[s], overrides) for s in studies}
    if args.data is not None and not any(hasattr(c, "data") for c in configs.values()):
        raise ConfigError(f"--data does not apply to study {args.study!r}: it reads no data source", flag="--data")
    given = {k for k, v in overrides.items() if v is not None and k not in COMMON}
    unused_options(configs, given, {s: dict.fromkeys(args.model or STUDIES[s].default_models) for s in studies})
    args.given_options = given
    for source in {
        cfg.data for cfg in configs.values() if getattr(cfg, "data", None) and not hasattr(cfg, "check_data")
    }:
        distributed.on_main(check_source, source)  # each source once, even when every study reads it
    for cfg in configs.values():  # a study whose data is not texts (e.g. prompt pairs) checks it itself
        if getattr(cfg, "data", None) and hasattr(cfg, "check_data"):
            distributed.on_main(cfg.check_data)
    from mechlens.loading import check_device
    from mechlens.preflight import check_model_paths, check_tuned_paths

    check_model_paths(args.model or [m for s in studies for m in STUDIES[s].default_models])
    check_tuned_paths({cfg.tuned for cfg in configs.values() if isinstance(getattr(cfg, "tuned", None), str)})
    check_device(args.device)
    args.device = distributed.local_device(args.device)  # one GPU per rank under torchrun
    _into_output(args.out, lambda dest: _run_checked(args, studies, configs, dest))


def unused_options(configs: dict, given: set[str], kinds: dict[str, dict[str, str | None]]) -> list[str]:
    """Options given on the command line (``given``: config field names) that a study does not use for a
    model (:meth:`mechlens.options.Options.not_applied`). One that no study and model of the run uses is
    refused (:class:`~mechlens.errors.ConfigError` naming its flag, before any forward pass); one that some
    use is applied there, and the others are returned as notes (terminal and results.json). ``kinds``:
    study -> {model spec: its kind, or None before the models are loaded}."""
    from mechlens.errors import ConfigError
    from mechlens.options import flag

    used: set[str] = set()
    unused: dict[str, dict[tuple[str, str], list[str]]] = {}
    for study, cfg in configs.items():
        fields = {f.name for f in dataclasses.fields(cfg)} & given
        for spec, kind in kinds.get(study, {}).items():
            why = cfg.not_applied(kind)
            used |= {name for name in fields if name not in why}
            for name in fields & set(why):
                unused.setdefault(name, {}).setdefault((study, why[name]), []).append(spec)
    notes = []
    for name, where in sorted(unused.items()):
        if name not in used:
            (study, why), specs = next(iter(where.items()))
            raise ConfigError(
                f"{flag(name)} ({name}) does not apply to study {study!r} on {', '.join(specs)}: "
                f"{why}; drop {flag(name)}",
                flag=flag(name),
            )
        notes += [
            f"{study} on {', '.join(specs)}: {flag(name)} not applied: {why}" for (study, why), specs in where.items()
        ]
    return notes


def _into_output(out, work) -> None:
    """``work(dest)`` with ``--out`` prepared by rank 0 (its error, if any, reaches every rank; other ranks
    get ``None``); the partial output is abandoned if ``work`` fails, and the process group is shut down."""
    from mechlens import distributed
    from mechlens.outputs import prepare_output

    prepared: dict[str, object] = {}
    distributed.on_main(lambda: prepared.setdefault("dest", prepare_output(out)) and None)
    dest = prepared.get("dest")
    done = False
    try:
        work(dest)
        done = True
    except BaseException:
        if dest is not None:
            dest.abort()
        raise
    finally:
        distributed.shutdown(wait=done)  # no barrier after an error: another rank may never reach it


def _run_checked(args, studies, configs, dest) -> None:
    import torch
    import transformers

    from mechlens.loading import load_model
    from mechlens.plan import plan
    from mechlens.runner import run_plan, summary_rows, write_outputs
    from mechlens.studies import STUDIES

    transformers.utils.logging.disable_progress_bar()  # one bar per long step: mechlens' own
    transformers.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    # 2. load every model, then check every study against every model before any forward pass
    models: dict[str, object] = {}
    for study in studies:
        for spec in args.model or STUDIES[study].default_models:
            if spec not in models:
                _log(f"loading {spec}")
                models[spec] = load_model(spec, device=args.device, weights=args.weights)
    checked = plan(
        studies,
        configs,
        lambda info: args.model or list(info.default_models),
        models,
        skip_unmet=args.study == "all",
        # the default models (tiny-mlm + tiny-gpt2) are meant to differ
        allow_different_tokenizers=lambda info: args.allow_different_tokenizers or not args.model,
        log=_log,
    )
    from mechlens import arch, distributed

    kinds = {
        study: {spec: arch.kind_of(m) for spec, m in chosen.items()} for study, (_, chosen) in checked.runs.items()
    }
    for note in unused_options({s: configs[s] for s in checked.runs}, args.given_options, kinds):
        checked.notes.append(note)
        if distributed.is_main():
            print(f"mechlens: note: {note}", file=sys.stderr)
    # 3. compute
    torch.manual_seed(args.seed)
    results = run_plan(checked, log=_log)
    if dest is None:  # a rank other than 0: its statistics were merged into rank 0's, which writes
        return
    # 4. write
    write_outputs(results, dest, checked.notes, context={"command": args.command_line})
    rows = summary_rows(results)
    width = max((len(r[1]) for r in rows), default=0)
    for study, model, line in rows:
        print(f"{study:<11} {model:<{width}}  {line}")
    print(f"wrote {args.out}/results.json, CSVs and report.html in {time.perf_counter() - t0:.1f} s")


def cmd_compare(args: argparse.Namespace) -> None:
    from mechlens.outputs import prepare_output
    from mechlens.runner import compare_runs, load_runs

    if len(args.dirs) < 2:
        from mechlens.errors import ConfigError

        raise ConfigError(
            f"compare needs two or more run directories, got {len(args.dirs)} ({args.dirs[0]}): "
            "pass each directory written by 'mechlens run' to compare",
            flag="DIR",
        )
    runs = load_runs(args.dirs)
    dest = prepare_output(args.out, inputs=args.dirs)
    try:
        compare_runs(runs, dest)
    except BaseException:
        dest.abort()
        raise
    print(f"wrote {args.out}/report.html (and comparison.csv where runs share a study) comparing {len(args.dirs)} runs")


def cmd_export(args: argparse.Namespace) -> None:
    from mechlens.zoo.export import export_model

    export_model(args.name, args.dir)
    print(f"wrote {args.dir}: {args.name} as a save_pretrained checkpoint with its tokenizer and model card")


def cmd_add_tokenizer(args: argparse.Namespace) -> None:
    from mechlens.tokenizer import save_tokenizer

    written = save_tokenizer(args.name, args.dir)
    print(
        f"wrote {written} and tokenizer_config.json: {args.name} beside the model in {args.dir}; "
        f"read it with 'mechlens run STUDY --model {args.dir}' or load_model({str(args.dir)!r})"
    )


def cmd_train_lens(args: argparse.Namespace) -> None:
    from mechlens import distributed, progress
    from mechlens.data import check_source
    from mechlens.lens.training import TrainConfig
    from mechlens.loading import check_device

    distributed.init_from_env(device=args.device)
    progress.QUIET = args.quiet or not distributed.is_main()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if cfg.data is None:
        from mechlens.errors import ConfigError

        raise ConfigError(
            "--data is required: the texts to train the tuned lens on (see 'mechlens list')", flag="--data"
        )
    distributed.on_main(check_source, cfg.data)
    from mechlens.preflight import check_model_paths

    check_model_paths([args.model])
    check_device(args.device)
    args.device = distributed.local_device(args.device)
    _into_output(args.out, lambda dest: _train_lens_checked(args, cfg, dest))


def _train_lens_checked(args, cfg, dest) -> None:
    import transformers

    from mechlens.lens.training import train_tuned_lens
    from mechlens.loading import load_model
    from mechlens.result import format_values

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    _log(f"loading {args.model}")
    model = load_model(args.model, device=args.device, weights=args.weights)
    lens = train_tuned_lens(model, cfg.data, cfg, command=args.command_line)
    if dest is None:  # a rank other than 0: rank 0 writes the (identical) lens
        return
    with dest.writing() as tmp:
        lens.save(tmp)
    c = lens.card
    print(
        f"trained {c.steps} steps on {c.n_train_texts} texts of {c.data} ({c.tokens_per_step:.0f} positions/step); "
        f"final training KL by readout point {format_values(c.final_kl_by_layer)} nats"
    )
    if c.heldout_kl_tuned is not None:
        print(
            f"held-out KL to final over the first {c.heldout} texts: logit lens {format_values(c.heldout_kl_logit)}, "
            f"tuned lens {format_values(c.heldout_kl_tuned)} nats"
        )
    print(f"wrote {args.out}/tuned_lens.safetensors and tuned_lens.json in {time.perf_counter() - t0:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    study = _find_study(argv) if argv and argv[0] == "run" else None
    from mechlens import signals

    try:
        with signals.handled():
            return _main(argv, study)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the outputs removed what they had begun
        line, code = signals.message(e)
        print(line, file=sys.stderr)
        return code


def _main(argv: list[str], study: str | None) -> int:
    from mechlens.errors import MechlensError

    try:
        if study is not None and study != "all":
            from mechlens.studies import get_study

            get_study(study)  # an unknown study is named as such, whatever options follow it
        args = build_parser(study, train_lens=bool(argv) and argv[0] == "train-lens").parse_args(argv)
        args.command_line = shlex.join(["mechlens", *argv])
        if args.command == "list":
            cmd_list()
        elif args.command == "run":
            cmd_run(args)
        elif args.command == "export":
            cmd_export(args)
        elif args.command == "train-lens":
            cmd_train_lens(args)
        elif args.command == "add-tokenizer":
            cmd_add_tokenizer(args)
        else:
            cmd_compare(args)
    except MechlensError as e:
        print(f"mechlens: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as e:  # argparse: --help (0) and usage errors (2, already one line)
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
