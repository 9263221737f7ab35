"""Building a run's components from its config (the trainer, addernet-eval, addernet-warmup and the
benchmarks build them here; ``trainer.Trainer`` runs the loop over them)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from addernet_dist.config import Config, ConfigError
from addernet_dist.data import build_loader
from addernet_dist.distributed import DistInfo
from addernet_dist.engine.base import Engine
from addernet_dist.evaluator import RECALIBRATION_SEED_OFFSET, BNRecalibrator
from addernet_dist.models import create_model
from addernet_dist.models.registry import check_input_size
from addernet_dist.nn import set_grad_modes


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
