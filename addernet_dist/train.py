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
import sys
from typing import Any

from addernet_dist.build import build_data, build_engine, build_model, build_recalibrator, seed_everything
from addernet_dist.checkpoint import (
    Checkpointer,
    CheckpointError,
    config_changes,
    describe_changes,
    load_for_resume,
    release_run_locks,
)
from addernet_dist.config import Config, ConfigError, load_config, save_resolved
from addernet_dist.distill import build_teacher
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.engine.base import check_adder_backend
from addernet_dist.evaluator import Evaluator
from addernet_dist.guard import DivergedError, StallWatchdog
from addernet_dist.interop import init_from_config
from addernet_dist.logging_utils import MetricsLogger, Progress, setup_console_logging, wandb_online_problem
from addernet_dist.metrics import EvalResult
from addernet_dist.ops import dispatch
from addernet_dist.optim import PSchedule
from addernet_dist.trainer import Preempted, Trainer

log = logging.getLogger("addernet_dist")

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a shell reports for a job killed by SIGTERM


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
    # engine/base.maybe_fuse_adder_bn decides adder.fuse_bn=auto by dispatch's process-wide default:
    # set it for the engine's build only (nothing after it reads the default; the layers carry theirs)
    with dispatch.default_backend(cfg.adder.backend):
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
    ckpt = Checkpointer(cfg.output_dir, cfg.train.keep_last, dist, every_steps=cfg.train.ckpt_every_steps)
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
