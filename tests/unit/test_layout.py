"""The package layout keeps the shape README's "Architecture" describes (docs/architecture.md).

Read with ``ast`` (nothing is imported): every ``import`` of ftctl's own modules, at the top of a
module or inside a function, is an edge of the import graph; imports under ``if TYPE_CHECKING:``
are not (they never run).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ftctl"
MAX_TOP_LEVEL = 12  # .py files directly in ftctl/ (the shared base, __init__ and __main__)
MAX_LINES = 600
CLI = "ftctl.cli"
ENTRY = "ftctl.__main__"  # `python -m ftctl`: runs the CLI
SERVER = "ftctl.deploy.server"
UI_MODULES = ("typer", "rich", "click")
# Core modules that may write to stdout/stderr themselves, and why.
MAY_PRINT = {
    # the server program: its stdout/stderr are the channel the client reads (framed messages)
    # and the detached go-live's log; it imports nothing from the client
    SERVER: "the server program's stdout is its protocol",
}


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def lines(self) -> int:
        return len(self.path.read_text(encoding="utf-8").splitlines())


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[_name(path)] = Module(_name(path), path, ast.parse(path.read_text(encoding="utf-8")))
    return out


MODULES = _modules()


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _base(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def imports(module: Module) -> set[str]:
    """Every module name ``module`` imports (ftctl's and others'), at any depth."""
    skip = _type_checking_only(module.tree)
    out = set()
    for node in ast.walk(module.tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out


def graph() -> dict[str, set[str]]:
    return {
        name: {m for m in imports(mod) if m in MODULES} - {name} for name, mod in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_top_level_keeps_the_shared_base_only():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_600_lines(name):
    assert MODULES[name].lines <= MAX_LINES


def test_the_core_never_imports_the_cli_libraries():
    offenders = {
        name: sorted(m for m in imports(mod) if m.split(".")[0] in UI_MODULES or _under(m, CLI))
        for name, mod in MODULES.items()
        if not _under(name, CLI) and name != ENTRY
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _chain(node: ast.expr) -> str:
    """``sys.stdout.buffer.write`` for the callee of ``sys.stdout.buffer.write(...)``."""
    if isinstance(node, ast.Attribute):
        return f"{_chain(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _prints(tree: ast.Module) -> list[int]:
    """Lines that call print() or write to sys.stdout / sys.stderr."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            _chain(node.func) == "print"
            or _chain(node.func).startswith(("sys.stdout.", "sys.stderr."))
        )
    ]


def test_the_core_never_prints():
    offenders = {
        name: _prints(mod.tree)
        for name, mod in MODULES.items()
        if not _under(name, CLI) and not any(_under(name, p) for p in MAY_PRINT)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_server_program_imports_nothing_from_the_client():
    offenders = {
        name: sorted(m for m in imports(mod) if m.startswith("ftctl") and not _under(m, SERVER))
        for name, mod in MODULES.items()
        if _under(name, SERVER)
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# What each package may import (docs/architecture.md, "The packages"); "base" is the modules
# directly in ftctl/ and may import no package (``python -m ftctl`` runs the CLI: ENTRY).
MAY_IMPORT = {
    "base": set(),
    "config": {"base"},
    "data": {"base", "config"},
    "model": {"base"},
    "train": {"base", "config", "data", "model"},
    "eval": {"base", "config", "data", "model"},
    "image": {"base", "config", "train"},
    "deploy": {"base", "config", "deploy.server"},
    "deploy.server": set(),
    "serve": {"base", "model"},
    "demo": {"base", "config", "data", "model", "train", "eval", "deploy", "deploy.server"},
}


def package_of(name: str) -> str:
    """The package of the architecture map a module belongs to (``base`` for the shared base)."""
    if _under(name, SERVER):
        return "deploy.server"
    parts = name.split(".")
    if len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "base"


def forbidden(edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Per module, the imports of other packages its package may not make."""
    out = {}
    for name, deps in edges.items():
        own = package_of(name)
        if own not in MAY_IMPORT or name == ENTRY:
            continue
        bad = sorted(
            f"{dep} ({package_of(dep)})"
            for dep in deps
            if package_of(dep) != own and package_of(dep) not in MAY_IMPORT[own]
        )
        if bad:
            out[name] = bad
    return out


def test_each_package_imports_only_what_the_architecture_map_allows():
    assert forbidden(graph()) == {}


def test_every_package_is_on_the_architecture_map():
    packages = {package_of(name) for name in MODULES} - {"cli"}
    assert packages == set(MAY_IMPORT)


def test_the_map_check_finds_a_forbidden_import():
    edges = {
        "ftctl.model.files": {"ftctl.deploy.plan", "ftctl.errors"},  # model -> deploy: no
        "ftctl.deploy.server.golive": {"ftctl.deploy.plan"},  # the server -> the client: no
        "ftctl.deploy.plan": {"ftctl.deploy.server.shared", "ftctl.config.load"},  # allowed
    }
    assert forbidden(edges) == {
        "ftctl.model.files": ["ftctl.deploy.plan (deploy)"],
        "ftctl.deploy.server.golive": ["ftctl.deploy.plan (deploy)"],
    }
