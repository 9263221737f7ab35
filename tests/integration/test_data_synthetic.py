"""Synthetic loader, sampler and DataConfig: determinism, sharding, resume, eval padding."""

from __future__ import annotations

import pydantic
import pytest
import torch

from addernet_dist.data import IGNORE_LABEL, DataConfig, Loader, ResumableShardSampler, build_loader


def _cfg(**kw) -> DataConfig:
    base = dict(
        dataset="synthetic",
        image_size=12,
        synthetic_train_size=37,
        synthetic_val_size=23,
        synthetic_num_classes=5,
    )
    base.update(kw)
    return DataConfig(**base)


def _collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.timeout(30)
def test_config_rejects_unknown_key_and_lists_valid_ones():
    with pytest.raises(pydantic.ValidationError) as e:
        DataConfig(datset="synthetic")
    assert "datset" in str(e.value) and "extra" in str(e.value).lower()
    with pytest.raises(pydantic.ValidationError, match="data.root is required"):
        DataConfig(dataset="imagefolder")
    with pytest.raises(pydantic.ValidationError, match="needs JPEG files"):
        DataConfig(dataset="synthetic", loader="dali")
    with pytest.raises(pydantic.ValidationError, match="needs JPEG files"):
        DataConfig(dataset="fashion_mnist", loader="dali")
    with pytest.raises(pydantic.ValidationError, match="one value per channel"):
        DataConfig(mean=(0.5,), std=(0.2, 0.2))


@pytest.mark.timeout(30)
def test_config_auto_values():
    assert DataConfig(dataset="imagefolder", root="/x").resolved_augment == "random_resized_crop"
    assert DataConfig(dataset="imagefolder", root="/x").resolved_val_resize_ratio == 256 / 224
    assert DataConfig(dataset="imagefolder", root="/x").resolved_hflip is True
    digits = DataConfig(dataset="digits")
    assert (digits.resolved_augment, digits.resolved_hflip) == ("pad_crop", False)
    assert digits.resolved_val_resize_ratio == 1.0
    assert DataConfig(dataset="digits", val_resize_ratio=1.25).resolved_val_resize_ratio == 1.25


@pytest.mark.timeout(30)
def test_synthetic_batches_shapes_dtypes_and_determinism():
    cfg = _cfg()
    a = build_loader(cfg, "train", batch_size=4, seed=3)
    assert isinstance(a, Loader)
    assert a.num_classes == 5
    batches = _collect(a)
    assert len(batches) == len(a) == 10  # ceil(37 / 4)
    x, y = batches[0]
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < 5
    # Same seed -> same batches; another seed -> another order of the same dataset.
    b = _collect(build_loader(cfg, "train", batch_size=4, seed=3))
    for (xa, ya), (xb, yb) in zip(batches, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = _collect(build_loader(cfg, "train", batch_size=4, seed=4))
    assert not torch.equal(torch.cat([y for _, y in batches]), torch.cat([y for _, y in c]))
    # The data itself depends on synthetic_seed only.
    val1 = _collect(build_loader(cfg, "val", batch_size=8, seed=0))
    val2 = _collect(build_loader(cfg, "val", batch_size=8, seed=99))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(val1, val2))


@pytest.mark.timeout(30)
def test_synthetic_is_learnable_by_class_means():
    """Nearest class-mean on the train split classifies val far above chance (1/5)."""
    cfg = _cfg(synthetic_train_size=200, synthetic_val_size=100)
    xs, ys = zip(*_collect(build_loader(cfg, "train", batch_size=50)))
    x, y = torch.cat(xs).flatten(1), torch.cat(ys)
    means = torch.stack([x[y == c].mean(0) for c in range(5)])
    vx, vy = zip(*_collect(build_loader(cfg, "val", batch_size=50)))
    pred = torch.cdist(torch.cat(vx).flatten(1), means).argmin(1)
    assert (pred == torch.cat(vy)).float().mean() > 0.9


@pytest.mark.timeout(30)
def test_epochs_differ_and_set_epoch_is_deterministic():
    cfg = _cfg()
    loader = build_loader(cfg, "train", batch_size=4, seed=0)
    e0 = torch.cat([y for _, y in loader])
    assert loader.state_dict()["epoch"] == 1  # a finished pass moves on to the next epoch
    e1 = torch.cat([y for _, y in loader])
    assert not torch.equal(e0, e1)
    other = build_loader(cfg, "train", batch_size=4, seed=0)
    other.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in other]), e1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("world_size", [2, 3])
