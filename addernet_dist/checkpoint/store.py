"""Checkpoint stores: the on-disk formats of one checkpoint, behind one protocol.

Two formats exist, both published under a ``checkpoints/step_<n>.pt`` name:

- :class:`FileStore` (engine=ddp): one verified file, ``torch.save`` bytes + ``b"ADDERCKP"`` +
  sha256 (runfolder.py's format, written atomically);
- :class:`DeepSpeedFolderStore` (engine=deepspeed): DeepSpeed's folder of shards plus a verified
  ``MANIFEST`` of their sha256 (engine/ds_checkpoint.py holds the folder mechanics).

The engine names the store it writes (``Engine.checkpoint_store``) and hands it to the
Checkpointer (checkpoint/manager.py). A checkpoint found on disk is read through the store of
its format, :func:`store_of`: a run folder may hold another engine's checkpoints (engine=ddp files
under engine=deepspeed), which must verify, prune and move like any other and be refused by the
engine's ``load`` with its message, never moved aside as corrupt. :func:`store_of` is the one
place that tells the formats apart by their shape on disk (tests/unit/test_layering.py).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

from addernet_dist.engine import ds_checkpoint
from addernet_dist.runfolder import (
    CheckpointError,
    atomic_write_bytes,
    link_or_copy,
    pid_alive,
    save_file,
    verify_file,
)


class CheckpointStore(Protocol):
    """What the Checkpointer needs of a checkpoint format."""

    name: str
    # Temp names a killed writer of this format leaves next to the final one (clean_stale_temp).
    temp_patterns: tuple[re.Pattern[str], ...]

    def holds(self, path: Path) -> bool:
        """Whether ``path`` has this format's shape on disk (not whether it verifies)."""

    def verify(self, path: Path) -> str | None:
        """None if ``path`` is a complete, uncorrupted checkpoint, else the reason it is not."""

    def signature(self, path: Path) -> tuple:
        """Cheap stat signature: unchanged signature, unchanged (already verified) checkpoint."""

    def copy(self, src: Path, dst: Path) -> None:
        """Crash-safe copy of the verified checkpoint ``src`` onto ``dst`` (best.pt)."""

    def link_copy(self, src: Path, dst: Path) -> None:
        """Hard links (copies where links fail) of ``src`` at the new name ``dst``."""

    def remove(self, path: Path) -> None:
        """Delete the checkpoint ``path`` (retention, temp cleanup)."""

    def same(self, a: Path, b: Path) -> bool:
        """Whether ``b`` is a copy of ``a`` (both of this format and verified)."""


class FileStore:
    """engine=ddp: one verified file per checkpoint (runfolder.save_file / verify_file)."""

    name = "file"
    # atomic_write_bytes: .<name>.tmp.<pid>
    temp_patterns = (re.compile(r"^\..+\.tmp\.(\d+)$"),)

    def holds(self, path: Path) -> bool:
        return Path(path).is_file()

    def write(self, state: dict[str, Any], path: Path) -> None:
        save_file(state, path)

    def verify(self, path: Path) -> str | None:
        return verify_file(path)

    def signature(self, path: Path) -> tuple:
        st = Path(path).stat()
        return (st.st_size, st.st_mtime_ns)

    def copy(self, src: Path, dst: Path) -> None:
        data = Path(src).read_bytes()
        problem = verify_file(src)
        if problem is not None:
            raise CheckpointError(f"not copying to {dst.name}: {problem}")
        atomic_write_bytes(data, dst)

    def link_copy(self, src: Path, dst: Path) -> None:
        link_or_copy(src, dst)

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def same(self, a: Path, b: Path) -> bool:
        """The same sha256 footer (and size)."""
        a, b = Path(a), Path(b)
        if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            fa.seek(-32, os.SEEK_END)
            fb.seek(-32, os.SEEK_END)
            return fa.read() == fb.read()


class DeepSpeedFolderStore:
    """engine=deepspeed: a folder of DeepSpeed shards + MANIFEST (engine/ds_checkpoint.py)."""

    name = "deepspeed-folder"
    # ds_checkpoint.tmp_name / publish: .<name>.tmp / .<name>.old (pid-less: only the lock
    # holder's rank 0 publishes)
    temp_patterns = (re.compile(r"^\.step_\d{9}\.pt\.(tmp|old)$"), re.compile(r"^\.best\.pt\.(tmp|old)$"))

    def holds(self, path: Path) -> bool:
        return Path(path).is_dir()

    def verify(self, path: Path) -> str | None:
        return ds_checkpoint.verify_dir(path)

    def signature(self, path: Path) -> tuple:
        """Every shard's size and mtime."""
        path = Path(path)
        return tuple(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))
            if p.is_file()
        )

    def copy(self, src: Path, dst: Path) -> None:
        ds_checkpoint.copy(Path(src), Path(dst))

    def link_copy(self, src: Path, dst: Path) -> None:
        shutil.copytree(src, dst, copy_function=link_or_copy)

    def remove(self, path: Path) -> None:
        ds_checkpoint.remove(path)

    def same(self, a: Path, b: Path) -> bool:
        """The same MANIFEST (which holds every shard's sha256)."""
        a, b = Path(a), Path(b)
        if not (self.holds(a) and self.holds(b)):
            return False
        manifest = ds_checkpoint.MANIFEST
        return (a / manifest).read_bytes() == (b / manifest).read_bytes()


FILE = FileStore()
DEEPSPEED_FOLDER = DeepSpeedFolderStore()
STORES: tuple[CheckpointStore, ...] = (DEEPSPEED_FOLDER, FILE)


def store_of(path: Path) -> CheckpointStore:
    """The store of the format ``path`` holds on disk (a file when nothing is there: its
    verify then says the file is missing)."""
    return DEEPSPEED_FOLDER if DEEPSPEED_FOLDER.holds(path) else FILE


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete, uncorrupted checkpoint of any store, else the reason."""
    return store_of(path).verify(path)


def same_checkpoint(a: Path, b: Path) -> bool:
    """Whether ``b`` is a copy of ``a`` (both verified, of one format)."""
    store = store_of(a)
    return store is store_of(b) and store.same(a, b)


def clean_stale_temp(folder: Path) -> list[Path]:
    """Remove temp files and folders of writers that are gone; returns what was removed.

    Call only while holding the folder's runfolder.RunLock (then no other trainer writes here):
    a ``.<name>.tmp.<pid>`` file is removed unless its pid is this process or a live process on
    this host; DeepSpeed's pid-less ``.step_<n>.pt.tmp``/``.old`` folders are removed outright
    (only the lock holder's rank 0 would publish them, and it has not started writing yet).
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    me = os.getpid()
    with_pid, pidless = FILE.temp_patterns, DEEPSPEED_FOLDER.temp_patterns
    for p in Path(folder).iterdir():
        m = next((m for r in with_pid if (m := r.match(p.name))), None)
        if m:
            pid = int(m.group(1))
            if pid == me or pid_alive(pid):
                continue
        elif not any(r.match(p.name) for r in pidless):
            continue
        store_of(p).remove(p)
        removed.append(p)
    return removed
