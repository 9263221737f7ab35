"""DALI loader (CPU-only pipelines, device_id=None): the same order, labels, sharding, eval
exactness and resume as the torchvision loader, pixels within a measured tolerance of it."""

from __future__ import annotations

import os
import re

import pytest
import torch

from addernet_dist.data import IGNORE_LABEL, DataConfig, build_loader
from addernet_dist.data.dali import DaliLoader, resolve_dali_device
from addernet_dist.data.folder import CorruptImageError
from addernet_dist.data.jpeg_tree import corrupt_file, make_jpeg_tree
from tests.helpers import module_jpeg_tree

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


tree = module_jpeg_tree("dali_imnet", num_classes=3, train_per_class=5, val_per_class=4)
flat_tree = module_jpeg_tree("dali_flat", num_classes=3, train_per_class=1, val_per_class=3, flat_val=True)


def _cfg(root, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=root, image_size=24, num_workers=1, loader="dali")
    base.update(kw)
    return DataConfig(**base)



def _count_pipeline_builds(monkeypatch) -> list[bool]:
    """The list DALI pipeline builds append to from now on (``train`` of each build)."""
    from addernet_dist.data import dali

    builds, build = [], dali.build_pipeline

    def counting_build(*args, **kw):
        builds.append(kw["train"])
        return build(*args, **kw)

    monkeypatch.setattr(dali, "build_pipeline", counting_build)
    return builds

def _tv(cfg: DataConfig) -> DataConfig:
    return cfg.model_copy(update={"loader": "torchvision", "num_workers": 0})


