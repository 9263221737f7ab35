"""Scan an image tree before a long run: layout, class and image counts, files that will not
decode, and oddities the loaders handle but a user may want to know about (grayscale, CMYK,
PNG stored under a .JPEG name, other colour modes). Backs ``addernet-data check ROOT``."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .folder import IMAGE_EXTENSIONS, high_bit_depth, scan_split

ODDITIES = {
    "grayscale": "grayscale (mode L), converted to 3 identical channels",
    "cmyk": "CMYK JPEG, converted to RGB",
    "format_mismatch": "content format differs from the file extension (e.g. PNG named .JPEG)",
    "other_mode": "unusual colour mode (palette/alpha), converted to RGB",
    "sixteen_bit": "16 bits per channel, scaled to 8 as DALI does (round(v * 255 / 65535))",
}


@dataclass
class FileReport:
    path: str
    error: str | None = None
    oddities: list[str] = field(default_factory=list)
    mode: str | None = None
    format: str | None = None


def inspect_image(path: str, decode: bool = True) -> FileReport:
    """Open (and with ``decode`` fully decode) one file; never raises."""
    r = FileReport(path)
    try:
        with Image.open(path) as im:
            r.mode, r.format = im.mode, im.format
            depth = high_bit_depth(im)  # before load(): it reads the decoder's raw mode
            if depth == "unfaithful":  # load_rgb refuses it the same way
                r.error = f"cannot be decoded faithfully: mode {im.mode} (32-bit); convert to 8/16-bit"
                return r
            if decode:
                im.load()  # a truncated or corrupt stream fails here, not at open()
            else:
                im.verify()
    except Exception as e:  # any decoder failure is the finding, whatever its type
        r.error = f"{type(e).__name__}: {e}"
        return r
    ext = os.path.splitext(path)[1].lower()
    expected = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
    if ext in expected and r.format != expected[ext]:
        r.oddities.append("format_mismatch")
    if depth == "16-bit":
        r.oddities.append("sixteen_bit")
    elif r.mode == "L":
        r.oddities.append("grayscale")
    elif r.mode == "CMYK":
        r.oddities.append("cmyk")
    elif r.mode != "RGB":
        r.oddities.append("other_mode")
    return r


def _inspect_decode(path: str) -> FileReport:
    return inspect_image(path, decode=True)


def _inspect_header(path: str) -> FileReport:
    return inspect_image(path, decode=False)


@dataclass
class SplitReport:
    name: str
    layout: str
    num_classes: int
    num_images: int
    images_per_class: Counter
    files: list[FileReport]
    ignored: list[str]  # non-image files found next to the images

    @property
    def corrupt(self) -> list[FileReport]:
        return [f for f in self.files if f.error]

    def with_oddity(self, kind: str) -> list[FileReport]:
        return [f for f in self.files if kind in f.oddities]


def _non_images(split_dir: Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(split_dir, followlinks=True):
        for n in names:
            if not n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."):
                out.append(os.path.join(dirpath, n))
    return sorted(out)


def check_tree(
    root: Path | str,
    splits: tuple[str, ...] = ("train", "val"),
    *,
    workers: int = 1,
    decode: bool = True,
) -> list[SplitReport]:
    """Report on each of ``splits`` present under ``root`` (layout errors propagate as the
    loaders would raise them)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' does not exist or is not a directory")
    present = [s for s in splits if (root / s).is_dir()]
    if not present:
        raise FileNotFoundError(
            f"'{root}' has none of the split folders {list(splits)}; expected ImageNet layout "
            "ROOT/train/<wnid>/*.JPEG and ROOT/val/..."
        )
    fn = _inspect_decode if decode else _inspect_header
    reports = []
    for split in present:
        samples = scan_split(root, split, train_split=splits[0] if splits[0] in present else split)
        flat = samples.split_dir == root / split and not any(
            e.is_dir() for e in os.scandir(root / split)
        )
        if workers > 1:
            with ProcessPoolExecutor(workers) as ex:
                files = list(ex.map(fn, samples.paths, chunksize=64))
        else:
            files = [fn(p) for p in samples.paths]
        # Every class of the model (the train folders), with 0 for one without images here: the
        # class count is the model's, as the loaders build it.
        per_class = Counter({c: 0 for c in samples.classes})
        per_class.update(samples.classes[label] for label in samples.labels)
        reports.append(
            SplitReport(
                name=split,
                layout="flat + ground-truth file" if flat else "class folders",
                num_classes=len(samples.classes),
                num_images=len(samples),
                images_per_class=per_class,
                files=files,
                ignored=_non_images(root / split),
            )
        )
    return reports


def format_report(root: Path | str, reports: list[SplitReport], max_list: int = 20) -> str:
    lines = [f"root: {root}"]
    for r in reports:
        counts = r.images_per_class.values()
        lines.append(
            f"{r.name}: {r.num_classes} classes, {r.num_images} images ({r.layout}; "
            f"{min(counts)}-{max(counts)} per class)"
        )

    def listing(split: str, title: str, items: list[str]) -> None:
        if not items:
            return
        lines.append(f"{split}: {title}: {len(items)}")
        lines.extend(f"  {x}" for x in items[:max_list])
        if len(items) > max_list:
            lines.append(f"  ... and {len(items) - max_list} more")

    for r in reports:
        listing(r.name, "classes without images", [c for c, n in r.images_per_class.items() if not n])
        listing(r.name, "CORRUPT / unreadable", [f"{f.path}: {f.error}" for f in r.corrupt])
        for kind, text in ODDITIES.items():
            listing(r.name, text, [f"{f.path} ({f.mode}, {f.format})" for f in r.with_oddity(kind)])
        listing(r.name, "non-image files (ignored by the loaders)", r.ignored)
    bad = sum(len(r.corrupt) for r in reports)
    lines.append(
        f"FAILED: {bad} file(s) cannot be decoded; remove or replace them before training"
        if bad
        else "OK: every image decodes"
    )
    return "\n".join(lines)
