"""Every decision that depends on the training device, as pure functions of a ``DeviceInfo``.

A GPU-only decision that reads ``torch.cuda`` inline cannot be tested on the CPU machines CI runs on;
a wrong branch would first show on a cluster. Here the device is a plain dataclass: ``DeviceInfo.probe``
is the only code that asks torch about the hardware, and tests pass a hand-written CUDA description
(``DeviceInfo(type="cuda", capability=(9, 0))``) to check what a GPU node would decide.

Decisions (each raises ``ValueError`` naming the problem and the fix on a combination that cannot run):
  ``adder_backend``      "auto" → triton on CUDA, cpu on CPU; triton on CPU only in Triton's interpreter
  ``fuse_adder_bn``      "auto" → fuse where the fused kernels run (the triton backend)
  ``autocast_dtype``     train.precision → bf16 autocast (CPU, CUDA sm ≥ 8.0), fp16 (CPU, CUDA sm ≥ 7.0), none
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
# fp16 tensor cores: Volta (V100, sm_70) and newer.
_FP16_MIN_CAPABILITY = (7, 0)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def autocast_dtype(precision: str | bool, dev: DeviceInfo) -> torch.dtype | None:
    """The autocast dtype of forward passes (training, evaluation, BN recalibration) for
    ``train.precision`` ("fp32" / "bf16" / "fp16"; a bool is the deprecated ``train.bf16``).

    bf16 and fp16 mean autocast on every device, CPU included (so CI runs the autocast code); the adder
    layers compute in fp32 under it either way (addernet_dist/ops/amp.py).
    """
    if isinstance(precision, bool):
        precision = "bf16" if precision else "fp32"
    if precision == "fp32":
        return None
    if precision not in _AUTOCAST:
        raise ValueError(f"train.precision={precision!r}; use fp32, bf16 or fp16")
    need = _BF16_MIN_CAPABILITY if precision == "bf16" else _FP16_MIN_CAPABILITY
    if dev.type == "cuda" and dev.capability is not None and dev.capability < need:
        major, minor = dev.capability
        fix = "train.precision=fp16 (with loss scaling) or fp32" if precision == "bf16" else "train.precision=fp32"
        raise ValueError(
            f"train.precision={precision} needs a GPU of compute capability >= {need[0]}.{need[1]}; "
            f"{dev.name or 'this GPU'} is {major}.{minor}: set {fix}"
        )
    return _AUTOCAST[precision]


def grad_scaling(precision: str) -> bool:
    """Whether ``train.precision`` needs loss scaling (a GradScaler): fp16 only. fp16's smallest normal
    is 6.1e-5, so small activation gradients of the autocast (stem/classifier) backward flush to zero
    unless the loss is scaled up first; bf16 has fp32's exponent range and needs none."""
    return precision == "fp16"


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
