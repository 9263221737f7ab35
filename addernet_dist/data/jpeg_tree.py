"""Generate small ImageNet-layout JPEG trees: test fixtures and the data benchmark's input.

Each image is a smooth class-coloured gradient with a few random rectangles, so classes differ in
colour (a tiny classifier separates them) while every file is a real, natural-ish JPEG. ``odd``
adds the files real ImageNet has: grayscale and CMYK JPEGs and a PNG saved under a .JPEG name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# Class hues spread evenly; ten classes is plenty for tests and the benchmark.
_PALETTE = np.array(
    [
        [220, 40, 40],
        [40, 200, 60],
        [40, 70, 220],
        [230, 200, 40],
        [200, 50, 200],
        [40, 200, 210],
        [240, 130, 30],
        [120, 60, 20],
        [150, 150, 150],
        [20, 20, 20],
    ],
    dtype=np.float32,
)


def _image(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    base = _PALETTE[label % len(_PALETTE)]
    ramp = np.linspace(0.6, 1.2, width, dtype=np.float32)[None, :, None]
    img = np.broadcast_to(base, (height, width, 3)) * ramp
    for _ in range(3):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(1, max(2, width // 3)), y0 + rng.integers(1, max(2, height // 3))
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * 0.5 + rng.uniform(0, 255, 3) * 0.5
    img = img + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> None:
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_jpeg_tree(
    root: Path | str,
    *,
    num_classes: int = 3,
    train_per_class: int = 5,
    val_per_class: int = 3,
    sizes: tuple[tuple[int, int], ...] = ((37, 53), (61, 29), (48, 48), (75, 41)),
    flat_val: bool = False,
    odd: bool = True,
    seed: int = 0,
) -> dict[str, list[tuple[str, int]]]:
    """Write ROOT/train/<wnid>/*.JPEG and ROOT/val (class folders, or flat with a
    LOC_val_solution.csv). Returns {split: [(path, label), ...]} in sorted-path order.

    odd=True makes, per split, the first image of class 0 grayscale (L), of class 1 CMYK and of
    class 2 a PNG stream named .JPEG (when those classes exist).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{1000000 + 37 * c:08d}" for c in range(num_classes)]
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    solution = ["ImageId,PredictionString"]
    counter = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            for k in range(per_class):
                w, h = sizes[(counter + c) % len(sizes)]
                counter += 1
                arr = _image(rng, c, w, h)
                if split == "val" and flat_val:
                    folder = root / "val"
                    name = f"ILSVRC2012_val_{counter:08d}.JPEG"
                    solution.append(f"{name[:-5]},{wnid} 0 0 {w - 1} {h - 1}")
                else:
                    folder = root / split / wnid
                    name = f"{wnid}_{k:04d}.JPEG"
                folder.mkdir(parents=True, exist_ok=True)
                mode, fmt = "RGB", "JPEG"
                if odd and k == 0:
                    mode, fmt = {0: ("L", "JPEG"), 1: ("CMYK", "JPEG"), 2: ("RGB", "PNG")}.get(
                        c, ("RGB", "JPEG")
                    )
                write_jpeg(folder / name, arr, mode, fmt)
                out[split].append((str(folder / name), c))
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    for split in out:
        out[split].sort()
    return out


def corrupt_file(path: Path | str, keep_bytes: int = 200) -> None:
    """Truncate a file to its first ``keep_bytes`` bytes (a download that died half-way)."""
    data = Path(path).read_bytes()[:keep_bytes]
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
