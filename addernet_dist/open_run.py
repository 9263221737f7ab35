"""Opening a run folder for ``Trainer.train``: lock it, pick the resume point, load the trainer's
components from it, commit the folder, then start the trainer's metrics logger, progress display
and stall watchdog at the resumed step (``Trainer.from_config`` built them without side effects:
they write into the folder, which nothing changes before the resume is validated)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from addernet_dist.build import seed_everything
from addernet_dist.checkpoint import (
    CheckpointError,
    config_changes,
    describe_changes,
    describe_runtime_changes,
    load_for_resume,
    runtime_changes,
    runtime_info,
)
from addernet_dist.config import save_resolved
from addernet_dist.nn import adder_modules
from addernet_dist.ops import dispatch

log = logging.getLogger("addernet_dist")


def run_environment(trainer: Any) -> str:
    """What the run's bits depend on besides its config (docs/training.md "Reproducibility"): world
    size, device, torch's intra-op threads (CPU reductions change with it) and the adder backend
    the layers resolve to."""
    dist = trainer.dist
    adders = adder_modules(trainer.model)
    backends = sorted({dispatch.resolve_backend(dist.device, m.backend) for m in adders})
    return (
        f"world size {dist.world_size}, device {dist.device}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op threads, adder backend {'+'.join(backends) or 'none (no adder layers)'}"
    )


@contextmanager
def open_run(trainer: Any) -> Iterator[None]:
    """Open ``trainer.cfg.output_dir``, resume ``trainer`` (a ``trainer.Trainer``) from it and start
    its logger, progress display and watchdog; they are closed after the block."""
    cfg, dist, engine, ckpt, state = trainer.cfg, trainer.dist, trainer.engine, trainer.ckpt, trainer.state
    logger, progress, watchdog = trainer.logger, trainer.progress, trainer.watchdog
    # Lock the run folder, clean temp files of killed writers, pick the resume point (or refuse).
    plan = ckpt.open(cfg)
    resume_from = plan.path

    seed_everything(cfg.train.seed + 1_000_003 * dist.rank)  # per-rank streams from here on
    changes: dict[str, list[Any]] = {}
    runtime: dict[str, list[Any]] = {}
    if resume_from is not None:
        client = load_for_resume(engine, resume_from)
        try:
            trainer.load_state_dict(client)
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {resume_from}: {e}") from e
        changes = config_changes(client.get("config") or {}, cfg.model_dump(mode="json"))
        runtime = runtime_changes(client.get("runtime"), runtime_info())  # {} for older checkpoints
    # Everything is validated (config, data, the resume checkpoint): only now log the run and change
    # the folder, so a refused run prints its error alone (the CLI's "error: ..." is stderr's first line).
    if dist.is_main:
        log.info("run: %s", run_environment(trainer))
        if resume_from is not None:
            log.info(
                "resumed from %s at step %d (epoch %d)", resume_from, state.global_step, state.epoch
            )
            for line in describe_changes(changes):
                (log.warning if changes else log.info)("resume: %s", line)
            for line in describe_runtime_changes(runtime):
                log.warning("resume: %s", line)
    ckpt.commit(plan)
    if resume_from is not None and ckpt.restore_best(resume_from, state.best_step):
        state.best_top1, state.best_step = -1.0, None  # best.pt is gone: the next one makes it
    ema_step = state.best_ema_step if state.best_ema_step >= 0 else None  # train.ema_decay's best
    if resume_from is not None and ckpt.restore_best(resume_from, ema_step, ckpt.best_ema_path):
        state.best_ema_top1, state.best_ema_step = -1.0, -1
    if dist.is_main:
        save_resolved(cfg, cfg.output_dir)

    try:
        logger.open(wandb_run_id=state.wandb_run_id)
        state.wandb_run_id = logger.wandb_run_id
        if resume_from is not None:
            rec = {"kind": "resume", "step": state.global_step, "epoch": state.epoch}
            rec.update({"changed": changes} if changes else {})
            logger.write({**rec, **({"runtime_changed": runtime} if runtime else {})})
        elif plan.from_scratch:
            # One history for readers: read_metrics drops the records of the abandoned attempt.
            logger.write({"kind": "resume", "step": 0, "epoch": 0, "restart": "no valid checkpoint"})
        progress.start(initial=trainer.schedule_step)  # total_steps counts this run's steps per epoch
        # Names a stalled peer instead of waiting for the 30-min process-group timeout (guard.py).
        watchdog.start(first_step=state.global_step)
        yield
    finally:
        watchdog.close()
        progress.close()
        logger.close()
