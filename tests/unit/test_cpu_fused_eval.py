"""CPU inference with BatchNorm (+ residual, + ReLU) folded into the fast path's forward epilogue.

``cpu_adder.adder2d_forward_cpu`` against the reference composed by hand, and fused eval-mode models
(``fuse_adder_bn``) against the unfused eval forward of the same weights and BN statistics.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from addernet_dist.kernels import cpu_adder
from addernet_dist.models.fusion import FusedAdderBN2d, fuse_adder_bn
from addernet_dist.models.resnet import Bottleneck, ResNet
from addernet_dist.ops import dispatch
from addernet_dist.ops.reference import adder2d_reference
from tests.logit_checks import assert_logits_vary


@pytest.fixture(scope="module", autouse=True)
def _built():
    cpu_adder.build()  # compiled once per machine (cached); fail loudly, never skip


# n, cin, cout, (h, w), k, stride, pad, dil, p
CASES = [
    (2, 3, 5, (13, 11), 3, 1, 1, 1, 1.0),
    (1, 7, 9, (7, 7), 1, 1, 0, 1, 1.0),  # 1×1, 7-wide rows
    (3, 5, 17, (9, 14), 3, 2, 1, 1, 1.0),  # strided, odd filter count (tile tails)
    (2, 4, 6, (10, 9), 1, 2, 0, 1, 2.0),  # strided 1×1, p = 2
    (1, 3, 4, (12, 12), 3, 1, 2, 2, 1.5),  # dilation, general p
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_epilogue_matches_the_reference(case, dtype):
    n, cin, cout, hw, k, s, pd, dil, p = case
    x = torch.randn(n, cin, *hw, dtype=dtype)
    w = torch.randn(cout, cin, k, k, dtype=dtype)
    y = adder2d_reference(x.double(), w.double(), s, pd, dil, p)
    center = y.mean((0, 2, 3)) + torch.randn(cout, dtype=torch.float64)
    scale = torch.rand(cout, dtype=torch.float64) + 0.5
    shift = torch.randn(cout, dtype=torch.float64)
    res = torch.randn_like(y)
    for residual in (None, res):
        for relu in (False, True):
            want = (y - center[:, None, None]) * scale[:, None, None] + shift[:, None, None]
            if residual is not None:
                want = want + residual
            if relu:
                want = want.clamp_min(0)
            got = cpu_adder.adder2d_forward_cpu(
                *(x, w, s, pd, dil, p),
                scale=scale.to(dtype),
                shift=shift.to(dtype),
                center=center.to(dtype),
                residual=None if residual is None else residual.to(dtype),
                relu=relu,
            )
            assert got.dtype == dtype and got.shape == want.shape
            # fp32: the adder sum rounds at ~|y|·2^-24 per term, scaled by `scale`
            tol = 1e-10 if dtype == torch.float64 else 2e-6 * y.abs().max().item()
            assert (got.double() - want).abs().max().item() < tol, (residual is None, relu)
            if relu:
                assert (want == 0).any() and (want > 0).any()  # the ReLU does something here


def test_epilogue_rejects_bad_shapes():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    ok = torch.ones(3)
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        cpu_adder.adder2d_forward_cpu(x, w, scale=torch.ones(4), shift=ok)
    with pytest.raises(ValueError, match="residual shape"):
        cpu_adder.adder2d_forward_cpu(x, w, scale=ok, shift=ok, residual=torch.ones(1, 3, 5, 5))


def _bottleneck_net(dtype) -> torch.nn.Module:
    # Bottleneck blocks: 1×1, 3×3 stride 2, 1×1 downsample (strided), residual adds, ReLUs
    torch.manual_seed(0)
    model = ResNet(Bottleneck, (1, 2), num_classes=10, conv="adder", stem="cifar").to(dtype)
    # BN statistics from real batches (momentum 1: the last batch's), so every BN folds a non-trivial
    # mean ~ −K·E|x − w| and variance; γ, β random
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 15, 13, dtype=dtype))
    return model.eval()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_eval_model_matches_the_unfused_eval_forward(dtype, monkeypatch):
    model = _bottleneck_net(dtype)
    fused = fuse_adder_bn(copy.deepcopy(model)).eval()
    n_fused = sum(isinstance(m, FusedAdderBN2d) for m in fused.modules())
    assert n_fused == 11  # 3 per block (3 blocks) + a 1×1 downsample in each stage
    calls = []
    real = cpu_adder.adder2d_forward_cpu

    def counted(*a, **kw):
        calls.append(kw["residual"] is not None)
        return real(*a, **kw)

    monkeypatch.setattr(cpu_adder, "adder2d_forward_cpu", counted)
    x = torch.randn(
        4, 3, 15, 13, dtype=dtype
    )  # odd sizes: 15×13 → 8×7 → 4×4 after the strided stage
    with torch.no_grad():
        want = model(x)
        got = fused(x)
    assert (
        len(calls) == n_fused and sum(calls) == 3
    )  # every layer on the kernel; 3 residual epilogues
    # outputs that differ across images (a constant output would match trivially)
    assert want.std(0).min() > 1e-3 * want.abs().max()
    assert_logits_vary(want, min_distinct_top1=1)  # compared elementwise, not by top-1
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    else:
        # the unfused BN rounds y·(γ/σ) + (β − μ·γ/σ) in fp32 after an adder sum at |y| ~ 1e2: both
        # are within a few fp32 ulps of |y| of the fp64 model, scaled through the network
        ref = _bottleneck_net(torch.float64)
        with torch.no_grad():
            exact = ref(x.double())
        err_fused = (got.double() - exact).abs().max().item()
        err_unfused = (want.double() - exact).abs().max().item()
        assert err_fused <= 2 * err_unfused + 1e-5, (err_fused, err_unfused)


@pytest.mark.timeout(120)
def test_fused_eval_stays_unfused_where_it_must(monkeypatch):
    model = _bottleneck_net(torch.float64)
    fused = fuse_adder_bn(copy.deepcopy(model)).eval()
    calls = []
    monkeypatch.setattr(cpu_adder, "adder2d_forward_cpu", lambda *a, **k: calls.append(1) or 1 / 0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    # autograd recording (e.g. frozen-BN fine-tuning): the unfused pair, which has a backward
    y = fused(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(model(x).sum(), x)[0])
    # the reference backend chosen: no CPU kernel either
    dispatch.set_default_backend("reference")
    try:
        with torch.no_grad():
            want = model(x)
            assert_logits_vary(want, min_distinct_top1=1)
            torch.testing.assert_close(fused(x), want)
    finally:
        dispatch.set_default_backend(None)
    # training mode: batch statistics, not the folded running ones
    fused.train()
    with torch.no_grad():
        fused(x)
    assert calls == []


def test_relu_and_residual_follow_the_block_order():
    # relu(bn(adder(x)) + residual): the residual is added before the ReLU, as in a ResNet block
    x, w = (
        torch.randn(1, 2, 6, 6, dtype=torch.float64),
        torch.randn(3, 2, 3, 3, dtype=torch.float64),
    )
    y = adder2d_reference(x, w, 1, 1)
    c = y.mean((0, 2, 3))
    one, zero = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    res = -(y - c[:, None, None]) + 0.25  # cancels the BN output: relu(0.25) everywhere
    got = cpu_adder.adder2d_forward_cpu(
        x, w, 1, 1, scale=one, shift=zero, center=c, residual=res, relu=True
    )
    torch.testing.assert_close(got, torch.full_like(y, 0.25))
    assert F.relu(y - c[:, None, None]).ne(0.25).any()
