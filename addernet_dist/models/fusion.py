"""Fused Adder2d + BatchNorm2d (+ ReLU, + residual) modules and the rewrite that installs them.

The graph-rewrite half of the fusion: ``FusedAdderBN2d`` (the module), the pair helpers each zoo
block's own ``fuse_adder_bn()`` method calls (``fuse_pair``, ``fuse_block_pairs``, ``fuse_sequential``),
``fuse_adder_bn(model)`` (the walk that calls those methods) and the state-dict key hooks. Which layers
pair up is the block's knowledge: models/resnet.py, vgg.py and lenet.py hold it, not this file. The kernels and the
autograd Function they call live in ``addernet_dist/kernels/fused.py``, ``kernels/triton_adder.py``
(launchers) and ``kernels/triton_kernels.py``; dependencies point one way: models -> nn -> ops -> kernels.

Off the fast path (CPU tensors without the interpreter, an Adder2d pinned to another backend, or
eval mode with autograd recording) the module computes exactly the unfused pair, so a fused model
is numerically the original model everywhere.

    from addernet_dist.models import create_model
    from addernet_dist.models.fusion import fuse_adder_bn

    model = create_model("resnet50")
    model = fuse_adder_bn(model)   # parameters shared, not copied; state_dict keys stay unfused
"""

from __future__ import annotations

import importlib
import sys
from functools import partial
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from addernet_dist.kernels import cpu_adder
from addernet_dist.nn import _NOT_TRACED, Adder2d
from addernet_dist.ops import amp, dispatch
from addernet_dist.ops.reference import check_conv_args