@pytest.mark.timeout(60)
def test_train_antialias_option_reaches_the_resize(tree):
    # Same seed, same crops: only the resize filter differs. Crops of the generated images are
    # downscaled to 24x24, where antialiasing changes pixels; the default is off (DLE's choice).
    root, _ = tree
    assert DataConfig(dataset="synthetic").dali.train_antialias is False
    outs = {}
    for aa in (False, True):
        cfg = _cfg(root, augment="random_resized_crop")
        cfg = cfg.model_copy(update={"dali": cfg.dali.model_copy(update={"train_antialias": aa})})
        outs[aa] = torch.cat([x for x, _ in build_loader(cfg, "train", batch_size=4, seed=3)])
    again = _cfg(root, augment="random_resized_crop")
    torch.testing.assert_close(
        torch.cat([x for x, _ in build_loader(again, "train", batch_size=4, seed=3)]), outs[False]
    )
    assert (outs[True] - outs[False]).abs().mean() > 1e-3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("augment", ["random_resized_crop", "pad_crop"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_shapes_dtypes_layout(tree, augment, channels_last):
    root, _ = tree
    loader = build_loader(
        _cfg(root, augment=augment), "train", batch_size=4, channels_last=channels_last
    )
    assert isinstance(loader, DaliLoader) and loader.dali_device == "cpu"
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    for x, y in batches:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        raw = x * STD + MEAN
        assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4  # normalised from 0..255
        assert raw.std() > 0.05  # real image content, not a constant


@pytest.mark.timeout(60)
def test_two_ranks_read_the_samplers_order(tree):
    """Labels batch by batch equal the torchvision loader's (same sampler), shards are disjoint
    and cover the train split."""
    root, _ = tree
    cfg = _cfg(root)
    all_idx = []
    for rank in range(2):
        dali = build_loader(cfg, "train", batch_size=3, rank=rank, world_size=2, seed=11)
        tv = build_loader(_tv(cfg), "train", batch_size=3, rank=rank, world_size=2, seed=11)
        for e in (0, 1):
            dali.set_epoch(e)
            tv.set_epoch(e)
            ya = torch.cat([y for _, y in dali])
            yb = torch.cat([y for _, y in tv])
            assert torch.equal(ya, yb)
        all_idx.append(set(dali.sampler.plan(0).indices.tolist()))
    assert all_idx[0] | all_idx[1] == set(range(15))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size,batch", [(1, 12), (2, 4), (4, 5)])
def test_eval_exact_and_close_to_torchvision(tree, world_size, batch):
    """Every val image counted once across ranks; pixels within the measured decode/resize
    tolerance of torchvision: mean |diff| < 0.01 (measured 0.0025-0.0033 per image in normalised
    units, ~0.2 grey levels; the geometry is identical, only decoder/resampler rounding differs),
    and a fixed colour classifier gives the same top-1 on both."""
    root, files = tree
    cfg = _cfg(root)
    dx, dy, tx, ty = [], [], [], []
    for rank in range(world_size):
        kw = dict(batch_size=batch, rank=rank, world_size=world_size)
        for (a, ya), (b, yb) in zip(
            build_loader(cfg, "val", **kw), build_loader(_tv(cfg), "val", **kw)
        ):
            assert torch.equal(ya, yb)
            dx.append(a[ya != IGNORE_LABEL])
            dy.append(ya[ya != IGNORE_LABEL])
            tx.append(b[yb != IGNORE_LABEL])
            ty.append(yb[yb != IGNORE_LABEL])
    dx, dy, tx, ty = map(torch.cat, (dx, dy, tx, ty))
    assert sorted(dy.tolist()) == sorted(label for _, label in files["val"])
    assert len(dy) == 12
    assert (dx - tx).abs().mean() < 0.01
    # "Same weights": nearest class colour, class colours taken from the torchvision batch.
    colour_t = (tx * STD + MEAN).mean((2, 3))
    colour_d = (dx * STD + MEAN).mean((2, 3))
    centres = torch.stack([colour_t[ty == c].mean(0) for c in range(3)])
    top1_t = (torch.cdist(colour_t, centres).argmin(1) == ty).float().mean()
    top1_d = (torch.cdist(colour_d, centres).argmin(1) == dy).float().mean()
    assert top1_t == top1_d


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [1, 3, 9])
def test_prefetch_depths_deliver_every_batch_once(tree, depth):
    """The scheduled-run bookkeeping (no decode past the epoch end) for queue depths below, near
    and above the 4 batches of an epoch: two epochs in a row, same labels as torchvision."""
    root, _ = tree
    cfg = _cfg(root, dali={"prefetch_queue_depth": depth})
    dali = build_loader(cfg, "train", batch_size=4, seed=2)
    tv = build_loader(_tv(cfg), "train", batch_size=4, seed=2)
    for _ in range(2):
        ya = [y for _, y in dali]
        yb = [y for _, y in tv]
        assert len(ya) == len(yb) == 4
        assert torch.equal(torch.cat(ya), torch.cat(yb))


@pytest.mark.timeout(60)
def test_flat_val_layout(flat_tree):
    root, files = flat_tree
    ((x, y),) = list(build_loader(_cfg(root), "val", batch_size=9))
    assert y.tolist() == [label for _, label in files["val"]]
    assert x.shape == (9, 3, 24, 24)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("augment", ["none", "random_resized_crop", "pad_crop"])
def test_mid_epoch_resume_is_bit_identical(tree, augment):
    """The resumed epoch is the uninterrupted one, pixel for pixel, random crops and flips included:
    the state carries DALI's pipeline checkpoint (reader position + random-op states) taken after
    exactly the batches handed out, though the pipeline had prefetched further."""
    root, _ = tree
    cfg = _cfg(root, augment=augment, hflip=augment != "none", pad=3)
    cfg.dali.prefetch_queue_depth = 3  # more in flight than the 2 batches handed out
    kw = dict(batch_size=2, rank=1, world_size=2, seed=5)
    ref = build_loader(cfg, "train", **kw)
    ref.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in ref]
    run = build_loader(cfg, "train", **kw)
    run.set_epoch(3)
    it = iter(run)
    head = [next(it) for _ in range(2)]
    state = run.state_dict()
    del it
    assert (state["dali_checkpoint"]["epoch"], state["dali_checkpoint"]["batches_done"]) == (3, 2)
    resumed = build_loader(cfg, "train", **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full) == 4
    for (xa, ya), (xb, yb) in zip(head + tail, full):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)
    # the checkpoint is spent by the resumed epoch: the next epoch starts fresh and matches too
    resumed.set_epoch(4)
    ref.set_epoch(4)
    for (xa, _), (xb, _) in zip(resumed, ref):
        assert torch.equal(xa, xb)


