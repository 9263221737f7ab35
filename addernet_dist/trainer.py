"""The training loop over checkpointed components (torchtitan's Trainer + CheckpointManager shape).

What each component owns (``Trainer.from_config`` builds them, build.py; :class:`Trainer` runs the loop):

- ``Engine`` (engine/): the wrapped model, the optimizer, the LR schedule; saves them itself.
- :class:`TrainState`: epoch, global_step (the ONE position of the run: the p and LR schedules are
  functions of it, shifted by :meth:`Trainer.align_schedules` after a steps-per-epoch change),
  best top-1, W&B run id.
- ``PSchedule`` (optim.py): p as a pure function of global_step.
- the train loader: its position in the epoch (per rank); :class:`RNGState`: python/numpy/torch RNGs
  (per rank).
- :class:`~addernet_dist.evaluator.Evaluator`: evaluation, BN recalibration, the best-at-final-p rule,
  the last evaluation.
- :class:`~addernet_dist.checkpoint.Checkpointer`: when to save, the files, what to keep.
- :class:`~addernet_dist.tiles.TileChoices`: the Triton kernel tiles chosen (a resumed run keeps them:
  they change result bits); every p code path is tuned before the first step (``tiles.tune_tiles``).
- :class:`~addernet_dist.ema.ModelEMA` (``train.ema_decay`` only): the EMA of the weights.

A checkpoint's client state is ``{name: component.state_dict()}`` over :attr:`Trainer.components`
(plus the run's config, world size and ``runtime``, for the record); resuming calls each ``load_state_dict`` in
the same order. Adding a component to the checkpoint is one line there.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from addernet_dist.build import build_components
from addernet_dist.checkpoint import Checkpointer, rng_state, runtime_info, set_rng_state
from addernet_dist.config import Config
from addernet_dist.data.base import Loader
from addernet_dist.distributed import DistInfo
from addernet_dist.ema import ModelEMA
from addernet_dist.engine.base import Engine, StepStats
from addernet_dist.evaluator import Evaluator
from addernet_dist.guard import NonFiniteGuard, StallWatchdog
from addernet_dist.logging_utils import MetricsLogger, Progress
from addernet_dist.loss import BatchMixer
from addernet_dist.metrics import EvalResult
from addernet_dist.nn import adder_layer_names, adder_modules, set_p
from addernet_dist.open_run import open_run
from addernet_dist.ops import dispatch
from addernet_dist.optim import PSchedule, set_schedule_step
from addernet_dist.tiles import TileChoices, tune_tiles, tuners_active, warmup_plan

log = logging.getLogger("addernet_dist")


class Preempted(Exception):
    """SIGTERM or SIGINT: a checkpoint was written; the run is unfinished (main exits
    EXIT_PREEMPTED)."""


@runtime_checkable
class Stateful(Protocol):
    """What the checkpoint holds of a component (torch.distributed.checkpoint's ``Stateful``)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


# ---------------------------------------------------------------------------------------------
# Components (each keeps the on-disk layout of its key in the checkpoint's client state)
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    epoch: int = 0  # epoch the loop is in (== epochs when done)
    global_step: int = 0  # optimizer steps taken
    best_top1: float = -1.0  # the maximum top-1 over the evaluations at the final p
    best_step: int | None = None  # the step whose checkpoint is best.pt (Checkpointer.restore_best)
    wandb_run_id: str | None = None
    wall_time_s: float = 0.0  # wall time spent in fit() by every attempt of the run, to the last save
    best_ema_top1: float = -1.0  # train.ema_decay: the EMA's best top-1 at the final p (best_ema.pt)
    best_ema_step: int = -1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = TrainState(**state)  # an unknown key is an error, as it was
        for f in fields(self):
            setattr(self, f.name, getattr(loaded, f.name))


class PScheduleState:
    """The checkpoint's ``p_schedule``: the schedule's shape and, for readers of older versions
    (which restored it), ``step`` = global_step. Nothing reads the position back from here."""

    def __init__(self, p_sched: PSchedule, state: TrainState) -> None:
        self.p_sched, self.state = p_sched, state

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.state.global_step, **self.p_sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p_sched.load_state_dict(state)


class LoaderState:
    """The train loader's position, per rank (identical today; kept per rank for loaders with
    rank-local state). Restored after :class:`TrainState` (it needs the epoch)."""

    def __init__(self, loader: Loader, state: TrainState, dist: DistInfo) -> None:
        self.loader, self.state, self.dist = loader, state, dist

    def state_dict(self) -> list[dict[str, Any]]:
        return self.dist.all_gather_object(self.loader.state_dict())

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        same_world = len(states) == self.dist.world_size
        loader_state = states[self.dist.rank if same_world else 0]
        if loader_state.get("batches_done", 0) != 0:
            self.loader.load_state_dict(loader_state)  # raises a clear error mid-epoch otherwise
        else:
            # At an epoch boundary the position is just the epoch: another world size or batch
            # size is fine here (the sampler's layout check is for mid-epoch positions). The loader
            # stands one epoch ahead of the train state when a preemption saved right after an
            # epoch's last step (before its evaluation): the batches of that epoch are done.
            self.loader.set_epoch(max(self.state.epoch, int(loader_state.get("epoch", 0))))


class RNGState:
    """Every rank's python, numpy and torch (and CUDA) RNG states."""

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist

    def state_dict(self) -> list[dict[str, Any]]:
        return self.dist.all_gather_object(rng_state())

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])
        else:
            log.warning(
                "resuming with WORLD_SIZE=%d from a checkpoint written with %d: per-rank RNG "
                "states not restored (the run continues correctly but not bit-identically)",
                self.dist.world_size,
                len(states),
            )


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def _check_same_classes(saved: list[str] | None, now: list[str] | None) -> None:
    """A resume whose data tree names other classes than the checkpoint's would go on training with
    every label meaning another class (a renamed, added or removed folder shifts the sorted indices)."""
    if saved is None or now is None or list(saved) == list(now):
        return
    if len(saved) != len(now):
        what = f"{len(saved)} classes in the checkpoint, {len(now)} in data.root now"
    else:
        i = next(i for i, (a, b) in enumerate(zip(saved, now)) if a != b)
        what = f"label {i} was class {saved[i]!r}, data.root now has {now[i]!r} there"
    raise ValueError(
        f"the training data's classes changed since the checkpoint ({what}); resuming would train "
        "on labels that mean other classes. Point data.root at the tree the run was trained on, or "
        "start a new output_dir (train.init_from=<checkpoint> to start from its weights)"
    )


