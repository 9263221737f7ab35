"""GPU tier of the DALI loader: the ``mixed`` (nvJPEG) pipeline against the CPU pipeline. Its graph
and operator placement are checked without a GPU in tests/integration/test_dali_loader.py
(test_mixed_pipeline_is_defined_and_placed_on_cpu)."""

from __future__ import annotations

import pytest
import torch

from addernet_dist.data import DataConfig, build_loader
from addernet_dist.data.jpeg_tree import make_jpeg_tree


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed (nvJPEG) decode needs a CUDA GPU")
@pytest.mark.timeout(120)
def test_gpu_mixed_pipeline_matches_cpu_pipeline(tmp_path):
    make_jpeg_tree(tmp_path, num_classes=3, train_per_class=5, val_per_class=4)
    cfg = DataConfig(dataset="imagefolder", root=tmp_path, image_size=24, num_workers=1, loader="dali")
    dev = torch.device("cuda", 0)
    for channels_last in (False, True):
        gpu = build_loader(cfg, "val", batch_size=5, device=dev, channels_last=channels_last)
        assert gpu.dali_device == "gpu"
        cpu = build_loader(cfg, "val", batch_size=5)
        for (a, ya), (b, yb) in zip(gpu, cpu):
            assert a.device.type == "cuda" and ya.device.type == "cuda"
            assert a.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert torch.equal(ya.cpu(), yb)
            assert (a.cpu() - b).abs().mean() < 0.03  # nvJPEG vs libjpeg-turbo: not measured yet
    train = build_loader(cfg, "train", batch_size=4, device=dev)
    for epoch in range(2):  # one train pipeline (one nvJPEG decoder) reads both epochs
        train.set_epoch(epoch)
        assert sum(len(y) for _, y in train) == 16
