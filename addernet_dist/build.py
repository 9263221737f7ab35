"""Building a run's components from its config: ``build_components`` is what ``Trainer.from_config``
hands to the trainer; addernet-eval, addernet-warmup and the benchmarks use the single builders.
(The metrics logger, progress display and stall watchdog are built here without side effects and
start at the resumed step: open_run.py.)"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from addernet_dist.checkpoint import Checkpointer
from addernet_dist.config import Config, ConfigError
from addernet_dist.data import build_loader
from addernet_dist.distill import build_teacher
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.base import Engine, check_adder_backend
from addernet_dist.evaluator import RECALIBRATION_SEED_OFFSET, BNRecalibrator, Evaluator
from addernet_dist.guard import StallWatchdog
from addernet_dist.interop import init_from_config
from addernet_dist.logging_utils import MetricsLogger, Progress, wandb_online_problem
from addernet_dist.models import create_model
from addernet_dist.models.registry import check_input_size
from addernet_dist.nn import adder_modules, set_grad_modes
from addernet_dist.optim import PSchedule

log = logging.getLogger("addernet_dist")


def adder_backend_arg(cfg: Config) -> str | None:
    """``adder.backend`` as the adder layers' ``backend=`` argument (None = by device, for "auto")."""
    return None if cfg.adder.backend == "auto" else cfg.adder.backend


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_kwargs(cfg: Config, dist: DistInfo, seed: int | None = None) -> dict[str, Any]:
    """``build_loader``'s keyword arguments for this rank (per-rank batch, shard, device)."""
    if cfg.train.global_batch_size % dist.world_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"WORLD_SIZE={dist.world_size}; choose a multiple of the number of processes"
        )
    return dict(
        batch_size=cfg.train.global_batch_size // dist.world_size,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.train.seed if seed is None else seed,
        device=dist.device,
        channels_last=cfg.train.channels_last,
    )


def build_split(cfg: Config, dist: DistInfo, split: str, seed: int | None = None):
    """One split's loader for this rank; the data layer's errors become user errors."""
    try:
        return build_loader(cfg.data, split, **loader_kwargs(cfg, dist, seed))
    except (OSError, ValueError) as e:
        # The data layer's errors name the path and the expected layout (missing folders, a val
        # image absent from the ground truth, a half-written digits root): make them user errors.
        raise ConfigError(f"data: {e}") from e


def build_data(cfg: Config, dist: DistInfo):
    train, val = build_split(cfg, dist, "train"), build_split(cfg, dist, "val")
    if len(train) == 0:
        raise ConfigError("the training split yields no batches; lower train.global_batch_size")
    n_train = getattr(getattr(train, "sampler", None), "num_samples", None)
    if n_train is not None and cfg.train.global_batch_size > n_train:
        # Every step would repeat samples within its batch (docs/data.md: at most W*B-1
        # duplicates per epoch holds, but they would all sit in one global batch). The fix must
        # also split over the ranks: 1 sample on 2 ranks has no valid batch size at all.
        w = dist.world_size
        fix = (
            f"set train.global_batch_size to at most {n_train}"
            if w == 1
            else f"set train.global_batch_size to a multiple of WORLD_SIZE={w} of at most "
            f"{n_train} (largest: {n_train // w * w})"
            if n_train >= w
            else f"no batch size splits it over WORLD_SIZE={w} ranks; run at most {n_train} "
            "process(es) or use more data"
        )
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is larger than the training "
            f"set ({n_train} samples): every batch would repeat samples; {fix}"
        )
    return train, val


def build_recalibrator(cfg: Config, dist: DistInfo) -> BNRecalibrator:
    """BN recalibration (train.bn_recalibration_batches) over a training loader of its own, shuffled
    with a seed no training epoch uses; built on first use only."""
    seed = cfg.train.seed + RECALIBRATION_SEED_OFFSET
    return BNRecalibrator(
        cfg.train.bn_recalibration_batches,
        lambda: build_loader(cfg.data, "train", **loader_kwargs(cfg, dist, seed)),
    )


