"""The ``env`` check: GPU, compute capability, driver, CUDA build and library versions; fails naming the
driver when it is older than the installed CUDA build needs."""

from __future__ import annotations

import contextlib
import importlib
import platform

import torch

from addernet_dist.selftest.plan import CheckFailed, DeviceDescription, driver_problem


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 — a broken install is reported, not raised
        return f"not importable ({type(e).__name__}: {str(e)[:80]})"
    return getattr(m, "__version__", "?")


def check_env(desc: DeviceDescription, params: dict) -> dict:
    nccl = None
    with contextlib.suppress(Exception):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    info = {
        "device": desc.name,
        "gpus": desc.count,
        "compute_capability": ".".join(map(str, desc.capability)) if desc.capability else None,
        "sms": desc.sms,
        "max_sm_clock_mhz": desc.clock_mhz,
        "driver": desc.driver,
        "cuda_build": desc.cuda_build,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "nccl": nccl,
        "deepspeed": _version("deepspeed") if _importable_quietly("deepspeed") else None,
    }
    problem = driver_problem(desc.driver, desc.cuda_build)
    if problem:
        raise CheckFailed(problem + f" | {info}")
    if desc.kind == "cuda" and desc.capability and desc.capability < (8, 0):
        raise CheckFailed(
            f"{desc.name} has compute capability {desc.capability}; the Triton adder kernels are built "
            "and tested for sm_80 and newer (A100, H100)"
        )
    return info


def _importable_quietly(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
