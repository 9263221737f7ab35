"""torchvision ImageFolder loader: layouts, labels, sharding, eval exactness, resume, corrupt files,
and the digits tree."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from addernet_dist.data import IGNORE_LABEL, DataConfig, build_loader
from addernet_dist.data.digits import ensure_digits_tree
from addernet_dist.data.folder import (
    CorruptImageError,
    devkit_id_to_wnid,
    random_resized_crop_box,
    scan_split,
)
from addernet_dist.data.jpeg_tree import corrupt_file, make_jpeg_tree
from tests.helpers import module_jpeg_tree

tree = module_jpeg_tree("imnet", num_classes=3, train_per_class=5, val_per_class=3)


flat_tree = module_jpeg_tree("imnet_flat", num_classes=3, train_per_class=2, val_per_class=3, flat_val=True)


def _cfg(root, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=root, image_size=24, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.timeout(60)
def test_train_batches_shapes_dtypes_labels(tree):
    root, files = tree
    loader = build_loader(_cfg(root), "train", batch_size=4, seed=1)
    assert loader.num_classes == 3
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # ceil(15 / 4), full batches
    for x, y in batches:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert torch.isfinite(x).all()
    labels = torch.cat([y for _, y in batches])
    # 16 slots for 15 images: every label count is the file count, plus one wrapped duplicate.
    counts = torch.bincount(labels, minlength=3)
    assert counts.sum() == 16 and (counts >= 5).all()


@pytest.mark.timeout(60)
def test_val_labels_follow_files_and_colours(tree):
    """Val keeps sorted-path order; the red channel mean says which class each image was drawn
    as (class 0 red, 1 green, 2 blue) -- labels must agree with the pixels."""
    root, files = tree
    loader = build_loader(_cfg(root, image_size=16), "val", batch_size=9)
    ((x, y),) = list(loader)
    assert y.tolist() == [label for _, label in files["val"]]
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    rgb = (x * std + mean).mean((2, 3))
    # Grayscale (first of class 0) has no dominant channel; check the others.
    colour = rgb.argmax(1)
    for i, (path, label) in enumerate(files["val"]):
        if Image.open(path).mode == "L":
            continue
        assert colour[i] == label, path


@pytest.mark.timeout(60)
def test_odd_files_decode_to_rgb(tree):
    root, files = tree
    modes = {Image.open(p).mode for p, _ in files["train"]}
    formats = {Image.open(p).format for p, _ in files["train"]}
    assert {"L", "CMYK", "RGB"} <= modes and {"PNG", "JPEG"} <= formats
    x, _ = next(iter(build_loader(_cfg(root), "val", batch_size=9)))
    assert x.shape[1] == 3


@pytest.mark.timeout(60)
def test_two_rank_train_shards_disjoint_and_cover(tree):
    root, files = tree
    seen = []
    for rank in range(2):
        loader = build_loader(
            _cfg(root, image_size=16), "train", batch_size=3, rank=rank, world_size=2, seed=4
        )
        ids = loader.sampler.plan().indices.tolist()
        assert len(ids) == len(loader) * 3
        seen.append(ids)
        assert sum(len(y) for _, y in loader) == len(ids)
    assert set(seen[0]) | set(seen[1]) == set(range(15))
    # 18 slots, 15 files: exactly 3 duplicates in total.
    assert len(seen[0]) + len(seen[1]) - len(set(seen[0]) | set(seen[1])) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size,batch", [(2, 2), (4, 3)])
def test_distributed_val_counts_each_file_once(tree, world_size, batch):
    root, files = tree
    cfg = _cfg(root, image_size=16)
    ((ref_x, ref_y),) = list(build_loader(cfg, "val", batch_size=9))
    xs, ys = [], []
    for rank in range(world_size):
        for x, y in build_loader(cfg, "val", batch_size=batch, rank=rank, world_size=world_size):
            xs.append(x[y != IGNORE_LABEL])
            ys.append(y[y != IGNORE_LABEL])
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(y) == 9
    match = torch.cdist(x.flatten(1), ref_x.flatten(1)).argmin(1)
    assert sorted(match.tolist()) == list(range(9))
    assert torch.equal(ref_y[match], y)
    assert torch.equal(ref_x[match], x)  # same pixels whichever rank decoded them


@pytest.mark.timeout(60)
def test_flat_val_with_loc_solution(flat_tree):
    root, files = flat_tree
    assert not any(p.is_dir() for p in (root / "val").iterdir())
    ((x, y),) = list(build_loader(_cfg(root), "val", batch_size=9))
    assert y.tolist() == [label for _, label in files["val"]]


@pytest.mark.timeout(60)
def test_flat_val_with_devkit_ground_truth(tmp_path):
    """Devkit IDs map through the devkit's wnid list, not sorted order: IDs here are reversed."""
    files = make_jpeg_tree(
        tmp_path, num_classes=3, train_per_class=1, val_per_class=2, flat_val=True, odd=False
    )
    (tmp_path / "LOC_val_solution.csv").unlink()
    wnids = sorted(os.listdir(tmp_path / "train"))
    devkit_order = wnids[::-1]  # devkit ID 1 = last sorted wnid, etc.
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    names = sorted(os.listdir(tmp_path / "val"))
    # Rename the flat files to the devkit's 1-based numbering, writing the ground truth.
    lines = []
    for i, (path, label) in enumerate(files["val"], start=1):
        os.rename(path, tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
        lines.append(str(devkit_order.index(wnids[label]) + 1))
    assert len(names) == 6
    # Without the wnid list the ground truth is refused, naming what is missing.
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError, match="meta.mat or a wnid list"):
        scan_split(tmp_path, "val")
    (data / "map_clsloc.txt").write_text(
        "".join(f"{w} {i} name_{i}\n" for i, w in enumerate(devkit_order, start=1))
    )
    assert devkit_id_to_wnid(tmp_path) == devkit_order
    s = scan_split(tmp_path, "val")
    assert s.labels == [label for _, label in files["val"]]


