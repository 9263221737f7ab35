"""Fused Adder2d + BatchNorm2d training: the autograd Function the fused module calls.

The module (``FusedAdderBN2d``) and the graph rewrite that installs it (``fuse_adder_bn``) live in
``addernet_dist/models/fusion.py``: kernels hold kernels and their autograd Functions and import
nothing from the model zoo or the layers.

Training: one forward kernel writes y and, from its registers, the per-channel batch statistics (BN never
re-reads y for them); normalisation is one elementwise pass; the backward is BN's own backward
(``aten.native_batch_norm_backward``, the exact op ``nn.BatchNorm2d`` uses) followed by the adder ∂X/∂F
kernels. Inference: the BN folds to (y − running_mean)·γ/√(var+ε) + β, applied in the forward kernel's
epilogue together with an optional residual add and ReLU — one kernel, one write.
"""

from __future__ import annotations

import torch

from addernet_dist.kernels import triton_adder as ta


class _AdderBNTrainFunction(torch.autograd.Function):
    """(x, w, γ, β) → BN_batch(adder2d(x, w)); also returns the batch (mean, biased var), not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, gamma, beta, conv, p, grad_x, grad_w, eps, deterministic, out_hw):
        stride, padding, dilation = conv
        y, (mean, var) = ta.adder2d_forward(
            x, weight, stride, padding, dilation, p, out_hw, bn_stats=True
        )
        invstd = torch.rsqrt(var + eps)
        # Same association as aten's batch_norm: (y − mean)·invstd·γ + β (never y·s + t: see the kernel).
        a = (invstd * gamma.float())[None, :, None, None]
        out = ((y.float() - mean[None, :, None, None]) * a + beta.float()[None, :, None, None]).to(
            x.dtype
        )
        ctx.save_for_backward(x, weight, y, gamma, mean, invstd)
        ctx.conf = (conv, p, grad_x, grad_w, eps, deterministic)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, g_out, _g_mean, _g_var):
        x, weight, y, gamma, mean, invstd = ctx.saved_tensors
        (stride, padding, dilation), p, grad_x, grad_w, eps, deterministic = ctx.conf
        need_x, need_w, need_g, need_b = ctx.needs_input_grad[:4]
        g_y, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
            g_out.contiguous(memory_format=_memory_format(y)),
            y,
            gamma,
            None,
            None,
            mean,
            invstd,
            True,
            eps,
            [need_x or need_w, need_g, need_b],
        )
        dx = dw = None
        if need_x:
            dx = ta.adder2d_grad_input(g_y, x, weight, stride, padding, dilation, p, grad_x)
        if need_w:
            dw = ta.adder2d_grad_weight(
                g_y, x, weight, stride, padding, dilation, grad_w, deterministic
            )
        g_gamma = g_gamma if need_g else None
        g_beta = g_beta if need_b else None
        return dx, dw, g_gamma, g_beta, None, None, None, None, None, None, None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# The public name models/fusion.py calls.
AdderBNTrainFunction = _AdderBNTrainFunction
