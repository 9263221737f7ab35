"""Sharding checked from what the loaders actually decoded, not from their bookkeeping.

Every image of the tree is one flat colour that encodes its sample index (base-6 digits in the
R, G, B channels, 40 grey levels apart; JPEG + resize + normalise move a flat colour by < 3 levels).
A loader's batch is decoded back to sample indices, and those must be, rank by rank and batch by
batch, the order ``ResumableShardSampler`` prescribes; every label must be the label of the file
that was decoded. Both loaders (DALI CPU pipeline, torchvision), train (random resized crops,
flips) and val (padding on the short rank), world size 2, and a mid-epoch resume.

Why: the DALI loader takes its labels from the sampler, and its reader-position check compares
positions inside the file list it built itself: a file list that gave every rank rank 0's order
kept every label and position check green (issue 16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from addernet_dist.data import IGNORE_LABEL, DataConfig, build_loader
from addernet_dist.data.sampler import ResumableShardSampler

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 7, 5  # 21 train, 15 val: uneven everywhere
BATCH, WORLD = 4, 2
LEVELS = np.array([20, 60, 100, 140, 180, 220])
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def _colour(i: int) -> np.ndarray:
    return LEVELS[[i % 6, (i // 6) % 6, (i // 36) % 6]].astype(np.uint8)


@pytest.fixture(scope="module")
def index_tree(tmp_path_factory):
    """ROOT/{train,val}/<wnid>/<wnid>_<k>.JPEG; sample i of a split (sorted path order, the
    loaders' order) is class i // per_class and has colour _colour(i)."""
    root = tmp_path_factory.mktemp("index_tree")
    sizes = ((29, 23), (40, 31), (26, 37))  # odd sizes: every pipeline resizes
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(NUM_CLASSES):
            d = root / split / f"n{1000000 + c:08d}"
            d.mkdir(parents=True)
            for k in range(per_class):
                i = c * per_class + k
                w, h = sizes[i % len(sizes)]
                arr = np.broadcast_to(_colour(i), (h, w, 3)).copy()
                Image.fromarray(arr, "RGB").save(d / f"x_{k:04d}.JPEG", quality=95)
    return root


def _decode(images: torch.Tensor) -> list[int]:
    """Sample index of each image of a normalised batch (median colour; crops keep it flat)."""
    raw = (images.float().cpu() * STD + MEAN) * 255.0
    colour = raw.flatten(2).median(dim=2).values  # (B, 3)
    digits = ((colour - 20.0) / 40.0).round().long()
    err = (colour - (20.0 + 40.0 * digits)).abs().max()
    assert err < 12, f"decoded colour {err:.1f} grey levels off the code: not an index image"
    return (digits[:, 0] + 6 * digits[:, 1] + 36 * digits[:, 2]).tolist()


def _cfg(root, loader: str) -> DataConfig:
    return DataConfig(
        dataset="imagefolder",
        root=root,
        image_size=16,
        num_workers=0 if loader == "torchvision" else 1,
        loader=loader,
        augment="random_resized_crop",
        hflip=True,
    )


def _expected(split: str, rank: int, epoch: int, num: int) -> torch.Tensor:
    s = ResumableShardSampler(
        num, batch_size=BATCH, rank=rank, world_size=WORLD, seed=7, shuffle=split == "train"
    )
    return s.plan(epoch)


def _check_batches(batches, split: str, per_class: int) -> list[int]:
    """Decoded indices of ``batches``; every non-padding label is the decoded file's label."""
    got: list[int] = []
    for images, labels in batches:
        idx = _decode(images)
        for i, y in zip(idx, labels.tolist()):
            if y != IGNORE_LABEL:
                assert y == i // per_class, f"label {y} delivered with the image of sample {i}"
        got.extend(idx)
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_each_rank_decodes_the_samplers_order_train_and_val(index_tree, loader):
    cfg = _cfg(index_tree, loader)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        n = NUM_CLASSES * per_class
        seen: set[int] = set()
        for rank in range(WORLD):
            ld = build_loader(cfg, split, batch_size=BATCH, rank=rank, world_size=WORLD, seed=7)
            epoch = 1 if split == "train" else 0  # epoch 1: a permutation unlike epoch 0's
            ld.set_epoch(epoch)
            batches = [(x.clone(), y.clone()) for x, y in ld]
            got = _check_batches(batches, split, per_class)
            plan = _expected(split, rank, epoch, n)
            assert got == plan.indices.tolist(), f"{loader} {split} rank {rank}"
            labels = torch.cat([y for _, y in batches])
            assert torch.equal(labels == IGNORE_LABEL, plan.is_pad)  # padding flagged, only it
            seen |= set(got)
        assert seen == set(range(n))  # the ranks' shards cover the split


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_mid_epoch_resume_decodes_the_rest_of_the_ranks_order(index_tree, loader):
    cfg = _cfg(index_tree, loader)
    n = NUM_CLASSES * TRAIN_PER_CLASS
    kw = dict(batch_size=BATCH, rank=1, world_size=WORLD, seed=7)
    run = build_loader(cfg, "train", **kw)
    run.set_epoch(2)
    it = iter(run)
    head = [tuple(t.clone() for t in next(it))]
    state = run.state_dict()
    del it
    resumed = build_loader(cfg, "train", **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what the trainer does at each epoch start: a no-op mid-epoch
    tail = [(x.clone(), y.clone()) for x, y in resumed]
    got = _check_batches(head + tail, "train", TRAIN_PER_CLASS)
    assert len(head + tail) == 3
    assert got == _expected("train", 1, 2, n).indices.tolist()
