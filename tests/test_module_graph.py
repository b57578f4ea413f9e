"""The import graph of qimg/ has no cycles: data flows down the layers
(commands -> api -> opening/create/info -> formats -> storage), never up.

The graph is read from the source with ast: every `import` and `from ...
import` of a qimg module, at module level and inside functions alike (a
function-level import is a dependency too, only a deferred one).
"""

from __future__ import annotations

import ast
from pathlib import Path

QIMG = Path(__file__).resolve().parent.parent / "qimg"


def _modules() -> dict[str, Path]:
    out = {}
    for path in QIMG.rglob("*.py"):
        parts = list(path.relative_to(QIMG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """The qimg modules `name` imports (a `from pkg import mod` names mod)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, top_level_only) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan,
    iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(component)
    return out


def test_cycle_finder_finds_a_cycle_and_its_members():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [{"a", "b", "c"}]


def test_qimg_has_no_import_cycles():
    assert cycles(import_graph(top_level_only=True)) == []
    assert cycles(import_graph(top_level_only=False)) == []


_COMMAND_LINE = ("qimg.__main__", "qimg.cli", "qimg.render", "qimg.completion")


def test_the_engine_imports_nothing_of_the_command_line():
    """Below the command line (cli, commands, render), no module imports
    a command module: the library never calls up into its users."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("qimg.commands") or name in _COMMAND_LINE:
            continue
        imported = _imports(name, path, modules, top_level_only=False)
        upward = {m for m in imported if m.startswith("qimg.commands") or m == "qimg.cli"}
        assert not upward, (name, upward)
