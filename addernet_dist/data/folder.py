"""Image folders as users have them (ImageNet, or any ``split/<class>/*.jpg`` tree) and the
torchvision loader over them.

Layouts understood (ROOT = data.root):
  ROOT/train/<wnid>/*.JPEG                       train, one folder per class
  ROOT/val/<wnid>/*.JPEG                         val in class folders, or
  ROOT/val/*.JPEG + ROOT/LOC_val_solution.csv    flat val, Kaggle ground truth (first wnid of
                                                 PredictionString), or
  ROOT/val/*.JPEG + ILSVRC2012_validation_ground_truth.txt
                                                 flat val, devkit ground truth: line i (1-based)
                                                 labels ILSVRC2012_val_{i:08d}.JPEG with a devkit
                                                 ILSVRC2012_ID in 1..1000.
Devkit IDs are NOT the sorted-wnid order (ID 1 is n02119789, kit fox), so they are mapped to a
wnid through the devkit itself: ``data/meta.mat`` (synsets' ILSVRC2012_ID -> WNID), or a wnid list
file where line i holds the wnid of ID i (``map_clsloc.txt`` as shipped with the 2015 devkit:
"n02119789 1 kit_fox", or a plain ``wnids.txt``). Without one the ground-truth file is refused
rather than guessed. Class indices are always the sorted wnids of ROOT/train (torchvision's
ImageFolder convention), so train and val agree no matter how val is laid out.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from .config import DataConfig
from .loader import ShardedLoader
from .sampler import ShardPlan

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LOC_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_DEVKIT_DIRS = ("ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12", "devkit/data", "devkit", ".")
_WNID_LISTS = ("map_clsloc.txt", "wnids.txt")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass
class Samples:
    """The files of one split. paths[i] has class index labels[i] into classes."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    split_dir: Path

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


def _layout_error(what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what}; expected ImageNet layout ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG "
        f"(or a flat ROOT/val/*.JPEG with ROOT/{LOC_SOLUTION} or the devkit's "
        f"{DEVKIT_GROUND_TRUTH}); see docs/data.md"
    )


def _walk_images(top: str, seen_dirs: dict[str, str], seen_files: dict[str, str]) -> list[str]:
    """Image files under ``top`` (sorted), following symlinked folders (datasets spread over
    disks) but refusing a folder or file reached twice: a loop (``c0/loop -> ..`` made 24 images
    984, other classes' images labelled c0) or a second link to one folder or image (counted
    twice, possibly under two labels). ``seen_*``: real path -> path, shared over a split."""
    files: list[str] = []
    stack = [top]
    while stack:
        d = stack.pop()
        real_dir = os.path.realpath(d)
        if real_dir in seen_dirs:
            raise ValueError(
                f"'{d}' is the folder '{seen_dirs[real_dir]}' again (a symlink loop or a second "
                "link to one folder): its images would be read twice, possibly under two "
                "labels; remove the link"
            )
        seen_dirs[real_dir] = d
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir():  # follows symlinks
                stack.append(e.path)
            elif _is_image(e.name):
                real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real_dir, e.name)
                if real in seen_files:
                    raise ValueError(
                        f"'{e.path}' is the image '{seen_files[real]}' again (both resolve to "
                        f"'{real}'): it would be read twice, possibly under two labels; remove "
                        "one of the links"
                    )
                seen_files[real] = e.path
                files.append(e.path)
    return sorted(files)


def scan_class_folders(split_dir: Path, classes: list[str] | None = None) -> Samples:
    """Every image under ``split_dir/<class>/`` (recursively), sorted, labelled by class."""
    found = _class_dirs(split_dir)
    classes = found if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise ValueError(
            f"{split_dir} has class folders that the train split does not: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; train and val must use the same class names"
        )
    paths: list[str] = []
    labels: list[int] = []
    seen_dirs = {os.path.realpath(split_dir): str(split_dir)}  # a link back up is a loop at once
    seen_files: dict[str, str] = {}
    for c in found:
        files = _walk_images(str(split_dir / c), seen_dirs, seen_files)
        paths.extend(files)
        labels.extend([index[c]] * len(files))
    if not paths:
        raise _layout_error(f"no images found under {split_dir}/<class>/")
    return Samples(paths, labels, classes, split_dir)


