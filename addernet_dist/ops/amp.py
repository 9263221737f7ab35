"""The mixed-precision (autocast) policy of the adder ops: one rule for every backend and the fused modules.

Adder outputs are large with a small spread: y = −Σ_k |x − w| ≈ −4000 ± 37 on a trained ResNet-50 layer
(K = 576..4608). bf16 keeps 8 significant bits, so near 4096 its rounding step is 32: a bf16 adder output
would lose most of the signal the following BatchNorm normalises. The rule, for ``adder2d`` /
``adder_linear`` on every backend ("reference", "cpu", "triton") and for ``FusedAdderBN2d``, inside or
outside ``torch.autocast``:

    compute dtype   fp64 if input or weight is fp64, else fp32 (``compute_dtype_of``)
    input, weight   upcast to the compute dtype before the backend runs (exact: every bf16/fp16 value
                    is an fp32 value); fp32 tensors are passed through untouched (no copy), so fp32
                    runs are bit-identical to runs without this layer
    accumulator     the compute dtype (fp32 sums of K terms; the kernels never accumulate in 16 bits)
    output y        the compute dtype: a pre-BN adder output is never rounded to 16 bits
    ∂L/∂y           arrives in the compute dtype (BN's backward runs on the fp32 y)
    ∂L/∂X, ∂L/∂F    computed in the compute dtype; autograd's cast returns them in the dtype of the
                    tensor the caller passed (bf16 activations get bf16 gradients, fp32 master weights
                    fp32 gradients)
    autocast        switched off inside the op (forward and backward), so an autocast region never
                    re-casts the backends' internal matmuls (the reference's ∂F GEMM) to 16 bits

The fused module applies the same rule to x and the filters, and its BN epilogue normalises the fp32 y
in fp32 and stores fp32. Under ``torch.autocast(bf16)`` an AdderNet therefore runs its stem convolution
and classifier in bf16 and everything from the first adder layer on in fp32 (BN of an fp32 input returns
fp32); docs/kernels.md discusses the cost.

BatchNorm with 16-bit weights (DeepSpeed's ``precision=bf16`` stores every parameter in bf16):
``FP32BatchNorm2d`` upcasts the affine parameters for the call, so BN still normalises the fp32 adder
output in fp32 and keeps fp32 running statistics (``keep_batchnorm_fp32`` swaps it in).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_LOW = (torch.bfloat16, torch.float16)


def compute_dtype_of(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The dtype an adder op with these operand dtypes accumulates in and returns."""
    for dt in (x_dtype, w_dtype):
        if not dt.is_floating_point:
            raise TypeError(f"adder operands must be floating point, got {dt}")
    return torch.float64 if torch.float64 in (x_dtype, w_dtype) else torch.float32


def adder_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, weight) in the compute dtype (differentiable casts; no-ops for operands already in it)."""
    cdt = compute_dtype_of(x.dtype, weight.dtype)
    return x.to(cdt), weight.to(cdt)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` (a no-op context when it is not enabled, or when the
    device type has none: meta tensors in count_ops' shape pass)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def fp32_affine(t: torch.Tensor | None) -> torch.Tensor | None:
    """A BN affine parameter as fp32 when it is stored in 16 bits (DeepSpeed bf16 weights)."""
    return t.float() if t is not None and t.dtype in _LOW else t


class FP32BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose statistics, buffers and normalisation stay fp32 when DeepSpeed stores
    its weight and bias in bf16 (``deepspeed.precision=bf16``): the affine parameters are upcast
    (differentiably) for the call, so an fp32 adder output is normalised in fp32 and the running
    statistics are updated in fp32. Same state_dict as ``nn.BatchNorm2d``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            fp32_affine(self.weight),
            fp32_affine(self.bias),
            use_batch,
            factor,
            self.eps,
        )


def swap_batchnorm_class(model: nn.Module, cls: type[nn.BatchNorm2d]) -> int:
    """Make every plain ``nn.BatchNorm2d`` of ``model`` (the fused modules' ``bn`` included) a ``cls``
    (a class swap: parameters, buffers and state_dict keys unchanged); returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = cls
            n += 1
    return n


def keep_batchnorm_fp32(model: nn.Module) -> int:
    """Every plain BatchNorm2d of ``model`` becomes an ``FP32BatchNorm2d``; returns how many."""
    return swap_batchnorm_class(model, FP32BatchNorm2d)
