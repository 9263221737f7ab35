"""DeepSpeed checkpoint folders that are as crash-safe as the trainer's single-file checkpoints.

DeepSpeed writes one checkpoint as a folder of shards (``mp_rank_00_model_states.pt`` from rank
0, ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` from every rank). To keep the trainer's
guarantees (checkpoint/manager.py: a crash never leaves a half-written checkpoint under a checkpoint name;
truncation or corruption later is detected and ``resume=auto`` falls back) the engine:

1. lets DeepSpeed write into a hidden temporary folder ``.<name>.tmp`` next to the final one;
2. after every rank is done, rank 0 writes ``MANIFEST`` into it: the sha256 and size of every
   shard, in the trainer's verified-file format (checkpoint.save_file);
3. renames the folder onto its final name ``step_<n>.pt`` (a folder; the name matches the
   trainer's checkpoint pattern so listing, pruning and ``resume=auto`` treat it like a file).

A folder without a valid MANIFEST, or whose shards do not match it, fails :func:`verify_dir`.

DeepSpeed's own loaders unpickle (``torch.load(weights_only=False)``): the engine hands DeepSpeed
:func:`load_shard` as its checkpoint engine's ``load`` and, like ``addernet-zero-to-state-dict``,
first reads every shard with :func:`check_loadable`, so a planted folder cannot run code.
This module imports no DeepSpeed at import time (checkpoint/store.py's DeepSpeedFolderStore calls it for
every folder-shaped checkpoint); the file-system helpers (atomic verified files, fsync of the folder)
are runfolder.py's, shared with the file store.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from addernet_dist.runfolder import (
    NO_ROOM,
    CheckpointWriteError,
    file_sha256,
    fsync_dir,
    load_file,
    no_room_error,
    safe_torch_load,
    save_file,
    verify_file,
)

MANIFEST = "MANIFEST"
FORMAT = "addernet-deepspeed-v1"


def remove(path: Path) -> None:
    """Delete a checkpoint folder, its temp folder, or what sits at its name (a trash or a file
    of the same name, e.g. engine=ddp's best.pt that a folder replaces)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def write_manifest(folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Hash every file under ``folder`` into ``folder/MANIFEST`` (atomic, verified format)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(folder))] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    save_file({"format": FORMAT, "files": files, **(extra or {})}, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    return load_file(Path(folder) / MANIFEST)


def verify_dir(folder: Path) -> str | None:
    """None if ``folder`` is a complete DeepSpeed checkpoint, else the reason it is not."""
    folder = Path(folder)
    problem = verify_file(folder / MANIFEST)
    if problem is not None:
        return f"DeepSpeed checkpoint folder '{folder}' has no valid {MANIFEST} ({problem})"
    manifest = read_manifest(folder)
    if manifest.get("format") != FORMAT:
        return f"'{folder}' is not an addernet DeepSpeed checkpoint (format {manifest.get('format')!r})"
    for rel, meta in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            return f"DeepSpeed checkpoint '{folder}' is missing shard '{rel}'"
        if p.stat().st_size != meta["size"]:
            return f"DeepSpeed checkpoint shard '{p}' is truncated ({p.stat().st_size} of {meta['size']} bytes)"
        if file_sha256(p) != meta["sha256"]:
            return f"DeepSpeed checkpoint shard '{p}' is corrupt (sha256 mismatch)"
    return None


def deepspeed_safe_globals() -> list[Any]:
    """The non-plain types DeepSpeed's ZeRO-1/2 optimizer shards hold (DeepSpeed 0.19: the stage
    enum, a (start, numel) dataclass, the loss scaler's attribute bag). None of them runs code when
    rebuilt; without DeepSpeed installed there are none, and such a shard is refused."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def load_shard(path: str | Path, map_location: Any = None) -> Any:
    """A DeepSpeed shard read with ``weights_only=True`` (runfolder.safe_torch_load); the signature
    of DeepSpeed's ``CheckpointEngine.load``."""
    return safe_torch_load(Path(path), Path(path), map_location or "cpu", deepspeed_safe_globals())


def check_loadable(folder: Path) -> None:
    """Read every ``*.pt`` file under ``folder`` with :func:`load_shard` (CheckpointError naming the
    file otherwise): run before anything that lets DeepSpeed unpickle them."""
    for p in sorted(Path(folder).rglob("*.pt")):
        if p.is_file():
            load_shard(p, "cpu")


def check_compatible(folder: Path, *, zero_stage: int, world_size: int) -> str | None:
    """None if this run can load ``folder``, else why not (and what to do instead).

    ZeRO-1/2 optimizer shards are cut for the world size that wrote them, so a resume must use
    the same ZeRO stage and (for stages 1/2) the same number of ranks.
    """
    manifest = read_manifest(folder)
    saved_stage, saved_world = manifest.get("zero_stage"), manifest.get("world_size")
    fix = (
        "resume with the same deepspeed.zero_stage and number of processes, or convert it with "
        "addernet-zero-to-state-dict to take only the weights"
    )
    if saved_stage != zero_stage:
        return f"'{folder}' was written with zero_stage={saved_stage}, this run uses {zero_stage}; {fix}"
    if zero_stage > 0 and saved_world != world_size:
        return (
            f"'{folder}' holds ZeRO-{zero_stage} optimizer shards of {saved_world} ranks, this run "
            f"has {world_size}; {fix}"
        )
    return None


def publish(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` onto ``final``, replacing an older one of that name.

    A folder cannot be renamed over a non-empty folder, so an existing ``final`` is first moved
    aside: a crash in between leaves ``final`` missing (resume falls back to the previous step),
    never a mixed folder.
    """
    trash = final.with_name(f".{final.name}.old")
    remove(trash)
    if final.exists():  # a folder, or a file of the same name (e.g. from engine=ddp)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    remove(trash)


def write_failed(final: Path, e: BaseException) -> CheckpointWriteError:
    """DeepSpeed's ``save_checkpoint`` of ``final`` failed (its torch.save writer turns a full disk
    or the file-size limit into a RuntimeError without errno): the room it needs (the newest
    complete checkpoint folder's size), the room there is, and that nothing earlier was touched."""
    import resource

    mib = 1 << 20
    final = Path(final)
    done = sorted(p for p in final.parent.glob("step_*.pt") if p.is_dir() and p != final)
    need = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()) if done else None
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = -1
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit = "none" if soft == resource.RLIM_INFINITY else f"{soft} bytes (`ulimit -f`)"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    size = f"about {need / mib:.1f} MiB (the previous checkpoint's size)" if need else "unknown"
    return CheckpointWriteError(
        f"cannot write DeepSpeed checkpoint '{final}' ({first}): it needs {size}; "
        f"{free / mib:.1f} MiB are free on its file system; file-size limit: {limit}. Nothing was "
        "replaced: every earlier checkpoint of the run is intact (DeepSpeed wrote into the temp "
        f"folder '{tmp_name(final).name}', removed at the next start). Make room (delete files, "
        "lower train.keep_last, raise `ulimit -f`), then run the same command (resume=auto)"
    )


def copy(src: Path, dst: Path) -> None:
    """Copy the checkpoint folder ``src`` to ``dst`` (e.g. best.pt) with the same crash safety."""
    tmp = tmp_name(dst)
    remove(tmp)
    try:  # file by file: copytree folds the errno of a failed copy into shutil.Error
        for p in sorted(src.rglob("*")):
            if p.is_dir():
                (tmp / p.relative_to(src)).mkdir(parents=True, exist_ok=True)
            else:
                (tmp / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / p.relative_to(src))
    except OSError as e:
        remove(tmp)
        if e.errno in NO_ROOM:
            size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
            raise no_room_error(dst, size, e) from None
        raise
    publish(tmp, dst)
