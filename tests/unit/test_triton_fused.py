"""Fused Adder2d+BatchNorm2d modules and ``fuse_adder_bn`` under the Triton interpreter, against the unfused
pair computed by the reference operator (the spec)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from addernet_dist.kernels.triton_testing import interpreted_modules
from addernet_dist.models import create_model, fusion
from addernet_dist.nn import Adder2d, set_p
from tests.logit_checks import assert_logits_vary, spread_model

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


@pytest.fixture(scope="module")
def fused():
    # models/fusion.py looks its kernel modules up at call time: inside this context it runs the
    # interpreted copies.
    with interpreted_modules("addernet_dist.kernels.fused"):
        yield fusion


def _pair(c=3, o=5, k=3, stride=1, padding=1, p=1.0, momentum=0.1):
    adder = Adder2d(c, o, k, stride=stride, padding=padding, p=p, backend="reference")
    bn = nn.BatchNorm2d(o, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return adder, bn


def _fused_copy(fused, adder, bn, relu):
    a2, b2 = copy.deepcopy(adder), copy.deepcopy(bn)
    a2.backend = None  # the fast path: the Triton kernels (interpreted on CPU)
    return fused.FusedAdderBN2d(a2, b2, relu=relu)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p,momentum", [(1.0, 0.1), (1.5, None)])
def test_training_matches_unfused_pair(fused, p, momentum):
    adder, bn = _pair(p=p, momentum=momentum, stride=2)
    f = _fused_copy(fused, adder, bn, relu=True)
    x = torch.randn(2, 3, 7, 7) + 3.0
    res = torch.randn(2, 5, 4, 4)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for _ in range(2):  # two steps: running statistics accumulate (and the cumulative average)
        y_ref = torch.relu(bn(adder(x1)) + res)
        y = f(x2, residual=res)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(y)
        y_ref.backward(g)
        y.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.adder.weight.grad, adder.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(f.bn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.bn.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(f.bn.running_var, bn.running_var, rtol=1e-5, atol=1e-3)
    assert int(f.bn.num_batches_tracked) == int(bn.num_batches_tracked) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("relu,with_res", [(False, False), (True, True)])
def test_inference_matches_unfused_pair(fused, relu, with_res):
    adder, bn = _pair(c=6, o=17, p=2.0)
    with torch.no_grad():
        bn.running_mean.uniform_(-60, -40)  # adder outputs are large and negative
        bn.running_var.uniform_(5, 50)
    adder.eval(), bn.eval()
    f = _fused_copy(fused, adder, bn, relu=relu).eval()
    x = torch.randn(1, 6, 5, 5)
    res = torch.randn(1, 17, 5, 5) if with_res else None
    with torch.no_grad():
        y_ref = bn(adder(x))
        if with_res:
            y_ref = y_ref + res
        if relu:
            y_ref = torch.relu(y_ref)
        y = f(x, residual=res)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(120)
def test_fuse_resnet8_block_pairs(fused):
    # width 4 (channels 4/8/16): the block structure the fusion rewrites is ResNet-8's; the
    # interpreted kernels cost ~5x less than at width 16 (5 s vs 27 s for the two forwards).
    model = create_model("resnet8", backend="reference", width=4)
    set_p(model, 1.5)
    x = torch.randn(6, 3, 8, 8)
    spread_model(model, x).train()
    fm = fused.fuse_adder_bn(copy.deepcopy(model))
    fms = [m for m in fm.modules() if isinstance(m, fused.FusedAdderBN2d)]
    # 3 blocks × 2 convs + 2 downsample projections; the full-precision stem conv is left alone.
    assert len(fms) == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fm.layer1[0]._modules.values())
    # The blocks' ReLUs and residual adds moved into the fused layers' epilogues.
    assert fm.layer1[0].conv1.relu and fm.layer1[0].conv2.relu
    assert not fm.layer2[0].downsample[0].relu
    for m in fms:
        m.adder.backend = None
    with torch.no_grad():
        torch.testing.assert_close(fm(x), model(x), rtol=1e-4, atol=1e-4)  # train mode: batch stats
        model.eval(), fm.eval()
        want = model(x)
        assert_logits_vary(want)
        torch.testing.assert_close(fm(x), want, rtol=1e-4, atol=1e-4)  # folded running stats


@pytest.mark.timeout(60)
def test_fuse_sequential_with_relu_lenet(fused):
    model = create_model("lenet5_bn").eval()
    for m in model.modules():
        if isinstance(m, Adder2d):
            m.backend = "reference"
    x = torch.randn(6, 1, 32, 32)
    spread_model(model, x)
    fm = fused.fuse_adder_bn(copy.deepcopy(model))
    fms = [m for m in fm.modules() if isinstance(m, fused.FusedAdderBN2d)]
    # LeNet-5-BN: adder conv 1→6 and 6→16, each followed by BN and ReLU in one Sequential.
    assert len(fms) == 2 and all(m.relu for m in fms)
    for m in fms:
        m.adder.backend = None
    with torch.no_grad():
        want = model(x)
        assert_logits_vary(want)
        torch.testing.assert_close(fm(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["resnet8", "resnet50", "lenet5_bn"])
def test_fused_model_saves_and_loads_the_unfused_keys(fused, name):
    # BasicBlock, Bottleneck (+ downsample Sequential) and the LeNet Sequential patterns: a fused model's
    # state_dict is the unfused model's, key for key and value for value, and each loads the other's
    # strictly — a checkpoint does not depend on whether the run fused (adder.fuse_bn).
    torch.manual_seed(0)
    plain = create_model(name)
    with torch.no_grad():  # every value distinct from a fresh model's, buffers included
        for t in [*plain.parameters(), *plain.buffers()]:
            if t.dtype.is_floating_point:
                t.add_(torch.rand_like(t))
    set_p(plain, 1.25)
    want = plain.state_dict()
    fm = fused.fuse_adder_bn(create_model(name))
    assert any(isinstance(m, fused.FusedAdderBN2d) for m in fm.modules())
    fm.load_state_dict(want, strict=True)  # strict: raises on any missing or unexpected key
    got = fm.state_dict()
    assert list(got) == list(want)  # same keys, same order
    for k, v in want.items():
        assert torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v, k
    assert all(m.p == 1.25 for m in fm.modules() if isinstance(m, Adder2d))
    back = create_model(name)
    back.load_state_dict(got, strict=True)
    # the hooks survive deep copies and pickling of the whole fused model
    buf = io.BytesIO()
    torch.save(copy.deepcopy(fm), buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert list(again.state_dict()) == list(want)
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]) if isinstance(v, torch.Tensor) else v == want[k], k


@pytest.mark.timeout(30)
def test_fused_module_rejects_bad_pairs(fused):
    adder, _ = _pair(o=5)
    with pytest.raises(ValueError, match="6 features but the adder layer has 5"):
        fused.FusedAdderBN2d(adder, nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="BatchNorm2d"):
        fused.FusedAdderBN2d(adder, nn.BatchNorm1d(5))


@pytest.mark.timeout(60)
def test_eval_with_autograd_falls_back_to_unfused_and_has_gradients(fused):
    adder, bn = _pair()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        # running statistics of real adder outputs (the init's (0, 1) sends every output of
        # y = -sum|x - w| ~ -13 below zero: the ReLU output and every gradient would be 0)
        out = adder(x)
        bn.running_mean.copy_(out.mean((0, 2, 3)))
        bn.running_var.copy_(out.var((0, 2, 3)))
    adder.eval(), bn.eval()
    f = _fused_copy(fused, adder, bn, relu=True).eval()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = f(x2)  # eval statistics with autograd recording: the inference kernel has no backward
    y_ref = torch.relu(bn(adder(x1)))
    assert 0.2 < (y_ref > 0).float().mean() < 0.8  # the ReLU passes part of the outputs
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert x1.grad.abs().sum() > 0 and adder.weight.grad.abs().sum() > 0
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.adder.weight.grad, adder.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f.bn.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