def _find(root: Path, names: tuple[str, ...], dirs: tuple[str, ...]) -> Path | None:
    for d in dirs:
        for n in names:
            p = root / d / n
            if p.is_file():
                return p
    return None


def devkit_id_to_wnid(root: Path) -> list[str]:
    """wnid of devkit ILSVRC2012_ID i at position i - 1 (found under ``root``, see module doc)."""
    dirs = _DEVKIT_DIRS + ("val",)
    meta = _find(root, ("meta.mat",), dirs)
    if meta is not None:
        from scipy.io import loadmat

        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        by_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        return [by_id[i] for i in range(1, 1001)]
    wl = _find(root, _WNID_LISTS, dirs)
    if wl is not None:
        wnids = [line.split()[0] for line in wl.read_text().splitlines() if line.strip()]
        return wnids
    raise _layout_error(
        f"{DEVKIT_GROUND_TRUTH} labels images with devkit class IDs, which need the devkit's "
        f"meta.mat or a wnid list ({' / '.join(_WNID_LISTS)}: line i = wnid of ID i) under "
        f"{root}/ILSVRC2012_devkit_t12/data/ to map to wnids; none was found"
    )


def scan_flat_val(split_dir: Path, root: Path, classes: list[str]) -> Samples:
    """A flat val folder labelled by LOC_val_solution.csv or the devkit ground truth."""
    files = sorted(n for n in os.listdir(split_dir) if _is_image(n))
    index = {c: i for i, c in enumerate(classes)}
    search_dirs = (".", "val", *_DEVKIT_DIRS)
    loc = _find(root, (LOC_SOLUTION,), search_dirs)
    wnid_of: dict[str, str] = {}
    if loc is not None:
        with open(loc, newline="") as f:
            for row in csv.DictReader(f):
                wnid_of[row["ImageId"]] = row["PredictionString"].split()[0]
        source = loc
    else:
        gt = _find(root, (DEVKIT_GROUND_TRUTH,), search_dirs)
        if gt is None:
            raise _layout_error(
                f"{split_dir} holds {len(files)} images but no class folders, and neither "
                f"{LOC_SOLUTION} nor {DEVKIT_GROUND_TRUTH} was found under {root}"
            )
        id_to_wnid = devkit_id_to_wnid(root)
        for i, line in enumerate(gt.read_text().split(), start=1):
            wnid_of[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[int(line) - 1]
        source = gt
    paths, labels = [], []
    for n in files:
        stem = os.path.splitext(n)[0]
        if stem not in wnid_of:
            raise ValueError(f"{split_dir / n} has no entry in the ground truth {source}")
        wnid = wnid_of[stem]
        if wnid not in index:
            raise ValueError(
                f"{split_dir / n} is labelled {wnid} by {source}, which is not a class folder "
                f"of the train split"
            )
        paths.append(str(split_dir / n))
        labels.append(index[wnid])
    if not paths:
        raise _layout_error(f"no images found in {split_dir}")
    return Samples(paths, labels, classes, split_dir)


def scan_split(root: Path, split_name: str, *, train_split: str = "train") -> Samples:
    """Scan ``root/split_name`` in any supported layout; classes come from ``root/train_split``."""
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"data.root '{root}' does not exist or is not a directory")
    split_dir = root / split_name
    if not split_dir.is_dir():
        raise _layout_error(f"data.root '{root}' has no '{split_name}' folder")
    train_dir = root / train_split
    classes = _class_dirs(train_dir) if train_dir.is_dir() else None
    if split_name == train_split and not classes:
        raise _layout_error(f"'{train_dir}' has no class sub-folders")
    if _class_dirs(split_dir):
        samples = scan_class_folders(split_dir, classes)
        if split_name == train_split:
            # torchvision's ImageFolder rule: a class the model would have but never train on is
            # an error (a half-copied tree), not a silent extra logit; the check says the same.
            empty = sorted(set(samples.classes) - {samples.classes[i] for i in set(samples.labels)})
            if empty:
                raise ValueError(
                    f"{len(empty)} class folder(s) of {split_dir} hold no images: "
                    f"{', '.join(str(split_dir / c) for c in empty[:5])}"
                    f"{' ...' if len(empty) > 5 else ''}; add their images or remove the folders"
                )
        return samples
    if not classes:
        raise _layout_error(
            f"'{split_dir}' is flat and there is no '{train_dir}' to take the class list from"
        )
    return scan_flat_val(split_dir, root, classes)


