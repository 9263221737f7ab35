"""The device description and the pure decisions made from it: which checks run, with which
parameters (``plan_checks``), the driver a CUDA build needs, the FP32 adder roofline. Only
``describe_device`` asks the machine; everything else is a pure function, so the GPU plan is tested on CPU.
"""

from __future__ import annotations

import platform
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

import torch


class CheckFailed(AssertionError):
    """A check's verdict (reported in the check's row; the other checks still run)."""


@dataclass(frozen=True)
class DeviceDescription:
    kind: str  # "cuda" | "cpu"
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    count: int = 0  # GPUs on this node
    sms: int | None = None  # streaming multiprocessors per GPU
    clock_mhz: float | None = None  # max SM clock
    driver: str | None = None  # e.g. "550.54.15"
    cuda_build: str | None = None  # torch.version.cuda, e.g. "13.0"


def describe_device() -> DeviceDescription:
    """This machine (the only impure part of the planning)."""
    cuda_build = torch.version.cuda
    if not torch.cuda.is_available():
        return DeviceDescription("cpu", platform.processor() or "cpu", cuda_build=cuda_build)
    props = torch.cuda.get_device_properties(0)
    smi = _nvidia_smi(["driver_version", "clocks.max.sm"])
    clock = float(smi[1]) if smi and _is_number(smi[1]) else None
    return DeviceDescription(
        "cuda",
        props.name,
        (props.major, props.minor),
        torch.cuda.device_count(),
        props.multi_processor_count,
        clock,
        smi[0] if smi else None,
        cuda_build,
    )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _nvidia_smi(fields: list[str]) -> list[str] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [s.strip() for s in out.stdout.splitlines()[0].split(",")]


# Minimum Linux driver per CUDA major version under CUDA's minor-version compatibility (NVIDIA's CUDA
# compatibility guide, "CUDA Toolkit and Minimum Required Driver Version"): a CUDA 13.x build of torch
# needs ≥ 580.65.06, 12.x ≥ 525.60.13, 11.x ≥ 450.80.02.
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}


def driver_problem(driver: str | None, cuda_build: str | None) -> str | None:
    """A sentence naming the driver if it is too old for the CUDA build, else None."""
    if not driver or not cuda_build:
        return None
    major = int(cuda_build.split(".")[0])
    need = MIN_DRIVER.get(major)
    if need is None:
        return None
    have = tuple(int(v) for v in re.findall(r"\d+", driver)[:3])
    if have < need:
        return (
            f"NVIDIA driver {driver} is too old for this CUDA {cuda_build} build of torch (needs "
            f"≥ {'.'.join(map(str, need))}): upgrade the driver, or install a torch build for an older "
            "CUDA (e.g. the cu12x wheels)"
        )
    return None


def fp32_adder_roofline(sms: int, clock_mhz: float) -> float:
    """Adder MACs/s at the FP32 issue roofline: 128 FP32 lanes per SM, 2 instructions per adder MAC
    (``FADD d = x − w``, ``FADD acc += |d|``) — i.e. half the FP32 FMA rate."""
    return sms * 128 * clock_mhz * 1e6 / 2


@dataclass(frozen=True)
class Check:
    name: str  # env | kernels | speed | train | deepspeed
    params: dict[str, Any] = field(default_factory=dict)


CHECK_NAMES = ("env", "kernels", "speed", "tiles", "train", "deepspeed")


def kernel_cases(quick: bool = False) -> list[dict[str, Any]]:
    """Every code path of the Triton kernels once (quick: one per kernel family)."""
    base = dict(
        p=1.0,
        grad_x="lp",
        grad_w="full",
        deterministic=True,
        dtype="float32",
        channels_last=False,
        epilogue="none",
    )
    cases = []
    for p in (1.0, 2.0, 1.5):
        for gx in ("lp", "hardtanh"):
            cases.append({**base, "p": p, "grad_x": gx})
    for gw, det in (("sign", True), ("sign", False), ("full", False)):
        cases.append({**base, "grad_w": gw, "deterministic": det})
    for dt in ("bfloat16", "float16"):
        cases.append({**base, "dtype": dt})
        cases.append({**base, "dtype": dt, "p": 1.5, "channels_last": True})
    cases.append({**base, "channels_last": True, "p": 2.0})
    for epi in ("bn_stats", "affine", "affine_res_relu"):
        cases.append({**base, "epilogue": epi})
    cases.append({**base, "epilogue": "bn_stats", "p": 1.5, "dtype": "bfloat16"})
    if quick:
        keep = (
            0,
            5,
            6,
            9,
            len(cases) - 2,
        )  # p=1, general p hardtanh, ∂F sign, bf16, affine+res+relu
        cases = [cases[i] for i in keep]
    return cases


