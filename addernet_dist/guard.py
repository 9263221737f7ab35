"""Run guards: stop a diverged run (NaN/inf), and name a stalled rank instead of hanging.

:class:`NonFiniteGuard` counts consecutive steps whose loss or gradient norm is not finite, on the
device (no host sync per step); :meth:`NonFiniteGuard.check` reads it (one all-reduce) on log
steps and before every checkpoint and evaluation, together with a finiteness test of the model's
parameters and buffers, and raises :class:`DivergedError`. So a non-finite model is never saved.

:class:`StallWatchdog` (multi-process runs): a daemon thread per rank publishes a heartbeat
(counter, step, phase) in the process group's store every few seconds. When its own training
loop has made no progress for ``stall_timeout_s`` (``stall_timeout_startup_s`` during the first
steps, evaluations, checkpoint writes and kernel-tile tuning) it reads every rank's heartbeat twice, names the ranks
whose heartbeat stopped (a SIGSTOPped or dead process, a hung host) or that are behind, logs
that, and exits the process with status 1 so ``torchrun --max-restarts`` restarts the group from
the last checkpoint: a collective would otherwise wait for the 30-minute process-group timeout
without a word.

Tile tuning (``during("tuning")``, installed as kernels/tile_tuner.py's phase hooks) can take longer
than any fixed limit (ResNet-50: 22 shapes × 3 p code paths × 5–8 tiles × 2–6 s of ptxas) while the
other ranks wait for rank 0's choice. Rank 0 calls :meth:`StallWatchdog.progress` after every timed
tile, which its heartbeat carries (``tuning:<trials>``); a rank waiting in the tuning phase counts a
peer's tuning progress as its own, so only a tuner stuck for the startup limit on one tile fires.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as tdist

from addernet_dist.distributed import DistInfo

log = logging.getLogger("addernet_dist")

EXIT_STALLED = 1


class DivergedError(RuntimeError):
    """The loss or a gradient went non-finite: the run stops without saving the model."""


class NonFiniteGuard:
    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit = limit
        self.streak = torch.zeros((), dtype=torch.int64, device=device)

    def update(
        self,
        loss: torch.Tensor,
        grad_norms: list[torch.Tensor | None],
        scaler_skip: torch.Tensor | None = None,
    ) -> None:
        """After every optimizer step (device ops only).

        scaler_skip (train.precision=fp16, ``StepStats.scaler_skip``): the GradScaler skipped this step
        for an inf/NaN gradient at a loss scale > 1. With a finite loss that is the scaler's business
        (it halves the scale; weights and optimizer state are untouched): the step neither counts nor
        resets the streak. A non-finite loss, or an overflow at scale <= 1, counts as usual."""
        loss_v = loss.detach().float().reshape(-1)
        vals = [loss_v] + [g.detach().float().reshape(-1) for g in grad_norms if g is not None and g.numel()]
        finite = torch.isfinite(torch.cat(vals)).all()
        streak = torch.where(finite, torch.zeros_like(self.streak), self.streak + 1)
        if scaler_skip is not None:
            streak = torch.where(scaler_skip & torch.isfinite(loss_v).all(), self.streak, streak)
        self.streak = streak

    @staticmethod
    def _model_nonfinite(model: torch.nn.Module) -> torch.Tensor:
        ts = [t.detach() for t in model.parameters()] + [
            b for b in model.buffers() if b.is_floating_point()
        ]
        if not ts:
            return torch.zeros((), dtype=torch.int64)
        return torch.stack([(~torch.isfinite(t)).any() for t in ts]).sum()

    def check(
        self, dist: DistInfo, step: int, model: torch.nn.Module | None = None, *, before: str = ""
    ) -> bool:
        """Collective. Raise DivergedError when the streak reached the limit on any rank, or
        (``model`` given: before a checkpoint/evaluation) any weight or buffer is non-finite.
        Returns whether the last step was finite on every rank (a checkpoint is only written
        then: a finite model reached through an inf gradient is not one to resume from)."""
        bad_model = self._model_nonfinite(model).to(self.streak.device) if model is not None else 0
        t = torch.stack([self.streak, torch.as_tensor(bad_model, device=self.streak.device)])
        if dist.initialized:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        streak, n_bad = (int(v) for v in t.tolist())
        if streak < self.limit and n_bad == 0:
            return streak == 0
        what = (
            f"the loss or a gradient norm has been non-finite for {streak} consecutive steps "
            f"(since step {step - streak + 1})"
            if streak
            else "the loss was finite but the model holds non-finite values"
        )
        if n_bad:
            what += f"; {n_bad} parameter/buffer tensors are non-finite"
        where = f" before the {before}" if before else ""
        raise DivergedError(
            f"training diverged at step {step}: {what}. Stopped{where}; no checkpoint of the "
            "non-finite model was written and the existing checkpoints are unchanged. Lower "
            "optim.lr or set train.grad_clip, then resume=<an earlier checkpoint> (or start "
            f"again in a new output_dir); train.max_nonfinite_steps={self.limit} sets the limit"
        )


def _own_store_client():
    """A store client with its own connection: the process group's client is shared with the
    main thread, and a heartbeat ``set`` queued behind one of its blocking calls stopped rank 1's
    heartbeats for the rest of the run (seen here after the first checkpoint barrier)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        try:
            return tdist.TCPStore(
                host,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=60),
                wait_for_workers=False,
            )
        except Exception as e:  # fall back to the group's store
            log.debug("own store client failed (%s); using the process group's", e)
    return tdist.distributed_c10d._get_default_store()


