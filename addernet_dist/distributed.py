"""Launch-environment detection and the few collectives the trainer needs.

torchrun (and launch/slurm.sbatch, which runs one torchrun per node) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain ``python -m addernet_dist.train`` sets none of
them and runs as a single process without a process group. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.initialized:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_buffers_(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s floating/integer buffers (BN running stats) to every rank."""
        if self.initialized:
            for buf in module.buffers():
                dist.broadcast(buf, src=src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.initialized:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.initialized:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from e


def init_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK, pick the device and initialise the process group.

    device="auto" uses CUDA when available (one GPU per local rank), else CPU.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "train.device=cuda but no CUDA device is visible; use train.device=cpu"
            )
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "set --nproc_per_node to at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    backend = None
    if world_size > 1:
        from addernet_dist import device_policy

        backend = device_policy.dist_backend(device_policy.DeviceInfo.probe(dev))
        if not dist.is_initialized():
            # 30 min: the first ImageNet eval + checkpoint of a big model can keep rank 0 busy for
            # minutes while the others wait at a barrier; the default 10 min is too tight there.
            kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
            if use_cuda:
                kwargs["device_id"] = dev
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if attempt is not None:
                # torchrun --max-restarts reuses the agent's store across attempts, so a restarted
                # group can read the DEAD attempt's connection keys (the peer addresses gloo/NCCL
                # publish) and try to connect to a port nobody listens on any more: refused, or
                # a hang in ProcessGroupGloo construction, seen here 2 runs in 3. A per-attempt
                # key prefix keeps attempts apart (pytorch/pytorch#167288 reports the NCCL twin).
                rdzv = dist.rendezvous("env://", timeout=kwargs["timeout"])
                store, _, _ = next(rdzv)
                rdzv.close()
                _attempt_store[:] = [store]  # released in destroy_distributed, see there
                kwargs.update(
                    store=dist.PrefixStore(f"addernet/attempt_{attempt}", store),
                    rank=rank,
                    world_size=world_size,
                )
            dist.init_process_group(**kwargs)
    return DistInfo(rank, world_size, local_rank, dev, backend)


# The store of a restarted attempt (see init_distributed). Dropped by destroy_distributed while the
# interpreter is fully alive: a C++ store or process group left for interpreter finalisation can abort
# the process at exit ("terminate called without an active exception", SIGABRT), which torchrun
# counts as a failure and answers with one more restart of a finished run (seen once in CI).
_attempt_store: list[Any] = []


def destroy_distributed(info: DistInfo, ok: bool = True) -> None:
    """Tear the process group down; ``ok=False`` on the error path.

    Success: a barrier first, so no rank destroys its connections while a peer still has a
    collective (the final eval's all-reduce, rank 0's checkpoint broadcast) in flight on them.
    Failure: no barrier (the peers may be gone or stuck) and no NCCL destroy, which is collective and
    would hang (torchtitan destroys on success only); gloo's destroy is local and runs.
    """
    if info.initialized and dist.is_initialized():
        if ok:
            dist.barrier()
            dist.destroy_process_group()
        elif info.backend == "gloo":
            dist.destroy_process_group()
    _attempt_store.clear()