@pytest.mark.timeout(60)
def test_resume_without_a_dali_checkpoint_keeps_the_file_order(tree):
    # A position saved by another loader (or before checkpoints were kept): the same files follow in
    # the same order; only the random draws of the rest of that epoch are new.
    root, _ = tree
    cfg = _cfg(root, augment="random_resized_crop", hflip=True)
    kw = dict(batch_size=2, rank=0, world_size=2, seed=5)
    ref = build_loader(cfg, "train", **kw)
    ref.set_epoch(1)
    full = [y.clone() for _, y in ref]
    tv = build_loader(_tv(cfg), "train", **kw)
    tv.set_epoch(1)
    it = iter(tv)
    next(it)
    state = tv.state_dict()
    del it
    assert "dali_checkpoint" not in state
    resumed = build_loader(cfg, "train", **kw)
    resumed.load_state_dict(state)
    tail = [y for _, y in resumed]
    assert torch.equal(torch.cat(tail), torch.cat(full[1:]))
    # a checkpoint of another position is ignored, not misapplied
    run = build_loader(cfg, "train", **kw)
    run.set_epoch(1)
    it = iter(run)
    next(it), next(it)
    state = run.state_dict()
    del it
    state["batches_done"] = 1
    resumed = build_loader(cfg, "train", **kw)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([y for _, y in resumed]), torch.cat(full[1:]))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [200, 0.7])
def test_corrupt_file_is_reported_by_path(tmp_path, keep):
    """A stub (200 bytes) and a file cut at 70% (part of its rows decode, then it fails) both stop
    the run with the file's path; neither trains as a half-grey image."""
    files = make_jpeg_tree(tmp_path, num_classes=2, train_per_class=4, val_per_class=1, odd=False)
    bad = files["train"][5][0]
    corrupt_file(bad, keep if isinstance(keep, int) else int(keep * os.path.getsize(bad)))
    loader = build_loader(_cfg(tmp_path), "train", batch_size=2)
    with pytest.raises(CorruptImageError, match=f"cannot decode image {bad}"):
        list(loader)


