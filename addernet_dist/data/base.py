"""The data interface the trainer talks to. Every loader (synthetic, torchvision, DALI) implements it.

A loader yields ``(images, labels)`` batches for ONE rank:
  images: float tensor (B, C, H, W) already normalised (NCHW, or channels_last memory format);
  labels: int64 tensor (B,). In evaluation loaders a label of ``IGNORE_LABEL`` (-1) marks a padded
  duplicate sample that must not be counted (so every val sample counts exactly once across ranks).

Mid-epoch resume: ``state_dict()`` returns the position inside the current epoch
(``{"epoch": e, "batches_done": k, ...}``); after ``load_state_dict(sd)`` the next iteration of
the loader continues with batch k of epoch e in the same order the interrupted run would have
used. ``set_epoch(e)`` changes the shuffle order deterministically (seeded by ``seed + epoch``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

IGNORE_LABEL = -1


@runtime_checkable
class Loader(Protocol):
    num_classes: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank (identical on every rank)."""
        ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
