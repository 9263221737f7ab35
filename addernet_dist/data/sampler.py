"""Which samples each rank reads, in which order: the one place every loader takes its order from.

Train (``shuffle=True``): epoch ``e`` draws a permutation of ``range(N)`` from
``torch.Generator().manual_seed(seed + e)`` (identical on every rank), pads it to a multiple of
``world_size * batch_size`` by repeating its own beginning, and rank ``r`` takes every
``world_size``-th entry starting at ``r``. So every rank has the same number of *full* batches,
every sample is seen at least once per epoch across all ranks, and at most
``world_size * batch_size - 1`` samples (different ones each epoch) are seen twice.

Eval (``shuffle=False``): the identity order padded only to a multiple of ``world_size``; the last
batch may be short (same length on every rank). Padded entries are flagged so the loader labels
them ``IGNORE_LABEL``: every sample counts exactly once across ranks.

Resume: the order is a pure function of ``(seed, epoch, rank, world_size, N)``, so the position
``(epoch, batches_done)`` is the whole state; ``rank_order(epoch)[batches_done * B:]`` is exactly
what the interrupted run would have read next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ShardPlan:
    """Per-rank sample order of one epoch.

    indices: int64 (L,) dataset indices this rank reads, in order.
    is_pad: bool (L,) True where the entry is a padding duplicate (eval only; train padding is
      a real extra sample and is trained on).
    positions: int64 (L,) position of the entry in the global padded order (a stable per-epoch
      id, used to seed per-sample augmentation so a resumed run augments identically).
    """

    indices: torch.Tensor
    is_pad: torch.Tensor
    positions: torch.Tensor


class ResumableShardSampler:
    """Deterministic, resumable sharding of ``num_samples`` items over ``world_size`` ranks."""

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"cannot sample from an empty dataset (num_samples={num_samples})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batches_done = 0

    # ---- order -------------------------------------------------------------------------------

    @property
    def samples_per_rank(self) -> int:
        n, w, b = self.num_samples, self.world_size, self.batch_size
        if self.shuffle:
            return math.ceil(n / (w * b)) * b
        return math.ceil(n / w)

    def __len__(self) -> int:
        """Batches per epoch on this rank (identical on every rank)."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    def plan(self, epoch: int | None = None) -> ShardPlan:
        """This rank's full order for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n, w = self.num_samples, self.world_size
        total = self.samples_per_rank * w
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        positions = torch.arange(total)
        # Wrap around (possibly several times when N < world_size * batch_size).
        padded = order[positions % n]
        is_pad = positions >= n
        if self.shuffle:
            # Train padding is deliberately trained on (a full batch on every rank).
            is_pad = torch.zeros_like(is_pad)
        sl = slice(self.rank, total, w)
        return ShardPlan(indices=padded[sl], is_pad=is_pad[sl], positions=positions[sl])

    def remaining_batches(self) -> list[ShardPlan]:
        """The batches this rank still has to read in the current epoch, from ``batches_done``."""
        p = self.plan()
        b = self.batch_size
        return [
            ShardPlan(p.indices[s : s + b], p.is_pad[s : s + b], p.positions[s : s + b])
            for s in range(self.batches_done * b, len(p.indices), b)
        ]

    # ---- position ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` at batch 0; a no-op when already in ``epoch`` (keeps a resumed
        mid-epoch position, so the trainer may call it unconditionally at each epoch start)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def advance(self) -> None:
        """One more batch consumed; after the last batch of the epoch, move to the next epoch."""
        self.batches_done += 1
        if self.batches_done >= len(self):
            self.epoch += 1
            self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The position only means the same thing for the same dataset, seed and global batch
        # layout; continuing with another one would silently repeat or skip samples.
        for key in ("seed", "num_samples", "world_size", "batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; mid-epoch resume needs the same dataset, seed, "
                    "world size and per-rank batch size (resume at an epoch boundary instead)"
                )
        batches_done = int(state["batches_done"])
        if not 0 <= batches_done <= len(self):
            raise ValueError(
                f"data loader state has batches_done={batches_done}, outside [0, {len(self)}]"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = batches_done
        if self.batches_done == len(self):
            self.epoch += 1
            self.batches_done = 0
