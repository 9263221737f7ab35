"""The engine interface: what the train loop needs from a parallelism backend (DDP, DeepSpeed).

The train loop (addernet_dist/train.py) only ever talks to an :class:`Engine`; it never touches
DDP or DeepSpeed directly. An engine owns the wrapped model, the optimizer, the LR scheduler, the
mixed-precision policy and the AdderNet-specific gradient processing (eq. 33 adaptive LR scaling),
so swapping ``engine: ddp`` for ``engine: deepspeed`` changes nothing in the loop.

Contract of one training iteration (the order is part of the contract)::

    loss = engine.forward_backward(images, labels)  # autocast fwd, loss, backward (+ all-reduce)
    stats = engine.step()                           # adaptive LR on GLOBAL grads, clip, opt step,
                                                    # LR scheduler step, zero grads

The contract is on ``step``: the eq. 33 norms ``||grad F_l||_2`` must be those of the GLOBAL batch's
gradient (averaged over ranks; see adaptive_lr.py for why this matters). The DDP engine gets there by
leaving the all-reduced gradient in ``.grad`` after ``forward_backward``; under ZeRO-1/2 the DeepSpeed
engine holds only this rank's reduced partition, so it reduces per-layer squared norms inside ``step``
(engine/zero_norms.py) instead.

Checkpoints: ``save(path, client_state)`` writes the engine's state (model, optimizer, LR
scheduler) plus the caller's ``client_state`` (train progress, loader position,
RNG states, config, W&B id) as one checkpoint at ``path``; ``load(path)`` restores the engine state
and returns ``client_state``. Both are COLLECTIVE: every rank calls them. The default
implementation (single verified file written by rank 0: checkpoint/store.py's FileStore, in
the layout of checkpoint/layout.py) suits DDP, where every
rank holds the full state; DeepSpeed overrides them to write its sharded directory format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from addernet_dist import device_policy
from addernet_dist.config import ConfigError
from addernet_dist.distributed import DistInfo
from addernet_dist.runfolder import CheckpointWriteError

if TYPE_CHECKING:
    from addernet_dist.checkpoint.store import CheckpointStore


def maybe_fuse_adder_bn(model: nn.Module, fuse_bn: bool | str, device: torch.device) -> int:
    """Apply ``fuse_adder_bn`` per ``adder.fuse_bn`` (on the bare model, on its device, before the
    optimizer and the wrappers see it); returns how many pairs were fused.

    "auto" fuses where the fused kernels run: the triton backend (CUDA, or CPU in Triton's
    interpreter), see ``device_policy.fuse_adder_bn``. Parameters are shared and the state_dict keeps
    the unfused keys, so nothing else in the engine changes.
    """
    from addernet_dist.nn import adder_modules
    from addernet_dist.ops import dispatch

    # the backend the layers carry (build_model passes adder.backend), not a process-wide default
    adders = adder_modules(model)
    backend = dispatch.resolve_backend(device, adders[0].backend if adders else None)
    if not device_policy.fuse_adder_bn(fuse_bn, backend):
        return 0
    from addernet_dist.models.fusion import FusedAdderBN2d, fuse_adder_bn

    fuse_adder_bn(model)
    return sum(isinstance(m, FusedAdderBN2d) for m in model.modules())


def resolve_autocast_dtype(precision: str | bool, device: torch.device) -> torch.dtype | None:
    """``train.precision`` → the autocast dtype on ``device`` (``device_policy.autocast_dtype``)."""
    try:
        return device_policy.autocast_dtype(precision, device_policy.DeviceInfo.probe(device))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_adder_backend(backend: str, device: torch.device) -> str:
    """Validate ``adder.backend`` for ``device`` (``device_policy.adder_backend``): e.g. triton on a
    CPU device without TRITON_INTERPRET=1 is a config error, never a silent fallback. Returns the
    backend the adder layers will run."""
    try:
        return device_policy.adder_backend(backend, device_policy.DeviceInfo.probe(device))
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass
class StepStats:
    """What ``Engine.step`` measured, as DEVICE tensors (reading them forces a host sync, so the
    loop only reads them on logging steps).

    adder_grad_norms: (L,) ||grad F_l||_2 of each adder layer's weight before scaling; empty when
        adaptive LR scaling is off or its scope is "local" (then the norms are per rank).
    adder_alphas: (L,) the eq. 33 factors alpha_l = eta * sqrt(k_l) / ||grad F_l||_2 applied.
    grad_norm: total gradient norm (after the eq. 33 scaling, before clipping; scalar tensor). Set on
        every step when clipping is on (the clip needs it), else only when ``step(want_grad_norm=True)``
        (the loop asks on log steps: one foreach norm there, nothing on the other steps).
    loss_scale: (train.precision=fp16) the GradScaler scale this step's backward used; None otherwise.
    scaler_skip: (fp16) bool tensor: the GradScaler skipped the optimizer step for an inf/NaN gradient
        at a loss scale > 1, an overflow the scaling itself may cause (NonFiniteGuard.update).
    """

    adder_grad_norms: torch.Tensor | None = None
    adder_alphas: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    loss_scale: torch.Tensor | None = None
    scaler_skip: torch.Tensor | None = None


class Engine(ABC):
    """Owns model wrapping, optimizer, LR schedule, precision and gradient processing.

    Both engines subclass ``engine.prepare.PreparedEngine``, their one shared construction.

    Attributes every engine sets in ``__init__``:
      model: the WRAPPED module to call for forward (DDP / DeepSpeed engine / compiled module).
      optimizer: the torch optimizer (SGD-NAG by default, see optim.py).
      lr_scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` stepped once per iteration.
      dist: rank / world size / device of this process.
      device: the torch.device inputs must be on.
      autocast_dtype: the autocast dtype of every forward pass of this run (training, evaluation,
        BN recalibration), e.g. torch.bfloat16; None runs them without autocast (fp32).
      input_dtype: the dtype the images are cast to before the model (DeepSpeed bf16 weights), or None.
      fused_adder_bn: how many Adder2d+BatchNorm2d pairs were fused (0: none).
      grad_scaler: the fp16 loss scaler (a checkpoint component of the trainer), None otherwise.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dist: DistInfo
    device: torch.device
    autocast_dtype: torch.dtype | None
    input_dtype: torch.dtype | None = None
    fused_adder_bn: int
    # The loss terms of the last forward_backward (loss.training_loss: {"ce", "kd"} with a
    # distillation teacher, {} without), detached device tensors, mean over the micro-batches.
    loss_parts: dict[str, torch.Tensor]
    grad_scaler: torch.amp.GradScaler | None = None

    # --- training -------------------------------------------------------------------------
    @abstractmethod
    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward under the engine's autocast policy, the loss (loss.Criterion: CE with label
        smoothing, plus the distillation term with a teacher), backward.

        images: (B, C, H, W) float on ``self.device``; labels: (B,) int64 class indices, or (B, C)
        float soft targets (mixup/cutmix, loss.BatchMixer). Returns the detached
        scalar loss of THIS rank's batch (fp32, device tensor, no host sync). Where the global
        gradient lives afterwards is engine-specific (``.grad`` for DDP, ZeRO partitions for DeepSpeed).
        """

    @abstractmethod
    def step(self, want_grad_norm: bool = False) -> StepStats:
        """Adaptive LR scaling (eq. 33) on the global grads, optional clipping, optimizer step,
        LR scheduler step, zero grads. No host syncs. ``want_grad_norm``: fill ``grad_norm`` even
        when clipping is off (a log step)."""

    @abstractmethod
    def unwrap(self) -> nn.Module:
        """The bare model (no DDP / compile / DeepSpeed wrapper): for set_p, eval, state dicts."""

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- state ----------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state: {"model", "optimizer", "lr_scheduler"}."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def checkpoint_store(self) -> CheckpointStore:
        """The format ``save`` writes (checkpoint/store.py), handed to the Checkpointer."""
        from addernet_dist.checkpoint.store import FILE

        return FILE

    def save(self, path: Path, client_state: dict[str, Any]) -> None:
        """Collective. Writes engine state + client_state atomically as ONE verified file
        (rank 0 writes, everyone waits)."""
        from addernet_dist.checkpoint import layout
        from addernet_dist.checkpoint.store import FILE

        state = layout.build(self.state_dict(), client_state)
        failed: Exception | None = None
        if self.dist.rank == 0:
            try:
                FILE.write(state, path)
            except Exception as e:  # disk full, file-size limit, ...: every rank must hear of it
                failed = e
        # A collective in place of a barrier: with a bare barrier the other ranks would wait for
        # rank 0 until the stall watchdog or the 30-minute process-group timeout ends them.
        problem = self.dist.broadcast_object(None if failed is None else str(failed))
        if failed is not None:
            raise failed
        if problem is not None:
            raise CheckpointWriteError(f"rank 0 could not write {path}: {problem}")

    def load(self, path: Path) -> dict[str, Any]:
        """Collective. Restores engine state from ``path`` and returns the client_state."""
        from addernet_dist.checkpoint import layout
        from addernet_dist.runfolder import load_file

        state = load_file(path)
        self.load_state_dict(layout.engine_part(state))
        return layout.client_part(state)
