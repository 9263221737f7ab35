"""Backend selection for ``addernet_dist.ops.adder2d``.

Backends (every one computes what ``adder2d_reference`` computes):
  "reference"  pure PyTorch, any device — the specification.
  "cpu"        the compiled CPU fast path (``addernet_dist.kernels.cpu_adder``), CPU tensors.
  "triton"     the Triton GPU kernels (``addernet_dist.kernels.triton_adder``), CUDA tensors; on CPU
               tensors only when the process runs Triton's interpreter (``TRITON_INTERPRET=1`` set before
               triton is imported): the same kernel code, interpreted with numpy — slow (~1000x), meant
               for CI and for checking the GPU path of the trainer on a CPU machine. Never chosen by
               "auto"; asked for on CPU without the interpreter it is unavailable (see below).

Which one runs, first match wins:
  1. ``backend=`` passed to ``adder2d`` (per call);
  2. ``set_default_backend(name)`` — a process-wide preference (the
     trainer gives its layers ``backend=`` instead, level 1);
  3. the environment variable ``ADDERNET_BACKEND``;
  4. auto: "triton" for CUDA tensors, "cpu" for CPU tensors, "reference" for anything else.
"auto" (or None) at levels 1-3 means "no preference here, ask the next level".

A backend that cannot run the call (not installed, no compiler, wrong device) falls back to the device's
automatic choice, or to "reference", with ONE RuntimeWarning per process for each (requested backend,
device type) pair — never silently, and never a warning per call.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "ADDERNET_BACKEND"

_default: str | None = None
_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()
_triton_error: str | None = None


def _normalize(name: str | None, source: str) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a backend name (str) or None, got {type(name).__name__}")
    key = name.strip().lower()
    if key in ("", "auto"):
        return None
    if key not in BACKENDS:
        raise ValueError(
            f"{source}={name!r} is not an adder backend; choose one of {', '.join(BACKENDS)} "
            "or 'auto' (triton on CUDA, cpu on CPU)"
        )
    return key


def set_default_backend(name: str | None) -> None:
    """Process-wide backend preference for code that builds its own layers; None/"auto" clears it.
    The trainer passes ``adder.backend`` to its layers instead (``build.build_model``)."""
    global _default
    _default = _normalize(name, "set_default_backend")


def get_default_backend() -> str | None:
    """The preference set by ``set_default_backend`` (None when unset)."""
    return _default


def auto_backend(device: torch.device) -> str:
    """The backend chosen for ``device`` when nobody asks for one."""
    return {"cuda": "triton", "cpu": "cpu"}.get(torch.device(device).type, "reference")


def _triton_module():
    """The kernel module, or None (``_triton_error`` says why). Looked up on every call, not cached:
    tests swap in an interpreted copy of the module (kernels/triton_testing.py)."""
    global _triton_error
    if _triton_error is not None:
        return None
    try:
        return importlib.import_module("addernet_dist.kernels.triton_adder")
    except Exception as e:  # ImportError, or triton failing to initialise
        _triton_error = f"{type(e).__name__}: {e}"
        return None


def _load_triton() -> Callable | None:
    mod = _triton_module()
    return None if mod is None else mod.adder2d_triton


def triton_interpreting() -> bool:
    """Whether the Triton kernels run in Triton's interpreter in this process (TRITON_INTERPRET=1)."""
    mod = _triton_module()
    return mod is not None and mod._interpreting()


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    dev = torch.device(device).type
    if name == "reference":
        return None
    if name == "cpu":
        if dev != "cpu":
            return f"it runs on CPU tensors only (got a {dev} tensor)"
        from addernet_dist.kernels import cpu_adder

        return None if cpu_adder.is_available() else f"its build failed: {cpu_adder.unavailable_reason()}"
    if name == "triton":
        if _load_triton() is None:
            return f"it is not importable ({_triton_error})"
        if dev == "cuda" or (dev == "cpu" and triton_interpreting()):
            return None
        return (
            f"it runs on CUDA tensors only (got a {dev} tensor); on CPU it runs in Triton's "
            "interpreter when TRITON_INTERPRET=1 is set before the process starts (slow; for tests)"
        )
    raise ValueError(f"unknown adder backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends(device: torch.device) -> list[str]:
    """Backends that can run on ``device`` right now, in preference order."""
    order = dict.fromkeys((auto_backend(device), *BACKENDS))  # auto first, no duplicates
    return [b for b in order if unavailable_reason(b, device) is None]


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend that will run an adder2d call on ``device`` (see the module docstring for the order)."""
    name = _normalize(requested, "backend")
    if name is None:
        name = _default
    if name is None:
        name = _normalize(os.environ.get(ENV_VAR), ENV_VAR)
    if name is None:
        name = auto_backend(device)
    reason = unavailable_reason(name, device)
    if reason is None:
        return name
    fallback = auto_backend(device)
    if fallback == name or unavailable_reason(fallback, device) is not None:
        fallback = "reference"
    key = (name, torch.device(device).type)
    with _lock:
        first = key not in _warned
        _warned.add(key)
    if first:
        warnings.warn(
            f"adder backend {name!r} is unavailable: {reason}; using {fallback!r} instead "
            f"(warned once per process; set {ENV_VAR} or backend= to choose explicitly)",
            RuntimeWarning,
            stacklevel=3,
        )
    return fallback


def get_impl(name: str) -> Callable:
    """The adder2d implementation of backend ``name``: ``impl(input, weight, *args, **kwargs) -> Tensor``
    with the arguments of ``reference.adder2d_args``."""
    if name == "reference":
        from addernet_dist.ops.reference import adder2d_reference

        return adder2d_reference
    if name == "cpu":
        from addernet_dist.kernels.cpu_adder import adder2d_cpu

        return adder2d_cpu
    if name == "triton":
        impl = _load_triton()
        if impl is None:
            raise RuntimeError(f"adder backend 'triton' is not importable ({_triton_error})")
        return impl
    raise ValueError(f"unknown adder backend {name!r}; choose one of {', '.join(BACKENDS)}")
