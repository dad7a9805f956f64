"""Study options: dataclass fields that carry their meaning and their valid range.

Every study's ``Config`` is a dataclass built from :func:`option` fields and derives from
:class:`Options`. Building one checks every field (type, range, choices) and the study's cross-field
rules (:meth:`Options.check`), and :meth:`Options.check_model` checks what depends on the model
(a layer within its depth, a sequence within its context) once it is known. A failed check raises
:class:`~mechlens.errors.ConfigError` naming both the command-line flag and the Python field, so the
same message serves ``mechlens run`` and a notebook. The command line is generated from the same
fields: each flag's ``--help`` text is the field's ``help`` plus its default and valid range.

This module imports neither torch nor TransformerLens: ``mechlens --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from mechlens.errors import ConfigError

_MISSING = dataclasses.MISSING


def option(
    default: Any,
    help: str,
    *,
    ge: int | float | None = None,
    gt: int | float | None = None,
    le: int | float | None = None,
    choices: tuple[Any, ...] | None = None,
    nonempty: bool = False,
) -> Any:
    """A dataclass field with its documentation and valid range (``ge``/``gt``/``le`` apply to numbers
    and to every element of a tuple; ``choices`` lists the allowed values; ``nonempty`` refuses an
    empty or all-whitespace string and an empty tuple)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "choices": choices, "nonempty": nonempty}
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line flag of a config field (``hist_bins`` -> ``--hist-bins``)."""
    return "--" + name.replace("_", "-")


def fail(name: str, message: str) -> typing.NoReturn:
    """Raise the one-line error for field ``name``: ``--flag (field) <message>``."""
    raise ConfigError(f"{flag(name)} ({name}) {message}", flag=flag(name))


def _base_type(t: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation: ``int | None`` -> ``(int, True)``."""
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0], True
    return t, False


def _num(v: int | float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def range_text(f: dataclasses.Field) -> str:
    """The valid range of a field in words, for ``--help`` and for errors."""
    m = f.metadata
    parts = []
    if m.get("choices"):
        parts.append("one of " + ", ".join(map(str, m["choices"])))
    if m.get("gt") is not None:
        parts.append(f"> {_num(m['gt'])}")
    if m.get("ge") is not None:
        parts.append(f">= {_num(m['ge'])}")
    if m.get("le") is not None:
        parts.append(f"<= {_num(m['le'])}")
    return ", ".join(parts)


def _check_number(name: str, f: dataclasses.Field, v: Any, what: str = "") -> None:
    m = f.metadata
    if isinstance(v, float) and not math.isfinite(v):
        fail(name, f"must be a finite number{what}, got {v}")
    if (m.get("gt") is not None and not v > m["gt"]) or (m.get("ge") is not None and not v >= m["ge"]):
        fail(name, f"must be {range_text(f)}{what}, got {v}")
    if m.get("le") is not None and not v <= m["le"]:
        fail(name, f"must be {range_text(f)}{what}, got {v}")


def _check_scalar(name: str, f: dataclasses.Field, t: Any, v: Any, what: str = "") -> None:
    if t is bool:
        if not isinstance(v, bool):
            fail(name, f"must be True or False{what}, got {v!r}")
        return
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            fail(name, f"must be an integer{what}, got {v!r}")
        _check_number(name, f, v, what)
    elif t is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            fail(name, f"must be a number{what}, got {v!r}")
        _check_number(name, f, float(v), what)
    elif t is str:
        if not isinstance(v, str):
            fail(name, f"must be a string{what}, got {v!r}")
        if f.metadata.get("nonempty") and not v.strip():
            fail(name, "must not be empty")
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        fail(name, f"must be {range_text(f)}, got {v!r}")


class Options:
    """Base class of the study configs: checks every :func:`option` field when the config is built."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            t, optional = _base_type(hints[f.name])
            v = getattr(self, f.name)
            if v is None:
                if not optional:
                    fail(f.name, "must be given (None is not allowed)")
                continue
            if typing.get_origin(t) is tuple:
                args = typing.get_args(t)
                if not isinstance(v, tuple | list):
                    fail(f.name, f"must be a list of values, got {v!r}")
                v = tuple(v)
                object.__setattr__(self, f.name, v)
                if args[-1] is Ellipsis:
                    if f.metadata.get("nonempty") and not v:
                        fail(f.name, "needs at least one value")
                    inner = [args[0]] * len(v)
                else:
                    if len(v) != len(args):
                        fail(f.name, f"takes exactly {len(args)} values, got {len(v)}")
                    inner = list(args)
                for it, x in zip(inner, v, strict=True):
                    _check_scalar(f.name, f, it, x, " (each value)")
            else:
                _check_scalar(f.name, f, t, v)
        self.check()

    def check(self) -> None:
        """Cross-field rules (e.g. the order of a pair); raise with :func:`fail`."""

    def check_model(self, model: Any) -> None:
        """Rules that need the model (a layer within its depth); called before any forward pass."""

    def not_applied(self, kind: str | None) -> dict[str, str]:
        """The fields this config does not use for a model of ``kind`` (``"causal"``, ``"masked"``; ``None``
        before the model is known: only what holds for every model), each with why. The command line
        refuses an option given explicitly that no study and model of the run uses, and notes one that
        only some use (:func:`mechlens.cli.unused_options`)."""
        return {}


MASKED_SPECIALS = "a masked LM always gets <s> ... </s>"


def check_layer(name: str, layer: int | None, n: int, what: str) -> None:
    """``layer`` (``None`` = default) must index one of ``n`` ``what``."""
    if layer is not None and not 0 <= layer < n:
        fail(name, f"must be in 0..{n - 1} ({n} {what} in this model), got {layer}")


def describe(f: dataclasses.Field) -> str:
    """``--help`` text of a field: its meaning, default and valid range."""
    default = f.default if f.default is not _MISSING else None
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    text = f.metadata.get("help", "")
    rng = range_text(f)
    if default is None:  # the help text says what happens by default
        return f"{text} ({rng})" if rng else text
    return f"{text} (default: {shown}{'; ' + rng if rng else ''})"
