"""The DDP engine: plain PyTorch DistributedDataParallel (or a bare module on one process).

Order of wrapping (fixed, torchtitan-style): move to device + memory format -> DDP -> compile.
Compiling the DDP module lets Dynamo's DDPOptimizer split graphs at bucket boundaries so the
all-reduce still overlaps backward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from addernet_dist.adaptive_lr import AdaptiveLRScaler
from addernet_dist.config import Config
from addernet_dist.device_policy import autocast
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.base import (
    Engine,
    StepStats,
    maybe_fuse_adder_bn,
    resolve_autocast_dtype,
)
from addernet_dist.metrics import upcast_logits
from addernet_dist.nn import adder_modules
from addernet_dist.optim import build_lr_scheduler, build_optimizer


class DDPEngine(Engine):
    def __init__(
        self, model: nn.Module, cfg: Config, dist: DistInfo, *, steps_per_epoch: int
    ) -> None:
        self.dist = dist
        self.device = dist.device
        self.cfg = cfg
        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        model = model.to(device=self.device, memory_format=memory_format)
        self.fused_adder_bn = maybe_fuse_adder_bn(model, cfg.adder.fuse_bn, self.device)
        self._module = model
        self.autocast_dtype = resolve_autocast_dtype(cfg.train.bf16, self.device)

        # Built on the bare module BEFORE wrapping: the "local" scope registers gradient hooks
        # that must run before DDP's reducer, and the parameters are the ones DDP reduces.
        adders = adder_modules(model)
        self.adaptive = (
            AdaptiveLRScaler(adders, cfg.adder.eta, cfg.adder.adaptive_scope)
            if cfg.adder.adaptive_lr and adders
            else None
        )

        wrapped: nn.Module = model
        if dist.world_size > 1:
            wrapped = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Every parameter is used every step; False skips a graph traversal per step.
                find_unused_parameters=False,
            )
        if cfg.train.compile:
            wrapped = torch.compile(wrapped)
        self.model = wrapped

        self.optimizer = build_optimizer(model, cfg.optim)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs
        )
        self._params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device.type, self.autocast_dtype):
            logits = self.model(images)
        # CE in (at least) fp32 whatever the autocast dtype: the log-softmax of 1000 bf16 logits
        # loses ~3 significant digits of the loss.
        loss = F.cross_entropy(upcast_logits(logits), labels)
        loss.backward()  # DDP all-reduces (averages) the grads during backward
        return loss.detach()

    def step(self, want_grad_norm: bool = False) -> StepStats:
        stats = StepStats()
        if self.adaptive is not None:
            stats.adder_grad_norms, stats.adder_alphas = self.adaptive.scale_()
        if self.cfg.train.grad_clip is not None:
            stats.grad_norm = torch.nn.utils.clip_grad_norm_(
                self._params, self.cfg.train.grad_clip, foreach=True
            )
        elif want_grad_norm:  # the same norm clip_grad_norm_ takes, without clipping (a device tensor)
            grads = [p.grad for p in self._params if p.grad is not None]
            stats.grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def unwrap(self) -> nn.Module:
        return self._module

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # Position from the checkpoint, schedule shape (total steps, warmup) from this run's config,
        # like the p schedule: resuming with more train.epochs stretches the remaining decay.
        # LambdaLR.load_state_dict overwrites its LRLambda objects' fields in place, hence copies.
        shape = [copy.copy(fn) for fn in self.lr_scheduler.lr_lambdas]
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.lr_scheduler.lr_lambdas = shape
