"""The ``mechlens`` command.

    mechlens list
    mechlens run STUDY|all [--model SPEC ...] [--data SOURCE] [--out DIR] [--device D] [--seed N]
                 [--weights raw|processed] [--allow-different-tokenizers] [study options]
    mechlens compare DIR DIR ... --out DIR

Study options are the fields of the study's dataclass ``Config`` as flags (``mechlens run position
--help`` lists them). Exit codes: 0 success; 2 bad input (unknown study or model, hub unreachable,
data too short, target token absent, vocabulary mismatch, NaN activations), with a one-line error
and no output written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import types
import typing
from collections.abc import Sequence

EXIT_BAD_INPUT = 2


def _add_config_flags(parser: argparse._ActionsContainer, config_cls, skip: set[str]) -> None:
    """One flag per field of a study's dataclass config (bools get --x/--no-x, tuples take lists)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        args = typing.get_args(t)
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            t = next(a for a in args if a is not type(None))
        flag = "--" + f.name.replace("_", "-")
        helptext = f"default: {f.default!r}"
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif typing.get_origin(t) is tuple:
            inner = typing.get_args(t)[0]
            parser.add_argument(flag, type=inner, nargs="+", default=None, help=helptext)
        else:
            parser.add_argument(flag, type=t, default=None, help=helptext)


COMMON = {"data", "seed"}


def build_parser(study: str | None = None) -> argparse.ArgumentParser:
    from mechlens.runner import STUDIES

    p = argparse.ArgumentParser(
        prog="mechlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="studies, embedded models and data sources")
    r = sub.add_parser("run", help="run a study (or all) and write results.json, CSVs and report.html")
    r.add_argument("study", help=f"one of {', '.join(STUDIES)} or 'all'")
    r.add_argument("--model", action="append", default=None, help="model spec; repeat to compare models")
    r.add_argument("--data", default=None, help="data source (see 'mechlens list'); default: the study's built-in")
    r.add_argument("--out", default="runs/latest", help="output directory (replaced atomically)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--weights", choices=("raw", "processed"), default="raw")
    r.add_argument("--allow-different-tokenizers", action="store_true")
    if study in STUDIES:
        _add_config_flags(r.add_argument_group(f"{study} options"), STUDIES[study].module.Config, COMMON)
    c = sub.add_parser("compare", help="combine earlier runs into one comparison report")
    c.add_argument("dirs", nargs="+")
    c.add_argument("--out", required=True)
    return p


def cmd_list() -> None:
    from mechlens.data import SOURCES
    from mechlens.runner import STUDIES
    from mechlens.zoo import EMBEDDED

    print("studies:")
    for s in STUDIES.values():
        print(f"  {s.name:<12} {s.title} (default models: {', '.join(s.default_models)})")
    print("embedded models:")
    for m in EMBEDDED.values():
        print(f"  {m.name:<12} {m.description}")
    print("data sources:")
    for name, desc in SOURCES.items():
        print(f"  {name:<24} {desc}")


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    from mechlens.loading import load_model
    from mechlens.runner import STUDIES, check_vocabularies, get_study, run_study, summary_rows, write_outputs

    studies = list(STUDIES) if args.study == "all" else [get_study(args.study).name]
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "study", "model", "out")}
    if overrides.get("data") is None:
        overrides.pop("data")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()}
    torch.manual_seed(args.seed)
    cache: dict[str, object] = {}
    notes: list[str] = []
    results = {}
    t0 = time.perf_counter()
    for study in studies:
        specs = args.model or list(STUDIES[study].default_models)
        for spec in specs:
            if spec not in cache:
                cache[spec] = load_model(spec, device=args.device, weights=args.weights)
        models = {spec: cache[spec] for spec in specs}
        allow = args.allow_different_tokenizers or not args.model  # defaults (tiny-mlm + tiny-gpt2) are meant to differ
        note = check_vocabularies(models, allow)
        if note:
            notes.append(f"{study}: {note}")
        print(f"[mechlens] {study}: {', '.join(specs)}", file=sys.stderr)
        results[study] = run_study(study, models, overrides)
    write_outputs(results, args.out, notes)
    width = max(len(r[1]) for r in summary_rows(results))
    for study, model, line in summary_rows(results):
        print(f"{study:<11} {model:<{width}}  {line}")
    print(f"wrote {args.out}/results.json, CSVs and report.html in {time.perf_counter() - t0:.1f} s")


def cmd_compare(args: argparse.Namespace) -> None:
    from mechlens.errors import MechlensError
    from mechlens.report import comparison_figures, render
    from mechlens.runner import STUDIES, atomic_dir

    merged: dict[str, dict[str, dict]] = {}
    for d in args.dirs:
        path = pathlib.Path(d) / "results.json"
        if not path.is_file():
            raise MechlensError(f"{d} has no results.json: pass directories written by 'mechlens run'")
        for study, entries in json.loads(path.read_text()).items():
            if study.startswith("_"):
                continue
            for model, e in entries.items():
                merged.setdefault(study, {})[f"{model} ({d})"] = e
    sections = [
        (s, STUDIES[s].title, entries, {"comparison across runs": comparison_figures(s, entries)})
        for s, entries in merged.items()
    ]
    out = pathlib.Path(args.out)
    with atomic_dir(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(merged, indent=1))
        (tmp / "report.html").write_text(render(sections, title="mechlens comparison"), encoding="utf-8")
    print(f"wrote {out}/report.html comparing {len(args.dirs)} runs")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    study = argv[1] if len(argv) > 1 and argv[0] == "run" else None
    args = build_parser(study).parse_args(argv)
    from mechlens.errors import MechlensError

    try:
        if args.command == "list":
            cmd_list()
        elif args.command == "run":
            cmd_run(args)
        else:
            cmd_compare(args)
    except (MechlensError, ValueError) as e:
        print(f"mechlens: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
