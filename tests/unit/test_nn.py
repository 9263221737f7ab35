"""Adder layers: p attribute, modes, state_dict round trips, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from addernet_dist.nn import Adder2d, AdderLinear, adder_modules, set_grad_modes, set_p
from tests.adder_formula import formula


def test_p_attribute_changes_forward_exactly_as_formula():
    layer = Adder2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    g = torch.zeros(2, 4, 5, 5, dtype=torch.float64)
    for p in (2.0, 1.73, 1.0):
        layer.p = p
        y_ref, _, _ = formula(x, layer.weight.detach(), g, (2, 2), (1, 1), (1, 1), p, "lp", "full")
        torch.testing.assert_close(layer(x).detach(), y_ref, rtol=1e-12, atol=1e-12)
    # and p = 2 vs p = 1 really are different functions
    layer.p = 2.0
    y2 = layer(x)
    layer.p = 1.0
    assert not torch.allclose(y2, layer(x))


def test_p_and_modes_survive_state_dict_round_trip():
    model = nn.Sequential(
        Adder2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), AdderLinear(4 * 3 * 3, 2)
    )
    set_p(model, 1.37)
    set_grad_modes(model, grad_x="hardtanh", grad_w="sign")
    sd = model.state_dict()
    fresh = nn.Sequential(
        Adder2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), AdderLinear(4 * 3 * 3, 2)
    )
    assert [m.p for m in adder_modules(fresh)] == [1.0, 1.0]
    fresh.load_state_dict(sd)
    for m in adder_modules(fresh):
        assert (m.p, m.grad_x, m.grad_w) == (1.37, "hardtanh", "sign")
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fresh(x), model(x))
    # the saved object is a plain dict (loads with weights_only=True)
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["0._extra_state"]["p"] == 1.37


def test_set_p_validates():
    with pytest.raises(ValueError, match=r"p must lie in \[1, 2\]"):
        set_p(Adder2d(1, 1, 1), 0.5)
    with pytest.raises(ValueError, match="grad_x must be one of"):
        set_grad_modes(Adder2d(1, 1, 1), grad_x="tanh")


def test_constructor_shape_matches_conv2d():
    a = Adder2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 2), dilation=2, bias=True)
    c = nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(1, 2), dilation=2, bias=True)
    x = torch.randn(2, 3, 11, 13)
    assert a.weight.shape == c.weight.shape and a.bias.shape == c.bias.shape
    assert a(x).shape == c(x).shape


def test_bias_is_added_per_channel():
    a = Adder2d(2, 3, 1, bias=True)
    with torch.no_grad():
        a.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(1, 2, 4, 4)
    no_bias = Adder2d(2, 3, 1)
    no_bias.weight = a.weight
    torch.testing.assert_close(a(x) - no_bias(x), a.bias.view(1, 3, 1, 1).expand(1, 3, 4, 4))


def test_weight_init_is_standard_normal():
    w = Adder2d(64, 64, 3).weight.detach()
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1.0) < 0.01


def test_adder_linear_matches_adder2d_1x1():
    lin = AdderLinear(6, 4).double()
    conv = Adder2d(6, 4, 1).double()
    conv.weight.data = lin.weight.data.view(4, 6, 1, 1)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(lin(x), conv(x[:, :, None, None])[:, :, 0, 0])
    assert lin(torch.randn(2, 3, 6, dtype=torch.float64)).shape == (2, 3, 4)


def test_constructor_arguments_reach_the_layer_positionally_and_by_name():
    # the arguments after the shape ones live in _AdderMixin._init_adder: nn.Conv2d / nn.Linear order holds
    for layer in (
        Adder2d(3, 4, 3, 2, 1, 1, True, 1.5, "hardtanh", "sign", "reference", None, torch.float64),
        Adder2d(3, 4, 3, stride=2, padding=1, bias=True, p=1.5, grad_x="hardtanh", grad_w="sign",
                backend="reference", dtype=torch.float64),
    ):
        assert (layer.stride, layer.padding, layer.dilation) == ((2, 2), (1, 1), (1, 1))
        assert (layer.p, layer.grad_x, layer.grad_w, layer.backend) == (1.5, "hardtanh", "sign", "reference")
        assert layer.bias is not None and layer.weight.dtype == torch.float64
        assert layer.weight.shape == (4, 3, 3, 3) and layer.bias.shape == (4,)
    lin = AdderLinear(5, 2, True, 1.25, "hardtanh", "sign", "reference", None, torch.float64)
    assert (lin.p, lin.grad_x, lin.grad_w, lin.backend) == (1.25, "hardtanh", "sign", "reference")
    assert lin.weight.shape == (2, 5) and lin.bias.shape == (2,) and lin.weight.dtype == torch.float64
    plain = Adder2d(3, 4, 3)
    assert (plain.bias, plain.p, plain.grad_x, plain.grad_w, plain.backend) == (None, 1.0, "lp", "full", None)
    # the modes are used: hardtanh and lp input gradients differ at p = 1.5
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    lp = Adder2d(3, 4, 3, p=1.5, backend="reference", dtype=torch.float64)
    ht = Adder2d(3, 4, 3, p=1.5, grad_x="hardtanh", backend="reference", dtype=torch.float64)
    ht.weight.data.copy_(lp.weight.data)
    (gx_lp,) = torch.autograd.grad(lp(x).sum(), x)
    (gx_ht,) = torch.autograd.grad(ht(x).sum(), x)
    assert not torch.allclose(gx_lp, gx_ht)
    with pytest.raises(TypeError):
        Adder2d(3, 4, 3, groups=2)
