"""Distinct adder-layer shapes (addernet_dist/layer_shapes.py) against torchvision's ResNets (code
nobody here wrote), and the throughput model of benchmarks/kernel_report.py on hand-checkable cases."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from addernet_dist.layer_shapes import adder_layer_shapes
from tests.helpers import kernel_report


def _torchvision_shapes(name: str) -> Counter:
    model = getattr(torchvision.models, name)().to("meta")
    seen = Counter()
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and n != "conv1":  # the stem stays a full-precision conv

            def hook(mod, inp, out):
                seen[
                    (
                        mod.in_channels,
                        mod.out_channels,
                        mod.kernel_size[0],
                        mod.stride[0],
                        mod.padding[0],
                        inp[0].shape[2],
                        out.shape[2],
                    )
                ] += 1

            hooks.append(m.register_forward_hook(hook))
    model(torch.empty(1, 3, 224, 224, device="meta"))
    return seen


@pytest.mark.parametrize(
    "name,distinct,layers,gmacs", [("resnet18", 10, 19, 1.6955), ("resnet50", 22, 52, 3.9691)]
)
def test_layer_shapes_match_torchvision(name, distinct, layers, gmacs):
    shapes = adder_layer_shapes(name)
    ours = Counter({(s.c, s.o, s.k, s.stride, s.pad, s.h, s.p): s.count for s in shapes})
    assert ours == _torchvision_shapes(name)
    assert (len(shapes), sum(s.count for s in shapes)) == (distinct, layers)
    # + the stem (118 M) and classifier: torchvision's 1.8 / 4.1 G multiply-adds per image
    assert sum(s.macs_per_image * s.count for s in shapes) / 1e9 == pytest.approx(gmacs, abs=1e-4)
    # 1×1 layers: about half of ResNet-50's adder MACs (53 %), only the downsamples in ResNet-18 (1 %)
    share = sum(s.macs_per_image * s.count for s in shapes if s.k == 1) / (gmacs * 1e9)
    assert share == pytest.approx({"resnet18": 0.0114, "resnet50": 0.534}[name], abs=1e-3)


def test_throughput_model_on_hand_checkable_cases():
    kr = kernel_report()
    from addernet_dist.layer_shapes import LayerShape

    gpu = dict(kr.H100_SXM)
    # 1×1, 64→64 at 16² (stride 1), batch 33: M = 8448 = 33 × 256 positions → 33 programs of
    # BLOCK_M 256 × BLOCK_N 64 — no padding; cost 2 SASS/MAC and nothing outside the loop
    s = LayerShape(64, 64, 1, 1, 0, 16, 16)
    cost = dict(per_mac=2.0, other_instrs=0, regs=64, smem=0)
    cfg = dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=4)
    gpu["sms"] = 33  # one program per SM: no tail
    r = kr.model_kernel_time("fwd", s, 33, cfg, 4, cost, gpu)
    assert r["waste"] == 1.0 and r["tail_eff"] == 1.0 and r["programs"] == 33
    # at the issue roofline: 33 SMs × 128 lanes × 1.98 GHz / 2 instructions per MAC
    assert r["tmacs"] == pytest.approx(33 * 128 * 1.98e9 / 2 / 1e12, rel=1e-9)
    # 34 programs on 33 SMs: two rounds, the second almost idle
    r2 = kr.model_kernel_time("fwd", s, 33, cfg, 4, cost, {**gpu, "sms": 32})
    assert r2["tail_eff"] == pytest.approx(33 / 64)
    # padding: O = 65 needs a second channel tile of which 1 of 64 channels is used
    r3 = kr.model_kernel_time("fwd", LayerShape(64, 65, 1, 1, 0, 16, 16), 33, cfg, 4, cost, gpu)
    assert r3["waste"] == pytest.approx(128 / 65)
    # ∂X of a 1×1 stride-2 layer: 3 of the 4 stride phases have no tap
    dx = kr.model_kernel_time("dx", LayerShape(64, 64, 1, 2, 0, 32, 16), 33, cfg, 4, cost, gpu)
    assert dx["waste"] == pytest.approx(1.0)
    assert (
        kr.resident_programs(255, 256, 0, gpu) == 1 and kr.resident_programs(64, 128, 0, gpu) == 8
    )


def test_throughput_model_costs_the_whole_p_schedule():
    # issue 21 item 4: 225 of ImageNet ResNet-50's 300 epochs run at a general p, where the MUFU pipe
    # (8 issue slots per warp MUFU instruction) binds, not the SASS count
    kr = kernel_report()
    from addernet_dist.config import load_config
    from addernet_dist.layer_shapes import LayerShape

    gpu = {**kr.H100_SXM, "sms": 33}
    s = LayerShape(64, 64, 1, 1, 0, 16, 16)
    cfg = dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=4)
    p1 = dict(per_mac=2.0, other_instrs=0, regs=64, smem=0, mufu=0.0)
    gen = dict(per_mac=5.37, other_instrs=0, regs=64, smem=0, mufu=2.0)  # SFU-only general p tile
    t1, tg = (kr.model_kernel_time("fwd", s, 33, cfg, 4, c, gpu)["seconds"] for c in (p1, gen))
    assert tg / t1 == pytest.approx(16 / 2)  # max(5.37, 8 × 2) = 16 slots per MAC vs 2
    # the schedule of configs/imagenet_resnet50.yaml: 5005 steps per epoch (1 281 167 images, batch
    # 256), p linear from 2 at step 0 to 1 at step 225 × 5005 = 1 126 125, then 1 to step 1 501 500
    root = Path(__file__).resolve().parents[2]
    rn50 = load_config(root / "configs" / "imagenet_resnet50.yaml", [])
    sc = kr.schedule_time(rn50, {"p1": 800.0, "general": 800.0 / 3}, gpus=8)
    assert sc["steps"] == {"p1": 375_375 + 1, "general": 1_126_124}
    # 256 images per step on 8 GPUs: 0.04 s per step at p = 1, 0.12 s at general p
    assert sc["hours"]["p1"] == pytest.approx(375_376 * 0.04 / 3600)
    assert sc["hours"]["general"] == pytest.approx(1_126_124 * 0.12 / 3600)
    assert sc["total_hours"] == pytest.approx(41.71, abs=0.01)
    assert sc["p1_only_hours"] == pytest.approx(1_501_500 * 0.04 / 3600)  # the old headline's 16.7
    # no schedule (p fixed at 1): every step at p = 1
    fixed = load_config(root / "configs" / "imagenet_resnet50.yaml", ["adder.p_schedule=false"])
    assert kr.schedule_time(fixed, {"p1": 800.0, "general": 1.0})["steps"]["general"] == 0
