"""The import graph of ``surgery`` and ``models``: no cycles, and every import points down a layer.

The layers: the library (every ``surgery`` module but the command line) <- ``models`` (adapters
built on the library) <- the command line (``surgery.cli``, ``surgery.__main__``). Imports are
read from the source with ``ast``, at module level and inside functions alike: an import moved
into a function body still ties the two modules together.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surgery", "models")
COMMAND_LINE = frozenset({"surgery.cli", "surgery.__main__"})
LAYERS = ("library", "models", "command line")  # each may import only its own layer and those before it


def module_files(root: Path) -> dict[str, Path]:
    """Dotted name -> source file of every module in PACKAGES (a package is its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (``from .. import x`` in a.b.c -> a)."""
    if not node.level:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules in ``modules`` that ``module`` imports anywhere in its source: ``import a.b``
    depends on a.b; ``from a import b`` on a.b where that is a module, else on a."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, path.name == "__init__.py")
            named.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {name for name in named if name in modules and name != module}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    modules = module_files(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of imports (its first module repeated at the end), or None."""
    finished: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for imported in sorted(graph[module]):
            if imported in path:
                return path[path.index(imported) :] + [imported]
            if imported not in finished:
                cycle = visit(imported)
                if cycle:
                    return cycle
        path.pop()
        finished.add(module)
        return None

    for module in sorted(graph):
        cycle = None if module in finished else visit(module)
        if cycle:
            return cycle
    return None


def layer(module: str) -> int:
    if module in COMMAND_LINE:
        return LAYERS.index("command line")
    return LAYERS.index("models" if module.split(".")[0] == "models" else "library")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module in a later layer than the importer's."""
    return [
        f"{module} ({LAYERS[layer(module)]}) imports {imported} ({LAYERS[layer(imported)]})"
        for module, imported_modules in sorted(graph.items())
        for imported in sorted(imported_modules)
        if layer(imported) > layer(module)
    ]


def test_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph(ROOT)) == []


def test_import_graph_reads_every_kind_of_import(tmp_path):
    """Absolute, relative (from a module and from a package's __init__) and function-level imports."""
    files = {
        "surgery/__init__.py": "from .rewrites import REGISTRY\n",
        "surgery/__main__.py": "import models.adapter\n",
        "surgery/cli.py": "",
        "surgery/rewrites/__init__.py": "from . import base\nfrom .base import Rewrite\n",
        "surgery/rewrites/base.py": "def f():\n    from .. import rewrite\n    from ..equivalence import strategies\n",
        "surgery/equivalence/__init__.py": "",
        "surgery/equivalence/strategies.py": "import torch\n",
        "models/__init__.py": "",
        "models/adapter.py": "def spec():\n    from surgery.cli import main\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph == {
        "surgery": {"surgery.rewrites"},
        "surgery.__main__": {"models.adapter"},
        "surgery.cli": set(),
        "surgery.rewrites": {"surgery.rewrites.base"},
        "surgery.rewrites.base": {"surgery", "surgery.equivalence.strategies"},
        "surgery.equivalence": set(),
        "surgery.equivalence.strategies": set(),
        "models": set(),
        "models.adapter": {"surgery.cli"},
    }
    assert find_cycle(graph) == ["surgery", "surgery.rewrites", "surgery.rewrites.base", "surgery"]
    assert upward_imports(graph) == ["models.adapter (models) imports surgery.cli (command line)"]
