"""Fashion-MNIST (and any MNIST-style IDX data set) as an in-memory :class:`~addernet_dist.data.base.Loader`.

The files come from Debian's ``dataset-fashion-mnist`` package::

    apt-get update && apt-get install -y dataset-fashion-mnist
    # -> /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

Layout of a batch: ``images`` float32 (B, 1, 32, 32), ``labels`` int64 (B,). The 28x28 images are
zero-padded by 2 pixels on each side to 32x32 (paper §5.2: "the images are resized to 32x32",
LeNet-5's input size; padding keeps the pixels unchanged, as LeNet-5 did [45]), scaled to [0, 1]
and normalised with the Fashion-MNIST training-set mean/std. No augmentation (the paper names none).

The whole split lives in memory as uint8 (60,000 x 28 x 28 = 47 MB), so a batch is one
``index_select``: no worker processes, and the iteration order is a pure function of
(seed, epoch, rank, world_size), which makes mid-epoch resume exact.

Sharding, padding and mid-epoch resume are the shared ones of every loader
(:class:`~addernet_dist.data.sampler.ResumableShardSampler` under
:class:`~addernet_dist.data.loader.ShardedLoader`): train shuffles with ``seed + epoch`` and pads
by wrapping to full batches on every rank (every image is seen each epoch); val keeps the file
order, pads to a multiple of ``world_size`` with duplicates labelled ``IGNORE_LABEL`` (-1) and
keeps the last, partial batch, so every sample is counted exactly once.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

# FASHION_MNIST_MEAN/STD: the training set's pixel statistics, defined with the config defaults.
from addernet_dist.data.config import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from addernet_dist.data.loader import ShardedLoader
from addernet_dist.data.sampler import ShardPlan

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}

# IDX type codes (third byte of the magic number) -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, detected from its first bytes).

    Returns an array of the file's dtype in native byte order and shape ``dims``.
    Raises ``ValueError`` naming the file if the header is not IDX or the payload is truncated.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err}); reinstall the data") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (magic {raw[:4].hex()!r}; expected 0000<type><ndim> with "
            f"type in {sorted(hex(k) for k in _IDX_DTYPES)})"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != need:
        raise ValueError(
            f"{path}: IDX payload is {len(raw)} bytes but dims {dims} need {need}; the file is "
            "truncated or corrupt, reinstall the data"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``), atomically."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"dtype {array.dtype} has no IDX type code; use one of {list(_IDX_CODES)}")
    payload = (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.astype(array.dtype.newbyteorder(">")).tobytes()
    )
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, path)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_idx_split(
    root: str | os.PathLike | None, split: Literal["train", "val", "test"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    ``root`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (None = Debian's path).
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    root = Path(root if root is not None else DEFAULT_ROOT)
    prefix = _SPLIT_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find(root, s) for s in stems]
    missing = [s + "[.gz]" for s, p in zip(stems, paths) if p is None]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in '{root}' (missing: {', '.join(missing)}). "
            f"Install them with `{INSTALL_HINT}` (they land in {DEFAULT_ROOT}), or set data.root "
            "to a folder that holds train-/t10k-{images-idx3,labels-idx1}-ubyte[.gz]."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{paths[0]} / {paths[1]}: expected images (N, H, W) and labels (N,), got "
            f"{images.shape} and {labels.shape}"
        )
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


class IdxLoader(ShardedLoader):
    """In-memory, sharded, resumable loader over an MNIST-style IDX split (see module docstring).

    ``limit``: use the first N images of the split. ``shuffle``: None = shuffle (and pad) the
    train split only; the order, padding and resume rules are the shared sampler's.
    """

    num_classes: int = 10

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: Literal["train", "val", "test"] = "train",
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        image_size: int = 32,
        mean: float = FASHION_MNIST_MEAN,
        std: float = FASHION_MNIST_STD,
        shuffle: bool | None = None,
        limit: int | None = None,
    ) -> None:
        images, labels = load_idx_split(root, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        h, w = images.shape[1:]
        if image_size < max(h, w):
            raise ValueError(f"image_size {image_size} is smaller than the images ({h}x{w})")
        super().__init__(
            len(labels),
            train=split == "train",
            shuffle=shuffle,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=device,
            channels_last=channels_last,
        )
        # Pad once here (uint8, zeros = background) instead of per batch.
        top, left = (image_size - h) // 2, (image_size - w) // 2
        padded = torch.zeros(len(images), image_size, image_size, dtype=torch.uint8)
        padded[:, top : top + h, left : left + w] = images
        self.images, self.labels = padded, labels
        self.num_classes = max(10, int(labels.max()) + 1) if len(labels) else 10
        self.mean, self.std = mean, std

    def _batches(self, plans: list[ShardPlan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for plan in plans:
            x = self.images.index_select(0, plan.indices).unsqueeze(1).float().div_(255.0)
            yield x.sub_(self.mean).div_(self.std), self.labels.index_select(0, plan.indices)


def build_fashion_mnist_loader(cfg: Any, split: Literal["train", "val"], **shard_kw: Any) -> IdxLoader:
    """``build_loader`` entry for ``dataset: fashion_mnist``. ``cfg`` is a validated DataConfig:
    its validation already put in the Fashion-MNIST defaults (32x32, the data set's 1-channel
    statistics; data/config.py). ``cfg.root`` None = Debian's path. ``shard_kw``: build_loader's
    (batch_size, rank, world_size, seed, device, channels_last)."""
    return IdxLoader(
        cfg.root or None,
        split,
        image_size=cfg.image_size,
        mean=float(cfg.mean[0]),
        std=float(cfg.std[0]),
        **shard_kw,
    )
