"""The code a cache's records come from, hashed by what it computes rather than how it is written.

A cache key covers the producing code (garden.cache), so that a fix to a kernel retires its records. It
should not cover the text: a comment, a docstring, a reformat, a type hint, a log line's wording or a
move of a function to another module changes no number, yet hashing the source would throw away hours
of Hub reads and statistics. So each producer is parsed, and what is hashed is its syntax tree with
docstrings, annotations and reporting calls (logging, warnings, progress) removed, keyed by the
definition's own name (not its module): moving a definition between listed modules keeps the hash.

Producers are named `module` (every top-level definition in it: functions, classes, constants) or
`module:name` / `module:Class.method` (one definition, a constant included).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import inspect
import json
from collections.abc import Iterable
from functools import cache

#: Calls that only report (their statements are dropped before hashing): `log.info(...)`, `print(...)`.
REPORTING_OBJECTS = frozenset({"log", "logger", "logging", "warnings", "bar"})  # bar: a tqdm bar
REPORTING_FUNCTIONS = frozenset({"print", "progress_report"})
#: Module-level assignments that set up reporting or typing, not computation.
SETUP_CALLS = frozenset({"getLogger", "TypeVar"})


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(
        node.value.value, str
    )


def _is_reporting(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    func = node.value.func
    if isinstance(func, ast.Name):
        return func.id in REPORTING_FUNCTIONS
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
        func.value.id in REPORTING_OBJECTS
    )


class _Normaliser(ast.NodeTransformer):
    """Strips what does not compute: docstrings (any bare string statement), reporting calls and
    annotations; an emptied body becomes `pass`."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                kept = [s for s in statements if not (_is_docstring(s) or _is_reporting(s))]
                setattr(node, field, kept or ([ast.Pass()] if field == "body" else []))
        return node

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is None:  # a bare annotation (a dataclass field without default) keeps its name
            return ast.Assign(targets=[node.target], value=ast.Constant(None))
        return self.generic_visit(ast.Assign(targets=[node.target], value=node.value))


def stripped(node: ast.AST) -> ast.AST:
    """A copy of a definition's syntax tree without docstrings, annotations and reporting calls."""
    return _Normaliser().visit(copy.deepcopy(node))


@cache
def _module_tree(module_name: str) -> ast.Module:
    return ast.parse(module_source(module_name))


def module_source(module_name: str) -> str:
    """A module's source (tests replace this to see how edits move the hash)."""
    return inspect.getsource(importlib.import_module(module_name))


def _assigned_names(node: ast.stmt) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]  # type: ignore[attr-defined]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _is_setup(node: ast.stmt) -> bool:
    value = getattr(node, "value", None)
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in SETUP_CALLS


def top_level_definitions(module_name: str, tree: ast.Module | None = None) -> dict[str, ast.stmt]:
    """name -> its defining statement: functions, classes and assigned constants (not imports, loggers,
    type variables or `__all__`)."""
    found: dict[str, ast.stmt] = {}
    for node in (tree or _module_tree(module_name)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign) and not _is_setup(node):
            for name in _assigned_names(node):
                if not name.startswith("__"):
                    found[name] = node
    return found


def _member(node: ast.stmt, name: str, producer: str) -> ast.stmt:
    for child in getattr(node, "body", []):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and child.name == name:
            return child
    raise LookupError(f"producer {producer!r}: no {name!r} in it")


def definition_node(module_name: str, qualname: str, top: dict[str, ast.stmt] | None = None) -> ast.stmt:
    """The statement defining `qualname` (`name` or `Class.method`) in a module."""
    head, *rest = qualname.split(".")
    top = top_level_definitions(module_name) if top is None else top
    if head not in top:
        raise LookupError(f"producer {module_name}:{qualname}: {module_name} defines no {head!r}")
    node = top[head]
    for part in rest:
        node = _member(node, part, f"{module_name}:{qualname}")
    return node


@cache
def _normalised_definitions(module_name: str) -> dict[str, ast.stmt]:
    """A module's top-level definitions, normalised once (a fresh parse, so no copy is needed)."""
    tree = _Normaliser().visit(ast.parse(module_source(module_name)))
    return top_level_definitions(module_name, tree)


@cache
def _dump(module_name: str, qualname: str) -> str:
    node = definition_node(module_name, qualname, _normalised_definitions(module_name))
    return ast.dump(node, include_attributes=False)


def definitions(producer: str) -> dict[str, str]:
    """{qualified name: normalised tree} of what one producer names."""
    module_name, _, qualname = producer.partition(":")
    names = [qualname] if qualname else list(_normalised_definitions(module_name))
    return {name: _dump(module_name, name) for name in names}


def code_hash(producers: Iterable[str]) -> str:
    """A short hash of the producers' normalised definitions, keyed by name and not by module."""
    merged: dict[str, list[str]] = {}
    for producer in producers:
        for name, tree in definitions(producer).items():
            merged.setdefault(name, []).append(tree)
    payload = json.dumps({name: sorted(trees) for name, trees in sorted(merged.items())})
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def clear() -> None:
    """Forget parsed modules (after a test replaced `module_source`)."""
    _module_tree.cache_clear()
    _normalised_definitions.cache_clear()
    _dump.cache_clear()
