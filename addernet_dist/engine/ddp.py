"""The DDP engine: plain PyTorch DistributedDataParallel (or a bare module on one process).

Order of wrapping (fixed, torchtitan-style): prepare (engine/prepare.py: device + memory format,
sync_bn, fusion, eq. 33 scaler, optimizer) -> DDP -> compile.
Compiling the DDP module lets Dynamo's DDPOptimizer split graphs at bucket boundaries so the
all-reduce still overlaps backward.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from addernet_dist.distill import CoTrainedTeacher
from addernet_dist.engine.base import StepStats
from addernet_dist.engine.prepare import PreparedEngine, PreparedModel
from addernet_dist.loss import Criterion


class DDPEngine(PreparedEngine):
    def _wrap(self, prep: PreparedModel, teacher: nn.Module | None, *, steps_per_epoch: int) -> None:
        cfg, dist, model = self.cfg, self.dist, prep.module
        # The loss of both engines (loss.py); a frozen teacher stays outside DDP and the optimizer,
        # a co-trained one (distill.co_train) has its own DDP wrapper, optimizer and LR schedule.
        self.co_teacher = (
            CoTrainedTeacher(teacher, cfg, dist, steps_per_epoch=steps_per_epoch)
            if teacher is not None and cfg.distill.co_train
            else None
        )
        criterion_teacher = self.co_teacher.wrapped if self.co_teacher is not None else teacher
        self.criterion = Criterion.from_config(cfg, self.autocast_dtype, criterion_teacher)

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

        self.optimizer = prep.optimizer
        self.lr_scheduler = prep.build_lr_scheduler(self.optimizer)
        self._params = [p for p in model.parameters() if p.requires_grad]

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, self.loss_parts = self.criterion(self.model, images, labels)
        # DDP all-reduces (averages) the grads during backward; fp16: of the scaled loss
        (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()
        return loss.detach()

    def step(self, want_grad_norm: bool = False) -> StepStats:
        stats = StepStats()
        if self.grad_scaler is not None:
            # fp16: unscale FIRST. eq. 33's alpha_l = eta * sqrt(k) / ||grad F_l|| and the clip norm
            # must see the true gradient; on scaled grads alpha would absorb the scale (unscale then
            # divides the update by it, 2^16 at the start) and the clip would act 2^16x too early.
            stats.loss_scale, stats.scaler_skip = unscale_(self.grad_scaler, self.optimizer)
        if self.adaptive is not None:
            stats.adder_grad_norms, stats.adder_alphas = self.adaptive.scale_()
        if self.cfg.train.grad_clip is not None:
            stats.grad_norm = torch.nn.utils.clip_grad_norm_(
                self._params, self.cfg.train.grad_clip, foreach=True
            )
        elif want_grad_norm:  # the same norm clip_grad_norm_ takes, without clipping (a device tensor)
            grads = [p.grad for p in self._params if p.grad is not None]
            stats.grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            # On an inf/NaN gradient: no optimizer.step (weights, momentum / Adam moments and Adam's
            # step count untouched) and the scale halves. The LR scheduler (and the trainer's
            # global_step, p schedule and loader) still advance: the batch is consumed either way.
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.co_teacher is not None:
            self.co_teacher.step()
        return stats

    def train(self) -> None:
        self.model.train()
        if self.co_teacher is not None:
            self.co_teacher.module.train()

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self._module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        if self.co_teacher is not None:
            state["teacher"] = self.co_teacher.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.co_teacher is not None:
            if "teacher" not in state:
                raise ValueError(
                    "the checkpoint holds no co-trained teacher (it was written without "
                    "distill.co_train=true); resume it with distill.co_train=false"
                )
            self.co_teacher.load_state_dict(state["teacher"])
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # Position from the checkpoint, schedule shape (total steps, warmup) from this run's config,
        # like the p schedule: resuming with more train.epochs stretches the remaining decay.
        # LambdaLR.load_state_dict overwrites its LRLambda objects' fields in place, hence copies.
        shape = [copy.copy(fn) for fn in self.lr_scheduler.lr_lambdas]
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.lr_scheduler.lr_lambdas = shape


def unscale_(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``scaler.unscale_(optimizer)``; returns (the scale the backward used, whether the step will be
    skipped for an overflow at a scale > 1) as device tensors (no host sync). At a scale <= 1 an
    inf/NaN gradient is no artefact of loss scaling, so NonFiniteGuard counts that step."""
    scale = scaler._get_scale_async().detach().clone()  # update() changes it in place
    scaler.unscale_(optimizer)
    found = torch.stack([f.to(scale.device) for f in scaler._found_inf_per_device(optimizer).values()]).sum()
    return scale, (found > 0) & (scale > 1.0)
