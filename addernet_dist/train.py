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
SIGTERM (Slurm preemption): the ranks agree on it at the next logging step, write a checkpoint
and exit with status 143 (EXIT_PREEMPTED, 128+SIGTERM: "not finished, run me again") without a
final evaluation; the same command continues from there.
Exit status: 0 finished; 1 failed (diverged, a stalled peer, a crash); 2 bad config, checkpoint
or run folder (the message says what to do); 143 preempted.
Fault injection for tests: ADDERNET_FAULT_STEP=s [ADDERNET_FAULT_RANK=r]
[ADDERNET_FAULT_MARKER=file] [ADDERNET_FAULT_SIGNAL=KILL|TERM|STOP] signals the process right after
optimizer step s (once, if a marker file is given: it is created first and disables later faults).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
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
    rng_state,
    set_rng_state,
)
from addernet_dist.config import Config, ConfigError, load_config, save_resolved
from addernet_dist.data import build_loader
from addernet_dist.distributed import DistInfo, destroy_distributed, init_distributed
from addernet_dist.engine.base import Engine, StepStats, check_adder_backend
from addernet_dist.guard import DivergedError, NonFiniteGuard, StallWatchdog
from addernet_dist.interop import init_from_config
from addernet_dist.logging_utils import MetricsLogger, Progress, setup_console_logging
from addernet_dist.metrics import EvalResult, evaluate, recalibrate_bn
from addernet_dist.models import create_model
from addernet_dist.models.registry import check_input_size
from addernet_dist.nn import adder_layer_names, adder_modules, set_grad_modes, set_p
from addernet_dist.ops import dispatch
from addernet_dist.optim import PSchedule

log = logging.getLogger("addernet_dist")

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a shell reports for a job killed by SIGTERM


class Preempted(Exception):
    """SIGTERM: a checkpoint was written; the run is unfinished (main exits EXIT_PREEMPTED)."""


@dataclass
class TrainState:
    epoch: int = 0  # epoch the loop is in (== epochs when done)
    global_step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    wandb_run_id: str | None = None


# ---------------------------------------------------------------------------------------------
# Components
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
        # duplicates per epoch holds, but they would all sit in one global batch).
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is larger than the training "
            f"set ({n_train} samples): every batch would repeat samples; set "
            f"train.global_batch_size to at most {n_train}"
        )
    return train, val


def _recalibrate_bn(cfg: Config, dist: DistInfo, model, epoch: int, autocast_dtype) -> int:
    """BN statistics at the current p from fresh training batches (train.bn_recalibration_batches).

    A loader of its own (shuffled with a seed no training epoch uses), so the training loader's
    position, and with it mid-epoch resume, is untouched."""
    loader = build_loader(cfg.data, "train", **loader_kwargs(cfg, dist, cfg.train.seed + 7_919))
    loader.set_epoch(epoch)
    n = min(cfg.train.bn_recalibration_batches, len(loader))
    return recalibrate_bn(model, loader, dist, num_batches=n, autocast_dtype=autocast_dtype)


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


def build_engine(cfg: Config, model: torch.nn.Module, dist: DistInfo, steps: int) -> Engine:
    if cfg.engine == "ddp":
        from addernet_dist.engine.ddp import DDPEngine

        return DDPEngine(model, cfg, dist, steps_per_epoch=steps)
    if cfg.engine == "deepspeed":
        from addernet_dist.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, dist, steps_per_epoch=steps)
    raise ConfigError(f"engine={cfg.engine!r}; use ddp or deepspeed")


class _Stop:
    """SIGTERM (Slurm preemption, torchrun shutdown) -> checkpoint at the next sync point."""

    def __init__(self) -> None:
        self.requested = False
        if hasattr(signal, "SIGTERM"):
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, dist: DistInfo) -> bool:
        # Every rank must stop at the same step (the checkpoint is collective), but ranks get the
        # signal at different moments: agree with one tiny all-reduce, only on log steps.
        flag = torch.tensor([float(self.requested)], device=dist.device)
        return bool(dist.all_reduce_sum_(flag).item() > 0)


def _maybe_inject_fault(global_step: int, rank: int) -> None:
    at = os.environ.get("ADDERNET_FAULT_STEP")
    if not at or int(at) != global_step:
        return
    fault_rank = os.environ.get("ADDERNET_FAULT_RANK")
    if fault_rank is not None and int(fault_rank) != rank:
        return
    marker = os.environ.get("ADDERNET_FAULT_MARKER")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    name = os.environ.get("ADDERNET_FAULT_SIGNAL", "KILL").upper()
    log.warning("fault injection: SIG%s to rank %d after step %d", name, rank, global_step)
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


# ---------------------------------------------------------------------------------------------
# Checkpoint client state
# ---------------------------------------------------------------------------------------------


