"""Packaging: every sub-package is listed in pyproject (find can't see the kernels/ mapping)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "addernet_dist").rglob("__init__.py")
    }
    on_disk |= {
        "addernet_dist.kernels." + ".".join(p.parent.relative_to(ROOT / "kernels").parts)
        for p in (ROOT / "kernels").rglob("__init__.py")
    }
    on_disk = {n.rstrip(".") for n in on_disk}
    assert on_disk <= listed, (
        f"add to pyproject [tool.setuptools] packages: {sorted(on_disk - listed)}"
    )
    assert conf["package-dir"]["addernet_dist.kernels"] == "kernels"


def test_kernels_import_as_subpackage_only():
    import addernet_dist.kernels as k

    assert Path(k.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
