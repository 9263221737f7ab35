"""Train an AdderNet (paper Algorithm 1) with torchrun/DDP (or DeepSpeed), resumable to the bit.

Launch commands (every form takes dotted overrides after the config, e.g. ``optim.lr=0.05``)::

    # 1 process (CPU or one GPU)
    addernet-train --config configs/debug.yaml output_dir=runs/debug
    python -m addernet_dist.train --config configs/debug.yaml

    # 1 node x N processes (N GPUs; on CPU, gloo processes)
    torchrun --standalone --nproc_per_node=N -m addernet_dist.train --config configs/imagenet_resnet18.yaml

    # M nodes x N processes: run on EVERY node (same command; HOST0 = first node's address)
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \\
        --rdzv_id=JOB --max-restarts=3 -m addernet_dist.train --config configs/imagenet_resnet50.yaml

    (launch/torchrun.sh and launch/slurm.sbatch wrap these.)

``resume=auto`` (default) continues from the newest valid checkpoint in ``output_dir``, so a
restarted torchrun group (``--max-restarts``) or a requeued Slurm job picks up by itself.
SIGTERM (Slurm preemption) or SIGINT (Ctrl-C): the ranks agree on it at the next logging step,
write a checkpoint and exit with status 143 (EXIT_PREEMPTED, 128+SIGTERM: "not finished, run me
again") without a final evaluation; the same command continues from there. A second Ctrl-C stops
at once (KeyboardInterrupt, no checkpoint).
Exit status: 0 finished; 1 failed (diverged, a stalled peer, a crash); 2 bad config, checkpoint
or run folder (the message says what to do); 143 preempted.
Fault injection for tests: ADDERNET_FAULT_STEP=s [ADDERNET_FAULT_RANK=r]
[ADDERNET_FAULT_MARKER=file] [ADDERNET_FAULT_SIGNAL=KILL|TERM|STOP] signals the process right after
optimizer step s (once, if a marker file is given: it is created first and disables later faults).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from typing import Any

import numpy as np
import torch

from addernet_dist.checkpoint import (
    Checkpointer,
    CheckpointError,
    config_changes,
    describe_changes,
    load_for_resume,
    release_run_locks,
)
from addernet_dist.config import Config, ConfigError, load_config, save_resolved
from addernet_dist.data import build_loader
from addernet_dist.distill import build_teacher
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.engine.base import Engine, check_adder_backend
from addernet_dist.evaluator import RECALIBRATION_SEED_OFFSET, BNRecalibrator, Evaluator
from addernet_dist.guard import DivergedError, StallWatchdog
from addernet_dist.interop import init_from_config
from addernet_dist.logging_utils import MetricsLogger, Progress, setup_console_logging, wandb_online_problem
from addernet_dist.metrics import EvalResult
from addernet_dist.models import create_model
from addernet_dist.models.registry import check_input_size
from addernet_dist.nn import set_grad_modes
from addernet_dist.ops import dispatch
from addernet_dist.optim import PSchedule
from addernet_dist.trainer import Preempted, Trainer

log = logging.getLogger("addernet_dist")

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a shell reports for a job killed by SIGTERM


# ---------------------------------------------------------------------------------------------
# Building the components (trainer.py runs the loop over them)
# ---------------------------------------------------------------------------------------------


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


def _recalibrate_bn(cfg: Config, dist: DistInfo, model, epoch: int, autocast_dtype) -> int:
    """One recalibration as the trainer does it at the end of ``epoch`` (tests redo it)."""
    return build_recalibrator(cfg, dist)(model, dist, epoch, autocast_dtype)


def build_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    try:
        check_input_size(cfg.model.name, cfg.data.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = create_model(
        cfg.model.name,
        conv=cfg.model.conv,
        num_classes=cfg.model.num_classes or num_classes,
        **cfg.model.create_kwargs(),
    )
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


# ---------------------------------------------------------------------------------------------
# The run: build, resume, fit
# ---------------------------------------------------------------------------------------------


def train(cfg: Config, *, raise_on_preempt: bool = False) -> EvalResult | None:
    """Run (or continue) the training described by ``cfg``; returns the last evaluation.

    Preempted (SIGTERM/SIGINT): returns None after the checkpoint, or raises :class:`Preempted` when
    ``raise_on_preempt`` (the CLI does, to exit with EXIT_PREEMPTED)."""
    dist = init_distributed(cfg.train.device)
    setup_console_logging(dist.rank)
    ok = False
    try:
        result = _train(cfg, dist)
        ok = True
        return result
    except Preempted:
        ok = True  # every rank agreed on it: a clean shutdown
        if raise_on_preempt:
            raise
        return None
    finally:
        release_run_locks()  # the run folder's lock (checkpoint.Checkpointer.open)
        destroy_distributed(dist, ok)


def _train(cfg: Config, dist: DistInfo) -> EvalResult | None:
    # First: before anything is built or written (rank 0 logs to W&B: its environment decides).
    wandb_problem = dist.broadcast_object(wandb_online_problem(cfg.wandb) if dist.is_main else None)
    if wandb_problem is not None:
        raise ConfigError(wandb_problem)
    # Same seed on every rank for the model init (DDP also broadcasts rank 0's weights).
    seed_everything(cfg.train.seed)
    check_adder_backend(cfg.adder.backend, dist.device)
    dispatch.set_default_backend(cfg.adder.backend)
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
        final_p=Trainer.final_p(engine.unwrap(), p_sched, total_steps),
        autocast_dtype=engine.autocast_dtype,
        recalibrate_final=cfg.train.bn_recalibration_final,
    )
    ckpt = Checkpointer(
        cfg.output_dir, cfg.train.keep_last, dist, every_steps=cfg.train.ckpt_every_steps, store=engine.checkpoint_store
    )
    trainer = Trainer(cfg, dist, engine, train_loader, p_sched, evaluator, ckpt)
    state = trainer.state
    # Lock the run folder, clean temp files of killed writers, pick the resume point (or refuse).
    plan = ckpt.open(cfg)
    resume_from = plan.path

    seed_everything(cfg.train.seed + 1_000_003 * dist.rank)  # per-rank streams from here on
    changes: dict[str, list[Any]] = {}
    if resume_from is not None:
        client = load_for_resume(engine, resume_from)
        try:
            trainer.load_state_dict(client)
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {resume_from}: {e}") from e
        changes = config_changes(client.get("config") or {}, cfg.model_dump(mode="json"))
        if dist.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d)", resume_from, state.global_step, state.epoch
            )
            for line in describe_changes(changes):
                (log.warning if changes else log.info)("resume: %s", line)
    # Everything is validated (config, data, the resume checkpoint): only now change the folder.
    ckpt.commit(plan)
    if resume_from is not None and ckpt.restore_best(resume_from, state.best_step):
        state.best_top1, state.best_step = -1.0, None  # best.pt is gone: the next one makes it
    ema_step = state.best_ema_step if state.best_ema_step >= 0 else None  # train.ema_decay's best
    if resume_from is not None and ckpt.restore_best(resume_from, ema_step, ckpt.best_ema_path):
        state.best_ema_top1, state.best_ema_step = -1.0, -1
    if dist.is_main:
        save_resolved(cfg, cfg.output_dir)

    logger = MetricsLogger(
        cfg, enabled=dist.is_main, wandb_run_id=state.wandb_run_id, total_steps=total_steps
    )
    state.wandb_run_id = logger.wandb_run_id
    if resume_from is not None:
        rec = {"kind": "resume", "step": state.global_step, "epoch": state.epoch}
        logger.write({**rec, **({"changed": changes} if changes else {})})
    elif plan.from_scratch:
        # One history for readers: read_metrics drops the records of the abandoned attempt.
        logger.write({"kind": "resume", "step": 0, "epoch": 0, "restart": "no valid checkpoint"})
    progress = Progress(
        enabled=dist.is_main,
        mode=cfg.train.progress_bar,
        total=total_steps,
        initial=trainer.schedule_step,  # total_steps counts this run's steps per epoch
    )
    # Names a stalled peer instead of waiting for the 30-min process-group timeout (guard.py).
    watchdog = StallWatchdog(
        dist,
        timeout_s=cfg.train.stall_timeout_s,
        startup_timeout_s=cfg.train.stall_timeout_startup_s,
        startup_steps=cfg.train.stall_startup_steps,
        first_step=state.global_step,
    )
    try:
        result = trainer.fit(logger, progress, watchdog)
    finally:
        watchdog.close()
        progress.close()
        logger.close()
    if dist.is_main and result is not None:
        print(
            f"final: top1={result.top1:.2f}% top5={result.top5:.2f}% "
            f"loss={result.loss:.4f} ({result.count} val images)",
            flush=True,
        )
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    ap.add_argument(
        "overrides", nargs="*", help="dotted overrides: optim.lr=0.05 output_dir=runs/x"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, "addernet-train", "Train an AdderNet (see module docstring).")
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, raise_on_preempt=True)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except DivergedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Preempted:
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
