"""In-memory synthetic classification data for debug runs, CI and throughput benchmarks.

Sample ``i`` of a split is ``template[label_i] + 0.8 * (bank_a[i % 97] + bank_b[(i // 97) % 89]) / √2``:
each class has a smooth random template (a 4×4 random field upsampled to the image size), and
the noise is the sum of two entries of fixed noise banks (97 and 89 are coprime, so the first
8,633 samples of a split all get different noise). Everything is a pure function of
``synthetic_seed``, split and index: no files, and batches are built with two gathers, so the
loader costs next to nothing even at 224×224 on a GPU. The classes are separable by their
low-frequency content, so a small network's loss drops within a few dozen steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .loader import ShardedLoader
from .sampler import ShardPlan

_BANK_A, _BANK_B = 97, 89
# Noise scale relative to the unit-variance templates: hard enough that the debug loss does not
# hit zero in a few steps, easy enough that it visibly falls.
_NOISE = 0.8


class SyntheticDataset:
    """A fixed synthetic split: ``labels`` int64 (N,), images built on demand by ``images(idx)``."""

    def __init__(
        self,
        *,
        size: int,
        num_classes: int,
        channels: int,
        image_size: int,
        seed: int,
        split: str,
        device: torch.device | str = "cpu",
    ) -> None:
        self.size = size
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(seed)
        # Templates are shared by the splits (same classes); noise and labels are per split.
        coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
        templates = F.interpolate(
            coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        templates = (templates - templates.mean()) / templates.std()
        g_split = torch.Generator().manual_seed(seed * 1000 + {"train": 1, "val": 2}.get(split, 3))
        shape = (channels, image_size, image_size)
        self.labels = torch.randint(num_classes, (size,), generator=g_split)
        bank_a = torch.randn(_BANK_A, *shape, generator=g_split)
        bank_b = torch.randn(_BANK_B, *shape, generator=g_split)
        device = torch.device(device)
        self._templates = templates.to(device)
        self._bank_a = (bank_a * (_NOISE / 2**0.5)).to(device)
        self._bank_b = (bank_b * (_NOISE / 2**0.5)).to(device)

    def __len__(self) -> int:
        return self.size

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """float32 (len(idx), C, H, W) on the dataset's device."""
        dev = self._templates.device
        idx = idx.to(dev)
        labels = self.labels.to(dev)[idx]
        return (
            self._templates[labels]
            + self._bank_a[idx % _BANK_A]
            + self._bank_b[(idx // _BANK_A) % _BANK_B]
        )


class SyntheticLoader(ShardedLoader):
    def __init__(self, dataset: SyntheticDataset, *, train: bool, **shard_kw: Any) -> None:
        super().__init__(len(dataset), train=train, **shard_kw)
        self.dataset = dataset
        self.num_classes = dataset.num_classes

    def _batches(self, plans: list[ShardPlan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for plan in plans:
            yield self.dataset.images(plan.indices), self.dataset.labels[plan.indices]
