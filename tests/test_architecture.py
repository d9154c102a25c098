"""The package's import graph, read from its source (AST, nothing imported): no import
cycle between medlit modules, and no module importing another module's ``_private`` name.

Imports inside functions count: a cycle that only closes at call time still means two
modules that cannot be understood, tested or moved apart. ``python tests/test_architecture.py
[ROOT]`` prints the graph's problems for any checkout (``ROOT`` holds ``medlit/``).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ImportGraph:
    """Every ``medlit`` module of a checkout, the medlit modules each imports (an edge to
    a package means its ``__init__``), and the private names imported across modules."""

    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    # (importing module, line, imported module, name)
    private: list[tuple[str, int, str, str]] = field(default_factory=list)

    @classmethod
    def read(cls, root: Path) -> ImportGraph:
        modules = {}
        for path in sorted((root / "medlit").rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        graph = cls(modules)
        for name, path in modules.items():
            graph._add(name, path, ast.parse(path.read_text(), str(path)))
        return graph

    def _add(self, name: str, path: Path, tree: ast.Module) -> None:
        out = self.edges.setdefault(name, set())
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "medlit")
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against the importing package
                    base = package[: len(package) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] != "medlit":
                    continue
                for alias in node.names:
                    if f"{target}.{alias.name}" in self.modules:  # a submodule
                        out.add(f"{target}.{alias.name}")
                        continue
                    out.add(target)
                    if alias.name.startswith("_") and target != name:
                        self.private.append((name, node.lineno, target, alias.name))
        out.discard(name)

    def cycles(self) -> list[list[str]]:
        """The strongly connected components of more than one module (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        found: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            for w in sorted(self.edges.get(v, ())):
                if w not in self.modules:
                    continue
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

        for v in self.modules:
            if v not in index:
                visit(v)
        return found

    def problems(self) -> list[str]:
        out = [f"import cycle: {' <-> '.join(c)}" for c in self.cycles()]
        out += [
            f"{self.modules[m].relative_to(self.modules[m].parents[len(m.split('.')) - 1])}"
            f":{line}: imports {target}.{name}, a private name"
            for m, line, target, name in self.private
        ]
        return out


def test_no_import_cycles_and_no_private_imports() -> None:
    graph = ImportGraph.read(ROOT)
    assert len(graph.modules) > 40 and sum(map(len, graph.edges.values())) > 100
    problems = graph.problems()
    print("\n".join(problems) or f"{len(graph.modules)} modules: no cycle, no private import")
    assert not problems, "\n".join(problems)


DATASETS = ("brats", "isic", "luna16")


def test_tasks_import_no_dataset_and_nothing_dispatches_on_class_names() -> None:
    """The task <-> data contract is datamodules/base.py: a task never imports a
    particular dataset's module, and no module compares class names."""
    graph = ImportGraph.read(ROOT)
    tasks = [m for m in graph.modules if m.startswith("medlit.tasks.")]
    assert len(tasks) >= 5
    found = [
        f"{m} imports {t}"
        for m in tasks
        for t in sorted(graph.edges[m])
        if any(part in DATASETS or part.endswith(DATASETS) for part in t.split(".")[1:])
    ]
    for name, path in graph.modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Compare)
                and isinstance(node.left, ast.Attribute)
                and node.left.attr == "__name__"
                and isinstance(node.left.value, ast.Call)
            ):
                found.append(f"{name}:{node.lineno}: compares a class name")
    assert not found, "\n".join(found)


def test_the_checker_finds_cycles_through_function_imports_and_private_names(
    tmp_path: Path,
) -> None:
    pkg = tmp_path / "medlit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import public\n")
    (pkg / "a.py").write_text("def f():\n    from medlit.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import _helper\npublic = 1\n")
    (pkg / "c.py").write_text("import medlit.a\n\ndef _helper():\n    pass\n")
    graph = ImportGraph.read(tmp_path)
    assert graph.cycles() == [["medlit.a", "medlit.c", "medlit.sub.b"]]
    assert graph.private == [("medlit.sub.b", 1, "medlit.c", "_helper")]
    assert graph.problems()[1] == "medlit/sub/b.py:1: imports medlit.c._helper, a private name"


if __name__ == "__main__":
    problems = ImportGraph.read(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT).problems()
    print("\n".join(problems) or "no cycle, no private import")
    sys.exit(1 if problems else 0)
