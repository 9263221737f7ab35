"""Every decision that depends on the training device, as pure functions of a ``DeviceInfo``.

A GPU-only decision that reads ``torch.cuda`` inline cannot be tested on the CPU machines CI runs on;
a wrong branch would first show on a cluster. Here the device is a plain dataclass: ``DeviceInfo.probe``
is the only code that asks torch about the hardware, and tests pass a hand-written CUDA description
(``DeviceInfo(type="cuda", capability=(9, 0))``) to check what a GPU node would decide.

Decisions (each raises ``ValueError`` naming the problem and the fix on a combination that cannot run):
  ``adder_backend``      "auto" → triton on CUDA, cpu on CPU; triton on CPU only in Triton's interpreter
  ``fuse_adder_bn``      "auto" → fuse where the fused kernels run (the triton backend)
  ``autocast_dtype``     train.bf16 → bf16 autocast on CPU and on CUDA with compute capability ≥ 8.0
  ``dali_device``        DALI "gpu" (mixed decode) on CUDA, "cpu" elsewhere
  ``dist_backend``       NCCL on CUDA, gloo on CPU
  ``deterministic_grad_weight``  the ∂L/∂F reduction mode of the triton kernels
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch

# bf16 arithmetic (and cuDNN's bf16 convolutions the stem runs under autocast) needs Ampere or newer.
_BF16_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceInfo:
    """What the decisions need to know about the training device.

    type: "cpu" or "cuda". capability: CUDA compute capability (major, minor); None on CPU or unknown.
    name: e.g. "NVIDIA H100 80GB HBM3" (messages only). triton_interpreter: TRITON_INTERPRET=1 in
    this process, i.e. the Triton kernels run on CPU tensors through Triton's interpreter.
    """

    type: Literal["cpu", "cuda"]
    capability: tuple[int, int] | None = None
    name: str = ""
    triton_interpreter: bool = False

    def __post_init__(self) -> None:
        if self.type not in ("cpu", "cuda"):
            raise ValueError(f"DeviceInfo.type must be 'cpu' or 'cuda', got {self.type!r}")

    @classmethod
    def probe(cls, device: torch.device) -> DeviceInfo:
        """The description of ``device`` in this process (the only hardware query in this module)."""
        device = torch.device(device)
        interp = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in (
            "1",
            "true",
            "on",
            "yes",
        )
        if device.type == "cuda":
            if not torch.cuda.is_available():  # a description without a GPU to ask (tests)
                return cls("cuda", None, "", interp)
            idx = device.index if device.index is not None else torch.cuda.current_device()
            return cls(
                "cuda",
                torch.cuda.get_device_capability(idx),
                torch.cuda.get_device_name(idx),
                interp,
            )
        if device.type != "cpu":
            raise ValueError(f"unsupported training device {device}; use cpu or cuda")
        return cls("cpu", None, "cpu", interp)


def adder_backend(requested: str, dev: DeviceInfo) -> str:
    """The adder operator backend the trainer runs (``adder.backend``; "auto" = by device)."""
    req = (requested or "auto").strip().lower()
    if req == "auto":
        return "triton" if dev.type == "cuda" else "cpu"
    if req == "triton" and dev.type == "cpu" and not dev.triton_interpreter:
        raise ValueError(
            "adder.backend=triton on a CPU device runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before launching (slow; meant for tests), "
            "or use adder.backend=cpu (or auto)"
        )
    if req == "cpu" and dev.type != "cpu":
        raise ValueError(
            "adder.backend=cpu needs train.device=cpu; on CUDA use adder.backend=triton (or auto)"
        )
    if req not in ("reference", "cpu", "triton"):
        raise ValueError(
            f"adder.backend={requested!r} is not a backend; use auto, reference, cpu or triton"
        )
    return req


def fuse_adder_bn(setting: bool | str, backend: str) -> bool:
    """Whether to install the fused Adder2d+BN modules (``adder.fuse_bn``). "auto": where the fused
    kernels run, i.e. with the triton backend (CUDA, or CPU in the interpreter). Elsewhere a fused
    module computes the unfused pair, so forcing it on is allowed but buys nothing."""
    if setting == "auto":
        return backend == "triton"
    return bool(setting)


def autocast_dtype(bf16: bool, dev: DeviceInfo) -> torch.dtype | None:
    """The autocast dtype of forward passes (training, evaluation, BN recalibration) for ``train.bf16``.

    bf16 means bf16 autocast on every device, CPU included (so CI runs the autocast code); the adder
    layers compute in fp32 under it either way (addernet_dist/ops/amp.py).
    """
    if not bf16:
        return None
    if dev.type == "cuda" and dev.capability is not None and dev.capability < _BF16_MIN_CAPABILITY:
        major, minor = dev.capability
        raise ValueError(
            f"train.bf16=true needs a GPU of compute capability >= 8.0 (Ampere or newer) for bf16; "
            f"{dev.name or 'this GPU'} is {major}.{minor}: set train.bf16=false"
        )
    return torch.bfloat16


def dali_device(setting: str, dev: DeviceInfo) -> str:
    """DALI's pipeline placement for ``data.dali.device``: "gpu" = ``mixed`` JPEG decode (nvJPEG) and
    GPU augmentation; "cpu" = ``device_id=None``, no GPU touched."""
    if setting == "gpu":
        if dev.type != "cuda":
            raise ValueError(
                "data.dali.device='gpu' needs a CUDA training device; use data.dali.device=auto "
                "or cpu on machines without a GPU"
            )
        return "gpu"
    if setting == "cpu":
        return "cpu"
    if setting != "auto":
        raise ValueError(f"data.dali.device={setting!r}; use auto, gpu or cpu")
    return "gpu" if dev.type == "cuda" else "cpu"


def dist_backend(dev: DeviceInfo) -> str:
    """The torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if dev.type == "cuda" else "gloo"


def deterministic_grad_weight(setting: bool | None, torch_deterministic: bool) -> bool:
    """The triton ∂L/∂F reduction: True = fixed-order fp32 partials (bitwise reproducible), False =
    float atomics; None follows ``torch.use_deterministic_algorithms`` (``torch_deterministic``)."""
    return torch_deterministic if setting is None else bool(setting)


def autocast(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The one autocast region of forward passes: ``torch.autocast(device_type, dtype)``, or nothing
    when ``dtype`` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
