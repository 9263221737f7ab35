"""Each zoo block fuses itself (its own ``fuse_adder_bn()``); ``fuse_adder_bn(model)`` is the walk that
calls those methods (models/fusion.py). The CPU tests of the fused numerics are test_cpu_fused_eval.py
and test_triton_fused.py; here: which pairs each block fuses and that its fused forward is wired
to the same computation (the fused modules pinned to their unfused path, so equal bit for bit).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from addernet_dist.models import create_model
from addernet_dist.models.fusion import FusedAdderBN2d, fuse_adder_bn
from addernet_dist.models.resnet import BasicBlock, Bottleneck
from addernet_dist.nn import Adder2d
from tests.logit_checks import spread_model


def _fused(model: nn.Module) -> list[FusedAdderBN2d]:
    return [m for m in model.modules() if isinstance(m, FusedAdderBN2d)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["resnet8", "resnet50"])
def test_a_resnet_block_fuses_its_own_pairs_and_downsample(name):
    with torch.device("meta"):
        model = create_model(name, width=4)
    block = model.layer2[0]
    assert isinstance(block, (BasicBlock, Bottleneck)) and not block.fused_epilogues
    n = 3 if isinstance(block, Bottleneck) else 2
    assert block.fuse_adder_bn() is block
    convs = [getattr(block, f"conv{i}") for i in range(1, n + 1)]
    assert all(isinstance(c, FusedAdderBN2d) and c.relu for c in convs)
    assert all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in range(1, n + 1))
    assert isinstance(block.downsample[0], FusedAdderBN2d) and not block.downsample[0].relu
    assert isinstance(block.downsample[1], nn.Identity) and block.fused_epilogues
    # the rest of the model is untouched until the walk reaches it
    assert not _fused(model.layer1) and isinstance(model.layer1[0].bn1, nn.BatchNorm2d)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "kw", "count"),
    [
        ("resnet8", {}, 8),  # 3 blocks x 2 + 2 downsamples; full-precision stem
        ("resnet8", {"adder_stem": True}, 9),  # + the adder stem (ResNet.fuse_adder_bn)
        ("resnet50", {}, 3 * 16 + 4),
        ("vgg_small", {}, 2),  # layers 3 and 5; 2, 4, 6 have a max-pool before their BN
        ("vgg_small", {"adder_stem": True}, 3),
        ("lenet5_bn", {}, 2),
        ("resnet8", {"conv": "conv"}, 0),  # the CNN twin has nothing to fuse
    ],
)
def test_the_walk_fuses_what_each_block_names(name, kw, count):
    with torch.device("meta"):
        model = create_model(name, width=4, **kw) if name.startswith("resnet") else create_model(name, **kw)
    keys = list(model.state_dict())
    assert fuse_adder_bn(model) is model
    assert len(_fused(model)) == count
    assert list(model.state_dict()) == keys  # the unfused keys
    fuse_adder_bn(model)  # fusing twice changes nothing
    assert len(_fused(model)) == count and list(model.state_dict()) == keys


@pytest.mark.timeout(60)
def test_the_walk_calls_any_modules_own_method():
    calls = []

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Adder2d(3, 4, 3, padding=1, bias=False)
            self.norm = nn.BatchNorm2d(4)

        def fuse_adder_bn(self):
            calls.append(self)
            return self

    inner = Block()
    model = nn.Sequential(nn.Identity(), nn.Sequential(inner))
    fuse_adder_bn(model)
    assert calls == [inner]
    # no pairing by attribute name any more: a block without the method is left as it is
    outer = nn.Module()
    outer.conv1, outer.bn1 = Adder2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    fuse_adder_bn(outer)
    assert type(outer.conv1) is Adder2d and type(outer.bn1) is nn.BatchNorm2d


@pytest.mark.timeout(120)
@pytest.mark.parametrize("train", [True, False])
def test_fused_block_forward_is_the_unfused_blocks(train):
    # The fused modules pinned to their unfused path (use_fast_path=False): the block's fused forward
    # (ReLUs and residual moved into conv epilogues) must compute the block's forward bit for bit.
    model = create_model("resnet8", width=4, adder_stem=True)
    x = torch.randn(4, 3, 8, 8)
    spread_model(model, x)
    model.train(train)
    fm = fuse_adder_bn(copy.deepcopy(model))
    for m in _fused(fm):
        m.use_fast_path = False
    assert all(b.fused_epilogues for stage in (fm.layer1, fm.layer2, fm.layer3) for b in stage)
    with torch.no_grad():
        want, got = model(x), fm(x)
    assert torch.equal(got, want)
    if train:  # batch statistics went to the same running buffers
        got_sd, want_sd = fm.state_dict(), model.state_dict()
        assert list(got_sd) == list(want_sd)
        assert all(torch.equal(got_sd[k], v) for k, v in want_sd.items() if torch.is_tensor(v))
