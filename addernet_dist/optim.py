"""Optimizer, per-iteration LR schedules and the lp (p: 2 -> 1) schedule.

All schedules are pure functions of the global iteration ``step`` (0-based, the number of
optimizer steps already taken), so resuming needs nothing but the step counter and the result is
identical whatever the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from addernet_dist.config import AdderConfig, OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``optim.name``: "sgd" (default) or "adamw".

    sgd: SGD with Nesterov momentum and weight decay on every parameter (paper §5.2-5.4, NAG). Weight
    decay also applies to adder filters and BN parameters, as in the paper's code: the adaptive LR
    (eq. 33) rescales only the loss gradient, SGD adds ``wd * F`` afterwards.

    adamw: torch AdamW in two param groups (timm's habit): weight decay on the >= 2-d weights (conv,
    adder, linear), none on 1-d parameters (BN weight/bias, biases): decoupled decay pulls a BN scale
    towards 0, which no data term asks for. eq. 33 still scales the adder gradients before the step
    (the engines' contract), but Adam normalises every element by its own running RMS, so the constant
    eta * sqrt(k) cancels and only the per-step 1/||grad F_l|| weighting of the moments remains
    (docs/training.md, Recipes; tests/integration/test_recipe_adamw.py checks the cancellation).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.name == "adamw":
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps
        )
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


@dataclass
class LRLambda:
    """Multiplier of the base LR at iteration ``step`` (picklable, so LambdaLR state_dict works).

    kind: "cosine": warmup then ``min + (1 - min) * (1 + cos(pi * t)) / 2``;
          "poly": warmup then ``(1 - t) ** power``; "constant": warmup then 1.
    t = (step - warmup_steps) / (total_steps - warmup_steps) in [0, 1].
    Warmup rises linearly from ``warmup_start_factor`` to 1 over ``warmup_steps``.
    """

    kind: str
    total_steps: int
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    min_factor: float = 0.0
    power: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_factor + (1.0 - self.warmup_start_factor) * frac
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "poly":
            return (1.0 - t) ** self.power
        if self.kind == "constant":
            return 1.0
        raise ValueError(f"unknown LR schedule {self.kind!r}; use cosine, poly or constant")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per ITERATION (``total = epochs * steps_per_epoch``)."""
    total = epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= total and total > 0:
        raise ValueError(
            f"optim.warmup_epochs={cfg.warmup_epochs} covers the whole run ({epochs} epochs); "
            "set it below train.epochs"
        )
    fn = LRLambda(
        kind=cfg.schedule,
        total_steps=total,
        warmup_steps=warmup,
        warmup_start_factor=cfg.warmup_start_factor,
        min_factor=cfg.min_lr / cfg.lr,
        power=cfg.poly_power,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def set_schedule_step(sched: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Move a LambdaLR to ``step`` and set its optimizer's lr to the schedule's value there."""
    sched.last_epoch = step
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


class PSchedule:
    """The lp -> l1 schedule (§4.2, Table 6): p falls linearly from ``p_start`` at step 0 to
    ``p_end`` at ``decay_steps``, then stays at ``p_end``. ``enabled=False`` pins p to p_end
    (the Table 4 "without lp" ablation).

    A pure function of the optimizer step: the run's position is ``TrainState.global_step`` alone
    (the trainer asks ``value(step)``; the layers only hold the p it set)."""

    def __init__(
        self, p_start: float, p_end: float, decay_steps: int, enabled: bool = True
    ) -> None:
        if p_end > p_start:
            raise ValueError(f"p_end={p_end} must be <= p_start={p_start}")
        self.p_start, self.p_end = float(p_start), float(p_end)
        self.decay_steps = int(decay_steps)
        self.enabled = enabled

    @classmethod
    def from_config(cls, cfg: AdderConfig, *, decay_epochs: float, steps_per_epoch: int):
        return cls(cfg.p_start, cfg.p_end, round(decay_epochs * steps_per_epoch), cfg.p_schedule)

    def value(self, step: int) -> float:
        if not self.enabled or step >= self.decay_steps:
            return self.p_end
        return self.p_start + (self.p_end - self.p_start) * (step / self.decay_steps)

    def state_dict(self) -> dict[str, Any]:
        """The schedule's shape, for the record (its position is the trainer's global_step)."""
        return {
            "p_start": self.p_start,
            "p_end": self.p_end,
            "decay_steps": self.decay_steps,
            "enabled": self.enabled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the shape comes from the (possibly edited) config, so extending
        train.epochs on resume changes the remaining decay as asked, and the position is the
        restored global_step. Accepts every checkpoint's p_schedule state (older ones hold a
        "step", the same number as train_state's global_step)."""
