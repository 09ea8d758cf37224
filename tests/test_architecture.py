"""Import direction: the layers point one way and no module imports itself back.

Rules (docs/architecture.md, "Three packages"), checked on every import statement anywhere in a file,
lazy imports inside functions included, and on `importlib.import_module("<literal>")`:

- `optg` imports nothing of ours;
- `stages` imports `optg` and `stages` only;
- `pipeline` imports `optg`, `stages` and `pipeline`;
- `benchmarks` imports `optg` and `stages` only (no `pipeline`: a benchmark that needs a whole run
  would start `python -m pipeline.cli` as a subprocess, the documented entry), and only their
  public names: no module or imported name starting with `_`;
- no cycle between modules of these packages. `import a.b.c` is an edge to the module `a.b.c`
  (not to the package `a.b`, whose `__init__` runs first but is not what the importer uses).
  Imports under `if TYPE_CHECKING:` never run, so they take no part in cycles; they still obey
  the layer rules.

The checker is tested on a tiny synthetic tree too, so a silent checker cannot pass.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "optg": {"optg"},
    "stages": {"optg", "stages"},
    "pipeline": {"optg", "stages", "pipeline"},
    "benchmarks": {"optg", "stages", "benchmarks"},
}
PUBLIC_ONLY = {"benchmarks"}  # packages that may use only the public names of the others


@dataclass(frozen=True)
class Import:
    module: str        # the importing module, dotted
    target: str        # the imported module (resolved to a module of ours when it is one)
    names: tuple[str, ...]
    line: int
    type_only: bool = False  # under `if TYPE_CHECKING:`


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def collect_modules(root: Path, packages: set[str]) -> dict[str, Path]:
    """Every module of `packages` under `root`: dotted name -> file."""
    found: dict[str, Path] = {}
    for package in sorted(packages):
        base = root / package
        if base.is_file() or (root / f"{package}.py").is_file():
            found[package] = root / f"{package}.py"
            continue
        for file in sorted(base.rglob("*.py")):
            found[module_name(root, file)] = file
    return found


def imports_of(name: str, file: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in `file`, at any depth (functions, branches, try blocks)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    is_package = file.name == "__init__.py"
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(name, alias.name, (), node.lineno, id(node) in type_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else base  # `from pkg import module` names the module
                out.append(Import(name, target, (alias.name,), node.lineno, id(node) in type_only))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_import_call(node.func)):
            out.append(Import(name, node.args[0].value, (), node.lineno))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def violations(root: Path, allowed: dict[str, set[str]] = ALLOWED,
               public_only: set[str] = PUBLIC_ONLY) -> list[str]:
    """Every upward import, private use and cycle in the packages of `allowed` under `root`."""
    modules = collect_modules(root, set(allowed))
    ours = set(allowed)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        layer = name.split(".")[0]
        for imp in imports_of(name, file, modules):
            top = imp.target.split(".")[0]
            if top not in ours:
                continue
            where = f"{file.relative_to(root)}:{imp.line}"
            if top not in allowed[layer]:
                problems.append(f"{where}: {layer} must not import {imp.target}")
            if layer in public_only and top != layer:
                private = [p for p in imp.target.split(".") + list(imp.names) if p.startswith("_")]
                if private:
                    problems.append(f"{where}: {layer} uses private {imp.target} {list(imp.names)}")
            if imp.target in modules and imp.target != name and not imp.type_only:
                graph[name].add(imp.target)
    problems += [f"import cycle: {' -> '.join(c + [c[0]])}" for c in cycles(graph)]
    return list(dict.fromkeys(problems))  # one line per place, however many names it imports


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


# ----------------------------------------------------------------------------- the project


def test_project_imports_point_one_way_without_cycles():
    assert violations(ROOT) == []


def test_checker_sees_the_project():
    """Guard against a checker that passes because it reads nothing."""
    modules = collect_modules(ROOT, set(ALLOWED))
    assert {"optg.sparsifier", "stages.data", "stages.data.catalog", "stages.zoo", "pipeline.runner",
            "benchmarks.accuracy"} <= set(modules)
    edges = {(i.module, i.target) for i in imports_of("stages.model", modules["stages.model"], modules)}
    assert ("stages.model", "stages.zoo") in edges


# ----------------------------------------------------------------------------- the checker itself


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ALLOWED:
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


CLEAN = {
    "optg/core.py": "import torch\n",
    "stages/a.py": "import optg.core\nfrom stages import b\n",
    "stages/b.py": "from optg.core import x\n",
    "pipeline/run.py": "from stages.a import y\nimport optg\n",
    "benchmarks/bench.py": "from stages.a import y\nimport optg.core as core\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    assert violations(write_tree(tmp_path, CLEAN)) == []


def test_type_only_imports_make_no_cycle(tmp_path):
    files = dict(CLEAN, **{"stages/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from stages.a import A\n"})
    assert violations(write_tree(tmp_path, files)) == []
    files["stages/b.py"] = "from stages.a import A\n"
    assert violations(write_tree(tmp_path, files)) == ["import cycle: stages.a -> stages.b -> stages.a"]


@pytest.mark.parametrize("rel, text, expected", [
    ("optg/core.py", "def f():\n    from stages import a\n", "optg must not import stages"),
    ("stages/b.py", "def f():\n    if True:\n        import pipeline.run\n", "stages must not import pipeline.run"),
    ("stages/b.py", "import importlib\nM = importlib.import_module('pipeline.run')\n",
     "stages must not import pipeline.run"),
    ("stages/b.py", "from ..pipeline import run\n", "stages must not import pipeline.run"),
    ("benchmarks/bench.py", "try:\n    from pipeline.run import go\nexcept ImportError:\n    pass\n",
     "benchmarks must not import pipeline.run"),
    ("benchmarks/bench.py", "from stages.a import _helper\n", "benchmarks uses private stages.a"),
    ("stages/b.py", "def g():\n    from stages.a import z\n", "import cycle: stages.a -> stages.b -> stages.a"),
    ("stages/sub/__init__.py", "from . import c\n", "import cycle: stages.sub -> stages.sub.c -> stages.sub"),
    ("stages/b.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.run import T\n",
     "stages must not import pipeline.run"),
], ids=["lazy-upward", "nested-upward", "import_module", "relative-upward", "try-upward", "private",
        "lazy-cycle", "package-cycle", "type-only-upward"])
def test_checker_catches_a_planted_violation(tmp_path, rel, text, expected):
    files = dict(CLEAN)
    files[rel] = text
    if rel.startswith("stages/sub/"):
        files["stages/sub/c.py"] = "from stages.sub import thing\n"
    found = violations(write_tree(tmp_path, files))
    assert any(expected in v for v in found), found
