"""Model preparation shared by both engines: everything between "a model from the registry" and
"a model an engine wraps", written once so that ``engine: ddp`` and ``engine: deepspeed`` cannot drift.

``prepare_model`` runs, in this order (the order matters, see the comments):

1. device and memory format (``train.channels_last``);
2. ``train.sync_bn``: BatchNorm2d -> SyncBatchNorm2d (global-batch statistics);
3. the Adder2d+BN fusion decision (``adder.fuse_bn``; never with sync_bn, whose statistics the
   fused epilogue would compute per rank);
4. the autocast dtype of every forward (``train.precision``; DeepSpeed's bf16 weights force bf16);
5. the eq. 33 ``AdaptiveLRScaler`` on the BARE module's adder weights (the "local" scope's tensor
   hooks must be registered before a DDP reducer or DeepSpeed's reduction hooks);
6. bf16 weights only: BatchNorm2d -> FP32BatchNorm2d (statistics of -4000 ± 37 stay fp32);
7. the optimizer (optim.py) over the bare module's parameters;
8. the fp16 GradScaler decision (``device_policy.grad_scaling``).

``PreparedEngine`` is the construction both engines share around it (``__init__``: ``_configure``,
``prepare_model``, ``_wrap``). The engines keep what differs: wrapping (DDP / compile,
``deepspeed.initialize``), stepping and save/load. The LR schedule is built by
``PreparedModel.build_lr_scheduler`` on the optimizer the engine steps (DeepSpeed's, after
``deepspeed.initialize`` has re-grouped its parameters).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from addernet_dist import device_policy
from addernet_dist.adaptive_lr import AdaptiveLRScaler
from addernet_dist.config import Config
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.base import Engine, maybe_fuse_adder_bn, resolve_autocast_dtype
from addernet_dist.nn import adder_modules
from addernet_dist.ops.amp import keep_batchnorm_fp32
from addernet_dist.optim import build_lr_scheduler, build_optimizer
from addernet_dist.sync_bn import convert_sync_bn

if TYPE_CHECKING:
    from addernet_dist.loss import Criterion


@dataclass
class PreparedModel:
    """The bare model and the per-run objects built around it (see ``prepare_model``).

    module: the bare model on the run's device (converted / fused in place; never wrapped).
    sync_bn_layers: how many BatchNorm2d became SyncBatchNorm2d (0 without train.sync_bn).
    fused_adder_bn: how many Adder2d+BatchNorm2d pairs were fused (0: none).
    autocast_dtype: the autocast dtype of every forward of the run, None for fp32.
    adders: the adder layers of ``module`` in order (``nn.adder_modules``).
    adaptive: the eq. 33 scaler, None when adder.adaptive_lr is off or the model has no adder layer.
    optimizer: the torch optimizer over ``module``'s parameters (optim.build_optimizer).
    grad_scaler: the fp16 loss scaler (train.precision=fp16), None otherwise.
    """

    module: nn.Module
    sync_bn_layers: int
    fused_adder_bn: int
    autocast_dtype: torch.dtype | None
    adders: list[nn.Module]
    adaptive: AdaptiveLRScaler | None
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler | None
    cfg: Config
    steps_per_epoch: int

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The per-iteration LR schedule (optim.build_lr_scheduler) on ``optimizer``: ``self.optimizer``
        for DDP, DeepSpeed's ``basic_optimizer`` (the same object, its groups re-built by ZeRO)."""
        return build_lr_scheduler(
            optimizer, self.cfg.optim, steps_per_epoch=self.steps_per_epoch, epochs=self.cfg.train.epochs
        )


