"""Opening a run folder for ``Trainer.train``: lock it, pick the resume point, load the trainer's
components from it, commit the folder, and start the metrics logger, progress display and stall
watchdog at the resumed step (they write into the folder and need the step: built after the resume)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from addernet_dist.build import seed_everything
from addernet_dist.checkpoint import CheckpointError, config_changes, describe_changes, load_for_resume
from addernet_dist.config import save_resolved
from addernet_dist.guard import StallWatchdog
from addernet_dist.logging_utils import MetricsLogger, Progress

log = logging.getLogger("addernet_dist")


@contextmanager
def opened(trainer: Any) -> Iterator[tuple[MetricsLogger, Progress, StallWatchdog]]:
    """Open ``trainer.cfg.output_dir`` and resume ``trainer`` (a ``trainer.Trainer``) from it; yields
    the run's (logger, progress, watchdog), closed after the block."""
    cfg, dist, engine, ckpt, state = trainer.cfg, trainer.dist, trainer.engine, trainer.ckpt, trainer.state
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

    total_steps = cfg.train.epochs * trainer.steps_per_epoch
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
        yield logger, progress, watchdog
    finally:
        watchdog.close()
        progress.close()
        logger.close()