def _client_state(cfg, state, p_sched, train_loader, dist, last_eval) -> dict[str, Any]:
    return {
        "train_state": asdict(state),
        "p_schedule": p_sched.state_dict(),
        # Per rank (identical positions today; kept per rank for loaders with rank-local state).
        "loader": dist.all_gather_object(train_loader.state_dict()),
        "rng": dist.all_gather_object(rng_state()),
        "world_size": dist.world_size,
        "config": cfg.model_dump(mode="json"),
        "last_eval": last_eval,
    }


def _restore(client: dict[str, Any], p_sched, train_loader, dist: DistInfo) -> TrainState:
    state = TrainState(**client["train_state"])
    p_sched.load_state_dict(client["p_schedule"])
    same_world = client["world_size"] == dist.world_size
    loader_state = client["loader"][dist.rank if same_world else 0]
    if loader_state.get("batches_done", 0) != 0:
        train_loader.load_state_dict(loader_state)  # raises a clear error mid-epoch otherwise
    else:
        # At an epoch boundary the position is just the epoch: another world size or batch size
        # is fine here (the sampler's layout check is for mid-epoch positions).
        train_loader.set_epoch(state.epoch)
    if same_world:
        set_rng_state(client["rng"][dist.rank])
    else:
        log.warning(
            "resuming with WORLD_SIZE=%d from a checkpoint written with %d: per-rank RNG states "
            "not restored (the run continues correctly but not bit-identically)",
            dist.world_size,
            client["world_size"],
        )
    return state


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(cfg: Config, *, raise_on_preempt: bool = False) -> EvalResult | None:
    """Run (or continue) the training described by ``cfg``; returns the last evaluation.

    Preempted (SIGTERM): returns None after the checkpoint, or raises :class:`Preempted` when
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
    engine = build_engine(cfg, model, dist, steps_per_epoch)
    fused = engine.fused_adder_bn
    if fused and dist.is_main:
        log.info("fused %d Adder2d+BatchNorm2d pairs (adder.fuse_bn=%s)", fused, cfg.adder.fuse_bn)
    p_sched = PSchedule.from_config(
        cfg.adder, decay_epochs=cfg.p_decay_epochs(), steps_per_epoch=steps_per_epoch
    )
    ckpt = Checkpointer(cfg.output_dir, cfg.train.keep_last, dist)
    # Lock the run folder, clean temp files of killed writers, pick the resume point (or refuse).
    plan = ckpt.open(cfg)
    resume_from = plan.path

    seed_everything(cfg.train.seed + 1_000_003 * dist.rank)  # per-rank streams from here on
    state = TrainState()
    last_eval: dict[str, float] | None = None
    changes: dict[str, list[Any]] = {}
    if resume_from is not None:
        client = load_for_resume(engine, resume_from)
        try:
            state = _restore(client, p_sched, train_loader, dist)
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {resume_from}: {e}") from e
        last_eval = client.get("last_eval")
        changes = config_changes(client.get("config") or {}, cfg.model_dump(mode="json"))
        if dist.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d)", resume_from, state.global_step, state.epoch
            )
            for line in describe_changes(changes):
                (log.warning if changes else log.info)("resume: %s", line)
    # Everything is validated (config, data, the resume checkpoint): only now change the folder.
    ckpt.commit(plan)
    if dist.is_main:
        save_resolved(cfg, cfg.output_dir)

    logger = MetricsLogger(cfg, enabled=dist.is_main, wandb_run_id=state.wandb_run_id)
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
        initial=state.global_step,
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
        result = _loop(
            cfg,
            dist,
            engine,
            state,
            p_sched,
            train_loader,
            val_loader,
            ckpt,
            logger,
            progress,
            last_eval,
            watchdog,
        )
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


def _loop(
    cfg,
    dist,
    engine,
    state,
    p_sched,
    train_loader,
    val_loader,
    ckpt,
    logger,
    progress,
    last_eval,
    watchdog: StallWatchdog,
) -> EvalResult | None:
    model = engine.unwrap()
    adders = adder_modules(model)
    adder_names = adder_layer_names(model)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    stop = _Stop()
    result: EvalResult | None = None
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, dist.device)

    def save(last_eval, best=False):
        # Never a checkpoint (or best.pt) of a non-finite model, nor one from a non-finite step.
        if not guard.check(dist, state.global_step, model, before="checkpoint"):
            log.warning(
                "not saving step %d: its loss or gradient norm is non-finite (the run stops after "
                "train.max_nonfinite_steps=%d such steps in a row)",
                state.global_step,
                cfg.train.max_nonfinite_steps,
            )
            return None
        path = ckpt.path_for(state.global_step)
        with watchdog.during("checkpoint"):
            engine.save(path, _client_state(cfg, state, p_sched, train_loader, dist, last_eval))
            ckpt.verify_written(path)
            if best:
                ckpt.copy_to_best(path)
            ckpt.prune()  # after best.pt is copied: only ever deletes verified, superseded files
        return path

    engine.train()
    p = p_sched.value(state.global_step)
    set_p(model, p)
    t_last, steps_last = time.perf_counter(), 0
    while state.epoch < cfg.train.epochs:
        train_loader.set_epoch(state.epoch)  # no-op when resumed mid-epoch
        step_in_epoch = int(train_loader.state_dict().get("batches_done", 0))
        for images, labels in train_loader:
            step_p = p_sched.value(state.global_step)
            if step_p != p:
                p = step_p
                set_p(model, p)
            loss = engine.forward_backward(images, labels)
            stats = engine.step()
            guard.update(loss, [stats.grad_norm, stats.adder_grad_norms])
            state.global_step += 1
            watchdog.beat(state.global_step)
            step_in_epoch += 1
            p_sched.step_count = state.global_step
            steps_last += 1
            _maybe_inject_fault(state.global_step, dist.rank)

            end_of_epoch = step_in_epoch == steps_per_epoch
            if state.global_step % cfg.train.log_every == 0 or end_of_epoch:
                dt = time.perf_counter() - t_last
                rec = _train_record(state, loss, engine, p, stats, adder_names, dist)
                rec["images_per_s"] = steps_last * cfg.train.global_batch_size / max(dt, 1e-9)
                logger.write(rec)
                guard.check(dist, state.global_step)  # after the record: the log shows the NaN
                keys = ("epoch", "loss", "lr", "p", "images_per_s")
                progress.update(steps_last, {k: rec[k] for k in keys})
                t_last, steps_last = time.perf_counter(), 0
                if stop.agreed(dist):
                    path = save(last_eval)
                    log.warning(
                        "preempted (SIGTERM): saved %s at step %d; the same command resumes",
                        path,
                        state.global_step,
                    )
                    raise Preempted(str(path))
            every = cfg.train.ckpt_every_steps
            if every and state.global_step % every == 0 and not end_of_epoch:
                save(last_eval)

        state.epoch += 1
        is_last = state.epoch == cfg.train.epochs
        if is_last or state.epoch % cfg.train.eval_every_epochs == 0:
            guard.check(dist, state.global_step, model, before="evaluation")
            eval_phase = watchdog.during("evaluation")
            eval_phase.__enter__()  # slow collective phase (the startup limit applies)
            recal = 0
            p_now = next(iter(adders)).p if adders else 1.0
            if cfg.train.bn_recalibration_batches and p_now > 1.0:
                recal = _recalibrate_bn(cfg, dist, model, state.epoch, _eval_dtype(engine))
            else:
                # Ranks' BN running stats drift apart after the last forward (each saw its own
                # batch); evaluate everywhere with rank 0's, which is also what gets checkpointed.
                dist.broadcast_buffers_(model)
            result = evaluate(model, val_loader, dist, autocast_dtype=_eval_dtype(engine))
            eval_phase.__exit__(None, None, None)
            engine.train()
            last_eval = result.as_dict()
            rec = {"kind": "eval", "step": state.global_step, "epoch": state.epoch}
            if recal:
                rec.update(bn_recalibration_batches=recal, p=p_now)
            logger.write({**rec, **asdict(result)})
            progress.message(
                f"epoch {state.epoch}: val top1 {result.top1:.2f}% top5 {result.top5:.2f}% "
                f"loss {result.loss:.4f} ({result.count} images)"
            )
            # best.pt holds a model at the p the run ends with (p_end, unless the run stops before
            # the decay does): a recalibrated mid-decay evaluation can score well, but that model
            # computes another l_p distance than the AdderNet the run produces.
            final_p = abs(p_now - p_sched.value(total_steps - 1)) < 1e-9 if adders else True
            is_best = final_p and result.top1 > state.best_top1
            if final_p:
                state.best_top1 = max(state.best_top1, result.top1)
            save(last_eval, best=is_best)
        else:
            save(last_eval)
        t_last = time.perf_counter()  # images/s measures training only, not eval + checkpoint

    if result is None and last_eval is not None:
        # Resumed after the last evaluation (e.g. killed while saving): report it again.
        result = EvalResult(**{k.removeprefix("val/"): v for k, v in last_eval.items()})
    return result


def _eval_dtype(engine: Engine) -> torch.dtype | None:
    return engine.autocast_dtype


def _train_record(state, loss, engine, p, stats: StepStats, adder_names, dist) -> dict[str, Any]:
    """Host-syncing summary of the last step (called on log steps only)."""
    loss_avg = dist.all_reduce_sum_(loss.detach().float().clone()) / dist.world_size
    rec: dict[str, Any] = {
        "kind": "train",
        "step": state.global_step,
        "epoch": state.epoch,
        "loss": float(loss_avg),
        "lr": engine.lr,
        "p": p,
    }
    if stats.grad_norm is not None:
        rec["grad_norm"] = float(stats.grad_norm)
    if stats.adder_grad_norms is not None and stats.adder_alphas is not None:
        norms, alphas = stats.adder_grad_norms.tolist(), stats.adder_alphas.tolist()
        for name, n, a in zip(adder_names, norms, alphas):
            rec[f"adder_grad_norm/{name}"] = n
            rec[f"adder_alpha/{name}"] = a
    return rec


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