class _KernelModule:
    """A kernel module looked up at call time, not bound at import: ``@triton.jit`` decides at
    import whether kernels are compiled or interpreted, and the CPU tests swap in interpreted
    copies of the kernel modules (kernels/triton_testing.py); a bound reference would keep the
    compiled copy. The lookup is one dict access per call."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _module(self) -> ModuleType:
        return sys.modules.get(self._name) or importlib.import_module(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)


ta = _KernelModule("addernet_dist.kernels.triton_adder")
_kernels = _KernelModule("addernet_dist.kernels.fused")


def _cpu_inference(
    m: FusedAdderBN2d, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
) -> torch.Tensor:
    """Eval-mode forward on CPU: BN folded into the CPU kernel's epilogue with the residual and ReLU.
    x and weight are the operands after the dtype policy (fp32, or fp64)."""
    adder, bn = m.adder, m.bn
    gamma, beta = m._gamma_beta(x)
    invstd = torch.rsqrt(bn.running_var.to(x.dtype) + bn.eps)
    return cpu_adder.adder2d_forward_cpu(
        *(x, weight, adder.stride, adder.padding, adder.dilation, adder.p),
        scale=invstd * gamma.to(invstd.dtype),
        shift=beta,
        center=bn.running_mean,
        residual=residual,
        relu=m.relu,
    )


class FusedAdderBN2d(nn.Module):
    """``relu?(bn(adder(x)) [+ residual])`` with the adder layer's and the BN's own parameters and buffers.

    The wrapped ``adder`` (an ``Adder2d``) and ``bn`` (a ``BatchNorm2d``) stay sub-modules, so ``set_p``,
    the adaptive learning rate and the optimizer see the same parameters as before fusing. Built directly,
    its state_dict keys carry the ``adder.`` / ``bn.`` prefixes; ``fuse_adder_bn`` maps them back to the
    unfused model's keys. ``forward(x, residual=None)``: x (N, Cin, H, W) → (N, Cout, H', W');
    the residual (same shape as the output) is added after BN and before the ReLU, as in a ResNet block.
    """

    # Per-layer metrics name the wrapped adder layer by this module's name (nn.adder_layer_names).
    layer_alias = "adder"

    def __init__(self, adder: Adder2d, bn: nn.BatchNorm2d, relu: bool = False) -> None:
        super().__init__()
        if not isinstance(adder, Adder2d):
            raise TypeError(f"adder must be an Adder2d, got {type(adder).__name__}")
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"bn must be a BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != adder.out_channels:
            raise ValueError(
                f"bn has {bn.num_features} features but the adder layer has {adder.out_channels} "
                "output channels"
            )
        if adder.bias is not None:
            raise ValueError(
                "fusing an Adder2d with a bias is not supported (BN makes a bias redundant)"
            )
        self.adder = adder
        self.bn = bn
        self.relu = bool(relu)
        # Forces the unfused path (for A/B comparisons and debugging); not saved.
        self.use_fast_path = True
        # ∂L/∂F reduction order, as adder2d_triton: True = fixed-order partials (bitwise reproducible),
        # False = float atomics, None = follow torch.are_deterministic_algorithms_enabled().
        self.deterministic: bool | None = True

    def _fast_path_ok(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            self.use_fast_path
            and self.adder.backend in (None, "triton")
            and (x.is_cuda or ta._interpreting())
            and x.dtype == weight.dtype
        )

    def _cpu_inference_ok(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        # eval-mode BN, no autograd, the CPU fast path chosen for this call: the folded-BN CPU kernel
        bn = self.bn
        return (
            self.use_fast_path
            and x.device.type == "cpu"
            and not bn.training
            and bn.running_mean is not None
            and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and dispatch.resolve_backend(x.device, self.adder.backend) == "cpu"
        )

    def _unfused(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        y = self.bn(self.adder(x))
        if residual is not None:
            y = y + residual
        return F.relu(y) if self.relu else y

    def _gamma_beta(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        # fp32 even where DeepSpeed stores them in bf16 (the dtype policy, ops/amp.py)
        if bn.affine:
            return amp.fp32_affine(bn.weight), amp.fp32_affine(bn.bias)
        ones = torch.ones(bn.num_features, device=x.device, dtype=torch.float32)
        return ones, torch.zeros_like(ones)

    @_NOT_TRACED  # as Adder2d.forward: p must not become a Dynamo guard (addernet_dist/nn.py)
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # The adder ops' dtype policy (addernet_dist/ops/amp.py): x and the filters in fp32 (fp64),
        # the BN epilogue in fp32, an fp32 output, autocast off; identical to the unfused pair's.
        x, weight = amp.adder_operands(x, self.adder.weight)
        with amp.autocast_off(x.device.type):
            return self._forward(x, weight, residual)

    def _forward(
        self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        if not self._fast_path_ok(x, weight):
            if self._cpu_inference_ok(x, weight):
                return _cpu_inference(self, x, weight, residual)
            return self._unfused(x, residual)
        adder, bn = self.adder, self.bn
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()  # see adder2d_triton: ∂L/∂X is written with x's (dense) strides
        stride, padding, dilation, out_hw = check_conv_args(
            x, weight, adder.stride, adder.padding, adder.dilation
        )
        use_batch_stats = bn.training or bn.running_mean is None
        gamma, beta = self._gamma_beta(x)
        if use_batch_stats:
            out, mean, var = _kernels.AdderBNTrainFunction.apply(
                x,
                weight,
                gamma,
                beta,
                (stride, padding, dilation),
                adder.p,
                adder.grad_x,
                adder.grad_w,
                bn.eps,
                ta.resolve_deterministic(self.deterministic),
                out_hw,
            )
            if bn.training and bn.track_running_stats:
                self._update_running_stats(mean, var, out.numel() // out.shape[1])
            if residual is not None:
                out = out + residual
            return F.relu(out) if self.relu else out
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            # Eval-mode statistics with autograd recording (e.g. fine-tuning with frozen BN): the
            # inference kernel has no backward, the unfused pair does.
            return self._unfused(x, residual)
        invstd = torch.rsqrt(bn.running_var.float() + bn.eps)
        y, _ = ta.adder2d_forward(
            x,
            weight,
            stride,
            padding,
            dilation,
            adder.p,
            out_hw,
            scale=invstd * gamma.float(),
            shift=beta.float(),
            center=bn.running_mean.float(),
            residual=residual,
            relu=self.relu,
        )
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / float(bn.num_batches_tracked)
        else:
            factor = bn.momentum
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _save_unfused(bn_key: str, module, state_dict, prefix, local_metadata) -> None:
    bn_prefix = prefix[: prefix.rstrip(".").rfind(".") + 1] + f"{bn_key}."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith("adder."):
            state_dict[prefix + rest[len("adder.") :]] = state_dict.pop(key)
        elif rest.startswith("bn."):
            state_dict[bn_prefix + rest[len("bn.") :]] = state_dict.pop(key)


def _load_unfused(conv_key: str, bn_key: str, module, state_dict, prefix, *args) -> None:
    conv, bn = f"{prefix}{conv_key}.", f"{prefix}{bn_key}."
    for key in [k for k in state_dict if k.startswith(bn)]:
        state_dict[f"{conv}bn.{key[len(bn) :]}"] = state_dict.pop(key)
    for key in [k for k in state_dict if k.startswith(conv)]:
        rest = key[len(conv) :]
        if not rest.startswith(("adder.", "bn.")):  # an unfused key of the adder layer
            state_dict[f"{conv}adder.{rest}"] = state_dict.pop(key)


def _keep_unfused_keys(parent: nn.Module, conv_key: str, bn_key: str) -> None:
    """Make ``parent.<conv_key>`` (a FusedAdderBN2d that replaced the adder layer there, the BN having
    been at ``parent.<bn_key>``) save and load under the unfused keys: ``<conv_key>.weight``,
    ``<bn_key>.running_mean``... instead of ``<conv_key>.adder.weight``, ``<conv_key>.bn.running_mean``.

    Saving renames in a post-hook of the fused module (it writes into the shared destination dict).
    Loading renames in a pre-hook of the PARENT: each module's pre-hooks only see the keys under its
    own prefix, and only the parent sees both the adder's and the BN's. The hooks are partials of
    module-level functions, so a fused model still deep-copies and pickles (``torch.save(model)``).
    """
    parent._modules[conv_key].register_state_dict_post_hook(partial(_save_unfused, bn_key))
    parent.register_load_state_dict_pre_hook(partial(_load_unfused, conv_key, bn_key))


def _is_fusable(adder: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(adder, Adder2d)
        and adder.bias is None
        and type(bn) is nn.BatchNorm2d
        and bn.num_features == adder.out_channels
    )


def fuse_pair(parent: nn.Module, conv_key: str, bn_key: str, relu: bool = False) -> FusedAdderBN2d | None:
    """Replace ``parent.<conv_key>`` (an Adder2d) and ``parent.<bn_key>`` (its BatchNorm2d) by one
    ``FusedAdderBN2d`` at ``<conv_key>``, the BN slot becoming ``nn.Identity``; the state_dict keeps
    the unfused keys. A zoo block names its own pairs and calls this from its ``fuse_adder_bn()``.
    Returns the fused module, or None when the pair is not fusable (a CNN twin's Conv2d, an adder
    layer with a bias, a pair fused already)."""
    adder, bn = parent._modules[conv_key], parent._modules[bn_key]
    if not _is_fusable(adder, bn):
        return None
    fused = FusedAdderBN2d(adder, bn, relu=relu)
    parent._modules[conv_key] = fused
    _keep_unfused_keys(parent, conv_key, bn_key)
    parent._modules[bn_key] = nn.Identity()
    return fused


def fuse_block_pairs(block: nn.Module, *pairs: tuple[str, str]) -> list[FusedAdderBN2d] | None:
    """``fuse_pair`` for each ``(conv_key, bn_key)`` of a block; the block's fused convolutions when
    every pair's convolution is one now (a block may then move its ReLUs and residual add into their
    epilogues), else None (e.g. a CNN twin, or an adder layer that could not be fused)."""
    for conv_key, bn_key in pairs:
        fuse_pair(block, conv_key, bn_key)
    convs = [block._modules[conv_key] for conv_key, _ in pairs]
    return convs if all(isinstance(c, FusedAdderBN2d) for c in convs) else None


def fuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    """Fuse consecutive ``Adder2d → BatchNorm2d`` entries of ``seq`` (VGG and LeNet features, the ResNet
    downsample), with a directly following ``nn.ReLU`` fused too; the BN and ReLU slots become
    ``nn.Identity``. In place; returns ``seq``."""
    keys = list(seq._modules.keys())
    i = 0
    while i + 1 < len(keys):
        if _is_fusable(seq._modules[keys[i]], seq._modules[keys[i + 1]]):
            relu = i + 2 < len(keys) and type(seq._modules[keys[i + 2]]) is nn.ReLU
            fuse_pair(seq, keys[i], keys[i + 1], relu=relu)
            if relu:
                seq._modules[keys[i + 2]] = nn.Identity()
            i += 3 if relu else 2
        else:
            i += 1
    return seq


def fuse_adder_bn(model: nn.Module) -> nn.Module:
    """Replace Adder2d → BatchNorm2d (→ ReLU) pairs by ``FusedAdderBN2d``, in place; returns ``model``.

    A walk, as timm's ``reparameterize_model``: every module with its own ``fuse_adder_bn()`` method
    (the zoo's blocks and models: models/resnet.py ``BasicBlock``/``Bottleneck``/``ResNet`` stem,
    models/vgg.py, models/lenet.py) fuses the pairs it knows it has; a plain ``nn.Sequential`` without
    one fuses its consecutive pairs (``fuse_sequential``). The zoo's ResNet blocks also move their
    ReLUs and residual add into the fused layers' epilogues. The BN (and fused ReLU) slots become
    ``nn.Identity``. Parameters are shared, so an optimizer built before fusing keeps working, and
    ``state_dict`` / ``load_state_dict`` keep the unfused model's keys (``conv1.weight``,
    ``bn1.running_mean``), so a checkpoint loads into a fused or an unfused model alike. Fusing
    twice changes nothing. Returns the model.
    """
    for module in list(model.modules()):  # parents before children, as fused modules appear
        method = getattr(type(module), "fuse_adder_bn", None)
        if method is not None:
            method(module)
        elif isinstance(module, nn.Sequential):
            fuse_sequential(module)
    return model
