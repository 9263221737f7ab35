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

Sharding (same rule as a ``DistributedSampler``):
- train: permutation seeded by ``seed + epoch``, padded by wrapping to a multiple of
  ``world_size``, rank r takes positions r, r+W, ...; only full batches are used (a last batch
  of 1-2 images would break BatchNorm), so ``len = (ceil(N / W)) // B``.
- val: no shuffle; padded to a multiple of ``world_size`` with duplicates labelled
  ``IGNORE_LABEL`` (-1); the last, partial batch is kept, so every sample is counted exactly once.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from addernet_dist.data.base import IGNORE_LABEL

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

# Pixel statistics of the Fashion-MNIST training set on [0, 1], computed on the 28x28 images
# (before padding) with float64: mean 0.28604, std 0.35302.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
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


class IdxLoader:
    """In-memory, sharded, resumable loader over an MNIST-style IDX split (see module docstring)."""

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        images, labels = load_idx_split(root, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        h, w = images.shape[1:]
        if image_size < max(h, w):
            raise ValueError(f"image_size {image_size} is smaller than the images ({h}x{w})")
        # Pad once here (uint8, zeros = background) instead of per batch.
        top, left = (image_size - h) // 2, (image_size - w) // 2
        padded = torch.zeros(len(images), image_size, image_size, dtype=torch.uint8)
        padded[:, top : top + h, left : left + w] = images
        self.images, self.labels = padded, labels
        self.num_classes = max(10, int(labels.max()) + 1) if len(labels) else 10
        self.train = split == "train"
        self.shuffle = self.train if shuffle is None else shuffle
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device, self.channels_last = torch.device(device), channels_last
        self.mean, self.std = mean, std
        self.epoch, self.batches_done, self._resume_at = 0, 0, 0
        if len(self) == 0:
            raise ValueError(
                f"split {split!r} has {len(labels)} images: too few for batch_size {batch_size} "
                f"x world_size {world_size} (training uses only full batches)"
            )

    def _per_rank(self) -> int:
        return math.ceil(len(self.labels) / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _rank_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices into the split, valid mask) of this rank for the current epoch."""
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self._per_rank() * self.world_size
        valid = torch.ones(total, dtype=torch.bool)
        if total > n:
            order = torch.cat([order, order[: total - n]])
            valid[n:] = False
        return order[self.rank :: self.world_size], valid[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, valid = self._rank_indices()
        start, self._resume_at = self._resume_at, 0
        bs = self.batch_size
        for b in range(start, len(self)):
            sel = idx[b * bs : (b + 1) * bs]
            x = self.images.index_select(0, sel).unsqueeze(1).float().div_(255.0)
            x = x.sub_(self.mean).div_(self.std)
            y = self.labels.index_select(0, sel).clone()
            if not self.train:
                # Wrapped duplicates are not counted in eval (base.IGNORE_LABEL).
                y[~valid[b * bs : (b + 1) * bs]] = IGNORE_LABEL
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.batches_done = b + 1
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def set_epoch(self, epoch: int) -> None:
        # Re-setting the epoch a resumed loader is already in must keep its position.
        if epoch != self.epoch:
            self.epoch, self.batches_done, self._resume_at = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"loader state was saved with seed {state['seed']} but this loader has seed "
                f"{self.seed}; resume with the same train.seed"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = self._resume_at = int(state["batches_done"])


def build_fashion_mnist_loader(
    cfg: Any,
    split: Literal["train", "val"],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool = False,
) -> IdxLoader:
    """``build_loader`` entry for ``dataset: fashion_mnist``.

    ``cfg.root`` None = Debian's path. ``cfg.mean``/``cfg.std``/``cfg.image_size`` are used only
    when set to something other than DataConfig's ImageNet defaults; otherwise the Fashion-MNIST
    statistics and 32x32.
    """
    given = getattr(cfg, "model_fields_set", set())
    augment = getattr(cfg, "augment", "none")
    if "augment" in given and augment not in ("auto", "none"):
        raise ValueError(
            f"data.augment={augment!r}: the fashion_mnist loader does no augmentation (paper §5.2 "
            "names none); set data.augment=none or leave it unset"
        )
    fields = getattr(type(cfg), "model_fields", {})

    def explicit(key: str) -> Any:
        """cfg.<key> if the user set it to something other than DataConfig's default (ImageNet's
        224 px and 3-channel statistics), else None. A default also arrives "set" when a saved
        config is re-validated (checkpoints hold the full dump), hence the value comparison."""
        value = getattr(cfg, key, None)
        default = fields[key].default if key in fields else None
        return value if key in given and value != default else None

    stats = {}
    for key in ("mean", "std"):
        value = explicit(key)
        if value is not None:
            value = tuple(value)
            if len(value) != 1:
                raise ValueError(
                    f"data.{key}={list(value)}: Fashion-MNIST has 1 channel, give one value"
                )
            stats[key] = float(value[0])
    return IdxLoader(
        getattr(cfg, "root", None) or None,
        split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        channels_last=channels_last,
        image_size=int(explicit("image_size") or 32),
        **stats,
    )
