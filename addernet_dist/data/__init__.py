"""Data loading: one factory, ``build_loader``, for synthetic, ImageFolder (ImageNet), digits and
Fashion-MNIST data through the torchvision or DALI pipelines. See docs/data.md."""

from __future__ import annotations

import torch

from .base import IGNORE_LABEL, Loader
from .config import DaliConfig, DataConfig
from .sampler import ResumableShardSampler

__all__ = [
    "IGNORE_LABEL",
    "DaliConfig",
    "DataConfig",
    "Loader",
    "ResumableShardSampler",
    "build_loader",
]


def build_loader(
    cfg: DataConfig,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> Loader:
    """The loader of ``split`` ("train" or "val") for one rank.

    batch_size: per rank. Train loaders shuffle with ``seed + epoch`` and yield full batches
    only; val loaders keep the file order and label padded duplicates ``IGNORE_LABEL``.
    Batches are float32 NCHW (channels_last memory format if asked), normalised, on ``device``;
    labels int64 on ``device``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    device = torch.device(device)
    shard_kw = dict(
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        channels_last=channels_last,
    )

    if cfg.dataset == "synthetic":
        from .synthetic import SyntheticDataset, SyntheticLoader

        dataset = SyntheticDataset(
            size=cfg.synthetic_train_size if train else cfg.synthetic_val_size,
            num_classes=cfg.synthetic_num_classes,
            channels=cfg.synthetic_channels,
            image_size=cfg.image_size,
            seed=cfg.synthetic_seed,
            split=split,
            device=device,
        )
        return SyntheticLoader(dataset, train=train, **shard_kw)

    if cfg.dataset == "fashion_mnist":
        # In-memory IDX loader (reproduction tools): 1×32×32 batches straight from Debian's
        # dataset-fashion-mnist files, no JPEG tree.
        from .idx import build_fashion_mnist_loader

        return build_fashion_mnist_loader(cfg, split, **shard_kw)

    from .folder import resolve_samples

    samples = resolve_samples(cfg, split, rank=rank)
    if cfg.resolved_loader == "dali":
        from .dali import DaliLoader

        return DaliLoader(cfg, samples, train=train, **shard_kw)
    from .folder import TorchvisionLoader

    return TorchvisionLoader(cfg, samples, train=train, **shard_kw)