def resolve_samples(cfg: DataConfig, split: str, *, rank: int = 0) -> Samples:
    """The files of ``split`` for any file-backed dataset in ``cfg``."""
    if cfg.dataset == "imagefolder":
        root = Path(cfg.root)  # validated non-None by DataConfig
    elif cfg.dataset == "digits":
        from .digits import ensure_digits_tree

        root = ensure_digits_tree(cfg.root)
    else:
        raise ValueError(f"dataset {cfg.dataset!r} is not an image-folder dataset")
    name = cfg.train_split if split == "train" else cfg.val_split
    return scan_split(root, name, train_split=cfg.train_split)


# ---- decoding and transforms ------------------------------------------------------------------


def high_bit_depth(im: Image.Image) -> str | None:
    """"16-bit" for a 16-bit-per-channel image :func:`load_rgb` scales as DALI does, "unfaithful"
    for one no loader here decodes faithfully (32-bit int or float: PIL's convert clips it), None
    for 8-bit."""
    rawmode = str(im.tile[0][3]) if getattr(im, "tile", None) else ""
    if im.mode.startswith("I;16") or (im.format == "PNG" and ";16" in rawmode):
        return "16-bit"  # (older Pillow opens 16-bit gray PNGs as mode I, rawmode I;16B)
    if im.mode in ("I", "F"):
        return "unfaithful"
    return None


