"""File-system helpers of a run folder: atomic writes, verified files, the run lock, temp cleanup.

One module for what the checkpoint stores (checkpoint/store.py: single files, DeepSpeed folders via
engine/ds_checkpoint.py) and the Checkpointer (checkpoint/manager.py) all need:

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: temp file in the same folder, fsync,
  ``os.replace``, fsync of the folder (:func:`fsync_dir`): a crash leaves the old file or the new
  one, never a half-written file under the final name.
- the verified file format: ``torch.save`` bytes + ``b"ADDERCKP"`` + sha256 of the bytes
  (:func:`save_file`, :func:`load_file`, :func:`verify_file`); truncation or corruption after the
  fact (a full disk on a network file system, a partial copy) fails verification.
- :class:`RunLock`: one writer per run folder (``<output_dir>/.lock``).
- :func:`strict_json`: every JSON the package writes is strict (no NaN/Infinity tokens).
- :func:`safe_torch_load`: the one way the package reads a ``torch.save`` file: ``weights_only=True``
  (tensors, numbers, strings, lists, tuples, dicts), never unpickling code. The sha256 footer
  checks integrity, not trust: a stranger's file with a valid footer is still a stranger's file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_MAGIC = b"ADDERCKP"
_FOOTER = len(_MAGIC) + 32


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or cannot resume this run."""


class RunFolderError(CheckpointError):
    """The run folder cannot be used as asked (held by another run, holds another run)."""


class CheckpointWriteError(CheckpointError):
    """A file of the run folder could not be written: disk full, quota, file-size limit."""


# errnos that mean "no room for this file": disk full, quota exceeded, file-size limit (ulimit -f)
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def no_room_error(path: Path, size: int, e: OSError, appending: bool = False) -> CheckpointWriteError:
    """The message for a write of ``size`` bytes to ``path`` that failed with ``e`` (one of
    ``NO_ROOM``): which file, how much room it needs, that nothing earlier was touched.
    ``appending``: a log appended in place (metrics.jsonl), not an atomic write."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = -1
    mib, what = 1 << 20, "record" if appending else "file"
    if e.errno == errno.EFBIG:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        need = (
            f"the {what} needs {size} bytes ({size / mib:.1f} MiB), over this process's file-size "
            f"limit ({limit}, `ulimit -f`); raise the limit (`ulimit -f unlimited`)"
        )
    else:
        need = (
            f"the {what} needs {size} bytes ({size / mib:.1f} MiB), {free} bytes "
            f"({free / mib:.1f} MiB) are free on its file system now; make room for it: delete "
            "files there, or lower train.keep_last"
        )
    kept = (
        "Every checkpoint of the run is intact (a torn last line of this log is dropped on resume)"
        if appending
        else f"Nothing was replaced: the previous '{path.name}', if any, and every earlier checkpoint "
        "of the run are intact (the write went to a temporary file, now removed)"
    )
    return CheckpointWriteError(
        f"cannot write '{path}': {e.strerror or e} ({need}). {kept}; once there is room, the same "
        "command resumes from the newest checkpoint (resume=auto)"
    )


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a power loss (best effort)."""
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


