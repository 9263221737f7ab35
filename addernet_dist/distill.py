"""The frozen distillation teacher (``distill:`` config section; the loss is in loss.py).

    teacher = build_teacher(cfg, num_classes, device)   # None when distill.teacher is unset

The teacher is ``create_model(distill.teacher, conv="conv")`` with the weights of
``distill.teacher_checkpoint``, read without unpickling anything:

- ``*.safetensors``: an ``addernet-export`` file (its metadata must name a conv model of that name);
- a checkpoint of ours (``step_*.pt`` / ``best.pt``): its sha256 footer is verified, then the payload
  is read with ``torch.load(weights_only=True)``;
- any other file: a plain state dict (e.g. torchvision's ``resnet50-0676ba61.pth``; a
  ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped, a DataParallel ``module.``
  prefix stripped), read with ``torch.load(weights_only=True)``.

Every tensor of the model must be in the file with its shape and vice versa (else a
:class:`~addernet_dist.config.ConfigError` listing the differences). The teacher is then put in eval
mode (BN uses its running statistics), every parameter gets ``requires_grad=False``, and it moves to
the training device in fp32. It is NOT wrapped by DDP/DeepSpeed, NOT in the optimizer, NOT among the
adaptive-LR layers (it has no adder layers, and the engines only ever see the student), and not in
the checkpoint: a resumed run reloads it from ``distill.teacher_checkpoint``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from addernet_dist.checkpoint import CheckpointError, layout
from addernet_dist.config import Config, ConfigError
from addernet_dist.distributed import DistInfo
from addernet_dist.interop import InteropError, _tensor_keys, check_finite, describe_mismatch, read_exported
from addernet_dist.models import create_model
from addernet_dist.runfolder import read_verified, safe_torch_load

_WRAPPERS = ("state_dict", "model")  # common {"state_dict": {...}} containers of plain files


def _unwrap_plain(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ConfigError(f"distill.teacher_checkpoint '{path}' holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}


def read_teacher_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, {"name", "conv"} where the file says so) of a teacher weights file, unpickling
    nothing (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"distill.teacher_checkpoint '{path}' is not a file; give a best.pt/step_*.pt of ours, an "
            "addernet-export .safetensors file, or a state dict file (e.g. torchvision weights)"
        )
    if path.suffix == ".safetensors":
        try:
            tensors, meta = read_exported(path)
        except InteropError as e:
            raise ConfigError(f"distill.teacher_checkpoint: {e}") from None
        return tensors, {"name": meta["name"], "conv": meta["conv"]}
    try:
        body: bytes | None = read_verified(path)
    except CheckpointError:
        body = None  # not a checkpoint of ours: a plain state dict file
    try:  # the one safe reader of the package (weights_only=True; never unpickles)
        if body is None:
            return _unwrap_plain(safe_torch_load(path, path), path), {}
        state = safe_torch_load(io.BytesIO(body), path)
    except CheckpointError as e:
        raise ConfigError(f"distill.teacher_checkpoint: {e}") from None
    try:
        weights, config = layout.weights_and_config(state)
        return _tensor_keys(weights), {"name": config["model"]["name"], "conv": config["model"]["conv"]}
    except (KeyError, TypeError) as e:
        raise ConfigError(f"distill.teacher_checkpoint '{path}' has no model weights ({e!r} missing)") from None


def load_teacher(
    name: str, path: str | Path, num_classes: int, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """The CNN ``name`` with the weights of ``path``, frozen and in eval mode (on the CPU)."""
    tensors, info = read_teacher_weights(path)
    for what, want in (("name", name), ("conv", "conv")):
        if what in info and info[what] != want:
            raise ConfigError(
                f"distill.teacher_checkpoint '{path}' holds model.{what}={info[what]!r}, but the "
                f"teacher is {name!r} with conv='conv'; point distill.teacher/teacher_checkpoint "
                "at a CNN model and its own weights"
            )
    try:
        model = create_model(name, conv="conv", num_classes=num_classes, **dict(kwargs or {}))
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"distill.teacher={name!r}: {e}") from None
    problem = describe_mismatch(model.state_dict(), tensors, {})
    if problem:
        raise ConfigError(
            f"distill.teacher_checkpoint '{path}' does not match the teacher model {name!r} "
            f"(conv, {num_classes} classes):\n{problem}\nuse the weights of that model (same name, "
            "number of classes and distill.teacher_kwargs)"
        )
    try:
        check_finite(tensors, path)
    except InteropError as e:
        raise ConfigError(f"distill.teacher_checkpoint: {e}") from None
    model.load_state_dict(tensors, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def build_teacher(cfg: Config, num_classes: int, device: torch.device) -> nn.Module | None:
    """The run's teacher on ``device`` (None without ``distill.teacher``): frozen, or with
    ``distill.co_train`` trainable and in train mode (initial weights from teacher_checkpoint, if
    given; else a fresh model from the current RNG, the same on every rank)."""
    d = cfg.distill
    if d.teacher is None:
        return None
    if d.teacher_checkpoint is not None:
        teacher = load_teacher(d.teacher, d.teacher_checkpoint, num_classes, d.teacher_kwargs)
    else:
        teacher = create_model(d.teacher, conv="conv", num_classes=num_classes, **d.teacher_kwargs)
    if d.co_train:
        teacher.requires_grad_(True).train()
    memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
    return teacher.to(device=device, memory_format=memory_format)


class CoTrainedTeacher:
    """``distill.co_train``: the CNN teacher, trained in the student's step on its own CE.

    Its gradient comes from ``loss.Criterion`` (teacher CE; the KD term sees detached teacher logits,
    so the student never pushes the teacher), is all-reduced by its own DDP wrapper on several ranks,
    optionally clipped (``train.grad_clip``, on its own norm), and applied by SGD-NAG with this run's
    ``optim`` section and LR schedule. No adaptive LR (a CNN has no adder layers). Checkpointed by the
    engine as ``state["teacher"] = {"model", "optimizer", "lr_scheduler"}``.
    """

    def __init__(self, module: nn.Module, cfg: Config, dist: DistInfo, *, steps_per_epoch: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from addernet_dist.optim import build_lr_scheduler, build_optimizer

        self.module = module
        self.wrapped: nn.Module = module
        if dist.world_size > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(module, device_ids=ids)
        self.optimizer = build_optimizer(module, cfg.optim)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs
        )
        self.grad_clip = cfg.train.grad_clip
        self._params = [p for p in module.parameters() if p.requires_grad]

    def step(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
