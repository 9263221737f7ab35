"""scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes, no download) written
once as a small JPEG ImageFolder tree, so the README's main job reads real images through the same
path as ImageNet.

Tree: ROOT/train/<digit>/<i>.jpg and ROOT/val/<digit>/<i>.jpg, 32×32 grayscale JPEGs (the loader
turns them into 3 identical channels), upscaled from 8×8 with bicubic interpolation. Split: every
5th image (by index in sklearn's order) goes to val: 1,437 train / 360 val, all classes in both.
Written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written tree behind and concurrent ranks race harmlessly (the loser discards its copy).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DIGITS_SIZE = 32
_VAL_EVERY = 5
# Stored quality: the 32×32 images are tiny, so a high quality costs nothing and keeps JPEG
# ringing well below the 0..16 grey levels of the source.
_QUALITY = 95
_MARKER = ".complete"


def default_cache_dir(name: str) -> Path:
    base = os.environ.get("ADDERNET_DATA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "addernet_dist"
    )
    return Path(base) / name


def write_tree_atomically(root: Path, write) -> Path:
    """Run ``write(tmp_dir)`` into a fresh sibling of ``root`` and rename it to ``root``.

    Idempotent: returns at once when ``root`` already holds a completed tree (marker file).
    """
    root = Path(root)
    if (root / _MARKER).is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists and is not a finished dataset tree (no {_MARKER} marker); point "
            "data.root at an empty or new folder, or delete this one to regenerate it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        (tmp / _MARKER).write_text("ok\n")
        if root.exists():
            root.rmdir()  # empty (checked above); rename needs the target gone
        os.rename(tmp, root)
    except OSError:
        # Another process renamed its finished copy into place first: use that one.
        if (root / _MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_digits(out: Path) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    for i, (img, label) in enumerate(zip(images, d.target)):
        split = "val" if i % _VAL_EVERY == 0 else "train"
        folder = out / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(img, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)
        big.save(folder / f"{i:04d}.jpg", quality=_QUALITY)


def ensure_digits_tree(root: Path | str | None = None) -> Path:
    """The digits tree under ``root`` (default: the cache dir), written on first use."""
    root = Path(root) if root is not None else default_cache_dir("digits")
    return write_tree_atomically(root, _write_digits)
