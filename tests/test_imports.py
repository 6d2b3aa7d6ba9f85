"""The shape of kcore's imports: no module-level import cycle, and ``import kcore`` never pulls in streamlit.

The import graph is read from the source (``ast``), not by importing: an edge A → B for every
``import``/``from … import`` that runs when A is imported (module level, including ``if``/``try``/``with``
blocks and class bodies; not inside functions, not under ``if TYPE_CHECKING``). Importing ``P.sub`` from
outside the package ``P`` also runs ``P/__init__.py`` first, so that counts as an edge to ``P`` too.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under ``package_dir`` (a package's name is its folder's)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], lazy: bool):
    """The import statements of ``body`` that run on import (every one, inside functions too, when ``lazy``)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if lazy:
                yield from _imports(node.body, lazy)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _imports(node.body, lazy)
            yield from _imports(node.orelse, lazy)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _imports(block, lazy)
        elif isinstance(node, (ast.ClassDef, ast.With, ast.For, ast.While)):
            yield from _imports(node.body, lazy)


def import_graph(package_dir: Path, lazy: bool = False) -> dict[str, set[str]]:
    """Module → the package's modules it imports (see the module docstring for what counts)."""
    modules = _module_names(package_dir)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body, lazy):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for target in targets:
            while target and target not in modules:  # `import kcore.a.b` names kcore.a.b, or an attribute's owner
                target = target.rpartition(".")[0]
            if not target:
                continue
            graph[name].add(target)
            parent = target.rpartition(".")[0]
            while parent and not (name == parent or name.startswith(parent + ".")):
                graph[name].add(parent)  # P/__init__.py runs before P.sub, unless we are inside P already
                parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:  # walk inside the group from its first module back to it, for a readable message
        start = min(group)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            back = [w for w in nxt if w == start]
            if back:
                out.append(path + [start])
                break
            fresh = [w for w in nxt if w not in seen] or nxt
            path.append(fresh[0])
            seen.add(fresh[0])
            if len(path) > len(group) + 1:  # the group's members reach start along another route
                out.append(sorted(group))
                break
    return out


def _describe(found: list[list[str]]) -> str:
    return "; ".join(" → ".join(c) for c in found)


def test_kcore_has_no_module_level_import_cycle():
    found = cycles(import_graph(ROOT / "kcore"))
    assert not found, (f"import cycles at module level: {_describe(found)}. Fix: move the shared code to the "
                       "module lower in the layers (or a new leaf module) so that the arrows run one way.")


def test_collectives_metrics_and_streaming_are_on_no_cycle_even_through_lazy_imports():
    # issue 24: distributed.py offers tensor collectives and sharding; metrics packs and merges its own moments;
    # streaming uses both. A function-level import must not close a circle between them either.
    layer = {"kcore.distributed", "kcore.streaming", "kcore.metrics"}
    found = [c for c in cycles(import_graph(ROOT / "kcore", lazy=True))
             if any(m in layer or m.startswith("kcore.metrics.") for m in c)]
    assert not found, f"import cycles through distributed/metrics/streaming: {_describe(found)}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root / "pkg"


def test_the_cycle_finder_sees_direct_package_and_lazy_cycles(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "import pkg.a\n",
        "pkg/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n",
        "pkg/c.py": "def f():\n    from pkg import leaf\nfrom pkg.sub.x import y\n",
        "pkg/sub/__init__.py": "from pkg.sub.x import y\n",
        "pkg/sub/x.py": "from pkg.c import f\ny = 1\n",
        "pkg/d.py": "from . import e\n",
        "pkg/e.py": "from .d import thing\n",
        "pkg/f.py": "def g():\n    from pkg import h\n",
        "pkg/h.py": "from pkg import f\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.c"] == {"pkg.sub.x", "pkg.sub"}  # the package's __init__ runs first
    assert graph["pkg.sub"] == {"pkg.sub.x"}  # from inside its own package: no edge to itself
    found = sorted(sorted(set(c)) for c in cycles(graph))
    assert found == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.x"], ["pkg.d", "pkg.e"]]
    lazy = import_graph(pkg, lazy=True)
    assert "pkg.leaf" not in graph["pkg.c"] and "pkg.leaf" in lazy["pkg.c"]  # a lazy import counts only when asked
    assert graph["pkg.leaf"] == lazy["pkg.leaf"] == set()  # an import under TYPE_CHECKING never runs
    lazy_found = sorted(sorted(set(c)) for c in cycles(lazy))
    assert lazy_found == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.x"], ["pkg.d", "pkg.e"], ["pkg.f", "pkg.h"]]


def test_importing_every_kcore_module_leaves_streamlit_unimported():
    code = (
        "import importlib, pkgutil, sys\n"
        "import kcore\n"
        "for m in pkgutil.walk_packages(kcore.__path__, 'kcore.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('streamlit', 'dashboard')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"kcore imported the dashboard's modules: {out.stdout.strip()}"
