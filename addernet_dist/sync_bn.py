"""``train.sync_bn``: BatchNorm statistics over the GLOBAL batch in multi-process training.

Without it every rank normalises with the mean/variance of its own B images, so N ranks x batch B
is a different model from 1 rank x batch N*B (the BN batch statistics and the running statistics
come from B, not N*B images). :class:`SyncBatchNorm2d` all-reduces them. Why not
``torch.nn.SyncBatchNorm``: it refuses CPU tensors (its forward checks for CUDA), so the gloo
test runs and CPU training could not use it; this one is the same math on any device, subclasses
``nn.BatchNorm2d`` (isinstance checks, BN recalibration and state_dict keys unchanged) and keeps
the statistics in fp32 at least whatever the autocast dtype.

Per forward in training with world size > 1, two differentiable all-reduces (``torch.distributed.nn``,
whose backward all-reduces the gradient) of C+1 and C values:

    mean = sum_r sum(x_r) / N                 N = sum_r count_r
    var  = sum_r sum((x_r - mean)^2) / N      centred before squaring: adder outputs are -4000 +- 37,
                                              and E[x^2] - mean^2 would cancel 1.6e7 - 1.6e7 in fp32
                                              (relative step 6e-8 * 1.6e7 ~ 1 of a variance ~1400)

Evaluation, and training on one process, take nn.BatchNorm2d's own path (bitwise the same as before).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from addernet_dist.ops.amp import _LOW, FP32BatchNorm2d, autocast_off, fp32_affine, swap_batchnorm_class


def _world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of the global batch."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world_size() > 1):
            return self._local(input)
        self._check_input_dim(input)
        x = input.float() if input.dtype in _LOW else input
        c = x.shape[1]
        with autocast_off(x.device.type):
            stats = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() // c)])
            stats = dist_nn.all_reduce(stats)  # SUM over ranks, differentiable
            n = stats[c]
            mean = stats[:c] / n
            xc = x - mean.view(1, c, 1, 1)
            var = dist_nn.all_reduce(xc.square().sum((0, 2, 3))) / n
            if self.track_running_stats and self.num_batches_tracked is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                    unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)
            y = xc * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
            if self.affine:
                y = y * fp32_affine(self.weight).view(1, c, 1, 1) + fp32_affine(self.bias).view(1, c, 1, 1)
        return y.to(input.dtype)

    def _local(self, input: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm2d's forward; with 16-bit affine parameters (DeepSpeed bf16 weights)
        FP32BatchNorm2d's, which upcasts them."""
        if self.weight is None or self.weight.dtype not in _LOW:
            return super().forward(input)
        return FP32BatchNorm2d.forward(self, input)


def convert_sync_bn(model: nn.Module) -> int:
    """Make every plain ``nn.BatchNorm2d`` of ``model`` a :class:`SyncBatchNorm2d` (a class swap:
    parameters, buffers and state_dict keys unchanged); returns how many. Call on the bare model
    before DDP / DeepSpeed wrap it, with Adder+BN fusion off (its epilogue statistics are per rank)."""
    return swap_batchnorm_class(model, SyncBatchNorm2d)