def recalibrate_bn(cfg: Config, dist: DistInfo, model, epoch: int, autocast_dtype) -> int:
    """One recalibration as the trainer does it at the end of ``epoch`` (tests redo it)."""
    return build_recalibrator(cfg, dist)(model, dist, epoch, autocast_dtype)


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    try:
        check_input_size(cfg.model.name, cfg.data.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kw = cfg.model.create_kwargs()
    if cfg.model.conv == "adder":
        # The layers carry adder.backend themselves (nn.Adder2d/AdderLinear backend=), so the model
        # computes with the config's backend whatever dispatch's process-wide default says.
        kw = {"backend": adder_backend_arg(cfg), **kw}
    model = create_model(cfg.model.name, conv=cfg.model.conv, num_classes=cfg.model.num_classes or num_classes, **kw)
    set_grad_modes(
        model,
        grad_x=cfg.adder.grad_x,
        grad_w="full" if cfg.adder.full_precision_grad else "sign",
    )
    return model


def build_engine(
    cfg: Config,
    model: torch.nn.Module,
    dist: DistInfo,
    steps: int,
    teacher: torch.nn.Module | None = None,
) -> Engine:
    if cfg.engine == "ddp":
        from addernet_dist.engine.ddp import DDPEngine

        return DDPEngine(model, cfg, dist, steps_per_epoch=steps, teacher=teacher)
    if cfg.engine == "deepspeed":
        from addernet_dist.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, dist, steps_per_epoch=steps, teacher=teacher)
    raise ConfigError(f"engine={cfg.engine!r}; use ddp or deepspeed")


def final_p(model: torch.nn.Module, p_sched: PSchedule, total_steps: int) -> float | None:
    """The p the run ends with (None for a model without adder layers)."""
    return p_sched.value(total_steps - 1) if adder_modules(model) else None


def build_run_log(cfg: Config, dist: DistInfo, total_steps: int) -> dict[str, Any]:
    """The run's metrics logger, progress display and stall watchdog, not started: no file, no W&B
    run, no thread until open_run starts them at the resumed step."""
    train = cfg.train
    return dict(
        logger=MetricsLogger(cfg, enabled=dist.is_main, total_steps=total_steps),
        progress=Progress(enabled=dist.is_main, mode=train.progress_bar, total=total_steps),
        # Names a stalled peer instead of waiting for the 30-min process-group timeout (guard.py).
        watchdog=StallWatchdog(
            dist,
            timeout_s=train.stall_timeout_s,
            startup_timeout_s=train.stall_timeout_startup_s,
            startup_steps=train.stall_startup_steps,
        ),
    )


def build_components(cfg: Config, dist: DistInfo) -> dict[str, Any]:
    """Every component of ``cfg``'s run: ``Trainer``'s keyword arguments (engine, train_loader,
    p_sched, evaluator, ckpt, logger, progress, watchdog). Validates the config, the data and W&B;
    writes nothing into the run folder (the logger, progress and watchdog start in open_run)."""
    # First: before anything is built or written (rank 0 logs to W&B: its environment decides).
    wandb_problem = dist.broadcast_object(wandb_online_problem(cfg.wandb) if dist.is_main else None)
    if wandb_problem is not None:
        raise ConfigError(wandb_problem)
    # Same seed on every rank for the model init (DDP also broadcasts rank 0's weights).
    seed_everything(cfg.train.seed)
    check_adder_backend(cfg.adder.backend, dist.device)  # build_model gives it to the adder layers
    train_loader, val_loader = build_data(cfg, dist)
    model = build_model(cfg, train_loader.num_classes)
    if cfg.train.init_from:  # weights only, before the engine wraps (DDP broadcast, DS masters)
        loaded, kept = init_from_config(model, cfg)
        log.info(
            "init_from %s: %d tensors loaded, kept fresh: %s",
            cfg.train.init_from,
            len(loaded),
            kept or "none",
        )
    steps_per_epoch = len(train_loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    # The frozen distillation teacher (distill.py), None without distill.teacher.
    teacher = build_teacher(cfg, cfg.model.num_classes or train_loader.num_classes, dist.device)
    engine = build_engine(cfg, model, dist, steps_per_epoch, teacher)
    fused = engine.fused_adder_bn
    if fused and dist.is_main:
        log.info("fused %d Adder2d+BatchNorm2d pairs (adder.fuse_bn=%s)", fused, cfg.adder.fuse_bn)
    p_sched = PSchedule.from_config(
        cfg.adder, decay_epochs=cfg.p_decay_epochs(), steps_per_epoch=steps_per_epoch
    )
    evaluator = Evaluator(
        val_loader,
        dist,
        build_recalibrator(cfg, dist),
        final_p=final_p(engine.unwrap(), p_sched, total_steps),
        autocast_dtype=engine.autocast_dtype,
        recalibrate_final=cfg.train.bn_recalibration_final,
    )
    ckpt = Checkpointer(
        cfg.output_dir, cfg.train.keep_last, dist, every_steps=cfg.train.ckpt_every_steps, store=engine.checkpoint_store
    )
    parts = dict(engine=engine, train_loader=train_loader, p_sched=p_sched, evaluator=evaluator, ckpt=ckpt)
    return {**parts, **build_run_log(cfg, dist, total_steps)}