def test_train_shards_disjoint_cover_and_pad_rule(world_size):
    n, b = 37, 4
    plans = [
        ResumableShardSampler(n, batch_size=b, rank=r, world_size=world_size, seed=5, shuffle=True)
        for r in range(world_size)
    ]
    lens = {len(p) for p in plans}
    assert len(lens) == 1  # same number of batches on every rank
    per_rank = [p.plan(epoch=2) for p in plans]
    # Full batches only, on every rank.
    assert all(len(pr.indices) == len(plans[0]) * b for pr in per_rank)
    positions = torch.cat([pr.positions for pr in per_rank])
    assert sorted(positions.tolist()) == list(range(len(positions)))  # disjoint slots
    seen = torch.cat([pr.indices for pr in per_rank])
    assert set(seen.tolist()) == set(range(n))  # every sample at least once
    # Exactly total - n duplicates, fewer than one global batch.
    assert len(seen) - n == len(seen) - len(set(seen.tolist())) < world_size * b


@pytest.mark.timeout(30)
@pytest.mark.parametrize("world_size,batch", [(1, 8), (2, 4), (3, 5), (4, 30)])
def test_eval_counts_every_sample_exactly_once(world_size, batch):
    """Across ranks, the non-ignored labels are exactly the val labels, each sample once."""
    cfg = _cfg()
    single = _collect(build_loader(cfg, "val", batch_size=23))
    assert len(single) == 1
    ref_x, ref_y = single[0]
    got_x, got_y = [], []
    for r in range(world_size):
        for x, y in build_loader(cfg, "val", batch_size=batch, rank=r, world_size=world_size):
            keep = y != IGNORE_LABEL
            got_x.append(x[keep])
            got_y.append(y[keep])
    x, y = torch.cat(got_x), torch.cat(got_y)
    assert len(y) == 23
    # Match sample-by-sample (images are unique), then labels must agree.
    d = torch.cdist(x.flatten(1), ref_x.flatten(1))
    match = d.argmin(1)
    assert sorted(match.tolist()) == list(range(23))
    assert torch.equal(ref_y[match], y)


@pytest.mark.timeout(30)
def test_eval_batch_counts_are_equal_across_ranks():
    cfg = _cfg()
    lengths = [
        len(list(build_loader(cfg, "val", batch_size=5, rank=r, world_size=3))) for r in range(3)
    ]
    assert lengths == [2, 2, 2]  # ceil(ceil(23/3)/5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("world_size", [1, 2])
def test_mid_epoch_resume_continues_exactly(world_size):
    cfg = _cfg()
    for rank in range(world_size):
        ref = build_loader(cfg, "train", batch_size=3, rank=rank, world_size=world_size, seed=7)
        ref.set_epoch(1)
        full = _collect(ref)
        run = build_loader(cfg, "train", batch_size=3, rank=rank, world_size=world_size, seed=7)
        run.set_epoch(1)
        it = iter(run)
        first = [next(it) for _ in range(4)]
        state = run.state_dict()
        assert (state["epoch"], state["batches_done"]) == (1, 4)
        del it  # the process dies here
        resumed = build_loader(cfg, "train", batch_size=3, rank=rank, world_size=world_size, seed=7)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # the trainer calls this at epoch start; must keep the position
        rest = _collect(resumed)
        assert len(first) + len(rest) == len(full)
        for (xa, ya), (xb, yb) in zip(first + rest, full):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert resumed.state_dict()["epoch"] == 2


@pytest.mark.timeout(30)
def test_resume_state_mismatch_is_a_clear_error():
    cfg = _cfg()
    a = build_loader(cfg, "train", batch_size=3, world_size=2)
    b = build_loader(cfg, "train", batch_size=4, world_size=2)
    with pytest.raises(ValueError, match="batch_size=3 but this run has batch_size=4"):
        b.load_state_dict(a.state_dict())


@pytest.mark.timeout(30)
def test_channels_last_and_split_validation():
    loader = build_loader(_cfg(), "train", batch_size=4, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="split must be"):
        build_loader(_cfg(), "test", batch_size=4)
