"""Build and load the CPU fast path's C++ (cpu_adder.h + cpu_fwd.cpp / cpu_gx.cpp / cpu_gw.cpp), and run its
job lists on threads. The launchers and the autograd Function are in cpu_adder.py.

Compile units: each of the three .cpp files (forward, input gradient, "sign" filter gradient) is compiled
once per dtype (fp32, fp64): 6 object files, compiled concurrently (~2x faster on 2 cores), linked into one
shared object that is cached on disk, keyed on the text of all four files, the compiler, the flags and the
CPU's ISA extensions. See cpu_adder.py's docstring for the threads and the fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["build", "is_available", "unavailable_reason"]

# The C++ sources ship next to this file as package data (pyproject.toml [tool.setuptools.package-data]):
# the header every unit includes, then one translation unit per kernel.
_HEADER = "cpu_adder.h"
_SOURCE_PATHS = [Path(__file__).with_name(n) for n in (_HEADER, "cpu_fwd.cpp", "cpu_gx.cpp", "cpu_gw.cpp")]

# ---- build & load --------------------------------------------------------------------------------------

# -ffast-math lets GCC call libmvec's vector exp/log for fp64 general p (~8x the scalar libm loop; fp32
# uses the inline pow16, whose exponent split is written with explicitly rounded intrinsics); it is
# given to the compile step only: linking a shared object with it (GCC < 13) pulls in crtfastmath.o, whose
# constructor would switch the whole process to flush-denormals-to-zero.
_COMPILE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-ffast-math"]
_ARCH_FLAG_CHOICES = (["-march=native"], [])  # native first; plain if the compiler rejects it
# OpenMP threads inside the kernels (see for_jobs in cpu_adder.h), GCC only: its libgomp.so.1 is the
# runtime torch loads, so both share one thread pool; clang's -fopenmp would bring a second runtime
# (libomp) whose pool would fight torch's for the cores. Without it the launchers use Python threads.
_OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_arch: list[str] | None = None  # the -march flags the loaded object was built with
_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("ADDERNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "addernet_dist"
    )
    return Path(root) / "cpu_adder"


def _cpu_signature() -> str:
    # -march=native code is only valid on CPUs with the same ISA extensions: key the cache on them so a
    # home directory shared by different machines never loads an object built for another one.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(force: bool = False) -> ctypes.CDLL:
    """Compile (once per machine, cached on disk) and load the kernels; raises RuntimeError on failure."""
    global _lib, _error, _arch
    with _lock:
        if _lib is not None and not force:
            return _lib
        if _error is not None and not force:  # failed once: don't recompile on every call
            raise RuntimeError(_error)
        cxx = _compiler()
        if cxx is None:
            _error = "no C++ compiler found (set CXX or install g++)"
            raise RuntimeError(_error)
        try:
            sources = {p.name: p.read_text() for p in _SOURCE_PATHS}
        except OSError as e:
            _error = (
                f"a kernel source is missing ({e}); reinstall addernet-dist "
                "(the .cpp and .h files ship as package data)"
            )
            raise RuntimeError(_error) from e
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        errors = []
        omp_choices = ([_OPENMP_FLAGS, []] if "clang" not in version.lower() else [[]])
        for arch, omp in [(a, o) for a in _ARCH_FLAG_CHOICES for o in omp_choices]:
            key = hashlib.sha256(
                "\0".join(
                    [*(f"{n}\0{t}" for n, t in sources.items()), cxx, version, *arch, *omp, *_COMPILE_FLAGS,
                     _cpu_signature()]
                ).encode()
            ).hexdigest()[:16]
            out = _cache_dir() / f"cpu_adder_{key}.so"
            if not out.exists() or force:
                try:
                    _compile(cxx, arch + omp, out, sources)
                except RuntimeError as e:
                    errors.append(str(e))
                    continue
            try:
                lib = ctypes.CDLL(str(out))
            except OSError as e:
                errors.append(f"loading {out}: {e}")
                continue
            _declare(lib)
            _lib, _error = lib, None
            if (
                errors
            ):  # e.g. -march=native rejected: runs, but on the baseline ISA (several x slower)
                warnings.warn(
                    f"addernet CPU fast path built with {arch + omp or 'no extra flags'} (slow; wanted "
                    f"{_ARCH_FLAG_CHOICES[0] + omp_choices[0]}): "
                    + errors[0][-500:],
                    RuntimeWarning,
                    stacklevel=2,
                )
            _arch = list(arch)
            return lib
        _error = "; ".join(errors)
        raise RuntimeError(_error)


# (translation unit, C type, symbol suffix): one object file each, compiled concurrently (~2x faster on 2 cores)
_UNITS = [
    (u, t, suf) for t, suf in (("float", "f32"), ("double", "f64")) for u in ("cpu_fwd", "cpu_gx", "cpu_gw")
]


def _compile(cxx: str, flags: list[str], out: Path, sources: dict[str, str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir, then rename: concurrent processes (torchrun ranks) never see a
    # half-written object, and the last rename wins with identical content.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp, "k.so")
        for name, text in sources.items():  # the text that was hashed, even if the files change meanwhile
            Path(tmp, name).write_text(text)
        objs, procs = [], []
        for unit, ctype, suf in _UNITS:
            src, obj = Path(tmp, f"{unit}.cpp"), Path(tmp, f"{unit}_{suf}.o")
            defs = [f"-DADDER_T={ctype}", f"-DADDER_SUF={suf}"]
            defs.append(f"-DADDER_OFFSETS={int(unit == 'cpu_fwd' and suf == 'f32')}")
            cmd = [cxx, *_COMPILE_FLAGS, *flags, *defs, "-c", str(src), "-o", str(obj)]
            objs.append(obj)
            procs.append((cmd, _spawn(cmd)))
        errors = []
        for cmd, proc in procs:  # reap every compiler process, even after one failed
            try:
                _wait(cmd, proc)
            except RuntimeError as e:
                errors.append(str(e))
        if errors:
            raise RuntimeError(errors[0])
        # (-fopenmp in `flags` links libgomp.so.1; -march is harmless here)
        link = [cxx, "-shared", *flags, *map(str, objs), "-o", str(so), "-lm"]
        _wait(link, _spawn(link))
        os.replace(so, out)


def _spawn(cmd: list[str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ
        )
    except OSError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed: {e}") from e


def _wait(cmd: list[str], proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        raise RuntimeError(f"{' '.join(cmd)} timed out") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")


def _declare(lib: ctypes.CDLL) -> None:
    vp, i64, dbl, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.adder_tap_offsets.argtypes = [vp, vp]
    lib.adder_vector_bytes.argtypes, lib.adder_vector_bytes.restype = [], cint
    lib.adder_fwd_ob.argtypes, lib.adder_fwd_ob.restype = [cint], cint
    lib.adder_openmp.argtypes, lib.adder_openmp.restype = [], cint
    # (jobs, njobs): a (njobs, 2 or 4) int64 array of ranges, run on njobs threads (see _launch)
    for suf in ("f32", "f64"):
        getattr(lib, f"adder_fwd_{suf}").argtypes = [
            *(vp, vp, vp, vp, vp, cint, dbl, cint, cint, vp, vp),
            *(vp, vp, vp, vp, cint),  # inference epilogue: center, scale, shift, residual, relu
        ]
        getattr(lib, f"adder_gx_{suf}").argtypes = [
            *(vp, vp, vp, vp, vp),
            *(vp, cint),
            dbl,
            cint,
            cint,
            vp,
        ]
        getattr(lib, f"adder_fwd_flat_{suf}").argtypes = [
            *(vp, vp, vp, vp, vp, cint, dbl, cint, cint, vp, vp),
            *(vp, vp, vp, vp, cint, i64),
        ]
        getattr(lib, f"adder_gx_flat_{suf}").argtypes = getattr(lib, f"adder_gx_{suf}").argtypes
        getattr(lib, f"adder_gw_{suf}").argtypes = [vp, vp, vp, vp, vp, vp, cint, cint, vp]
        for kind in ("phase_pad", "phase_unpad"):
            getattr(lib, f"adder_{kind}_{suf}").argtypes = [vp, i64, i64, i64, i64, vp, vp, vp, cint]
        for kind in ("fwd", "gx", "gw", "phase_pad", "phase_unpad", "fwd_flat", "gx_flat"):
            getattr(lib, f"adder_{kind}_{suf}").restype = None


def is_available() -> bool:
    """True when the kernels are compiled and loaded (compiles them on first call, ~3 s)."""
    try:
        build()
        return True
    except RuntimeError:
        return False


def unavailable_reason() -> str | None:
    """Why ``is_available()`` is False (compiler output), or None."""
    return None if is_available() else _error


# ---- threads -------------------------------------------------------------------------------------------

_use_openmp = True  # False: Python threads even where the object has OpenMP (forked children; tests)
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None


def _reset_pool_after_fork() -> None:
    global _pool, _pool_key, _use_openmp
    _pool, _pool_key = None, None  # a forked child (DataLoader worker) inherits no live threads
    # nor the parent's OpenMP workers: libgomp is not fork-safe, and a child's first parallel region
    # after the parent ran one waits forever for them (test_forked_child_can_use_the_kernels_after_the_
    # parent_did hung). torch avoids it by running DataLoader workers at 1 thread; the kernels use
    # Python threads in a forked child instead.
    _use_openmp = False


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _run(fn, jobs: list[tuple]) -> None:
    """Run ``fn(*job)`` for every job, on up to torch.get_num_threads() threads (ctypes drops the GIL)."""
    global _pool, _pool_key
    if len(jobs) == 1:
        fn(*jobs[0])
        return
    key = (os.getpid(), len(jobs))
    if _pool_key != key:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_key = ThreadPoolExecutor(len(jobs), thread_name_prefix="adder_cpu"), key
    for f in [_pool.submit(fn, *job) for job in jobs]:
        f.result()




def _launch(fn, jobs: list[tuple[int, ...]], args) -> None:
    """Run the C entry ``fn`` over ``jobs`` (ranges, one per thread): ``args(jobs_ptr, njobs, first)``
    gives its arguments, ``first`` the index of the first job passed (where a job's output buffer lies).

    With OpenMP (see for_jobs in cpu_adder.h) one call runs every job on torch's own OpenMP pool;
    otherwise each job is a call of its own on the Python threads of ``_run``. Either way job i computes
    exactly the same thing, so results depend on the job list only.
    """
    arr = torch.tensor(jobs, dtype=torch.int64)
    ptr, row = arr.data_ptr(), arr.stride(0) * arr.element_size()
    if len(jobs) == 1 or (_use_openmp and _lib_or_raise().adder_openmp()):
        fn(*args(ptr, len(jobs), 0))
    else:
        _run(fn, [args(ptr + i * row, 1, i) for i in range(len(jobs))])


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]



def _lib_or_raise() -> ctypes.CDLL:
    return _lib if _lib is not None else build()


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"
