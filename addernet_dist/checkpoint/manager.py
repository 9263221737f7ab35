"""The run folder's checkpoint bookkeeping: naming, verifying, retention, best.pt, resume decisions.

The format of one checkpoint is its store's (checkpoint/store.py); e.g. the file store's
(runfolder.py): ``torch.save`` bytes followed by a 40-byte footer
``b"ADDERCKP" + sha256(body)``, written atomically (temp file, fsync, ``os.replace``, fsync of the
folder), so a crash at any moment leaves either the old set of checkpoints or the new one, never a
half-written file under a checkpoint name. The footer catches what atomic rename cannot:
truncation or corruption after the fact (disk full on a network file system, a partial copy); such
a file fails ``verify``, ``resume=auto`` falls back to the previous one with a warning naming it,
and the file is moved aside to ``<name>.corrupt`` (never deleted: it may be all a user has).

Layout of ``<output_dir>/checkpoints/``: ``step_<global step, 9 digits>.pt`` and ``best.pt`` (a
copy of the checkpoint with the best val top-1). Retention (:meth:`Checkpointer.prune`) deletes a
step checkpoint only when this run has verified it AND ``keep_last`` newer checkpoints that verify;
it never deletes the newest valid one, nor a file it cannot read.

One run per folder (:meth:`Checkpointer.open`): rank 0 holds ``<output_dir>/.lock`` for the life of
the run; a fresh start (``resume=none``) in a folder that holds a run is refused unless
``overwrite=true``, which moves the old run into ``<output_dir>/old-<UTC time>/``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addernet_dist.checkpoint import layout
from addernet_dist.checkpoint.resume import check_resumable
from addernet_dist.checkpoint.store import FILE, CheckpointStore, clean_stale_temp, same_checkpoint, store_of, verify
from addernet_dist.distributed import DistInfo
from addernet_dist.runfolder import CheckpointError, RunFolderError, RunLock, load_file

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")

# Locks held by this process (released by train.train on any exit; the kernel does on a crash).
_HELD_LOCKS: list[RunLock] = []


def release_run_locks() -> None:
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


def step_of(path: Path) -> int | None:
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Run-folder bookkeeping
# ---------------------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    """What :meth:`Checkpointer.open` decided (identical on every rank)."""

    path: Path | None = None
    # resume=auto found a run but no checkpoint that verifies: step 0, a restart mark in metrics.jsonl.
    from_scratch: bool = False
    notes: list[str] = field(default_factory=list)
    # Applied by Checkpointer.commit once the resume is validated (a rejected run moves nothing):
    move_old_run: bool = False  # overwrite=true: the previous run goes to old-<time>/
    supersede_after: int | None = None  # resume= an older step: newer ones go to superseded-<time>/


class Checkpointer:
    """Names, lists, verifies, prunes and resolves the checkpoints of one run folder."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        keep_last: int,
        dist: DistInfo,
        every_steps: int = 0,
        store: CheckpointStore | None = None,
    ) -> None:
        self.root = Path(output_dir)
        # The format this run writes (Engine.checkpoint_store); None: whichever format a written
        # checkpoint has. Checkpoints found in the folder are read by their own format's store
        # (store.store_of): the folder may hold another engine's, which engine.load refuses.
        self.store = store
        self.dir = self.root / "checkpoints"
        self.keep_last = keep_last
        self.every_steps = every_steps  # train.ckpt_every_steps; 0: only at the end of each epoch
        self.dist = dist
        # path -> stat signature of checkpoints this process verified: re-read only when changed since.
        self._valid: dict[Path, tuple] = {}

    # ---- when to save, and the save ---------------------------------------------------------

    def due(self, global_step: int, end_of_epoch: bool) -> bool:
        """A mid-epoch checkpoint every ``every_steps`` steps (the epoch's end saves anyway)."""
        return bool(self.every_steps) and global_step % self.every_steps == 0 and not end_of_epoch

    def save(
        self, global_step: int, write: Callable[[Path], None], *, best: bool = False, best_ema: bool = False
    ) -> Path:
        """Collective. ``write(path)`` the step's checkpoint (the engine's format), read it back,
        copy it to best.pt when ``best`` (to best_ema.pt when ``best_ema``), then apply retention."""
        path = self.path_for(global_step)
        write(path)
        self.verify_written(path)
        if best:
            self.copy_to_best(path)
        if best_ema:  # train.ema_decay: the checkpoint whose EMA scored best (addernet-eval --ema)
            self.copy_to_best(path, self.best_ema_path)
        self.prune()  # after best.pt is copied: only ever deletes verified, superseded files
        return path

    def path_for(self, global_step: int) -> Path:
        return self.dir / f"step_{global_step:09d}.pt"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    @property
    def best_ema_path(self) -> Path:
        return self.dir / "best_ema.pt"

    def list(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    # ---- validity --------------------------------------------------------------------------

    def _store(self, path: Path) -> CheckpointStore:
        """This run's store for what it writes, the store of its format for anything else."""
        store = self.store
        return store if store is not None and store.holds(path) else store_of(path)

    def _check(self, path: Path) -> str | None:
        """The store's verify(), cached for checkpoints this process already verified unchanged."""
        store = self._store(path)
        try:
            sig = store.signature(path)
        except OSError as e:
            return f"cannot stat '{path}': {e}"
        if self._valid.get(path) == sig:
            return None
        problem = store.verify(path)
        if problem is None:
            self._valid[path] = sig
        return problem

    def move_aside(self, path: Path, problem: str, kind: str = "corrupt") -> Path:
        """Rename an unreadable (or superseded) checkpoint to ``<name>.<kind>`` (kept for the
        user, out of the way of listing, retention and resume)."""
        dst, n = path.with_name(f"{path.name}.{kind}"), 1
        while dst.exists():
            dst, n = path.with_name(f"{path.name}.{kind}{n}"), n + 1
        os.replace(path, dst)
        log.warning("moved checkpoint %s aside to %s (%s)", path.name, dst.name, problem)
        return dst

    def newest_valid(self, move_aside: bool = False) -> Path | None:
        """The newest checkpoint that verifies; warns about (and optionally moves aside) each
        newer one that does not."""
        for path in reversed(self.list()):
            problem = self._check(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s; trying the previous one", path.name, problem)
            if move_aside:
                self.move_aside(path, problem)
        return None

    def verify_written(self, path: Path) -> None:
        """Collective. Rank 0 reads back the checkpoint just written: one that does not verify
        (a full disk on a network file system) is an error on every rank (none is left waiting
        in the next collective), and the previous checkpoints stay."""
        problem = None
        if self.dist.is_main:
            self._valid.pop(path, None)
            problem = self._check(path)
        problem = self.dist.broadcast_object(problem)
        if problem is not None:
            raise CheckpointError(f"the checkpoint just written does not verify: {problem}")

    # ---- opening a run folder -----------------------------------------------------------------

    def holds_run(self) -> list[str]:
        """What in the folder belongs to a run (empty: the folder is free for a fresh start)."""
        found = [f"checkpoints/{p.name}" for p in self.list()]
        if self.dir.is_dir():
            found += [
                f"checkpoints/{p.name}"
                for p in sorted(self.dir.iterdir())
                if p.name in ("best.pt", "best_ema.pt") or ".corrupt" in p.name or ".superseded" in p.name
            ]
        metrics = self.root / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.append("metrics.jsonl")
        return found

    def _move_old_run(self) -> Path:
        dst = self.root / time.strftime("old-%Y%m%dT%H%M%SZ", time.gmtime())
        n = 1
        while dst.exists():
            dst = self.root / (time.strftime("old-%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{n}")
            n += 1
        dst.mkdir()
        for name in ("checkpoints", "metrics.jsonl", "config.yaml", "wandb"):
            if (self.root / name).exists():
                os.replace(self.root / name, dst / name)
        return dst

    def _supersede_newer(self, step: int) -> Path | None:
        """resume= an older checkpoint of this folder: the newer ones (another future of the run)
        move to ``checkpoints/superseded-<UTC time>/`` instead of being overwritten, with a hard
        link (a copy where links fail) of best.pt / best_ema.pt: they may be that future's best,
        which the resumed run's next best would replace."""
        newer = [p for p in self.list() if (step_of(p) or 0) > step]
        if not newer:
            return None
        dst = self.dir / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
        dst.mkdir(exist_ok=True)
        for p in newer:
            os.replace(p, dst / p.name)
        for best in (self.best_path, self.best_ema_path):
            if best.exists():
                self._store(best).link_copy(best, dst / best.name)
        return dst

    def _decide(self, cfg: Any) -> ResumePlan:
        """Rank 0's part of :meth:`open` (raises CheckpointError with the fix)."""
        plan = ResumePlan()
        for p in clean_stale_temp(self.dir) + clean_stale_temp(self.root):
            log.warning("removed %s, left by a killed writer", p)
        resume, overwrite = cfg.resume, getattr(cfg, "overwrite", False)
        existing = self.holds_run()
        inside = False
        if resume not in ("auto", "none"):  # verified by check_paths
            inside = Path(resume).resolve().parent == self.dir.resolve()
        if existing and (resume == "none" or (resume not in ("auto", "none") and not inside)):
            what = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            if not overwrite:
                raise RunFolderError(
                    f"output_dir '{self.root}' already holds a run ({what}); resume={resume} "
                    "would mix two runs in one folder. Continue that run with resume=auto, "
                    "choose another output_dir, or pass overwrite=true to move the old run "
                    f"into '{self.root}/old-<time>/' and start fresh"
                )
            plan.move_old_run = True
            existing = []
        if resume == "none":
            return plan
        if resume == "auto":
            found = self.newest_valid(move_aside=True) or self._valid_best()
            if found == self.best_path:
                plan.notes.append(
                    f"no valid step checkpoint in '{self.dir}': resuming from best.pt (a complete "
                    "checkpoint of the best evaluation) instead of starting from scratch over it"
                )
            if found is None:
                if existing:
                    plan.from_scratch = True
                    plan.notes.append(
                        f"no valid checkpoint in '{self.dir}': starting from scratch (metrics.jsonl "
                        "marks the restart; earlier records there are superseded)"
                    )
                return plan
            plan.path = found
        else:
            plan.path = Path(resume)
        if FILE.holds(plan.path):  # a DeepSpeed folder is checked by the DeepSpeed engine's load
            state = load_file(plan.path)
            check_resumable(state, plan.path, cfg)
            if inside:
                plan.supersede_after = int(layout.client_part(state)["train_state"]["global_step"])
        return plan

    def _valid_best(self) -> Path | None:
        """best.pt when it verifies; an unreadable one is moved aside (a fresh start would
        otherwise overwrite it: never delete what may be all a user has)."""
        if not self.best_path.exists():
            return None
        problem = self._check(self.best_path)
        if problem is None:
            return self.best_path
        self.move_aside(self.best_path, problem)
        return None

    def restore_best(self, resumed: Path, best_step: int | None, best_path: Path | None = None) -> bool:
        """Collective, after a resume. The train state names the step whose checkpoint is best.pt
        (``best_step``, recorded before the copy; or best_ema.pt's, ``best_path``): a run killed or
        out of disk while copying left it missing or holding the previous best: copy it again. A
        valid best file that is not that step's (the previous best, or another future's after
        resume= an older step) is kept aside as ``<name>.superseded``, never overwritten.
        True when neither it nor the step's checkpoint is left (the caller forgets that best)."""
        best_path = best_path or self.best_path
        lost = False
        if self.dist.is_main and best_step is not None and Path(resumed) != best_path:
            problem = self._check(best_path) if best_path.exists() else "missing"
            best_ok = problem is None
            if best_path.exists() and not best_ok:
                self.move_aside(best_path, problem)  # replaced below: keep it for the user
            src = Path(resumed) if step_of(resumed) == best_step else self.path_for(best_step)
            src_ok = src == Path(resumed) or (src.exists() and self._check(src) is None)
            if src_ok and not (best_ok and same_checkpoint(src, best_path)):
                if best_ok:
                    self.move_aside(best_path, f"not the checkpoint of step {best_step}", "superseded")
                log.warning("%s is not the checkpoint of step %d, the best evaluation: copying %s to %s "
                            "again", best_path.name, best_step, src.name, best_path.name)  # fmt: skip
                self.copy_to_best(src, best_path)
            elif not best_ok and not src_ok:
                log.warning("%s (step %d) is missing or unreadable and that step's checkpoint is gone: the"
                            " next evaluation at the final p makes it again", best_path.name, best_step)  # fmt: skip
                lost = True
        return bool(self.dist.broadcast_object(lost))

    def commit(self, plan: ResumePlan) -> None:
        """Rank 0, once the resume checkpoint loaded and fits the run: move the previous run
        (overwrite=true) or the checkpoints newer than an explicit resume point out of the way."""
        if not self.dist.is_main:
            return
        if plan.move_old_run:
            log.warning("overwrite=true: moved the previous run to %s", self._move_old_run())
        if plan.supersede_after is not None:
            moved = self._supersede_newer(plan.supersede_after)
            if moved is not None:
                log.warning("resumed from an older checkpoint: the newer ones moved to %s", moved)

    def check_paths(self, resume: str) -> None:
        """Refuse, before anything is created, an output_dir that cannot be a folder and a
        ``resume=`` path that is not a checkpoint (a typo must not leave an empty run folder)."""
        for p in (self.root, *self.root.parents):
            if p.exists():
                if not p.is_dir():
                    where = "is" if p == self.root else f"is inside '{p}', which is"
                    raise RunFolderError(
                        f"output_dir '{self.root}' {where} a file, not a folder; set output_dir "
                        "to a folder (it is created when missing)"
                    )
                break
        if resume not in ("auto", "none"):
            problem = verify(Path(resume))  # the file itself first: the most useful message
            if problem is not None:
                raise CheckpointError(f"resume={resume}: {problem}; pass resume=auto or resume=none")

    def open(self, cfg: Any) -> ResumePlan:
        """Collective. Lock the run folder (rank 0, for the life of the run), remove temp files
        of killed writers, and decide where the run starts (``cfg.resume``, ``cfg.overwrite``).

        resume: "none" -> fresh start (refused in a folder that holds a run, unless overwrite);
        "auto" -> newest valid checkpoint of the folder (unreadable newer ones are moved aside;
        none at all: from scratch, said); else a path that must verify and fit the run.
        """
        plan: ResumePlan | None = None
        error: str | None = None
        if self.dist.is_main:
            lock = RunLock(self.root)
            try:
                self.check_paths(cfg.resume)  # before the lock creates the folder
                lock.acquire()
                _HELD_LOCKS.append(lock)
                plan = self._decide(cfg)
            except CheckpointError as e:
                error = str(e)
            except OSError as e:  # e.g. a read-only output_dir: every rank must hear of it
                error = f"cannot use output_dir '{self.root}': {e}"
        plan, error = self.dist.broadcast_object((plan, error))
        if error is not None:
            release_run_locks()
            raise CheckpointError(error)
        if self.dist.is_main:
            for note in plan.notes:
                log.warning(note)
        return plan

    # ---- retention --------------------------------------------------------------------------

    def prune(self) -> None:
        """Retention (rank 0): walking from the newest step down, keep the first ``keep_last``
        checkpoints that verify and delete the older ones that verify; one that does not verify
        is moved aside (``.corrupt``), never deleted and never counted as kept."""
        if not self.dist.is_main:
            return
        kept = 0
        for path in reversed(self.list()):
            problem = self._check(path)
            if problem is not None:
                self.move_aside(path, problem)
                continue
            if kept >= self.keep_last:
                self._store(path).remove(path)
                self._valid.pop(path, None)
            else:
                kept += 1

    def copy_to_best(self, path: Path, dst: Path | None = None) -> None:
        """Copy a verified step checkpoint to ``dst`` (default best.pt), by its store."""
        dst = dst or self.best_path
        if not self.dist.is_main:
            return
        self._store(Path(path)).copy(Path(path), dst)
