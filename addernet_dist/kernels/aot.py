"""Ahead-of-time compilation of every Triton kernel and tuning config, no GPU needed.

``kernel_specs()`` enumerates (kernel, signature, constexprs, options) for every kernel × tuning config, with
the specialisations the runtime JIT would apply (16-byte aligned pointers, the padded filter stride
divisible by 16). ``compile_spec(spec, cc)`` runs the full Triton → PTX → cubin pipeline for an sm_<cc>
target with the bundled ptxas. Used by tests/unit/test_triton_aot.py (does every config compile for sm_80 and
sm_90?) and benchmarks/kernel_report.py (registers, spills, shared memory, SASS per MAC).

    python -m addernet_dist.kernels.aot --cc 80 90     # compile everything, print one line per kernel
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from addernet_dist.kernels import triton_adder as ta

# torch dtype name → Triton signature element type.
_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


@dataclass(frozen=True)
class KernelSpec:
    """One compilable specialisation: a kernel, its tuning config and the constexprs of one code path."""

    name: str  # e.g. "fwd[p=1,epi=none]"
    kernel: Any  # the @triton.jit function
    config: triton.Config
    constexprs: dict[str, Any]
    dtype: str = "fp32"
    # MACs one thread performs per iteration of the hot (innermost channel) loop; kernel_report divides
    # the loop's SASS instruction count by it.
    macs_per_iter: int = 0
    divisible16: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        kw = ",".join(
            f"{k[6:] if k.startswith('BLOCK_') else k}={v}"
            for k, v in self.config.kwargs.items()
            if not (k == "EXP2_FMA" and v == 0)  # the default: SFU exp2 everywhere
        )
        return f"{self.name} {self.dtype} [{kw},w={self.config.num_warps}]"


def _arg_names(kernel) -> list[str]:
    return list(inspect.signature(kernel.fn).parameters)


def _signature(spec: KernelSpec) -> tuple[dict[str, str], dict[str, Any], dict]:
    names = _arg_names(spec.kernel)
    consts = {**spec.constexprs, **spec.config.kwargs}
    sig: dict[str, str] = {}
    attrs: dict = {}
    for i, nm in enumerate(names):
        if nm in consts:
            sig[nm] = "constexpr"
        elif nm.endswith("_ptr"):
            # Statistics/partials buffers are always fp32; data pointers follow the storage dtype.
            # The forward/∂X filters are re-laid out in fp32 on the host, whatever the storage dtype.
            fp32_only = nm in ("part_ptr", "center_ptr", "scale_ptr", "shift_ptr", "dw_ptr") or (
                nm == "w_ptr" and spec.kernel is not ta._adder_bwd_dw_kernel
            )
            sig[nm] = "*fp32" if fp32_only else _PTR[spec.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif nm == "p":
            sig[nm] = "fp32"
        else:
            sig[nm] = "i32"
            if nm in spec.divisible16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _spread(i: int, cfg: triton.Config, paths: list, full: bool) -> tuple[list, int]:
    """The code paths the forward / ∂X config number ``i`` compiles (``kernel_specs``) and its MACs per thread
    and hot-loop step. ``paths[2]`` is the general-p path (ℓp at general p for ∂X): the only one of the
    EXP2_FMA configs, which the autotuner prunes for every other path."""
    kw = cfg.kwargs
    if kw["EXP2_FMA"]:
        chosen = [paths[2]]
    else:
        chosen = paths if full else [paths[i % len(paths)]]
    return chosen, kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"] // (32 * cfg.num_warps)


def kernel_specs(r: int = 3, s: int = 3, full: bool = False) -> list[KernelSpec]:
    """Every kernel × every tuning config. ``full`` also crosses every code path (p mode, epilogue, ...)
    with every config; otherwise the code paths are spread over the configs so that each config and each
    code path compiles at least once (the CPU test budget)."""
    specs: list[KernelSpec] = []
    fp32 = tl.float32
    fwd_paths = [
        ("p=1,epi=none", dict(P_MODE=ta.P_ONE, EPILOGUE=ta.EPI_NONE, HAS_RES=False, RELU=False)),
        (
            "p=2,epi=bnstats",
            dict(P_MODE=ta.P_TWO, EPILOGUE=ta.EPI_BN_STATS, HAS_RES=False, RELU=False),
        ),
        (
            "p=gen,epi=none",
            dict(P_MODE=ta.P_GENERAL, EPILOGUE=ta.EPI_NONE, HAS_RES=False, RELU=False),
        ),
        (
            "p=1,epi=affine+res+relu",
            dict(P_MODE=ta.P_ONE, EPILOGUE=ta.EPI_AFFINE, HAS_RES=True, RELU=True),
        ),
        (
            "p=1,epi=bnstats",
            dict(P_MODE=ta.P_ONE, EPILOGUE=ta.EPI_BN_STATS, HAS_RES=False, RELU=False),
        ),
    ]
    for i, cfg in enumerate(ta.FWD_CONFIGS):
        paths, macs = _spread(i, cfg, fwd_paths, full)
        for j, (nm, path) in enumerate(paths):
            # 16-bit storage is a load-convert away from fp32: compile one path per config in bf16/fp16.
            dtype = ("fp32", "bf16", "fp16")[(i + j) % 3]
            specs.append(
                KernelSpec(
                    f"fwd[{nm}]",
                    ta._adder_fwd_kernel,
                    cfg,
                    dict(R=r, S=s, ACC_DTYPE=fp32, FAST_MATH=True, FMA_EXP2_OK=True, **path),
                    dtype,
                    macs,
                    ("OP",),
                )
            )
    dx_paths = [
        ("lp,p=1", ta.GX_SIGN),
        ("hardtanh", ta.GX_HARDTANH),
        ("lp,p=gen", ta.GX_POW),
        ("lp,p=2", ta.GX_LINEAR),
    ]
    for i, cfg in enumerate(ta.DX_CONFIGS):
        paths, macs = _spread(i, cfg, dx_paths, full)
        for j, (nm, mode) in enumerate(paths):
            dtype = ("fp32", "bf16")[(i + j) % 2]
            specs.append(
                KernelSpec(
                    f"dx[{nm}]",
                    ta._adder_bwd_dx_kernel,
                    cfg,
                    dict(R=r, S=s, GX_MODE=mode, FAST_MATH=True, FMA_EXP2_OK=True, ACC_DTYPE=fp32),
                    dtype,
                    macs,
                    ("CP",),
                )
            )
    dw_paths = [
        ("full,deterministic", dict(SIGN=False, ATOMIC=False)),
        ("sign,atomic", dict(SIGN=True, ATOMIC=True)),
        ("full,atomic", dict(SIGN=False, ATOMIC=True)),
        ("sign,deterministic", dict(SIGN=True, ATOMIC=False)),
    ]
    for i, cfg in enumerate(ta.DW_CONFIGS):
        paths = dw_paths if full else [dw_paths[i % len(dw_paths)]]
        kw = cfg.kwargs
        for nm, path in paths:
            # Per hot-loop iteration: one position (sign, rank-1) or one BLOCK_K-position GEMM step.
            steps = 1 if path["SIGN"] else kw["BLOCK_K"]
            macs = kw["BLOCK_M"] * kw["BLOCK_N"] * steps // (32 * cfg.num_warps)
            specs.append(
                KernelSpec(
                    f"dw[{nm}]",
                    ta._adder_bwd_dw_kernel,
                    cfg,
                    dict(R=r, S=s, ACC_DTYPE=fp32, **path),
                    "fp32",
                    macs,
                )
            )
    return specs


def compile_spec(spec: KernelSpec, cc: int):
    """Compile one spec for sm_<cc> (80, 90); returns Triton's CompiledKernel (``.asm["cubin"]`` etc.)."""
    sig, consts, attrs = _signature(spec)
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", cc, 32),
        options={"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages},
    )


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with Triton (ptxas, cuobjdump, nvdisasm)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, spill/stack bytes and static shared memory of a cubin, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [nvidia_tool("cuobjdump"), "-res-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    ap.add_argument("--full", action="store_true", help="every code path × every config")
    args = ap.parse_args(argv)
    for spec in kernel_specs(full=args.full):
        for cc in args.cc:
            t0 = time.perf_counter()
            k = compile_spec(spec, cc)
            use = resource_usage(k.asm["cubin"])
            print(
                f"sm_{cc} {spec.label:64s} regs={use['registers']:3d} stack={use['stack']:4d} B "
                f"smem={k.metadata.shared:6d} B  {time.perf_counter() - t0:5.1f}s"
            )


if __name__ == "__main__":
    main()
