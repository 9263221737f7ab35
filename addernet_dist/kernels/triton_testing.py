"""Run the Triton kernels on CPU tensors through Triton's interpreter, without leaking the mode.

``@triton.jit`` decides at decoration (import) time whether a kernel is compiled or interpreted, from
``TRITON_INTERPRET``. Setting the variable process-wide would leak into every test that runs after ours
(and would not work at all if triton or our modules were already imported, e.g. by the AOT tests or the
dispatcher). ``interpreted_modules`` instead imports FRESH copies of the kernel modules with
``TRITON_INTERPRET=1`` and afterwards restores ``sys.modules``, the package attributes and the
environment exactly as they were. This works because the kernels call only triton.language builtins and
the package's own helpers (triton_math.py, re-imported with them): triton's ``@jit`` library functions
(``tl.zeros``, ``tl.sum``, ``tl.cdiv``) are compiled-mode objects once triton is imported without the
variable, and the interpreter cannot call them.

    with interpreted_modules("addernet_dist.kernels.triton_adder") as (ta,):
        y = ta.adder2d_triton(x_cpu, w_cpu)   # runs the real kernel code in the interpreter
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

# Everything that holds @triton.jit kernels or helpers, or references to them: all re-imported together
# (the kernels call triton_math's helpers, which must be interpreted copies too).
KERNEL_MODULES = (
    "addernet_dist.kernels.triton_math",
    "addernet_dist.kernels.triton_kernels",
    "addernet_dist.kernels.triton_tiles",
    "addernet_dist.kernels.triton_adder",
    "addernet_dist.kernels.fused",
)


@contextlib.contextmanager
def interpreted_modules(*names: str) -> Iterator[tuple[ModuleType, ...]]:
    pkg = importlib.import_module("addernet_dist.kernels")
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_mods = {k: sys.modules.pop(k) for k in KERNEL_MODULES if k in sys.modules}
    saved_attrs = {k: getattr(pkg, k.rsplit(".", 1)[1], None) for k in KERNEL_MODULES}
    for (
        k
    ) in KERNEL_MODULES:  # `from addernet_dist.kernels import x` must not find the compiled copy
        if hasattr(pkg, k.rsplit(".", 1)[1]):
            delattr(pkg, k.rsplit(".", 1)[1])
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield tuple(importlib.import_module(n) for n in names)
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for k in KERNEL_MODULES:
            sys.modules.pop(k, None)
            attr = k.rsplit(".", 1)[1]
            if saved_attrs[k] is None:
                if hasattr(pkg, attr):
                    delattr(pkg, attr)
            else:
                setattr(pkg, attr, saved_attrs[k])
        sys.modules.update(saved_mods)
