"""Checkpoints: the layout of one (layout.py), its on-disk formats (store.py: a verified file, a
DeepSpeed folder), the run folder's bookkeeping (manager.py: Checkpointer) and resume (resume.py,
with the runtime a checkpoint records: torch threads and version).

``from addernet_dist.checkpoint import X`` keeps working for the names of the former single module
checkpoint.py (the verified-file helpers are runfolder.py's, re-exported here).
"""

from addernet_dist.checkpoint import layout
from addernet_dist.checkpoint.manager import Checkpointer, ResumePlan, release_run_locks, step_of
from addernet_dist.checkpoint.resume import (
    check_resumable,
    config_changes,
    describe_changes,
    describe_runtime_changes,
    load_for_resume,
    rng_state,
    runtime_changes,
    runtime_info,
    set_rng_state,
)
from addernet_dist.checkpoint.store import (
    DEEPSPEED_FOLDER,
    FILE,
    CheckpointStore,
    DeepSpeedFolderStore,
    FileStore,
    clean_stale_temp,
    same_checkpoint,
    store_of,
    verify,
)
from addernet_dist.runfolder import (
    CheckpointError,
    RunFolderError,
    RunLock,
    atomic_write_bytes,
    encode,
    link_or_copy,
    load_file,
    read_verified,
    save_file,
    verify_file,
)

__all__ = [
    "DEEPSPEED_FOLDER",
    "FILE",
    "CheckpointError",
    "CheckpointStore",
    "Checkpointer",
    "DeepSpeedFolderStore",
    "FileStore",
    "ResumePlan",
    "RunFolderError",
    "RunLock",
    "atomic_write_bytes",
    "check_resumable",
    "clean_stale_temp",
    "config_changes",
    "describe_changes",
    "describe_runtime_changes",
    "encode",
    "layout",
    "link_or_copy",
    "load_file",
    "load_for_resume",
    "read_verified",
    "release_run_locks",
    "rng_state",
    "runtime_changes",
    "runtime_info",
    "same_checkpoint",
    "save_file",
    "set_rng_state",
    "step_of",
    "store_of",
    "verify",
    "verify_file",
]
