"""The IDX (Fashion-MNIST) loader on tiny generated IDX files; never needs the real data."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from addernet_dist.data.base import IGNORE_LABEL, Loader
from addernet_dist.data.idx import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IdxLoader,
    load_idx_split,
    read_idx,
    write_idx,
)

N_TRAIN, N_VAL = 23, 11  # odd sizes: no split divides evenly by 2 ranks x batch 4


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", N_TRAIN, ".gz"), ("t10k", N_VAL, "")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        # The label is stored in pixel (0, 0) as well, so tests can tie images to labels.
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images[:, 0, 0] = labels
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{gz}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{gz}", labels)
    return tmp_path


def _pixel00(x: torch.Tensor) -> torch.Tensor:
    """Recover the raw uint8 value of the top-left pixel of the 28x28 image inside the 32x32 pad."""
    return (x[:, 0, 2, 2] * FASHION_MNIST_STD + FASHION_MNIST_MEAN).mul(255).round().long()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.arange(3 * 5 * 7).reshape(3, 5, 7) - 50).astype(dtype)
    if dtype == np.uint8:
        arr = np.abs(arr).astype(np.uint8)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == arr.dtype and back.shape == (3, 5, 7)
    np.testing.assert_array_equal(back, arr)


@pytest.mark.timeout(30)
def test_header_is_big_endian_idx(tmp_path):
    write_idx(tmp_path / "l", np.array([7, 1, 2], dtype=np.uint8))
    raw = (tmp_path / "l").read_bytes()
    assert raw == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 1, 2])


@pytest.mark.timeout(30)
def test_truncated_and_foreign_files_are_named(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"x: IDX payload is .* truncated"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="y: not an IDX file"):
        read_idx(tmp_path / "y")
    (tmp_path / "z.gz").write_bytes(gzip.compress(b"0" * 100)[:20])
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(tmp_path / "z.gz")


@pytest.mark.timeout(30)
def test_missing_files_name_the_apt_command(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        IdxLoader(tmp_path, "train", batch_size=4)
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg


@pytest.mark.timeout(30)
def test_batches_are_padded_normalised_and_match_labels(idx_root):
    raw, labels = load_idx_split(idx_root, "train")
    assert raw.shape == (N_TRAIN, 28, 28) and labels.dtype == torch.int64
    loader = IdxLoader(idx_root, "train", batch_size=4, seed=3)
    assert isinstance(loader, Loader) and loader.num_classes == 10
    # Train pads by wrapping to full batches (the shared sampler): 23 images -> 6 batches of 4,
    # the last one has one image of the epoch's beginning again.
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    for x, y in batches:
        assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        # 2-pixel zero border, normalised like the pixels.
        zero = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
        torch.testing.assert_close(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], zero))
        torch.testing.assert_close(x[:, :, :, 30:], torch.full_like(x[:, :, :, 30:], zero))
        assert torch.equal(_pixel00(x), y)


@pytest.mark.timeout(30)
def test_train_shards_cover_the_split_and_shuffle_per_epoch(idx_root):
    raw, _ = load_idx_split(idx_root, "train")
    flat = raw.reshape(N_TRAIN, -1).float()

    def ids(loader):
        out = []
        for x, _ in loader:
            img = (x[:, 0, 2:30, 2:30] * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255
            d = torch.cdist(img.reshape(len(x), -1).round(), flat)
            out += d.argmin(1).tolist()
        return out

    r0 = IdxLoader(idx_root, "train", batch_size=4, rank=0, world_size=2, seed=1)
    r1 = IdxLoader(idx_root, "train", batch_size=4, rank=1, world_size=2, seed=1)
    a, b = ids(r0), ids(r1)
    assert len(a) == len(b) == 12  # ceil(23/2)=12 per rank -> 3 full batches of 4
    # 24 slots for 23 images: the one wrapped duplicate is the only overlap, and together the
    # ranks cover the whole split.
    assert len(set(a) & set(b)) <= 1 and set(a) | set(b) == set(range(N_TRAIN))
    r0.set_epoch(1)
    assert ids(r0) != a
    r0.set_epoch(0)
    assert ids(r0) == a


@pytest.mark.timeout(30)
def test_val_counts_every_sample_exactly_once_across_ranks(idx_root):
    _, labels = load_idx_split(idx_root, "val")
    got = []
    for rank in range(3):
        loader = IdxLoader(idx_root, "val", batch_size=2, rank=rank, world_size=3)
        assert len(loader) == 2  # ceil(11/3)=4 per rank
        got += [y for _, y in loader]
    y = torch.cat(got)
    assert (y == IGNORE_LABEL).sum() == 1  # 12 slots for 11 samples
    assert torch.equal(
        torch.bincount(y[y >= 0], minlength=10), torch.bincount(labels, minlength=10)
    )


@pytest.mark.timeout(30)
def test_mid_epoch_resume_continues_the_same_order(idx_root):
    full = IdxLoader(idx_root, "train", batch_size=4, seed=5)
    full.set_epoch(2)
    expected = [x for x, _ in full]
    part = IdxLoader(idx_root, "train", batch_size=4, seed=5)
    part.set_epoch(2)
    it = iter(part)
    next(it), next(it)
    state = part.state_dict()
    assert state == {
        "epoch": 2,
        "batches_done": 2,
        "seed": 5,
        "num_samples": N_TRAIN,
        "world_size": 1,
        "batch_size": 4,
    }
    resumed = IdxLoader(idx_root, "train", batch_size=4, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer re-announces the epoch; the position must survive
    rest = [x for x, _ in resumed]
    assert len(rest) == 4
    for a, b in zip(rest, expected[2:]):
        assert torch.equal(a, b)
    # The next epoch starts from its beginning again.
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed)
    with pytest.raises(ValueError, match="saved with seed=5 but this run has seed=6"):
        IdxLoader(idx_root, "train", batch_size=4, seed=6).load_state_dict(state)


@pytest.mark.timeout(30)
def test_build_loader_registers_fashion_mnist(idx_root):
    from addernet_dist.data import DataConfig, build_loader

    cfg = DataConfig(dataset="fashion_mnist", root=idx_root, image_size=32)
    kw = dict(batch_size=4, rank=0, world_size=1, seed=0, device="cpu")
    loader = build_loader(cfg, "val", channels_last=True, **kw)
    assert isinstance(loader, IdxLoader) and loader.mean == FASHION_MNIST_MEAN
    x, _ = next(iter(loader))
    assert x.shape == (4, 1, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    cfg = DataConfig(dataset="fashion_mnist", root=idx_root, image_size=32, mean=(0.5,), std=(0.5,))
    assert build_loader(cfg, "train", **kw).std == 0.5
    # A full dump of the config (as checkpoints store it) re-validated: defaults stay defaults.
    dumped = DataConfig.model_validate(
        DataConfig(dataset="fashion_mnist", root=idx_root).model_dump(mode="json")
    )
    dumped_loader = build_loader(dumped, "val", **kw)
    assert dumped_loader.mean == FASHION_MNIST_MEAN and dumped_loader.images.shape[-1] == 32
    with pytest.raises(ValueError, match="one value"):
        DataConfig(dataset="fashion_mnist", root=idx_root, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="data.augment=none"):
        DataConfig(dataset="fashion_mnist", root=idx_root, augment="pad_crop")


@pytest.mark.timeout(30)
def test_bad_arguments_are_explained(idx_root):
    with pytest.raises(ValueError, match="empty dataset"):
        IdxLoader(idx_root, "train", batch_size=4, limit=0)
    with pytest.raises(ValueError, match="image_size 20"):
        IdxLoader(idx_root, "train", batch_size=4, image_size=20)
    with pytest.raises(ValueError, match="split must be one of"):
        load_idx_split(idx_root, "dev")


@pytest.mark.timeout(30)
def test_idx_order_is_the_shared_samplers(idx_root):
    # One data system: the IDX loader takes its order, padding and position from
    # ResumableShardSampler under ShardedLoader, like the synthetic/torchvision/DALI loaders.
    from addernet_dist.data.loader import ShardedLoader
    from addernet_dist.data.sampler import ResumableShardSampler

    raw, labels = load_idx_split(idx_root, "train")
    for rank in range(2):
        loader = IdxLoader(idx_root, "train", batch_size=4, rank=rank, world_size=2, seed=7)
        assert isinstance(loader, ShardedLoader)
        loader.set_epoch(3)
        sampler = ResumableShardSampler(
            N_TRAIN, batch_size=4, rank=rank, world_size=2, seed=7, shuffle=True
        )
        expected = sampler.plan(3).indices
        got = torch.cat([y for _, y in loader])
        assert torch.equal(got, labels[expected])
        # a batch larger than the split still trains on full batches (wrapped)
    big = IdxLoader(idx_root, "train", batch_size=64)
    assert len(big) == 1 and next(iter(big))[0].shape[0] == 64


def test_fashion_mnist_defaults_are_decided_by_config_validation(idx_root):
    from addernet_dist.data import DataConfig
    from addernet_dist.data.config import IMAGENET_MEAN, IMAGENET_STD

    cfg = DataConfig(dataset="fashion_mnist", root=idx_root)
    assert cfg.image_size == 32
    assert cfg.mean == (FASHION_MNIST_MEAN,) and cfg.std == (FASHION_MNIST_STD,)
    # the resolved values are what a run folder's config.yaml / checkpoint records
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    # configs dumped by earlier versions carry the ImageNet defaults: read as "not given"
    legacy = cfg.model_dump(mode="json") | {
        "image_size": 224,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    assert DataConfig.model_validate(legacy) == cfg
    given = DataConfig(dataset="fashion_mnist", image_size=40, mean=(0.5,), std=(0.25,))
    assert (given.image_size, given.mean, given.std) == (40, (0.5,), (0.25,))
    # other datasets keep the ImageNet defaults
    assert DataConfig(dataset="synthetic").mean == IMAGENET_MEAN
