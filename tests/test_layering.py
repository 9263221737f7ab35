"""Layering of the package: no import cycle among its modules (lazy imports inside functions
included), kernels/ imports nothing from models/ or nn and its files import one way (KERNEL_LAYERS), and no
module (Python, or the kernels' C++) grows past ~600 lines.

The import graph is read from the source with ``ast`` (every ``import`` statement anywhere in a
file, except under ``if TYPE_CHECKING:``), not from ``sys.modules``: a lazy import inside a
function is as much a dependency as a top-level one, it only hides the cycle from the
interpreter. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg``; importing ``a.b`` is an edge to ``a.b`` only (not to the parent package's __init__).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.train_helpers import REPO

ROOTS = {"addernet_dist": REPO / "addernet_dist"}
MAX_LINES = 600
# Cycles tolerated for now: none (checkpoint.py <-> engine/ds_checkpoint.py went with
# addernet_dist/runfolder.py, the file-system helpers both use).
KNOWN_CYCLES: list[list[str]] = []
# Modules over the limit that landed from other work and still need splitting (the test fails if
# they grow, or once they shrink below the limit and stay listed).
KNOWN_LONG: dict[str, int] = {}
# Kernel files, lowest layer first: a kernel module imports only kernel modules listed before it (Liger's
# one-op-per-file shape: math -> kernels -> tile tables -> launchers + autograd Function; the C++ build
# under the CPU launchers). A new kernel module must be placed here.
KERNEL_LAYERS = [
    "addernet_dist.kernels",
    "addernet_dist.kernels.tile_tuner",
    "addernet_dist.kernels.triton_math",
    "addernet_dist.kernels.triton_kernels",
    "addernet_dist.kernels.triton_tiles",
    "addernet_dist.kernels.triton_adder",
    "addernet_dist.kernels.fused",
    "addernet_dist.kernels.aot",
    "addernet_dist.kernels.triton_testing",
    "addernet_dist.kernels.cpu_build",
    "addernet_dist.kernels.cpu_adder",
]


def package_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of the installed package."""
    mods: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            mods[name] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for sub in node.orelse:
                yield from _imports(ast.Module(body=[sub], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def import_graph(mods: dict[str, Path] | None = None) -> dict[str, set[str]]:
    mods = package_modules() if mods is None else mods
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            for t in targets:
                # `import a.b.c` inside the package: the longest known module prefix
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_lazy_imports(tmp_path):
    # the checker itself: a cycle closed only by an import inside a function is found
    pkg = tmp_path / "addernet_dist"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from addernet_dist import b\n")
    (pkg / "b.py").write_text("def f():\n    from addernet_dist.a import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from addernet_dist import a\n"
    )
    mods = {
        "addernet_dist": pkg / "__init__.py",
        "addernet_dist.a": pkg / "a.py",
        "addernet_dist.b": pkg / "b.py",
        "addernet_dist.c": pkg / "c.py",
    }
    g = import_graph(mods)
    assert g["addernet_dist.c"] == set()
    assert cycles(g) == [["addernet_dist.a", "addernet_dist.b"]]


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == [], "import cycles (lazy imports included): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def test_kernels_import_nothing_from_models_or_layers():
    # models -> nn -> ops -> kernels: the graph rewrite lives in models/fusion.py
    g = import_graph()
    for mod, deps in g.items():
        if mod.startswith("addernet_dist.kernels"):
            bad = {d for d in deps if d.startswith(("addernet_dist.models", "addernet_dist.nn"))}
            assert not bad, f"{mod} imports {sorted(bad)}"


def test_kernel_modules_import_only_lower_layers():
    g = import_graph()
    kernels = {m for m in g if m.startswith("addernet_dist.kernels")}
    assert kernels == set(KERNEL_LAYERS), f"place new kernel modules in KERNEL_LAYERS: {kernels ^ set(KERNEL_LAYERS)}"
    for i, mod in enumerate(KERNEL_LAYERS):
        up = {d for d in g[mod] if d.startswith("addernet_dist.kernels") and KERNEL_LAYERS.index(d) > i}
        assert not up, f"{mod} imports a higher kernel layer: {sorted(up)}"


def test_no_module_over_600_lines():
    # Python modules and the C++ kernel sources (one translation unit per kernel plus a common header)
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "addernet_dist").rglob("*")
        if p.suffix in {".py", ".cpp", ".h"} and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == KNOWN_LONG, f"modules over {MAX_LINES} lines (split them): {long}"
    assert any(p.suffix == ".cpp" for p in (REPO / "addernet_dist" / "kernels").iterdir())  # the walk sees C++


def _configured_line_length() -> int:
    import re  # not tomllib: the project supports Python 3.10, which lacks it

    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[tool.ruff]", 1)[1].split("\n[", 1)[0]
    return int(re.search(r"^line-length\s*=\s*(\d+)", section, re.M).group(1))


def test_no_line_over_the_configured_length():
    """One line length for the project (pyproject's ruff ``line-length``, also enforced by ruff's E501).

    120, not 100: at 100, 600+ lines (mostly comments that carry a measurement and its why) exceeded it
    and the limit was ignored; at 120 every source line fits and the limit holds. Source = Python, the
    C++ kernels and the shell launchers, tests and benchmarks included.
    """
    limit = _configured_line_length()
    assert limit == 120
    files = [
        p
        for d in ("addernet_dist", "tests", "benchmarks", "launch", "tools", ".ci")
        if (REPO / d).exists()
        for p in (REPO / d).rglob("*")
        if p.suffix in {".py", ".cpp", ".h", ".sh", ".sbatch", ""} and p.is_file() and ".venv" not in p.parts
        and "__pycache__" not in p.parts
    ]
    assert len(files) > 50, files  # the walk found the tree
    long = [
        f"{p.relative_to(REPO)}:{i}: {len(line)}"
        for p in files
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if len(line) > limit
    ]
    assert not long, f"lines over {limit} characters (wrap them): {long}"