@pytest.mark.timeout(60)
def test_missing_root_and_bad_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data.root '{tmp_path / 'nope'}' does not exist"):
        build_loader(_cfg(tmp_path / "nope"), "train", batch_size=2)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="has no class sub-folders.*ROOT/train/<wnid>/"):
        build_loader(_cfg(tmp_path), "train", batch_size=2)
    (tmp_path / "train" / "n1").mkdir()
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "a.JPEG")
    with pytest.raises(
        FileNotFoundError, match="no class folders, and neither LOC_val_solution.csv"
    ):
        build_loader(_cfg(tmp_path), "val", batch_size=2)


@pytest.mark.timeout(60)
def test_mid_epoch_resume_is_bit_identical(tree):
    """Same batches, including the random crops and flips, as the uninterrupted epoch."""
    root, _ = tree
    cfg = _cfg(root, image_size=16, num_workers=1)
    ref = build_loader(cfg, "train", batch_size=2, seed=3)
    ref.set_epoch(2)
    full = [(x.clone(), y.clone()) for x, y in ref]
    run = build_loader(cfg, "train", batch_size=2, seed=3)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(3)]
    state = run.state_dict()
    del it
    resumed = build_loader(cfg.model_copy(update={"num_workers": 0}), "train", batch_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full) == 8
    for (xa, ya), (xb, yb) in zip(head + tail, full):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # Another epoch gives other crops of the same files.
    other = build_loader(cfg, "train", batch_size=2, seed=3)
    other.set_epoch(3)
    assert not torch.equal(torch.cat([x for x, _ in other]), torch.cat([x for x, _ in full]))


