"""Crash-safe checkpoint files and the run folder's checkpoint bookkeeping.

File format (runfolder.py): ``torch.save`` bytes followed by a 40-byte footer
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
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from addernet_dist.distributed import DistInfo
from addernet_dist.engine import ds_checkpoint
from addernet_dist.runfolder import (  # noqa: F401  (re-exported: the checkpoint API)
    CheckpointError,
    RunFolderError,
    RunLock,
    atomic_write_bytes,
    clean_stale_temp,
    encode,
    link_or_copy,
    load_file,
    read_verified,
    remove,
    same_checkpoint,
    save_file,
    verify_file,
)

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")

# Locks held by this process (released by train.train on any exit; the kernel does on a crash).
_HELD_LOCKS: list[RunLock] = []


def release_run_locks() -> None:
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete, uncorrupted checkpoint, else the reason it is not."""
    if Path(path).is_dir():  # engine=deepspeed saves folders (engine/ds_checkpoint.py)
        return ds_checkpoint.verify_dir(path)
    return verify_file(path)


def step_of(path: Path) -> int | None:
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# RNG state of every rank
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Plain types and tensors only (a checkpoint may hold nothing else, runfolder.safe_torch_load):
    numpy's legacy tuple becomes a dict with its 624 uint32 words as an int64 tensor."""
    key, words, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = {
        "key": str(key),
        "words": torch.from_numpy(words.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, None)
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    ns = state["numpy"]
    if isinstance(ns, dict):
        words = ns["words"].numpy().astype(np.uint32)
        ns = (ns["key"], words, ns["pos"], ns["has_gauss"], ns["cached_gaussian"])
    np.random.set_state(ns)  # a dict, or the tuple checkpoints before the safe-loading rule hold
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def _model_identity(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: model_cfg.get(k) for k in ("name", "conv", "num_classes", "kwargs")}


def _describe_model(model_cfg: dict[str, Any]) -> str:
    extra = f", kwargs {model_cfg['kwargs']}" if model_cfg.get("kwargs") else ""
    classes = model_cfg.get("num_classes") or "dataset's"
    return f"{model_cfg.get('name')} (conv={model_cfg.get('conv')}, {classes} classes{extra})"


def check_resumable(state: dict[str, Any], path: Path, cfg: Any) -> None:
    """Refuse, with what to do instead, a checkpoint file that cannot resume the run ``cfg``."""
    engine = state.get("engine") if isinstance(state, dict) else None
    client = state.get("client") if isinstance(state, dict) else None
    if not isinstance(engine, dict) or not isinstance(client, dict):
        raise CheckpointError(f"'{path}' is not a training checkpoint written by addernet-train")
    if engine.get("optimizer") is None or "train_state" not in client:
        raise CheckpointError(
            f"'{path}' holds model weights only (e.g. converted from a DeepSpeed checkpoint by "
            "addernet-zero-to-state-dict): it has no optimizer state, so it cannot resume a run. "
            "Resume the DeepSpeed checkpoint folder itself with engine=deepspeed, or evaluate "
            "the file with addernet-eval"
        )
    saved = client.get("config", {}).get("model")
    if saved is not None:
        want = cfg.model.model_dump(mode="json")
        if _model_identity(saved) != _model_identity(want):
            raise CheckpointError(
                f"'{path}' holds model {_describe_model(saved)}, this run builds "
                f"{_describe_model(want)}; set model.* to match the checkpoint to resume it, or "
                "start the new model in another output_dir"
            )


class Checkpointer:
    """Names, lists, verifies, prunes and resolves the checkpoints of one run folder."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int, dist: DistInfo, every_steps: int = 0) -> None:
        self.root = Path(output_dir)
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

    @staticmethod
    def _signature(path: Path) -> tuple:
        if path.is_dir():  # a DeepSpeed folder: every shard's size and mtime
            return tuple(
                (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(path.rglob("*"))
                if p.is_file()
            )
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)

    def _check(self, path: Path) -> str | None:
        """verify(), cached for files this process already verified unchanged."""
        try:
            sig = self._signature(path)
        except OSError as e:
            return f"cannot stat '{path}': {e}"
        if self._valid.get(path) == sig:
            return None
        problem = verify(path)
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
            if best.is_dir():  # a DeepSpeed folder
                shutil.copytree(best, dst / best.name, copy_function=link_or_copy)
            elif best.is_file():
                link_or_copy(best, dst / best.name)
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
        if plan.path.is_file():
            state = load_file(plan.path)
            check_resumable(state, plan.path, cfg)
            if inside:
                plan.supersede_after = int(state["client"]["train_state"]["global_step"])
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

    def resolve_resume(self, resume: str) -> Path | None:
        """Collective, no lock: where ``resume`` points (kept for tools and tests).

        resume: "none" -> None; "auto" -> newest valid in the run folder (None when there is
        none); anything else is a path that must verify.
        """
        choice: str | None = None
        error: str | None = None
        if self.dist.is_main:
            if resume == "auto":
                found = self.newest_valid()
                choice = str(found) if found else None
            elif resume != "none":
                problem = verify(Path(resume))
                if problem is not None:
                    error = f"resume={resume}: {problem}; pass resume=auto or resume=none"
                else:
                    choice = resume
        choice, error = self.dist.broadcast_object((choice, error))
        if error is not None:
            raise CheckpointError(error)
        return Path(choice) if choice else None

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
                remove(path)  # a file, or an engine=deepspeed folder
                self._valid.pop(path, None)
            else:
                kept += 1

    def copy_to_best(self, path: Path, dst: Path | None = None) -> None:
        """Copy a verified step checkpoint to ``dst`` (default best.pt)."""
        dst = dst or self.best_path
        if not self.dist.is_main:
            return
        if Path(path).is_dir():  # engine=deepspeed folder
            ds_checkpoint.copy(Path(path), dst)
            return
        data = Path(path).read_bytes()
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"not copying to {dst.name}: {problem}")
        atomic_write_bytes(data, dst)


# ---------------------------------------------------------------------------------------------
# Resume: load, keep this run's optimizer settings, say what changed
# ---------------------------------------------------------------------------------------------

# Optimizer hyperparameters a resumed run takes from ITS config (the checkpoint's momentum
# buffers and schedule position are kept): the user asked for them on the command line.
_NEW_HYPERPARAMETERS = ("momentum", "nesterov", "weight_decay", "dampening")


def load_for_resume(engine: Any, path: Path) -> dict[str, Any]:
    """Collective. ``engine.load(path)``, then this run's optimizer settings (optim.lr, momentum,
    nesterov, weight_decay) replace the checkpoint's: ``optimizer.load_state_dict`` would restore
    the saved ones and the run would silently train with them. The LR schedule keeps its
    position: lr = new base lr x the schedule's factor at the resumed step."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    sched = engine.lr_scheduler
    base_lrs = list(sched.base_lrs)
    try:
        client = engine.load(path)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(
            f"cannot resume from '{path}' with this config: {e}. Resume with the checkpoint's "
            "settings (see its config), or start the new run in another output_dir"
        ) from e
    sched.base_lrs = base_lrs
    lambdas = getattr(sched, "lr_lambdas", None)
    for i, (g, fresh) in enumerate(zip(engine.optimizer.param_groups, groups)):
        for k in _NEW_HYPERPARAMETERS:
            if k in fresh:
                g[k] = fresh[k]
        g["initial_lr"] = base_lrs[i]
        if lambdas is not None:
            g["lr"] = base_lrs[i] * lambdas[i](sched.last_epoch)
    sched._last_lr = [g["lr"] for g in engine.optimizer.param_groups]
    return client


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_QUIET_KEYS = {"resume", "overwrite"}  # keys whose change on resume is expected, not worth a line


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{"optim.lr": [0.1, 0.05], ...}``: every key whose value differs between the
    checkpoint's config and this run's (keys only one side has count as changed)."""
    a, b = _flatten(old), _flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if k not in _QUIET_KEYS and a.get(k) != b.get(k)}


def describe_changes(changes: dict[str, list[Any]]) -> list[str]:
    if not changes:
        return ["config unchanged since the checkpoint"]
    lines = [f"{k}: {old!r} -> {new!r} (this run's value applies)" for k, (old, new) in changes.items()]
    return [f"{len(changes)} config key(s) differ from the checkpoint's:", *lines]
