"""The package's layers: no import cycle among ampq's modules, and every import goes to the
importer's own layer or one below (docs/architecture.md draws the same picture).

Imports are read from the source (every ``import`` and ``from ... import``, inside functions too),
so an import that is hidden in a function to dodge a cycle is still seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module belongs to the entry with the longest prefix that names it or a package
# above it; it may import from its own layer and those below, never above.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["ampq.errors", "ampq.atomic", "ampq.version", "ampq.dtypes", "ampq.memory", "ampq.models", "ampq.attention", "ampq.builtin",
                    "ampq.figures", "ampq.experts", "ampq.expert_names"]),
    ("formats", ["ampq.formats"]),
    ("algorithms and kernels", ["ampq.algorithms", "ampq.kernels"]),
    ("quantized modules", ["ampq.nn", "ampq.nested", "ampq.quant_experts", "ampq.nested_experts", "ampq.quant_embedding"]),
    ("layer table", ["ampq.layer_table", "ampq.coverage"]),
    ("io", ["ampq.io"]),
    # AWQ's scaling runs a block on calibration data: a pipeline step that lives beside the algorithms
    ("pipeline", ["ampq.calibrate", "ampq.spill", "ampq.fisher", "ampq.sensitivity",
                  "ampq.allocate", "ampq.schemes", "ampq.pipeline", "ampq.decode_once",
                  "ampq.report", "ampq.resume", "ampq.data", "ampq.evaluation", "ampq.similarity", "ampq.compiled", "ampq.bench", "ampq.algorithms.awq",
                  "ampq.placement", "ampq.ranks", "ampq.launch"]),
    ("loading", ["ampq.loading", "ampq.importers", "ampq.hf"]),
    ("public API", ["ampq", "ampq.exporters", "ampq.exporting", "ampq.comparison"]),
    ("command line", ["ampq.cli", "ampq.__main__"]),
]


def modules(src: Path) -> dict[str, Path]:
    """Every module under ``src``'s packages by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(src: Path, root: str = "ampq") -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, among ``root``'s modules.
    Importing ``a.b.c`` runs package ``a.b`` too, so it counts as importing both (except the root
    package and the importer's own packages, which are already running)."""
    mods = modules(src)

    def resolve(name: str) -> str | None:  # "ampq.io.model.save" -> "ampq.io.model"
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        deps: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target != root and not target.startswith(root + "."):
                    continue
                module = resolve(target)
                if module is None:
                    continue
                parts = module.split(".")
                for i in range(2, len(parts) + 1):  # the module and each package above it but the root
                    hop = ".".join(parts[:i])
                    if hop not in own and hop in mods:
                        deps.setdefault(hop, node.lineno)
                if module == root and module != name:
                    deps.setdefault(module, node.lineno)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def upward_imports(graph: dict[str, dict[str, int]], layers=LAYERS) -> list[str]:
    problems = []
    for module, deps in sorted(graph.items()):
        mine = layer_of(module, layers)
        for dep, line in sorted(deps.items()):
            theirs = layer_of(dep, layers)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{module} (layer '{layers[mine][0]}') imports {dep} (layer '{layers[theirs][0]}') "
                                f"at line {line}")
    return problems


def test_no_import_cycle():
    graph = import_graph(SRC)
    found = cycles(graph)
    detail = ["; ".join(f"{m} -> {d} (line {graph[m][d]})" for m in c for d in graph[m] if d in c) for c in found]
    assert not found, "import cycles among ampq modules:\n" + "\n".join(detail)


def test_every_module_has_a_layer():
    unplaced = [m for m in modules(SRC) if layer_of(m) is None]
    assert not unplaced, f"declare the layer of {unplaced} in LAYERS (and docs/architecture.md)"


def test_imports_only_go_down():
    problems = upward_imports(import_graph(SRC))
    assert not problems, "imports that go up a layer:\n" + "\n".join(problems)


@pytest.fixture
def toy(tmp_path):
    """A package whose imports the checks above must refuse: a cycle through a function-level import
    and through a package's __init__, and an import that goes up a layer."""
    files = {
        "toy/__init__.py": "",
        "toy/low.py": "def f():\n    from toy.high import g\n",
        "toy/high.py": "import toy.low\n",
        "toy/sub/__init__.py": "from toy.sub import inner\n",
        "toy/sub/inner.py": "",
        "toy/other.py": "from toy.sub.inner import x\n",
        "toy/sub/back.py": "from toy import other\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checks_find_what_they_look_for(toy):
    graph = import_graph(toy, root="toy")
    assert graph["toy.low"] == {"toy.high": 2}  # inside a function, still seen
    assert set(graph["toy.other"]) == {"toy.sub", "toy.sub.inner"}  # the package runs too
    assert cycles(graph) == [["toy.high", "toy.low"]]
    graph["toy.sub"]["toy.sub.back"] = 1  # toy.sub -> back -> other -> toy.sub
    assert ["toy.other", "toy.sub", "toy.sub.back"] in cycles(graph)
    layers = [("bottom", ["toy.low"]), ("top", ["toy.high"])]
    assert upward_imports({"toy.low": {"toy.high": 2}, "toy.high": {"toy.low": 1}}, layers) == [
        "toy.low (layer 'bottom') imports toy.high (layer 'top') at line 2"]