class Trainer:
    """The loop: for each batch {set p, step, maybe log, maybe save}; at epoch ends {maybe
    evaluate, save}. Everything else is a component it calls."""

    def __init__(
        self,
        cfg: Config,
        dist: DistInfo,
        engine: Engine,
        train_loader: Loader,
        p_sched: PSchedule,
        evaluator: Evaluator,
        ckpt: Checkpointer,
        logger: MetricsLogger, progress: Progress, watchdog: StallWatchdog,  # not checkpointed; open_run starts them
    ) -> None:
        self.cfg, self.dist, self.engine = cfg, dist, engine
        self.train_loader, self.p_sched, self.evaluator, self.ckpt = train_loader, p_sched, evaluator, ckpt
        self.logger, self.progress, self.watchdog = logger, progress, watchdog
        self.model = engine.unwrap()
        self.adder_names = adder_layer_names(self.model)
        self.steps_per_epoch = len(train_loader)
        self.state = TrainState()
        # The checkpoint: name -> component, restored in this order (the loader needs the epoch).
        self.components: dict[str, Stateful] = {
            "train_state": self.state,
            "p_schedule": PScheduleState(p_sched, self.state),
            "loader": LoaderState(train_loader, self.state, dist),
            "rng": RNGState(dist),
            "last_eval": evaluator,
            "tiles": TileChoices(),
        }
        # mixup / cutmix of each per-rank batch on the device (loss.py; a no-op when both are off)
        self.mixer = BatchMixer.from_config(cfg.train, train_loader.num_classes)
        if engine.grad_scaler is not None:  # fp16: the loss scale resumes exactly
            self.components["grad_scaler"] = engine.grad_scaler
        # train.ema_decay: the EMA of the weights, evaluated next to the model (addernet_dist/ema.py)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        if self.ema is not None:
            self.components["ema"] = self.ema
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, dist.device)
        self.p: float | None = None  # the p the adder layers compute with (set from p_sched only)
        # The LR and p schedules run at step global_step + step_offset: 0 unless a resume changed
        # the steps per epoch (see align_schedules); global_step itself only ever counts up.
        self.step_offset = 0
        self.result: EvalResult | None = None
        self._fit_t0: float | None = None  # perf_counter at fit()'s start
        self._wall_before = 0.0  # wall time of earlier attempts (the checkpoint's)

    @classmethod
    def from_config(cls, cfg: Config, dist: DistInfo) -> Trainer:
        """The trainer of ``cfg``'s run over its components (built by build.build_components)."""
        return cls(cfg, dist, **build_components(cfg, dist))

    def train(self) -> EvalResult | None:
        """Open the run folder, resume, start the logger, progress and watchdog (open_run), fit."""
        with open_run(self):
            return self.fit()

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective (the per-rank components gather): the checkpoint's client state."""
        self.state.wall_time_s = self.wall_time_s()
        client = {name: c.state_dict() for name, c in self.components.items()}
        names = getattr(self.train_loader, "class_names", None)
        if names is not None:  # label index -> folder name, for export/eval
            client["class_names"] = list(names)
        client.update(world_size=self.dist.world_size, config=self.cfg.model_dump(mode="json"))
        return {**client, "runtime": runtime_info()}  # threads, torch version: resume reports a change

    def load_state_dict(self, client: dict[str, Any]) -> None:
        _check_same_classes(client.get("class_names"), getattr(self.train_loader, "class_names", None))
        for name, component in self.components.items():
            if name in client:
                component.load_state_dict(client[name])
            else:  # a checkpoint written before the component was checkpointed
                log.warning("resume: the checkpoint holds no %r state; it starts fresh", name)
                start_fresh = getattr(component, "start_fresh", None)
                if start_fresh is not None:
                    start_fresh()  # e.g. the EMA starts from the resumed weights, not the fresh init
        if "loader" in client:  # without it the loader's position is not the run's
            self.align_schedules()

    def align_schedules(self) -> None:
        """Put the LR and p schedules at the loader's position in THIS run's steps per epoch.

        The schedules are built from this run's steps per epoch, the checkpoint's global_step
        counts the steps of the run that wrote it. Resumed at an epoch boundary with another
        train.global_batch_size (e.g. 16 -> 32: 12 -> 6 steps per epoch on configs/debug.yaml),
        step 12 of the old run is step 6 of the new one; without this the schedules would start
        at step 12 of 12 (lr = min_lr = 0 for the rest of the run). The epochs (samples) done are
        kept; global_step goes on counting (checkpoint names and logs stay monotonic)."""
        pos = self.train_loader.state_dict()
        at = int(pos["epoch"]) * self.steps_per_epoch + int(pos.get("batches_done", 0))
        self.step_offset = at - self.state.global_step
        if self.step_offset == 0:
            return
        set_schedule_step(self.engine.lr_scheduler, at)
        if self.dist.is_main:
            log.warning(
                "resume: %d steps per epoch now (train.global_batch_size or the data changed): "
                "the LR and p schedules continue at step %d of %d (epoch %d, batch %d, the same "
                "fraction of the run) instead of the checkpoint's step %d; lr %.6g, p %.4g",
                self.steps_per_epoch,
                at,
                self.cfg.train.epochs * self.steps_per_epoch,
                int(pos["epoch"]),
                int(pos.get("batches_done", 0)),
                self.state.global_step,
                self.engine.lr,
                self.p_sched.value(max(at - 1, 0)),
            )

    def save(self, best: bool = False, best_ema: bool = False) -> Path | None:
        """Collective. Checkpoint the current step (and copy it to best.pt when ``best``, to
        best_ema.pt when ``best_ema``)."""
        step = self.state.global_step
        # Never a checkpoint (or best.pt) of a non-finite model, nor one from a non-finite step.
        if not self.guard.check(self.dist, step, self.model, before="checkpoint"):
            log.warning(
                "not saving step %d: its loss or gradient norm is non-finite (the run stops after "
                "train.max_nonfinite_steps=%d such steps in a row)",
                step,
                self.cfg.train.max_nonfinite_steps,
            )
            return None
        with self.watchdog.during("checkpoint"):
            return self.ckpt.save(
                step, lambda path: self.engine.save(path, self.state_dict()), best=best, best_ema=best_ema
            )

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> EvalResult | None:
        """Train to ``train.epochs`` (open_run started the logger, progress and watchdog); returns the
        last evaluation (raises Preempted on SIGTERM/SIGINT)."""
        tile_tuner = _tile_hooks(self.watchdog)
        try:
            self._tune_tiles()
            return self._fit()
        finally:
            if tile_tuner is not None:
                tile_tuner.set_phase_hooks(None, None)

    def _tune_tiles(self) -> None:
        """Tune every kernel tile of every p code path now, in the watchdog's "tuning" phase: the
        first step at p = 1 comes ~1.1 M steps into ImageNet ResNet-50, where minutes of tuning on
        rank 0 would stop every rank (stall_timeout_s=300). Nothing to do off the compiled Triton
        path, with ADDERNET_TILE_TUNING=0, or for keys a tile cache / the checkpoint already holds."""
        if not tuners_active() or not adder_modules(self.model):
            return
        # tuners_active() only says the compiled kernels are importable (true on any machine with
        # Triton): a run whose layers use the CPU fast path or the reference would pay a full
        # training step per p path here and tune nothing
        if "triton" not in {dispatch.resolve_backend(self.dist.device, m.backend) for m in adder_modules(self.model)}:
            return
        plan = warmup_plan(self.cfg, self.dist.world_size)
        with self.watchdog.during("tuning"):
            t0 = time.perf_counter()
            tune_tiles(
                self.model,
                plan.p_values,
                plan.batches[:1],  # the tile key has no batch size
                plan.image_size,
                device=self.dist.device,
                autocast_dtype=self.engine.autocast_dtype,
                input_dtype=self.engine.input_dtype,
                channels_last=plan.channels_last,
            )
            log.info("kernel tiles of p %s ready in %.0f s", plan.p_values, time.perf_counter() - t0)

    def _fit(self) -> EvalResult | None:
        state, train, watchdog = self.state, self.cfg.train, self.watchdog
        self._fit_t0, self._wall_before = time.perf_counter(), state.wall_time_s
        stop, meter = _Stop(), _Throughput(train.global_batch_size)
        self.engine.train()
        self._set_p(max(self.schedule_step - 1, 0))  # the p of the last step taken (a resumed model's)
        while state.epoch < train.epochs:
            step_in_epoch, batches = self._rest_of_epoch()
            for images, labels in batches:
                self._set_p(self.schedule_step)
                end_of_epoch = step_in_epoch + 1 == self.steps_per_epoch
                log_step = (state.global_step + 1) % train.log_every == 0 or end_of_epoch
                loss = self.engine.forward_backward(*self.mixer(images, labels))
                stats = self.engine.step(want_grad_norm=log_step)  # the norm costs a pass: log steps only
                if self.ema is not None:
                    self.ema.update()
                self.guard.update(loss, [stats.grad_norm, stats.adder_grad_norms], stats.scaler_skip)
                state.global_step += 1
                step_in_epoch += 1
                watchdog.beat(state.global_step)
                meter.steps += 1
                _maybe_inject_fault(state.global_step, self.dist.rank, watchdog)
                if log_step:
                    self._log_step(loss, stats, meter)
                    if stop.agreed(self.dist):
                        self._preempt(stop.name)
                if self.ckpt.due(state.global_step, end_of_epoch):
                    self.save()
            state.epoch += 1
            if state.epoch == train.epochs or state.epoch % train.eval_every_epochs == 0:
                self._evaluate()
            else:
                self.save()
            meter.restart()  # images/s measures training only, not eval + checkpoint
        self._summary()
        # Resumed after the last evaluation (e.g. killed while saving): report it again.
        return self.result or self.evaluator.last_result()

    @property
    def schedule_step(self) -> int:
        """The step the LR and p schedules are at (global_step, or aligned: align_schedules)."""
        return self.state.global_step + self.step_offset

    def wall_time_s(self) -> float:
        """Wall time of the run so far: earlier attempts (from the checkpoint) + this fit()."""
        if self._fit_t0 is None:  # not fitting (yet)
            return self.state.wall_time_s
        return self._wall_before + time.perf_counter() - self._fit_t0

    def _summary(self) -> None:
        """The run's last record and console line: best top-1 and its step, wall time, checkpoint."""
        state = self.state
        best = self.ckpt.best_path
        newest = self.ckpt.list()
        path = best if best.exists() else (newest[-1] if newest else None)
        rec = {
            "kind": "summary",
            "step": state.global_step,
            "epoch": state.epoch,
            "best_top1": state.best_top1 if state.best_step is not None else None,
            "best_step": state.best_step,
            "wall_time_s": round(self.wall_time_s(), 3),
            "checkpoint": None if path is None else str(path),
        }
        if self.ema is not None:
            found = state.best_ema_step >= 0
            rec["best_ema_top1"] = state.best_ema_top1 if found else None
            rec["best_ema_step"] = state.best_ema_step if found else None
            rec["ema_checkpoint"] = str(self.ckpt.best_ema_path) if self.ckpt.best_ema_path.exists() else None
        self.logger.write(rec)
        best_text = "none" if rec["best_top1"] is None else f"{state.best_top1:.2f}% at step {state.best_step}"
        self.progress.message(
            f"done: {state.global_step} steps in {rec['wall_time_s']:.1f} s wall time; "
            f"best top-1 {best_text}; checkpoint {rec['checkpoint']}"
        )

    def _rest_of_epoch(self) -> tuple[int, Iterable[tuple[torch.Tensor, torch.Tensor]]]:
        """(batches done, the batches left) of the epoch ``state.epoch``."""
        if int(self.train_loader.state_dict()["epoch"]) > self.state.epoch:
            return 0, ()  # preempted after the epoch's last step: only its end (eval, save) is left
        self.train_loader.set_epoch(self.state.epoch)  # no-op when resumed mid-epoch
        return int(self.train_loader.state_dict().get("batches_done", 0)), self.train_loader

    def _set_p(self, step: int) -> None:
        p = self.p_sched.value(step)
        if p != self.p:
            self.p = p
            set_p(self.model, p)
            if self.ema is not None:  # the EMA computes (is evaluated and saved at) the model's p
                set_p(self.ema.module, p)

    def _log_step(self, loss: torch.Tensor, stats: StepStats, meter: _Throughput) -> None:
        rec = self._train_record(loss, stats)
        rec["images_per_s"] = meter.images_per_s()
        self.logger.write(rec)
        self.guard.check(self.dist, self.state.global_step)  # after the record: the log shows the NaN
        keys = ("epoch", "loss", "lr", "p", "grad_norm", "images_per_s")
        self.progress.update(meter.steps, {k: rec[k] for k in keys})
        meter.restart(steps=0)

    def _preempt(self, signal_name: str) -> None:
        path = self.save()
        log.warning(
            "preempted (%s): saved %s at step %d; the same command resumes",
            signal_name,
            path,
            self.state.global_step,
        )
        raise Preempted(str(path))

    def _evaluate(self) -> None:
        state = self.state
        self.guard.check(self.dist, state.global_step, self.model, before="evaluation")
        before = (state.best_top1, state.best_step, state.best_ema_top1, state.best_ema_step)
        with self.watchdog.during("evaluation"):  # slow collective phase (the startup limit applies)
            result, extra = self.evaluator(self.model, state.epoch, self.p)
            ema_fields, best_ema = self._evaluate_ema() if self.ema is not None else ({}, False)
        self.engine.train()
        self.result = result
        rec = {"kind": "eval", "step": state.global_step, "epoch": state.epoch, **extra, **asdict(result)}
        self.logger.write({**rec, **ema_fields})
        ema_text = f"; EMA top1 {ema_fields['ema_top1']:.2f}%" if ema_fields else ""
        self.progress.message(
            f"epoch {state.epoch}: val top1 {result.top1:.2f}% top5 {result.top5:.2f}% "
            f"loss {result.loss:.4f} ({result.count} images){ema_text}"
        )
        best = self.evaluator.is_new_best(result, self.p, state)  # recorded in the checkpoint
        if self.save(best=best, best_ema=best_ema) is None:  # not saved (non-finite): keep the old bests
            (state.best_top1, state.best_step, state.best_ema_top1, state.best_ema_step) = before

    def _evaluate_ema(self) -> tuple[dict[str, Any], bool]:
        """Collective. The EMA evaluated like the model, at the model's p (BN recalibrated under the
        same rule); returns its ``ema_*`` record fields and whether it is a new best_ema.pt."""
        state, ema = self.state, self.ema  # its p is the model's (_set_p)
        result, extra = self.evaluator.evaluate(ema.module, state.epoch, self.p)
        fields = {f"ema_{k}": v for k, v in asdict(result).items() if k != "count"}
        fields.update({f"ema_{k}": v for k, v in extra.items() if k != "p"})
        best = self.evaluator.best_candidate(self.p) and result.top1 > state.best_ema_top1
        if best:
            state.best_ema_top1, state.best_ema_step = result.top1, state.global_step
        return fields, best

    def _train_record(self, loss: torch.Tensor, stats: StepStats) -> dict[str, Any]:
        """Host-syncing summary of the last step (called on log steps only)."""
        dist = self.dist
        loss_avg = dist.all_reduce_sum_(loss.detach().float().clone()) / dist.world_size
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.state.global_step,
            # Epochs done, as in eval records (which come at whole numbers): the last step of the
            # first epoch logs 1.0 and its evaluation epoch 1.
            "epoch": epochs_done(self.schedule_step, self.steps_per_epoch),
            "loss": float(loss_avg),
            "lr": self.engine.lr,
            "p": self.p,  # the step's p: p_sched.value(step - 1)
        }
        for name, part in self.engine.loss_parts.items():  # loss_ce, loss_kd when distilling
            rec[f"loss_{name}"] = float(dist.all_reduce_sum_(part.float().clone()) / dist.world_size)
        # always there on a log step (engine.step(want_grad_norm=True)); None only for an engine
        # that measured nothing (a model without gradients)
        rec["grad_norm"] = None if stats.grad_norm is None else float(stats.grad_norm)
        if stats.loss_scale is not None:  # fp16: the scale of this step's backward, and its skip
            rec["loss_scale"] = float(stats.loss_scale)
            rec["scaler_skip"] = bool(stats.scaler_skip)
        if stats.adder_grad_norms is not None and stats.adder_alphas is not None:
            norms, alphas = stats.adder_grad_norms.tolist(), stats.adder_alphas.tolist()
            for name, n, a in zip(self.adder_names, norms, alphas):
                rec[f"adder_grad_norm/{name}"] = n
                rec[f"adder_alpha/{name}"] = a
        return rec


