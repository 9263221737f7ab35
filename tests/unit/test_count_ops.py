"""Operation counts: hand-derived values, torch's own FLOP counter, and the adder = 2× conv rule."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from addernet_dist.count_ops import count_ops, layer_ops, main
from addernet_dist.models import create_model, list_models, model_info


def test_lenet_by_hand():
    # conv1 5·5·1·6·28·28 + conv2 5·5·6·16·10·10 + fc 400·120 + 120·84 + 84·10
    expected = 117_600 + 240_000 + 48_000 + 10_080 + 840
    assert count_ops(create_model("lenet5_bn", conv="conv"), (1, 32, 32)) == {
        "mul": expected,
        "add": expected,
    }
    # every LeNet layer is an adder layer (§5.2): no multiplication, twice the additions
    assert count_ops(create_model("lenet5_bn"), (1, 32, 32)) == {"mul": 0, "add": 2 * expected}


def test_resnet20_by_hand():
    stem = 3 * 16 * 9 * 32 * 32
    stage1 = 6 * 16 * 16 * 9 * 32 * 32
    stage2 = 16 * 32 * 9 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16 + 16 * 32 * 16 * 16
    stage3 = 32 * 64 * 9 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8 + 32 * 64 * 8 * 8
    fc = 64 * 10
    total = stem + stage1 + stage2 + stage3 + fc
    assert total == 40_813_184
    assert count_ops(create_model("resnet20", conv="conv"), (3, 32, 32))["mul"] == total
    body = count_ops(create_model("resnet20"), (3, 32, 32), exclude_first_last=True)
    assert body == {"mul": 0, "add": 2 * (total - stem - fc)}


@pytest.mark.parametrize(
    "name, feat, classes, bias", [("resnet20", 64, 10, False), ("resnet50", 2048, 1000, True)]
)
def test_official_head_is_counted(name, feat, classes, bias):
    # The official AdderNet classifier (head="linear_bn"): the 1x1 conv / linear is a
    # full-precision layer (feat x classes MACs); the BN over the logits is not counted, like every
    # BN (it folds into that linear at inference).
    shape = model_info(name).input_shape
    with torch.device("meta"):  # shapes only: no 25 M-weight init, no arithmetic
        official = create_model(name, head="linear_bn", head_bias=bias)
        plain = create_model(name)
        cnn = create_model(name, conv="conv", head="linear_bn", head_bias=bias).eval()
    rows = layer_ops(official, shape)
    assert rows[-1] == ("fc.0", "mul", feat * classes)
    assert count_ops(official, shape) == count_ops(plain, shape)
    body = count_ops(official, shape, exclude_first_last=True)
    assert body["mul"] == 0 and rows[-2][0] != "fc.0"
    # torch's FLOP counter agrees on the CNN twin with the same head
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        cnn(torch.zeros(1, *shape, device="meta"))
    assert 2 * count_ops(cnn, shape)["mul"] == fc.get_total_flops()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list_models())
def test_cnn_counts_agree_with_torch_flop_counter(name):
    model = create_model(name, conv="conv").eval()
    shape = model_info(name).input_shape
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, *shape))
    ours = count_ops(model, shape)
    assert 2 * ours["mul"] == fc.get_total_flops()  # torch counts a MAC as 2 FLOPs
    assert ours["add"] == ours["mul"]


@pytest.mark.parametrize("name", list_models())
def test_adder_counts_are_twice_the_cnn_in_additions(name):
    shape = model_info(name).input_shape
    cnn = layer_ops(create_model(name, conv="conv"), shape)
    add = layer_ops(create_model(name, conv="adder", adder_stem=True, adder_head=True), shape)
    assert [m for _, _, m in cnn] == [m for _, _, m in add]  # same layers, same sizes
    assert {k for _, k, _ in add} == {"adder"}
    ops = count_ops(create_model(name, conv="adder", adder_stem=True, adder_head=True), shape)
    assert ops == {"mul": 0, "add": 2 * sum(m for _, _, m in cnn)}


def test_count_ops_does_not_touch_the_model():
    m = create_model("resnet8")
    before = {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
    count_ops(m, (3, 32, 32))
    assert all(v.device.type == "cpu" for v in m.state_dict().values() if torch.is_tensor(v))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if torch.is_tensor(v))


def test_cli_prints_table(capsys):
    main(["resnet20", "lenet5_bn"])
    out = capsys.readouterr().out
    assert "resnet20" in out and "40.81M" in out and "81.63M" not in out
    assert "41.17M" in out  # the paper's printed figure next to ours
    with pytest.raises(ValueError, match="input_shape must be"):
        count_ops(create_model("resnet8"), (32, 32))


def test_resnet50_paper_figure_is_the_v1_layout():
    # README: the paper's 3.9G is ResNet-50 with the stride on the bottleneck's first 1×1 (v1);
    # torchvision/our twin (v1.5, stride on the 3×3) is 4.09G.
    m = create_model("resnet50", conv="conv")
    assert count_ops(m, (3, 224, 224))["mul"] == 4_089_184_256
    for stage in (m.layer2, m.layer3, m.layer4):
        stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    assert round(count_ops(m, (3, 224, 224))["mul"] / 1e9, 2) == 3.86