def _rgb_from_16bit(path: str, im: Image.Image) -> Image.Image:
    """A 16-bit image as DALI's decoder gives it: v -> round(v * 255 / 65535) per channel (its
    CPU pipeline, measured: tests/integration/test_data_16bit.py), gray repeated, alpha dropped. PIL's
    convert("RGB") clips 16-bit gray to 255 (a white image) and truncates 16-bit colour."""
    if im.format == "PNG":  # PIL keeps only the high byte of 16-bit colour PNGs
        from torchvision.io import ImageReadMode, decode_png, read_file

        x = decode_png(read_file(path), mode=ImageReadMode.UNCHANGED).to(torch.int32)
    else:  # I;16 (TIFF): PIL holds the 16-bit values
        x = torch.from_numpy(np.asarray(im).astype(np.int32))[None]
    x = (x * 255 + 32767) // 65535
    x = x[:1].expand(3, -1, -1) if x.shape[0] <= 2 else x[:3]
    return Image.fromarray(x.permute(1, 2, 0).to(torch.uint8).contiguous().numpy(), "RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to an RGB PIL image (grayscale, CMYK, palette, 16-bit and PNG-in-.JPEG
    included); raise CorruptImageError naming the file when it cannot be decoded completely or
    faithfully."""
    try:
        with Image.open(path) as im:
            depth = high_bit_depth(im)
            if depth == "unfaithful":
                raise ValueError(
                    f"mode {im.mode} (32-bit) has no faithful 8-bit RGB decode; convert the file "
                    "to 8 or 16 bits per channel"
                )
            if depth == "16-bit":
                return _rgb_from_16bit(path, im)
            return im.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, RuntimeError) as e:
        raise CorruptImageError(
            f"cannot decode image {path}: {e}. Remove or replace the file (find all such files "
            f"with `addernet-data check ROOT`)"
        ) from e


def random_resized_crop_box(
    rng: random.Random,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style crop: area fraction uniform in ``scale``, aspect
    ratio log-uniform in ``ratio``; 10 tries, then the largest centred crop within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """PIL image -> normalised float32 (3, S, S). Train randomness comes only from the ``rng``
    passed in, so a sample's augmentation is a function of (seed, epoch, position) and a resumed
    run augments exactly like the uninterrupted one, whatever the worker count."""

    def __init__(self, cfg: DataConfig, train: bool) -> None:
        self.size = cfg.image_size
        self.augment = cfg.resolved_augment if train else "none"
        self.hflip = train and cfg.resolved_hflip
        self.val_resize = round(cfg.image_size * cfg.resolved_val_resize_ratio)
        self.scale = (cfg.min_crop_area, 1.0)
        self.ratio = cfg.crop_aspect_ratio
        self.pad = cfg.pad
        self.mean = list(cfg.mean)
        self.std = list(cfg.std)
        self.randaugment = (
            v2.RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude)
            if train and cfg.randaugment_ops
            else None
        )

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        s = self.size
        x = TF.pil_to_tensor(img)  # uint8 (3, H, W)
        if self.augment == "random_resized_crop":
            top, left, h, w = random_resized_crop_box(
                rng, img.width, img.height, self.scale, self.ratio
            )
            x = TF.resized_crop(x, top, left, h, w, [s, s], antialias=True)
        elif self.augment == "pad_crop":
            x = TF.resize(x, [s, s], antialias=True)
            x = TF.pad(x, [self.pad])
            top, left = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
            x = TF.crop(x, top, left, s, s)
        else:
            x = TF.resize(x, self.val_resize, antialias=True)  # shorter side
            x = TF.center_crop(x, [s, s])
        if self.hflip and rng.random() < 0.5:
            x = TF.horizontal_flip(x)
        if self.randaugment is not None:
            # torchvision draws from torch's global RNG: seed it from the sample's rng (and restore it),
            # so the augmentation stays a function of (seed, epoch, position) and resumes exactly
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                x = self.randaugment(x)
        x = x.to(torch.float32).div_(255.0)
        return TF.normalize(x, self.mean, self.std)


def sample_rng(seed: int, epoch: int, position: int) -> random.Random:
    # Python's Random accepts any int seed; packing the three keeps streams distinct.
    return random.Random((seed << 80) ^ (epoch << 40) ^ position)


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Samples, transform: ImageTransform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
        index, seed, epoch, position = item
        img = load_rgb(self.samples.paths[index])
        return self.transform(img, sample_rng(seed, epoch, position)), self.samples.labels[index]


class FolderLoader(ShardedLoader):
    """Base of the loaders over an image-file list (torchvision and DALI): one sampler, one order."""

    def __init__(self, cfg: DataConfig, samples: Samples, *, train: bool, **shard_kw: Any) -> None:
        """``shard_kw``: ``ShardedLoader``'s (batch_size, rank, world_size, seed, device, channels_last)."""
        super().__init__(len(samples), train=train, **shard_kw)
        self.cfg = cfg
        self.samples = samples
        self.num_classes = len(samples.classes)
        self.class_names = list(samples.classes)


class TorchvisionLoader(FolderLoader):
    """PIL decode + torchvision transforms in ``cfg.num_workers`` DataLoader worker processes."""

    def __init__(self, cfg: DataConfig, samples: Samples, **kw) -> None:
        super().__init__(cfg, samples, **kw)
        self.dataset = _FolderDataset(samples, ImageTransform(cfg, self.train))

    def _batches(self, plans: list[ShardPlan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed, epoch = self.sampler.seed, self.sampler.epoch
        batches = [
            [(int(i), seed, epoch, int(p)) for i, p in zip(plan.indices, plan.positions)]
            for plan in plans
        ]
        if not batches:
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory and self.device.type == "cuda",
            prefetch_factor=4 if self.cfg.num_workers > 0 else None,
        )
        yield from loader
