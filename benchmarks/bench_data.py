"""Images/s of the DALI pipeline vs the torchvision loader on the same generated JPEG tree.

Both loaders read the same ImageNet-like files (default 500x375 JPEGs) with the same number of
CPU workers (DataLoader worker processes vs DALI threads), the standard ImageNet transforms at
224 (train: random-resized-crop + flip; val: resize 256 + centre crop), batch 64, one rank, and
are timed in one run, alternating epoch by epoch, over whole epochs (pipeline build / worker
start included, since the loaders pay them every epoch); the median epoch is reported. One
untimed warm-up epoch each first (page cache).
On a CUDA machine the DALI ``mixed`` (nvJPEG) pipeline is timed too.

    python benchmarks/bench_data.py                      # tree in a temp dir, 2 workers
    python benchmarks/bench_data.py --workers 8 --images 4000 --root /tmp/bench_tree
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from addernet_dist.data import DataConfig, build_loader
from addernet_dist.data.jpeg_tree import make_jpeg_tree


def time_epoch(loader, epoch: int, device: str) -> float:
    """Images/s of one whole epoch (pipeline build / worker start included)."""
    loader.set_epoch(epoch)
    n = 0
    t0 = time.perf_counter()
    for x, _ in loader:
        n += x.shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None, help="tree location (default: temp dir)")
    p.add_argument("--images", type=int, default=1000, help="train images (val: a quarter)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    args = p.parse_args()

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        root = Path(tmp.name)
    if not (root / "train").is_dir():
        classes = 10
        make_jpeg_tree(
            root,
            num_classes=classes,
            train_per_class=args.images // classes,
            val_per_class=max(1, args.images // (4 * classes)),
            sizes=((args.width, args.height),),
            odd=False,
        )
    jpeg_kb = sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG")) / 1024 / args.images

    base = dict(
        dataset="imagefolder", root=root, image_size=224, num_workers=args.workers, pin_memory=False
    )
    variants = [("torchvision", "cpu", {"loader": "torchvision"})]
    variants.append(("dali-cpu", "cpu", {"loader": "dali"}))
    if torch.cuda.is_available():
        variants.append(("dali-mixed", "cuda", {"loader": "dali"}))
        variants.append(("torchvision->cuda", "cuda", {"loader": "torchvision"}))

    print(
        f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cores visible, torch {torch.__version__}"
    )
    print(
        f"# tree: {args.images} train JPEGs {args.width}x{args.height} (~{jpeg_kb:.0f} KB each), "
        f"batch {args.batch}, {args.workers} workers/threads, {args.epochs} timed epochs"
    )
    results: dict[tuple[str, str], float] = {}
    for split in ("train", "val"):
        loaders = []
        for name, device, over in variants:
            cfg = DataConfig(**base, **over)
            loader = build_loader(cfg, split, batch_size=args.batch, device=device)
            time_epoch(loader, 0, device)  # warm-up: page cache, lazy imports, CUDA context
            loaders.append((name, device, loader))
        # Alternate the loaders epoch by epoch so load from other jobs on a shared machine hits
        # all of them alike; report the median epoch.
        samples: dict[str, list[float]] = {name: [] for name, _, _ in loaders}
        for e in range(args.epochs):
            for name, device, loader in loaders:
                samples[name].append(time_epoch(loader, e + 1, device))
        for name, _, _ in loaders:
            ips = statistics.median(samples[name])
            results[(name, split)] = ips
            runs = " ".join(f"{v:.0f}" for v in samples[name])
            print(f"{split:5s} {name:18s} {ips:8.1f} images/s (median; epochs: {runs})", flush=True)
    for split in ("train", "val"):
        ratio = results[("dali-cpu", split)] / results[("torchvision", split)]
        print(f"{split:5s} ratio dali-cpu / torchvision: {ratio:.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
