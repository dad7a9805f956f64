"""The typed parts are the only result schema (issue 27): a study's typed result holds its parts, and the flat
``results.json`` names are :class:`mechlens.result.view` s of them, so no value is stored twice."""

from __future__ import annotations

import dataclasses
import re

import pytest

from mechlens.result import metrics_of, not_in_metrics, view, views_of
from mechlens.studies import STUDIES


def _result_classes():
    seen = []
    for info in STUDIES.values():
        mod = info.module
        for name, obj in sorted(vars(mod).items()):
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and name.endswith("Result") and obj not in seen:
                seen.append(obj)
    return seen


def _part_types(cls) -> dict[str, type]:
    """The result's fields whose declared type is a dataclass of its study (its parts)."""
    import sys

    ns = vars(sys.modules[cls.__module__])
    out = {}
    for f in dataclasses.fields(cls):
        head = re.match(r"\w+", str(f.type))
        t = ns.get(head.group(0)) if head else None
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            out[f.name] = t
    return out


RESULTS = _result_classes()


def test_every_study_result_is_found():
    names = {c.__name__ for c in RESULTS}
    assert {"PositionResult", "LogitsResult", "MaskedLensResult", "CausalLensResult", "CorpusLensResult",
            "MagnitudesResult", "DistancesResult"} <= names, names  # fmt: skip


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_no_field_copies_a_field_of_a_part(cls):
    """A field named and typed like a field of one of the result's parts would hold that part's value a second
    time (what ``LogitsResult.compose`` and ``MagnitudesResult`` did before the parts became the schema): such
    names must be views. (A field that merely shares a name, e.g. study 6's ``dla`` part and the ``dla``
    intervals of its ``intervals`` part, has another type.)"""
    parts = _part_types(cls)
    own = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    copies = {
        (name, part)
        for part, t in parts.items()
        for g in dataclasses.fields(t)
        for name in [g.name]
        if name != part and own.get(name) == str(g.type)
    }
    assert not copies, f"{cls.__name__} stores fields of its parts again: {sorted(copies)}"
    assert not any(issubclass(cls, t) for t in parts.values() if t is not cls)


def test_views_are_metrics_and_attributes_and_store_nothing():
    @dataclasses.dataclass(frozen=True)
    class Part:
        a: float
        b: list[float]

    @dataclasses.dataclass(frozen=True)
    class Result:
        kind: str
        part: Part = not_in_metrics()
        a = view("part.a")
        twice = view(lambda r: [2 * x for x in r.part.b])

    r = Result("k", Part(1.5, [1.0, 2.0]))
    assert views_of(Result) == ["a", "twice"]
    assert r.a == 1.5 and r.twice == [2.0, 4.0]
    assert metrics_of(r) == {"kind": "k", "a": 1.5, "twice": [2.0, 4.0]}
    assert "a" not in vars(r) and "twice" not in vars(r)  # computed from the part on each read
    assert [f.name for f in dataclasses.fields(Result)] == ["kind", "part"]
