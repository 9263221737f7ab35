"""Distinct adder-layer shapes (addernet_dist/layer_shapes.py) against torchvision's ResNets (code
nobody here wrote), and the throughput model of benchmarks/kernel_report.py on hand-checkable cases."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from addernet_dist.layer_shapes import adder_layer_shapes


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


def _report():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernel_report"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_throughput_model_on_hand_checkable_cases():
    kr = _report()
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