def prepare_model(
    model: nn.Module,
    cfg: Config,
    device: torch.device,
    *,
    steps_per_epoch: int,
    bf16_weights: bool = False,
) -> PreparedModel:
    """Steps 1-8 of the module docstring on ``model`` (modified in place) for ``device``.

    bf16_weights: the engine will store the weights in bf16 (``deepspeed.precision=bf16``): the
    autocast dtype is bf16 on any device (it then only casts the fp32 images at the first layer, and
    the trainer's eval feeds the bf16 model the same way) and BatchNorm computes in fp32.
    """
    memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    model = model.to(device=device, memory_format=memory_format)
    # train.sync_bn before keep_batchnorm_fp32, which leaves SyncBatchNorm2d alone (it upcasts 16-bit
    # affine parameters itself); no fusion then (the fused epilogue's statistics are per rank)
    sync_bn_layers = convert_sync_bn(model) if cfg.train.sync_bn else 0
    fused = maybe_fuse_adder_bn(model, False if cfg.train.sync_bn else cfg.adder.fuse_bn, device)
    if bf16_weights:
        autocast_dtype: torch.dtype | None = torch.bfloat16
    else:
        autocast_dtype = resolve_autocast_dtype(cfg.train.precision, device)
    adders = adder_modules(model)
    # On the bare module BEFORE any wrapper: the "local" scope registers tensor hooks on the adder
    # weights, which run before DDP's reducer and DeepSpeed's post-accumulate reduction hooks.
    adaptive = (
        AdaptiveLRScaler(adders, cfg.adder.eta, cfg.adder.adaptive_scope)
        if cfg.adder.adaptive_lr and adders
        else None
    )
    if bf16_weights:
        keep_batchnorm_fp32(model)
    optimizer = build_optimizer(model, cfg.optim)
    # fp16: loss scaling. The initial scale 2^16 and halving on overflow are torch's defaults; the
    # adder layers return fp32 (ops/amp.py), so only the stem/classifier backward is fp16.
    grad_scaler = torch.amp.GradScaler(device.type) if device_policy.grad_scaling(cfg.train.precision) else None
    return PreparedModel(
        module=model,
        sync_bn_layers=sync_bn_layers,
        fused_adder_bn=fused,
        autocast_dtype=autocast_dtype,
        adders=adders,
        adaptive=adaptive,
        optimizer=optimizer,
        grad_scaler=grad_scaler,
        cfg=cfg,
        steps_per_epoch=steps_per_epoch,
    )


class PreparedEngine(Engine):
    """The construction both engines share: ``_configure`` (engine-specific checks before the model is
    touched), ``prepare_model`` on the bare model, the attributes it sets, then ``_wrap`` (wrapper,
    optimizer, LR schedule, loss) on what it prepared. Adds to ``Engine``'s attributes: cfg,
    sync_bn_layers, adaptive (the eq. 33 scaler or None), criterion (loss.Criterion)."""

    cfg: Config
    sync_bn_layers: int
    adaptive: AdaptiveLRScaler | None
    criterion: Criterion

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        dist: DistInfo,
        *,
        steps_per_epoch: int,
        teacher: nn.Module | None = None,
    ) -> None:
        self.dist = dist
        self.device = dist.device
        self.cfg = cfg
        bf16_weights = self._configure()
        prep = prepare_model(model, cfg, self.device, steps_per_epoch=steps_per_epoch, bf16_weights=bf16_weights)
        self._module = prep.module
        self.sync_bn_layers, self.fused_adder_bn = prep.sync_bn_layers, prep.fused_adder_bn
        self.autocast_dtype, self.adaptive, self.grad_scaler = prep.autocast_dtype, prep.adaptive, prep.grad_scaler
        self.loss_parts = {}
        self._wrap(prep, teacher, steps_per_epoch=steps_per_epoch)

    def _configure(self) -> bool:
        """Engine-specific checks and setup before ``prepare_model`` touches the model (``self.cfg``,
        ``self.dist`` are set). Returns whether the engine stores the weights in bf16
        (``prepare_model``'s ``bf16_weights``)."""
        return False

    @abstractmethod
    def _wrap(self, prep: PreparedModel, teacher: nn.Module | None, *, steps_per_epoch: int) -> None:
        """After ``prepare_model``: set ``criterion``, ``model`` (the wrapped module), ``optimizer`` and
        ``lr_scheduler`` from ``prep`` (the bare module is ``prep.module``)."""

    def unwrap(self) -> nn.Module:
        return self._module