@pytest.mark.timeout(60)
def test_augmentation_draws_change_with_the_epoch_at_a_fixed_position(tmp_path):
    """Every training file holds the same image, so what a position decodes depends only on its
    augmentation draws (the epoch's shuffle changes which file, not what is in it): the crops and
    flips at a position differ from one epoch to the next, and repeat within an epoch."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for c in range(2):
        for k in range(4):
            path = tmp_path / "train" / f"n{c:08d}" / f"img_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    cfg = _cfg(tmp_path, image_size=16)

    def epoch(e: int) -> torch.Tensor:
        loader = build_loader(cfg, "train", batch_size=4, seed=5)
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    e0, e1 = epoch(0), epoch(1)
    assert e0.shape == (8, 3, 16, 16)
    assert torch.equal(epoch(0), e0)  # a function of (seed, epoch, position)
    for pos in range(8):
        assert not torch.equal(e0[pos], e1[pos]), f"position {pos}: same crop in epochs 0 and 1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [200, 0.7])
def test_corrupt_file_is_reported_by_path(tmp_path, keep):
    """A stub and a file cut at 70% (PIL would decode its top rows) both raise with the path."""
    files = make_jpeg_tree(tmp_path, num_classes=2, train_per_class=3, val_per_class=1, odd=False)
    bad = files["train"][4][0]
    corrupt_file(bad, keep if isinstance(keep, int) else int(keep * os.path.getsize(bad)))
    loader = build_loader(_cfg(tmp_path, num_workers=1), "train", batch_size=2)
    with pytest.raises(Exception, match=f"cannot decode image {bad}"):
        list(loader)
    with pytest.raises(CorruptImageError, match=f"cannot decode image {bad}"):
        list(build_loader(_cfg(tmp_path), "train", batch_size=2))


@pytest.mark.timeout(60)
def test_random_resized_crop_box_stays_inside_and_in_range():
    import random

    rng = random.Random(0)
    for w, h in ((37, 53), (500, 375), (3, 200)):
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_box(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


@pytest.mark.timeout(60)
def test_digits_tree_written_once_atomically(tmp_path):
    root = tmp_path / "digits"
    out = ensure_digits_tree(root)
    assert out == root
    train = scan_split(root, "train")
    val = scan_split(root, "val")
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == [str(d) for d in range(10)]
    assert sorted(set(val.labels)) == list(range(10))
    with Image.open(train.paths[0]) as im:
        assert im.size == (32, 32) and im.format == "JPEG"
    # Idempotent: a second call rewrites nothing.
    mtime = os.stat(train.paths[0]).st_mtime_ns
    ensure_digits_tree(root)
    assert os.stat(train.paths[0]).st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".digits.tmp")]
    # A half-written folder is never taken for a dataset.
    junk = tmp_path / "junk"
    (junk / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a finished dataset tree"):
        ensure_digits_tree(junk)
    # The pixels are sklearn's digits.
    from sklearn.datasets import load_digits

    d = load_digits()
    with Image.open(Path(root) / "val" / str(d.target[0]) / "0000.jpg") as im:
        small = np.asarray(im.resize((8, 8), Image.BOX), dtype=np.float32) * 16 / 255
    assert np.abs(small - d.images[0]).mean() < 1.5


@pytest.mark.timeout(60)
def test_digits_tree_concurrent_writers_agree(tmp_path):
    """Two ranks creating the tree at once: both get the finished tree, no temp folder is left."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "race"
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(ensure_digits_tree, [root, root]))
    assert results == [root, root]
    assert (root / ".complete").is_file()
    assert len(scan_split(root, "train")) == 1437
    assert [p.name for p in tmp_path.iterdir()] == ["race"]


@pytest.mark.timeout(60)
def test_digits_loader(tmp_path):
    cfg = DataConfig(dataset="digits", root=tmp_path / "d", image_size=32, num_workers=0)
    train = build_loader(cfg, "train", batch_size=64)
    val = build_loader(cfg, "val", batch_size=100, rank=1, world_size=2)
    assert train.num_classes == 10 and len(train) == 23  # ceil(1437 / 64)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32)
    # Grayscale source: the three channels carry the same image (up to normalisation).
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5)
    n = sum(int((y != IGNORE_LABEL).sum()) for _, y in val)
    assert n == 180  # rank 1 of 2 holds half of the 360 val images, no padding needed
