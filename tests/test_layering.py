"""The library's rooms import only downwards (DESIGN.md "Layout"), and no modules import in a cycle.

Imports are read with ``ast`` from every ``mllm_jax`` source file, at any depth: an import inside
a function still ties the two modules together, and one that closes a cycle only moves the
failure to the first call. ``from pkg import name`` counts as importing ``pkg.name`` when that
is a module, else ``pkg``; a package's ``__init__`` is a module of its own.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "mllm_jax"

# room -> rooms it must not import: layers are reusable on their own, data and models are usable
# without the training code, and the training code does not know the recipes built on it.
FORBIDDEN = {
    "mllm_jax.layers": ("mllm_jax.train", "mllm_jax.data", "mllm_jax.models", "mllm_jax.recipes"),
    "mllm_jax.data": ("mllm_jax.train", "mllm_jax.recipes"),
    "mllm_jax.models": ("mllm_jax.train", "mllm_jax.recipes"),
    "mllm_jax.train": ("mllm_jax.recipes",),
    "mllm_jax.checkpoint_conversion": ("mllm_jax.train", "mllm_jax.recipes"),
}
# The command lines sit above every room: `python -m mllm_jax.train` picks a recipe to run.
COMMAND_LINES = frozenset({"mllm_jax.train.__main__"})


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported_names(module: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """(dotted name, line) of everything ``path`` imports, relative imports made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def _resolve(name: str) -> str | None:
    """The longest prefix of ``name`` that is an mllm_jax module, or None (not the library)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in _modules():
            return candidate
    return None


@functools.cache
def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line of such an import}, library modules only."""
    graph = {}
    for module, path in _modules().items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(module, path):
            target = _resolve(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_import_graph_sees_the_library():
    graph = _import_graph()
    assert len(graph) > 50
    # A top-level import, a relative-free `from pkg import module`, and a function-level import.
    assert "mllm_jax.layers.vit" in graph["mllm_jax.models.multimodal_lm"]
    assert "mllm_jax.data.builders" in graph["mllm_jax.recipes.llava_stages"]
    assert "mllm_jax.recipes.llava_demo" in graph["mllm_jax.train.__main__"]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_no_room_above_it(room):
    offending = [
        f"{module} imports {target} ({_modules()[module].relative_to(PACKAGE_DIR.parent)}:{line})"
        for module, edges in sorted(_import_graph().items())
        if _in_room(module, room) and module not in COMMAND_LINES
        for target, line in sorted(edges.items())
        if any(_in_room(target, above) for above in FORBIDDEN[room])
    ]
    assert not offending, "\n".join(offending)


def test_cycle_finder_reports_a_cycle_through_a_function_level_import():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 9}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_among_library_modules():
    graph = _import_graph()
    described = []
    for component in _cycles(graph):
        members = set(component)
        edges = [
            f"  {module} -> {target} (line {line})"
            for module in component
            for target, line in sorted(graph[module].items())
            if target in members
        ]
        described.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not described, "import cycles:\n" + "\n".join(described)
