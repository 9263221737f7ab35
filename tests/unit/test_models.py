"""Model zoo: every registered model runs forward and backward in both variants; parity with torchvision."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from addernet_dist.models import create_model, list_models, model_info
from addernet_dist.nn import Adder2d, AdderLinear, adder_modules
from tests.logit_checks import assert_logits_vary

# reduced input sizes: ImageNet models at 32×32 (spatial sizes 8→1 through the stages)
REDUCED = {"resnet18": (3, 32, 32), "resnet50": (3, 32, 32)}


def test_registry_lists_the_paper_models():
    assert {"lenet5_bn", "vgg_small", "resnet20", "resnet32", "resnet18", "resnet50"} <= set(
        list_models()
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("conv", ["adder", "conv"])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, conv):
    model = create_model(name, conv=conv, num_classes=7)
    shape = REDUCED.get(name, model_info(name).input_shape)
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 3])).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    n_adder = len(adder_modules(model))
    if conv == "adder":
        assert n_adder > 0
        assert all(m.weight.grad.abs().sum() > 0 for m in adder_modules(model))
    else:
        assert n_adder == 0


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cnn_twin_is_torchvision(name):
    ours = create_model(name, conv="conv")
    tv = getattr(torchvision.models, name)()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())
    ours.load_state_dict(tv.state_dict())  # strict: same names and shapes
    ours.eval(), tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = tv(x)
    assert_logits_vary(want, min_distinct_top1=1)  # untrained: one class may win for both images
    torch.testing.assert_close(ours(x), want)


def test_stem_and_head_stay_full_precision_by_default():
    m = create_model("resnet20")
    assert isinstance(m.conv1, nn.Conv2d) and isinstance(m.fc, nn.Linear)
    assert isinstance(m.layer2[0].downsample[0], Adder2d)  # adder 1×1 + BN shortcut
    assert isinstance(m.layer2[0].downsample[1], nn.BatchNorm2d)
    m = create_model("resnet20", adder_stem=True, adder_head=True)
    assert isinstance(m.conv1, Adder2d) and isinstance(m.fc[0], AdderLinear)
    lenet = create_model("lenet5_bn")  # paper §5.2: every layer is an adder layer
    assert not any(isinstance(x, (nn.Conv2d, nn.Linear)) for x in lenet.modules())


def test_adder_options_are_passed_to_layers():
    m = create_model("resnet8", p=2.0, grad_x="hardtanh")
    assert {(a.p, a.grad_x) for a in adder_modules(m)} == {(2.0, "hardtanh")}
    # every adder layer type takes the backend option, LeNet's adder FC layers included
    m = create_model("lenet5_bn", backend="reference", grad_w="sign")
    assert {(a.backend, a.grad_w) for a in adder_modules(m)} == {("reference", "sign")}
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="make no sense with conv='conv'"):
        create_model("resnet8", conv="conv", p=2.0)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet20"):
        create_model("resnet9")
    with pytest.raises(ValueError, match="conv must be one of"):
        create_model("resnet8", conv="binary")