def train_smoke_overrides(desc: DeviceDescription, quick: bool = False) -> dict[str, Any]:
    """How the training smoke runs on this device: processes, backend, fusion, DALI device, ..."""
    if desc.kind == "cuda":
        return dict(
            nproc=max(1, min(desc.count, 8)),
            distributed_backend="nccl",
            overrides={
                "train.device": "cuda",
                "train.precision": "bf16",
                "train.channels_last": True,
                "adder.backend": "triton",
                "adder.fuse_bn": True,
                "data.loader": "dali",
                "data.dali.device": "gpu",  # DALI "mixed": nvJPEG decode on the GPU
            },
            # the first tile of each list, no timing: ResNet-8's shapes × three p code paths × 4-5
            # tiles would cost minutes of ptxas; the tile mechanism has its own tests and the speed check
            env={"ADDERNET_TILE_TUNING": "0"},
        )
    return dict(
        nproc=2,
        distributed_backend="gloo",
        overrides={
            "train.device": "cpu",
            "train.precision": "bf16",
            # quick (CI): the reference operator, whose cost at these sizes is negligible; the full
            # CPU form runs the compiled CPU fast path (its first build takes minutes on 2 cores).
            "adder.backend": "reference" if quick else "cpu",
            "adder.fuse_bn": True,
            "data.loader": "dali",
            "data.dali.device": "cpu",
        },
        env={},
    )


def plan_checks(desc: DeviceDescription, quick: bool = False) -> list[Check]:
    """The checks for a device description (pure: tests call it with a CUDA description on CPU)."""
    cuda = desc.kind == "cuda"
    checks = [Check("env")]
    checks.append(
        Check(
            "kernels",
            dict(
                mode="compiled" if cuda else "interpreter",
                device="cuda" if cuda else "cpu",
                # GPU: sizes with several tiles in every direction; interpreter: tiny (its cost is per op)
                shape=dict(n=4, c=19, o=35, h=15, k=3, stride=2, pad=1)
                if cuda
                else dict(n=2, c=6, o=5, h=7, k=3, stride=2, pad=1),
                cases=kernel_cases(quick),
            ),
        )
    )
    if cuda:
        from addernet_dist.kernels.triton_adder import DW_SELFTEST_CONFIGS

        # the forward vs cuDNN, and ∂F's default tile vs its low-register candidate (occupancy)
        checks.append(
            Check(
                "speed",
                dict(
                    model="resnet50",
                    batch=64,
                    shapes="representative",
                    dw_candidates=list(DW_SELFTEST_CONFIGS),
                ),
            )
        )
    if not quick:
        # the tile tuner's rank agreement over the real process group (NCCL on a GPU node)
        checks.append(
            Check(
                "tiles",
                dict(
                    # one GPU: one rank (NCCL needs a device per rank); the watchdog phase and the
                    # checkpoint round trip of the tiles are still checked
                    nproc=max(1, min(desc.count, 8)) if cuda else 2,
                    mode="compiled" if cuda else "interpreter",
                    env={},
                ),
            )
        )
    smoke = train_smoke_overrides(desc, quick)
    checks.append(Check("train", dict(**smoke, epochs=1 if quick else 2, eval_cli=not quick)))
    if not quick:
        ds = train_smoke_overrides(desc, quick)
        ds["overrides"] = {
            **ds["overrides"],
            "engine": "deepspeed",
            "deepspeed.zero_stage": 2,
            "adder.fuse_bn": False if not cuda else True,
        }
        if not cuda:
            ds["env"] = {"DS_ACCELERATOR": "cpu"}
        checks.append(Check("deepspeed", dict(**ds, epochs=1, eval_cli=False)))
    return checks
