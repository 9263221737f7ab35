"""The part every loader shares: position bookkeeping, device placement, eval padding labels."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .base import IGNORE_LABEL
from .sampler import ResumableShardSampler, ShardPlan


class ShardedLoader:
    """Base of the synthetic, torchvision and DALI loaders (implements ``base.Loader``).

    Subclasses implement ``_batches(plans)``: yield one ``(images, labels)`` pair per plan, the
    images already normalised float32 NCHW (any device), labels int64 on the CPU. This class
    marks eval padding with ``IGNORE_LABEL``, moves to ``device``, applies channels_last and
    advances the resume position *before* handing a batch out, so a checkpoint written after a
    train step on batch k records k + 1 batches done.
    """

    num_classes: int
    # the folder names behind the label indices (a folder tree); None where labels have no names
    class_names: list[str] | None = None

    def __init__(
        self,
        num_samples: int,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str,
        channels_last: bool,
        shuffle: bool | None = None,
    ) -> None:
        """``num_samples`` items sharded by the one ``ResumableShardSampler`` of this loader;
        ``shuffle``: None = shuffle (and pad) the train split only."""
        self.sampler = ResumableShardSampler(
            num_samples,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            shuffle=train if shuffle is None else shuffle,
        )
        self.train = train
        self.device = torch.device(device)
        self.channels_last = channels_last

    # ---- Loader protocol ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            plans = self.sampler.remaining_batches()
        else:
            # Eval always covers the whole split; its position never matters.
            saved = self.sampler.batches_done
            self.sampler.batches_done = 0
            plans = self.sampler.remaining_batches()
            self.sampler.batches_done = saved
        for plan, (images, labels) in zip(plans, self._batches(plans), strict=True):
            labels = labels.to(torch.int64)
            if not self.train and bool(plan.is_pad.any()):
                labels = labels.masked_fill(plan.is_pad, IGNORE_LABEL)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.train:
                self.sampler.advance()
            yield images, labels

    # ---- for subclasses ----------------------------------------------------------------------

    def _batches(self, plans: list[ShardPlan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError
