"""The layout rules of docs/layout.md, read from the source text (nothing is imported): `kernels/` imports nothing
from qlora_core, the package's import graph has no cycle, every library file is named in docs/layout.md, and every
test file in tests/README.md."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qlora_core"


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            out += [(f"{mod}.{a.name}" if mod else a.name, node.level) for a in node.names]
    return out


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["qlora_core", *parts])


def _library_graph() -> dict[str, set[str]]:
    """qlora_core module -> the qlora_core modules its top-level (module-scope) imports name."""
    files = {_module_of(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module scope only: deferred imports are allowed
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                stem = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for a in node.names:
                    for cand in (f"{stem}.{a.name}", stem):
                        if cand in files:
                            deps.add(cand)
                            break
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        graph[mod] = deps - {mod}
    return graph


def test_kernels_import_nothing_from_the_library():
    bad = [(p.name, m) for p in (ROOT / "kernels").glob("*.py") for m, level in _imports(p)
           if level == 0 and m.split(".")[0] == "qlora_core"]
    assert not bad, f"kernels/ must take tables and constants from its callers, not import them: {bad}"


def test_the_library_has_no_import_cycle():
    graph = _library_graph()
    assert "qlora_core.ops.quant4" in graph["qlora_core.ops.nf4_linear"]  # the graph is read at all
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_docs_layout_names_every_library_file():
    text = (ROOT / "docs" / "layout.md").read_text()
    files = [p.relative_to(ROOT) for p in [*PKG.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
             if p.name != "__init__.py"]
    missing = [str(f) for f in files if f.name not in text]
    assert not missing, f"docs/layout.md does not name: {missing}"


def test_tests_readme_lists_every_test_file():
    text = (ROOT / "tests" / "README.md").read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if p.name not in text]
    assert not missing, f"tests/README.md does not list: {missing}"