class StallWatchdog:
    """Built without side effects (``Trainer.from_config``); until :meth:`start` it is inert (a
    checkpoint written before ``Trainer.train`` calls :meth:`during` on it). :meth:`start` at the
    resumed step starts the heartbeat thread (multi-process runs with ``timeout_s > 0``)."""

    def __init__(self, dist: DistInfo, *, timeout_s: float, startup_timeout_s: float, startup_steps: int) -> None:
        self.dist = dist
        self.timeout_s = timeout_s
        self.startup_timeout_s = max(startup_timeout_s, timeout_s)
        self.startup_steps = startup_steps
        self.first_step: int | None = None  # set by start()
        self.step = 0
        self.phase = "startup" if startup_steps > 0 else "train"
        self.startup_until = startup_steps
        self._last = time.monotonic()
        self._trials = 0  # tiles timed by this rank (heartbeat of the "tuning" phase)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published_step = -1  # the step in this rank's last heartbeat (the thread sets it)

    def start(self, first_step: int = 0) -> StallWatchdog:
        """Watch from ``first_step`` (the resumed step: the startup limit covers the next
        ``startup_steps`` steps)."""
        self.first_step = self.step = first_step
        self.startup_until = first_step + self.startup_steps
        self.phase = "startup" if self.startup_steps > 0 else "train"
        self._last = time.monotonic()
        if not (self.dist.initialized and self.timeout_s > 0) or self._thread is not None:
            return self
        self._store = _own_store_client()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._key = f"addernet/heartbeat/attempt_{attempt}/rank_{{}}"
        self._beat_count = 0
        self._publish()  # every rank's key exists before anyone reads it
        self._interval = max(0.2, min(5.0, self.timeout_s / 10))
        self._thread = threading.Thread(
            target=self._run, name="addernet-stall-watchdog", daemon=True
        )
        self._thread.start()
        return self

    # ---- called by the training loop -----------------------------------------------------------
    def beat(self, step: int) -> None:
        self.step = step
        self._last = time.monotonic()
        if self.phase == "startup" and step >= self.startup_until:
            self.phase = "train"

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        """A slow collective phase (evaluation, checkpoint): the startup limit applies."""
        previous, self.phase, self._last = self.phase, phase, time.monotonic()
        try:
            yield
        finally:
            self.phase, self._last = previous, time.monotonic()

    def progress(self) -> None:
        """Rank 0 timed one more tile (tile_tuner's progress hook): the tuning phase is alive."""
        self._trials += 1
        self._last = time.monotonic()

    def wait_published(self, step: int, timeout_s: float = 30.0) -> bool:
        """Block until this rank's heartbeat carries ``step`` (fault injection: a rank stopped in
        the same heartbeat interval as its last steps is reported at an earlier step, 3 steps of
        0.1 s inside one 0.4 s interval here). False without a thread or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            if self.published_step >= step:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the thread ----------------------------------------------------------------------------
    def _limit(self) -> float:
        return self.timeout_s if self.phase == "train" else self.startup_timeout_s

    def _publish(self) -> None:
        self._beat_count += 1
        step = self.step
        phase = f"tuning:{self._trials}" if self.phase == "tuning" else self.phase
        value = f"{self._beat_count} {step} {phase}"
        self._store.set(self._key.format(self.dist.rank), value)
        self.published_step = step

    def _read_all(self) -> dict[int, tuple[int, int, str]]:
        keys = [self._key.format(r) for r in range(self.dist.world_size)]
        raw = self._store.multi_get(keys)
        out = {}
        for r, v in enumerate(raw):
            count, step, phase = v.decode().split(" ", 2)
            out[r] = (int(count), int(step), phase)
        return out

    def _run(self) -> None:
        first: dict[int, tuple[int, int, str]] | None = None
        while not self._stop.wait(self._interval):
            try:
                self._publish()
                waited = time.monotonic() - self._last
                limit = self._limit()
                if waited < limit / 2:
                    first = None
                    continue
                if first is None:
                    first = self._read_all()  # halfway: remember everyone's heartbeat
                    continue
                if waited >= limit:
                    now = self._read_all()
                    if self.phase == "tuning" and _peer_tuned(first, now, self.dist.rank):
                        self._last, first = time.monotonic(), None  # rank 0 is still tuning
                        continue
                    self._fire(first, now, waited, limit)
            except Exception as e:  # the store went away (shutdown): nothing left to watch
                if not self._stop.is_set():
                    log.debug("stall watchdog stopped: %s", e)
                return

    def _fire(self, first, now, waited: float, limit: float) -> None:
        me = self.dist.rank
        stalled = [r for r in now if r != me and now[r][0] == first[r][0]]
        behind = [r for r in now if r != me and r not in stalled and now[r][1] < self.step]
        key = "train.stall_timeout_s" if self.phase == "train" else "train.stall_timeout_startup_s"
        if stalled:
            # The heartbeat lags the loop by up to one interval: "last reported".
            who = ", ".join(
                f"rank {r} (last reported step {now[r][1]}, {now[r][2]})" for r in stalled
            )
            cause = f"{who} stopped responding: no heartbeat for over {limit / 2:.0f} s"
        elif behind:
            who = ", ".join(f"rank {r} (at step {now[r][1]})" for r in behind)
            cause = f"{who} is behind and making no progress"
        else:
            cause = (
                "every rank is alive but none finishes the collective (steps: "
                + ", ".join(f"rank {r}: {now[r][1]}" for r in now)
                + ")"
            )
        msg = (
            f"stalled run: rank {me} has waited {waited:.0f} s since it finished step {self.step} "
            f"({self.phase}; limit {key}={limit:g}); {cause}. Exiting with status "
            f"{EXIT_STALLED} so torchrun --max-restarts restarts the group from the last "
            "checkpoint (resume=auto)"
        )
        log.error(msg)
        print(f"error: {msg}", file=sys.stderr, flush=True)
        for h in logging.getLogger().handlers:
            h.flush()
        # The main thread is blocked inside a C++ collective and cannot be interrupted; the
        # run folder lock (flock) and the metrics file (flushed per line) survive _exit.
        os._exit(EXIT_STALLED)


def _peer_tuned(
    first: dict[int, tuple[int, int, str]], now: dict[int, tuple[int, int, str]], me: int
) -> bool:
    """Another rank's heartbeat shows tiles timed since ``first`` (``tuning:<trials>`` advanced)."""
    return any(
        r != me and now[r][2].startswith("tuning:") and now[r][2] != first[r][2] for r in now
    )
