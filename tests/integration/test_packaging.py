"""Packaging: plain package discovery (kernels in addernet_dist/kernels/) and the C++ sources as package data."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_packages_are_found_without_a_directory_mapping():
    """Plain discovery: the kernels live in addernet_dist/kernels/, no package-dir maps them in."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in conf and "packages" in conf
    assert conf["packages"]["find"]["include"] == ["addernet_dist*"]
    assert (ROOT / "addernet_dist" / "kernels" / "__init__.py").is_file()
    assert not (ROOT / "kernels").exists()  # no second copy at the top level


def test_kernels_import_as_subpackage_only():
    import addernet_dist.kernels as k

    assert Path(k.__file__).resolve() == (ROOT / "addernet_dist" / "kernels" / "__init__.py").resolve()


def test_wheel_ships_the_cpu_kernel_source(tmp_path):
    """A non-editable install (built wheel) has the C++ sources (cpu_adder.h, cpu_fwd/gx/gw.cpp) where
    kernels/cpu_build.py looks for them.

    Fails when the package-data entry in pyproject.toml is dropped (the wheel then has no .cpp and
    the installed CPU fast path could never build).
    """
    import shutil
    import subprocess
    import sys

    # build from a copy of the sources: setuptools reuses a ./build/ left by an earlier build, which
    # could supply a file the current configuration no longer packages
    src, wheels, target = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    junk = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", "docs")
    shutil.copytree(ROOT, src, ignore=junk)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("addernet_dist-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    probe = (
        "import addernet_dist.kernels.cpu_adder as c, addernet_dist.kernels.cpu_build as b; "
        "print(c.__file__); print(*b._SOURCE_PATHS); print(all(p.is_file() for p in b._SOURCE_PATHS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(target)},
    ).stdout.split()  # fmt: skip
    mod, *srcs, found = out
    assert Path(mod).resolve().is_relative_to(target.resolve())  # the installed copy, not the tree
    assert [Path(s).name for s in srcs] == ["cpu_adder.h", "cpu_fwd.cpp", "cpu_gx.cpp", "cpu_gw.cpp"]
    assert found == "True"
    for s in srcs:
        assert Path(s).resolve().is_relative_to(target.resolve())
        assert Path(s).read_text() == (ROOT / "addernet_dist" / "kernels" / Path(s).name).read_text()
