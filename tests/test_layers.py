"""The package's layers, read from its source: no import cycle among the modules of ``mechlens/`` (every
import counts, function-level and ``TYPE_CHECKING`` ones included; a package re-exporting its own
submodule, e.g. ``mechlens.zoo.export_model``, is not a loop: Python imports a package before any of its
submodules), and no library module outside ``mechlens/studies/`` names a study (the studies sit on top:
orchestration reaches them through the registry, :data:`mechlens.studies.STUDIES`, only)."""

from __future__ import annotations

import ast
import pathlib

import mechlens
from mechlens.studies import STUDIES

ROOT = pathlib.Path(mechlens.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _package(name: str) -> str:
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str) -> set[str]:
    """The mechlens modules that module ``name`` imports anywhere in its source (``from pkg import x``
    counts as importing ``pkg.x`` when that is a module, else ``pkg``; relative imports resolved)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(name).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # `import mechlens.ops.loss` names the module; a name inside it, its module
                t = t.rpartition(".")[0]
            own_submodule = MODULES[name].name == "__init__.py" and t.startswith(name + ".")
            if t and t != name and not own_submodule:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_imports_at_every_level():
    """The reader is able to fail: it finds a function-level import (the registry's study modules are imported
    by name, and a study's own imports are read), and a planted two-module loop is a cycle."""
    assert "mechlens.studies" in imports("mechlens.plan")
    assert "mechlens.lens.corpus" in imports("mechlens.lens.training")  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_no_import_cycles():
    graph = {name: imports(name) for name in MODULES}
    assert cycles(graph) == []


def test_no_library_module_names_a_study():
    """Outside mechlens/studies/, no module imports a study module or names one in a string (e.g. for
    importlib): the registry is the only list of studies."""
    studies = {s.module_name for s in STUDIES.values()}
    assert studies and all(m in MODULES for m in studies)
    offenders = []
    for name, path in MODULES.items():
        if name == "mechlens.studies" or name.startswith("mechlens.studies."):
            continue
        named = {m for m in imports(name) if any(m == s or m.startswith(s + ".") for s in studies)}
        tree = ast.parse(path.read_text(encoding="utf-8"))
        named |= {
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in studies
        }
        offenders += [f"{name} -> {m}" for m in sorted(named)]
    assert offenders == []
