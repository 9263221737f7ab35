"""Crash-safe checkpoint files and the run folder's checkpoint bookkeeping.

File format: ``torch.save`` bytes followed by a 40-byte footer ``b"ADDERCKP" + sha256(body)``.
A file is written to a temporary name in the same folder, fsynced, then ``os.replace``d onto its
final name (and the folder fsynced), so a crash at any moment leaves either the old set of
checkpoints or the new one, never a half-written file under a checkpoint name. The footer catches
what atomic rename cannot: truncation or corruption after the fact (disk full on a network file
system, a partial copy); such a file fails ``verify`` and ``resume=auto`` falls back to the
previous one with a warning naming it.

Layout of ``<output_dir>/checkpoints/``: ``step_<global step, 9 digits>.pt`` (the last
``keep_last`` are kept) and ``best.pt`` (a copy of the checkpoint with the best val top-1).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from addernet_dist.distributed import DistInfo

log = logging.getLogger(__name__)

_MAGIC = b"ADDERCKP"
_FOOTER = len(_MAGIC) + 32
_STEP_RE = re.compile(r"^step_(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (tmp file in the same folder + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def encode(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    return body + _MAGIC + hashlib.sha256(body).digest()


def save_file(state: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(encode(state), path)


def _read_verified(path: Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e}") from e
    if len(data) < _FOOTER or data[-_FOOTER : -_FOOTER + len(_MAGIC)] != _MAGIC:
        raise CheckpointError(f"checkpoint '{path}' is truncated or not an addernet checkpoint")
    body, digest = data[:-_FOOTER], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint '{path}' is corrupt (sha256 mismatch)")
    return body


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete, uncorrupted checkpoint, else the reason it is not."""
    if Path(path).is_dir():  # engine=deepspeed saves folders (engine/ds_checkpoint.py)
        from addernet_dist.engine.ds_checkpoint import verify_dir

        return verify_dir(path)
    try:
        _read_verified(path)
    except CheckpointError as e:
        return str(e)
    return None


def load_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    body = _read_verified(path)
    # weights_only=False: the file also holds RNG states (numpy arrays, Python tuples) and the
    # config; its integrity is checked above and it is only ever a file this trainer wrote.
    return torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)


# ---------------------------------------------------------------------------------------------
# RNG state of every rank
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Run-folder bookkeeping
# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Names, lists, prunes and resolves the checkpoints of one run folder."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int, dist: DistInfo) -> None:
        self.dir = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.dist = dist

    def path_for(self, global_step: int) -> Path:
        return self.dir / f"step_{global_step:09d}.pt"

    @property
    def best_path(self) -> Path:
        return self.dir / "best.pt"

    def list(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that verifies; warns about each newer one that does not."""
        for path in reversed(self.list()):
            problem = verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s; trying the previous one", path.name, problem)
        return None

    def resolve_resume(self, resume: str) -> Path | None:
        """Collective: rank 0 decides (so every rank resumes from the same file) and broadcasts.

        resume: "none" -> None; "auto" -> newest valid in the run folder (None when there is
        none); anything else is a path that must verify.
        """
        choice: str | None = None
        error: str | None = None
        if self.dist.is_main:
            if resume == "none":
                choice = None
            elif resume == "auto":
                found = self.newest_valid()
                choice = str(found) if found else None
            else:
                problem = verify(Path(resume))
                if problem is not None:
                    error = f"resume={resume}: {problem}; pass resume=auto or resume=none"
                else:
                    choice = resume
        choice, error = self.dist.broadcast_object((choice, error))
        if error is not None:
            raise CheckpointError(error)
        return Path(choice) if choice else None

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` step checkpoints (rank 0 only)."""
        if not self.dist.is_main:
            return
        from addernet_dist.engine.ds_checkpoint import remove

        for path in self.list()[: -self.keep_last]:
            remove(path)  # a file, or an engine=deepspeed folder

    def copy_to_best(self, path: Path) -> None:
        if self.dist.is_main and Path(path).is_dir():  # engine=deepspeed folder
            from addernet_dist.engine.ds_checkpoint import copy

            copy(Path(path), self.best_path)
        elif self.dist.is_main:
            atomic_write_bytes(Path(path).read_bytes(), self.best_path)
