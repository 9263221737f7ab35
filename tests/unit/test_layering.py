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


# ---- checkpoint formats and layout: one home each (issue 23.1) ------------------------------------
# The single-file vs DeepSpeed-folder split is the stores' (checkpoint/store.py and the folder
# mechanics they call, engine/ds_checkpoint.py); the {"engine": ..., "client": ...} layout is spelled
# only in checkpoint/layout.py. Elsewhere, in a module that handles checkpoints (imports the
# checkpoint package, runfolder or ds_checkpoint), a shape test of a path (is_dir/is_file/isdir/isfile)
# and a literal "engine"/"client" key are refused unless the exact line is listed here with its why.
_CKPT_MODULES = ("addernet_dist.checkpoint", "addernet_dist.runfolder", "addernet_dist.engine.ds_checkpoint")
FORMAT_HOMES = {"addernet_dist/checkpoint/store.py", "addernet_dist/engine/ds_checkpoint.py"}
LAYOUT_HOMES = {"addernet_dist/checkpoint/layout.py"}
SHAPE_TESTS_ALLOWED = {
    # the checkpoints/ folder and output_dir's parents, not a checkpoint
    "addernet_dist/checkpoint/manager.py": {
        "if not self.dir.is_dir():",
        "if self.dir.is_dir():",
        "if not p.is_dir():",
        "if metrics.is_file() and metrics.stat().st_size > 0:",
    },
    "addernet_dist/zero_to_state_dict.py": {"if out.is_dir():"},  # the output argument must name a file
    # "no such file" messages before reading a file the user named (not a choice between formats)
    "addernet_dist/distill.py": {"if not path.is_file():"},
    "addernet_dist/weights_io.py": {"if not path.is_file():"},
    "addernet_dist/analyze/checkpoints.py": {"if not path.is_file():"},
    "addernet_dist/config.py": {"if not p.is_file():"},  # the YAML config file
    "addernet_dist/models/pretrained.py": {"if not path.is_file():"},  # an official weights file
}
LAYOUT_KEYS_ALLOWED = {
    "addernet_dist/config_doc.py": {'"engine": "parallelism backend (docs/deepspeed.md for deepspeed)",'},  # config key
    "addernet_dist/selftest/plan.py": {'"engine": "deepspeed",'},  # the config key engine=
}
_SHAPE_TESTS = {"is_dir", "is_file", "isdir", "isfile"}


def _handles_checkpoints(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if any(n == m or n.startswith(m + ".") for n in names for m in _CKPT_MODULES):
            return True
    return False


def checkpoint_format_leaks(root: Path, repo: Path) -> list[str]:
    """``path:line: text`` of every shape test / layout key outside the homes and the lists above."""
    leaks = []
    for p in sorted(root.rglob("*.py")):
        rel = str(p.relative_to(repo))
        source = p.read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        check_shape = rel not in FORMAT_HOMES and (_handles_checkpoints(tree) or rel in SHAPE_TESTS_ALLOWED)
        for node in ast.walk(tree):
            if check_shape and isinstance(node, ast.Attribute) and node.attr in _SHAPE_TESTS:
                allowed = SHAPE_TESTS_ALLOWED.get(rel, set())
            elif (
                rel not in LAYOUT_HOMES
                and isinstance(node, ast.Constant)
                and node.value in ("engine", "client")
            ):
                allowed = LAYOUT_KEYS_ALLOWED.get(rel, set())
            else:
                continue
            text = lines[node.lineno - 1].strip()
            if text not in allowed:
                leaks.append(f"{rel}:{node.lineno}: {text}")
    return leaks


def test_checkpoint_formats_and_layout_have_one_home():
    leaks = checkpoint_format_leaks(ROOTS["addernet_dist"], REPO)
    assert not leaks, (
        "checkpoint format branching (is_dir/is_file on a checkpoint path) or the {engine, client} layout "
        "outside checkpoint/store.py / checkpoint/layout.py: use store_of(path) / a store's holds(), "
        "layout.build / layout.parts (or list the line with its why in tests/unit/test_layering.py):\n"
        + "\n".join(leaks)
    )


def test_checkpoint_format_scan_sees_a_branch_and_a_layout_key(tmp_path):
    pkg = tmp_path / "addernet_dist"
    pkg.mkdir()
    (pkg / "leaky.py").write_text(
        "from addernet_dist.checkpoint import load_file\n"
        "def read(path):\n"
        "    if path.is_dir():\n"
        "        return None\n"
        '    return load_file(path)["client"]\n'
    )
    (pkg / "unrelated.py").write_text("def f(p):\n    return p.is_dir()\n")  # handles no checkpoints
    assert checkpoint_format_leaks(pkg, tmp_path) == [
        "addernet_dist/leaky.py:3: if path.is_dir():",
        'addernet_dist/leaky.py:5: return load_file(path)["client"]',
    ]