def tmp_path_for(path: Path) -> Path:
    """The temp name of a write to ``path``: ``.<name>.tmp.<pid>`` (the pid lets
    :func:`clean_stale_temp` tell a live writer's file from a dead one's)."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (tmp file in the same folder + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_ROOM:
            tmp.unlink(missing_ok=True)  # before measuring the free space
            raise no_room_error(path, len(data), e) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode(), path)


# ---------------------------------------------------------------------------------------------
# The verified file format
# ---------------------------------------------------------------------------------------------


def encode(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    return body + _MAGIC + hashlib.sha256(body).digest()


def save_file(state: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(encode(state), path)


def read_verified(path: Path) -> bytes:
    """The payload of a verified file; :class:`CheckpointError` saying what is wrong otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CheckpointError(
            f"'{path}' is a folder, not a checkpoint file: a DeepSpeed checkpoint (engine=deepspeed "
            "writes step_<n>.pt folders) resumes only with engine=deepspeed; convert it to a file "
            "with `addernet-zero-to-state-dict FOLDER model.pt` to evaluate it or start from it"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint '{path}': {e}") from e
    if len(data) < _FOOTER or data[-_FOOTER : -_FOOTER + len(_MAGIC)] != _MAGIC:
        raise CheckpointError(f"checkpoint '{path}' is truncated or not an addernet checkpoint")
    body, digest = data[:-_FOOTER], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint '{path}' is corrupt (sha256 mismatch)")
    return body


def verify_file(path: Path) -> str | None:
    """None if ``path`` is a complete, uncorrupted verified file, else the reason it is not."""
    try:
        read_verified(path)
    except CheckpointError as e:
        return str(e)
    return None


def _legacy_numpy_globals() -> list[Any]:
    """What checkpoints written before the safe-loading rule hold besides plain types: numpy's RNG
    state (a uint32 array). Rebuilding such an array calls no code of the file's choosing."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(
    src: Path | io.BytesIO,
    path: Path,
    map_location: str | torch.device = "cpu",
    extra_globals: list[Any] | tuple[Any, ...] = (),
) -> Any:
    """``torch.load(src, weights_only=True)``: tensors, numbers, strings, None and containers of
    them (plus the legacy numpy RNG array and ``extra_globals``); any other object in the pickle,
    a ``__reduce__`` that would run a command included, is refused with a :class:`CheckpointError`
    naming ``path`` and the refused object, before anything of it runs."""
    try:
        with torch.serialization.safe_globals([*_legacy_numpy_globals(), *extra_globals]):
            return torch.load(src, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, AttributeError, EOFError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        # torch's message is a page long; keep the line that names the refused object
        keys = ("GLOBAL", "Can only build", "WeightsUnpickler")
        why = next((ln for ln in lines if any(k in ln for k in keys)), lines[0])
        why = why[why.find("WeightsUnpickler error") :] if "WeightsUnpickler" in why else why
        why = why.split(". Please use")[0]
        raise CheckpointError(
            f"'{path}' holds something a checkpoint may not contain, or is not a torch.save file "
            f"({why}): addernet-dist reads "
            "checkpoints with torch.load(weights_only=True) only (tensors, numbers, strings, "
            "lists, dicts) and never unpickles other objects, whoever wrote the file. Save a "
            "state_dict of tensors instead (docs/training.md, 'What a checkpoint may contain')"
        ) from None


def load_file(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A verified file, read with :func:`safe_torch_load` (never unpickled)."""
    body = read_verified(path)
    return safe_torch_load(io.BytesIO(body), Path(path), map_location)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (a ResNet-50 shard is ~300 MB: never whole
    in memory). The one hash of the package's manifests and provenance records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link (a copy where the file system has none): checkpoints are only ever replaced
    by rename (atomic_write_bytes, publish), so the link keeps the bytes it was made with."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None: ``json.dumps`` would otherwise write
    ``NaN``/``Infinity``, which strict parsers (JavaScript, jq, Go) reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kw: Any) -> str:
    return json.dumps(strict_json(obj), allow_nan=False, **kw)


# ---------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "holder unknown"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')}, started {started}"


class RunLock:
    """Exclusive lock on a run folder for the life of the run (taken by rank 0).

    ``flock`` on ``<output_dir>/.lock``: the kernel releases it when the holder exits in any way
    (SIGKILL, OOM kill, node reboot on a local disk), so a crash never leaves a lock to clean up.
    The file records the holder's pid, host and start time for the refusal message. Where the
    file system has no flock (ENOLCK/EOPNOTSUPP, e.g. some NFS mounts without lockd) the record
    itself is the lock: a record left by a dead process on the same host is stale and taken
    over; one from another host must be removed by hand (the message says so).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, info: dict[str, Any], extra: str = "") -> RunFolderError:
        return RunFolderError(
            f"output_dir '{self.folder}' is in use by another run ({_holder_text(info)}): two runs "
            "in one folder would mix their checkpoints and metrics. Wait for it to finish, stop "
            f"it, or choose another output_dir{extra}"
        )

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "argv": sys.argv,
        }
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise self._refuse(self._read()) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            # No flock here: the record is the lock.
            info = self._read()
            if info.get("pid") and not info.get("released"):
                same_host = info.get("host") == socket.gethostname()
                if not same_host or pid_alive(int(info["pid"])):
                    os.close(fd)
                    hint = "" if same_host else f" (if it is dead, delete '{self.path}')"
                    raise self._refuse(info, hint) from None
                log.warning("taking over the stale lock of dead %s", _holder_text(info))
        os.ftruncate(fd, 0)
        os.pwrite(fd, dumps_strict(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, dumps_strict({"released": True}).encode(), 0)
        except OSError:
            pass
        # Closing the descriptor releases the flock. The file stays: unlinking a lock file
        # while another process has it open lets two processes hold "the" lock.
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