# ---------------------------------------------------------------------------------------------
# Small helpers of the loop
# ---------------------------------------------------------------------------------------------


def epochs_done(global_step: int, steps_per_epoch: int) -> float:
    """The ``epoch`` of every metrics record: epochs done at ``global_step`` (4 decimals)."""
    return round(global_step / steps_per_epoch, 4)


class _Throughput:
    """Images per second over the steps since the last log (training time only)."""

    def __init__(self, global_batch_size: int) -> None:
        self.global_batch_size = global_batch_size
        self.restart(steps=0)

    def restart(self, steps: int | None = None) -> None:
        self.t0 = time.perf_counter()
        if steps is not None:
            self.steps = steps

    def images_per_s(self) -> float:
        return self.steps * self.global_batch_size / max(time.perf_counter() - self.t0, 1e-9)


class _Stop:
    """SIGTERM (Slurm preemption, torchrun shutdown) or SIGINT (Ctrl-C) -> checkpoint at the next
    sync point. A second Ctrl-C interrupts at once (KeyboardInterrupt, no checkpoint)."""

    def __init__(self) -> None:
        self.requested = False
        self.name = "a signal on another rank"
        for name in ("SIGTERM", "SIGINT"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, dist: DistInfo) -> bool:
        # Every rank must stop at the same step (the checkpoint is collective), but ranks get the
        # signal at different moments: agree with one tiny all-reduce, only on log steps.
        flag = torch.tensor([float(self.requested)], device=dist.device)
        return bool(dist.all_reduce_sum_(flag).item() > 0)


def _tile_hooks(watchdog: StallWatchdog):
    """Make kernel-tile tuning a phase of ``watchdog`` (kernels/tile_tuner.py); returns the tuner
    module (None without Triton)."""
    try:
        from addernet_dist.kernels import tile_tuner
    except ImportError:
        return None
    tile_tuner.set_phase_hooks(watchdog.during, watchdog.progress)
    return tile_tuner


def _maybe_inject_fault(global_step: int, rank: int, watchdog: StallWatchdog | None = None) -> None:
    """ADDERNET_FAULT_STEP=s [ADDERNET_FAULT_RANK=r] [ADDERNET_FAULT_MARKER=file]
    [ADDERNET_FAULT_SIGNAL=KILL|TERM|STOP]: signal this process right after optimizer step s (tests).
    SIGSTOP models a hung rank: it stops once its heartbeat has published step s, so the peers'
    stall message names a known step (a stop within one heartbeat interval reports an earlier one)."""
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
    if name == "STOP" and watchdog is not None:
        watchdog.wait_published(global_step)
    log.warning("fault injection: SIG%s to rank %d after step %d", name, rank, global_step)
    os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
