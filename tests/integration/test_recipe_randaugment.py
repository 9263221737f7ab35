"""data.randaugment_ops: RandAugment changes TRAIN pixels only (never val), in the torchvision and the
DALI pipelines, reproducibly from the run seed (so resumes stay exact); in-memory loaders refuse it."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from addernet_dist.data import DataConfig, build_loader
from addernet_dist.data.jpeg_tree import make_jpeg_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ra_tree")
    make_jpeg_tree(root, num_classes=3, train_per_class=4, val_per_class=2)
    return root


def _images(cfg: DataConfig, split: str, epoch: int = 0, seed: int = 3) -> torch.Tensor:
    loader = build_loader(cfg, split, batch_size=4, seed=seed)
    loader.set_epoch(epoch)
    return torch.cat([x for x, _ in loader])


def _cfg(root, loader: str, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=root, image_size=24, num_workers=0 if loader == "torchvision" else 1)
    return DataConfig(**base, loader=loader, **kw)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_randaugment_changes_train_pixels_only_and_reproducibly(tree, loader):
    plain = _cfg(tree, loader)
    ra = _cfg(tree, loader, randaugment_ops=2, randaugment_magnitude=15)
    torch.manual_seed(123)
    before = torch.rand(3)
    x_plain, x_ra = _images(plain, "train"), _images(ra, "train")
    assert x_plain.shape == x_ra.shape == (12, 3, 24, 24)
    changed = [(a - b).abs().max().item() > 1e-3 for a, b in zip(x_plain, x_ra)]
    assert sum(changed) >= 9, changed  # 2 ops per image at magnitude 15: nearly every image moves
    # the same (seed, epoch, position) gives the same augmentation (exact resume); another epoch another
    assert torch.equal(_images(ra, "train"), x_ra)
    assert not torch.equal(_images(ra, "train", epoch=1), _images(plain, "train", epoch=1))
    # validation is never augmented
    assert torch.equal(_images(plain, "val"), _images(ra, "val"))
    if loader == "torchvision":  # the global torch RNG is restored around torchvision's draws
        torch.manual_seed(123)
        assert torch.equal(torch.rand(3), before)


@pytest.mark.timeout(120)
def test_dali_randaugment_resumes_mid_epoch_exactly(tree):
    cfg = _cfg(tree, "dali", randaugment_ops=2, randaugment_magnitude=9, augment="random_resized_crop", hflip=True)
    kw = dict(batch_size=2, rank=0, world_size=1, seed=5)
    ref = build_loader(cfg, "train", **kw)
    ref.set_epoch(2)
    full = [x.clone() for x, _ in ref]
    run = build_loader(cfg, "train", **kw)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it)[0] for _ in range(2)]
    state = run.state_dict()
    del it
    resumed = build_loader(cfg, "train", **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    got = head + [x for x, _ in resumed]
    assert len(got) == len(full) == 6
    for a, b in zip(got, full):
        assert torch.equal(a, b)


def test_in_memory_loaders_refuse_randaugment_naming_the_loader():
    with pytest.raises(ValidationError, match=r"data.randaugment_ops=2: the synthetic loader \(data/synthetic.py"):
        DataConfig(dataset="synthetic", randaugment_ops=2)
    with pytest.raises(ValidationError, match=r"the fashion_mnist loader \(data/idx.py"):
        DataConfig(dataset="fashion_mnist", randaugment_ops=1)
    assert DataConfig(dataset="synthetic").randaugment_ops == 0