@pytest.mark.timeout(30)
def test_device_resolution():
    cfg = DataConfig(dataset="imagefolder", root="/x", loader="dali")
    assert resolve_dali_device(cfg, torch.device("cpu")) == "cpu"
    assert resolve_dali_device(cfg, torch.device("cuda", 0)) == "gpu"
    forced = cfg.model_copy(update={"dali": cfg.dali.model_copy(update={"device": "cpu"})})
    assert resolve_dali_device(forced, torch.device("cuda", 0)) == "cpu"
    gpu = cfg.model_copy(update={"dali": cfg.dali.model_copy(update={"device": "gpu"})})
    with pytest.raises(ValueError, match="needs a CUDA training device"):
        resolve_dali_device(gpu, torch.device("cpu"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "train,augment",
    [(True, "random_resized_crop"), (True, "pad_crop"), (False, "none")],
)
def test_mixed_pipeline_is_defined_and_placed_on_cpu(tree, train, augment):
    """The GPU (``mixed``) pipeline as far as DALI goes without a GPU: the graph is defined, which makes
    DALI check every operator's arguments and each input's device placement, and its placement is the
    intended one: the file reader (train: fed paths, ``fn.io.file.read``) on CPU, the decoder ``mixed``
    (CPU in, GPU out), everything after it on the GPU, both outputs GPU-resident. Building it needs
    CUDA, so that part runs in the GPU tier
    (tests/gpu/test_dali_gpu.py)."""
    from addernet_dist.data.dali import define_pipeline

    root, _ = tree
    cfg = _cfg(root, augment=augment)
    files = sorted(str(p) for p in (root / "train").rglob("*.JPEG"))
    assert files
    placement = {}
    for dali_device in ("gpu", "cpu"):
        pipe = define_pipeline(
            cfg,
            None if train else files,  # train: fed by the loader through external_source
            train=train,
            batch_size=2,
            shard_id=0,
            num_shards=1,
            seed=0,
            dali_device=dali_device,
            device_id=0 if dali_device == "gpu" else None,
            channels_last=False,
        )
        pipe._build_graph()  # DALI's own graph checks; no device needed
        if dali_device == "gpu":
            pipe_args = [dict(op._op._init_args) for op in pipe._ops]
        placement[dali_device] = [
            (op.name, tuple(o.device for o in op.outputs)) for op in pipe._ops
        ]
    gpu, cpu = placement["gpu"], placement["cpu"]
    assert [n for n, _ in gpu] != [] and len(gpu) == len(cpu)
    if train:  # paths and sample indices fed on the host, files read by DALI's CPU threads
        assert gpu[:2] == [("Paths", ("cpu",)), ("Reader", ("cpu",))], gpu
        assert ("Positions", ("cpu",)) in gpu  # defined where it is first used: as an output
    else:
        assert gpu[0] == ("Reader", ("cpu", "cpu"))
    decoders = [i for i, (n, _) in enumerate(gpu) if re.fullmatch(r"__Image(RandomCrop)?_\d+", n)]
    assert len(decoders) == 1, gpu
    first_gpu = decoders[0]
    # before the decoder only CPU work on the encoded bytes (the file reader)
    assert all(devs == ("cpu",) * len(devs) for _, devs in gpu[:first_gpu])
    # the decoder and every image op after it: GPU outputs (random draws/casts stay CPU arguments)
    image_ops = [
        (n, d)
        for n, d in gpu[first_gpu:]
        if re.fullmatch(r"__(Image|ImageRandomCrop|Resize|Slice|CropMirrorNormalize)_\d+", n)
    ]
    assert image_ops and all(d == ("gpu",) for _, d in image_ops), image_ops
    # nvJPEG's buffers are padded and the HW decoder preallocated (issue 21.6), as data.dali says
    decoder_args = pipe_args[first_gpu]
    d = cfg.dali
    assert d.device_memory_padding > 0 and d.preallocate_width_hint > 0
    for key in ("device_memory_padding", "host_memory_padding", "preallocate_width_hint",
                "preallocate_height_hint", "hw_decoder_load"):
        assert decoder_args[key] == getattr(d, key), key
    assert all(d == ("cpu",) * len(d) for _, d in cpu), cpu  # the CPU twin: no GPU anywhere


@pytest.mark.timeout(90)
@pytest.mark.parametrize("depth", [2, 3])
def test_eval_pipeline_is_built_once_and_reads_the_same_pixels(tree, monkeypatch, depth):
    """Issue 21.6: evaluations reuse the eval pipeline (its reader sticks to this rank's shard) instead of
    building it (and its decoder) every time; every evaluation gives the pixels and labels of a freshly
    built pipeline. Kept only after a complete evaluation: one cut short, or one shorter than the
    prefetch queue (depth 3 > 2 batches: the first schedule_run reads past the end), rebuilds."""
    builds = _count_pipeline_builds(monkeypatch)
    root, _ = tree
    cfg = _cfg(root, dali={"prefetch_queue_depth": depth})
    for rank in range(2):  # 12 val images, 2 ranks: 2 batches of 4 per rank (the last one padded)
        kw = dict(batch_size=4, rank=rank, world_size=2)
        fresh = [list(build_loader(cfg, "val", **kw)) for _ in range(2)]  # one loader, one build each
        builds.clear()
        loader = build_loader(cfg, "val", **kw)
        runs = [list(loader) for _ in range(3)]
        for got in [*runs, fresh[1]]:
            assert len(got) == len(fresh[0]) == 2
            for (x, y), (fx, fy) in zip(got, fresh[0]):
                assert torch.equal(x, fx) and torch.equal(y, fy)
        assert builds == [False] * (1 if depth <= 2 else 3)
        builds.clear()
        next(iter(loader))  # an evaluation cut short (reuses the pipeline, drops it after one batch) ...
        again = list(loader)  # ... so the next one builds one and reads from the start
        assert builds == [False] * (1 if depth <= 2 else 2)
        assert all(torch.equal(x, fx) for (x, _), (fx, _) in zip(again, fresh[0], strict=True))


@pytest.mark.timeout(90)
def test_train_epochs_and_evaluations_keep_their_pixels_with_the_eval_pipeline_reused(tree):
    """Two epochs with an evaluation after each, through loaders that live for the whole run (as the
    trainer's do): the train batches equal those of loaders that never evaluated, and both evaluations
    equal a fresh val loader's."""
    root, _ = tree
    cfg = _cfg(root, augment="random_resized_crop")
    train, val = build_loader(cfg, "train", batch_size=4, seed=5), build_loader(cfg, "val", batch_size=4)
    ref_train = build_loader(cfg, "train", batch_size=4, seed=5)
    ref_val = list(build_loader(cfg, "val", batch_size=4))
    for epoch in range(2):
        train.set_epoch(epoch)
        ref_train.set_epoch(epoch)
        for (x, y), (rx, ry) in zip(train, ref_train, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        for (x, y), (rx, ry) in zip(val, ref_val, strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("depth", [2, 5])
def test_train_pipeline_is_built_once_per_run_and_resumes_at_epoch_boundaries(tree, monkeypatch, depth):
    """Issue 21.6: three epochs with an evaluation after each build ONE train pipeline (and one eval
    pipeline), not one per epoch: each epoch's order is fed through external_source. Its random stream
    runs on across epochs (epochs get other crops), and the state saved at an epoch boundary carries the
    pipeline checkpoint, so a loader resumed there reads the next epochs pixel for pixel. Depth 5 > the
    4 batches of an epoch: the queue never reaches into the next epoch."""
    builds = _count_pipeline_builds(monkeypatch)
    root, _ = tree
    cfg = _cfg(root, augment="random_resized_crop", hflip=True, dali={"prefetch_queue_depth": depth})
    train, val = build_loader(cfg, "train", batch_size=4, seed=5), build_loader(cfg, "val", batch_size=4)
    tv = build_loader(_tv(cfg), "train", batch_size=4, seed=5)
    epochs, states = [], []
    for epoch in range(3):
        train.set_epoch(epoch)
        tv.set_epoch(epoch)
        got = [(x.clone(), y) for x, y in train]
        assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in tv]))  # the order
        epochs.append(got)
        states.append(train.state_dict())
        assert sum(len(y) for _, y in val) == 12
    # one train pipeline for the whole run; one eval pipeline too, except at depth 5 > its 3 batches,
    # where every evaluation builds one (see test_eval_pipeline_is_built_once_and_reads_the_same_pixels)
    assert builds == [True] + [False] * (1 if depth <= 3 else 3)
    assert [(s["epoch"], s["batches_done"]) for s in states] == [(1, 0), (2, 0), (3, 0)]
    assert all("dali_checkpoint" in s for s in states)
    # each sample gets other crops in each epoch: the random stream runs on
    by_sample = [
        dict(zip(train.sampler.plan(e).indices.tolist(), torch.cat([x for x, _ in epochs[e]])))
        for e in range(3)
    ]
    for a, b in ((0, 1), (1, 2)):
        assert not any(torch.equal(by_sample[a][i], by_sample[b][i]) for i in range(15))
    builds.clear()
    resumed = build_loader(cfg, "train", batch_size=4, seed=5)
    resumed.load_state_dict(states[0])
    for epoch in (1, 2):
        resumed.set_epoch(epoch)
        for (x, y), (rx, ry) in zip(resumed, epochs[epoch], strict=True):
            assert torch.equal(y, ry) and torch.equal(x, rx)
    assert builds == [True]
