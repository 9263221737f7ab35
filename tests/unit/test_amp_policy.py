"""The adder ops' dtype policy under autocast (addernet_dist/ops/amp.py), on every backend and the fused
Adder2d+BN module; the Triton kernels run in the interpreter on CPU tensors.

Issue 11 part 1: under ``torch.autocast(bf16)`` a stem ``nn.Conv2d`` hands bf16 to the first adder layer
(fp32 filters); the triton backend raised ``TypeError: input dtype torch.bfloat16 != weight dtype
torch.float32`` while "cpu" and "reference" accepted the mix silently, each with its own output dtype.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from addernet_dist.kernels.triton_testing import interpreted_modules
from addernet_dist.models import fusion
from addernet_dist.nn import Adder2d
from addernet_dist.ops import adder2d, adder_linear, dispatch
from addernet_dist.ops.amp import compute_dtype_of
from addernet_dist.ops.reference import adder2d_reference

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")

BACKENDS = ("reference", "cpu", "triton")
_FN = {
    "reference": None,
    "cpu": "AdderCPUFunctionBackward",
    "triton": "AdderTritonFunctionBackward",
}


@pytest.fixture(scope="module")
def interp():
    """The Triton kernel modules imported in interpreter mode (restored afterwards)."""
    with interpreted_modules(
        "addernet_dist.kernels.triton_adder", "addernet_dist.kernels.fused"
    ) as mods:
        yield mods


def _check_backend_ran(y: torch.Tensor, backend: str) -> None:
    want = _FN[backend]
    if want is not None:  # the reference ends in views (no distinctive grad_fn)
        assert type(y.grad_fn).__name__ == want


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_stem_feeds_every_backend(interp, backend):
    """The crash of part 1: stem conv → BN → ReLU under bf16 autocast → Adder2d with fp32 filters."""
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    adder = Adder2d(4, 5, 3, padding=1, backend=backend)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "adder backend", RuntimeWarning)  # no fallback
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = stem(x)
            h.retain_grad()
            y = adder(h)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    assert h.dtype == torch.bfloat16  # the premise: autocast hands the adder layer bf16
    _check_backend_ran(y, backend)
    # The policy: fp32 output (never 16-bit before BN), gradients in the operands' own dtypes.
    assert y.dtype == torch.float32
    assert h.grad.dtype == torch.bfloat16 and adder.weight.grad.dtype == torch.float32
    # Values: the spec in fp64 on the same (bf16-valued, exactly upcast) activations.
    hd = h.detach().double().requires_grad_()
    wd = adder.weight.detach().double().requires_grad_()
    yd = adder2d_reference(hd, wd, padding=1)
    yd.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).double())
    # fp32 sums of 36 terms of O(1): ~1e-6 relative; the bf16 input gradient is one bf16 rounding.
    torch.testing.assert_close(y.detach().double(), yd.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(adder.weight.grad.double(), wd.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=2**-8, atol=1e-2)


_ROWS = [  # (x dtype, w dtype, autocast)
    (torch.float32, torch.float32, True),
    (torch.bfloat16, torch.float32, True),  # the stem's output under autocast
    (torch.bfloat16, torch.float32, False),  # the same rule without autocast
    (torch.float16, torch.float32, True),
    (torch.bfloat16, torch.bfloat16, True),  # DeepSpeed's bf16 weights
    (torch.float64, torch.float64, False),
]
# The interpreter costs ~4 s a row: triton runs the rows the policy changes (16-bit operands).
_CASES = [
    (b, *row)
    for b in BACKENDS
    for row in _ROWS
    if b != "triton" or torch.float16 in row[:2] or torch.bfloat16 in row[:2]
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,x_dtype,w_dtype,autocast", _CASES)
def test_dtype_policy_table(interp, backend, x_dtype, w_dtype, autocast):
    """The table of docs/kernels.md, one row per operand pair, inside and outside autocast."""
    x = (torch.randn(2, 2, 5, 5) * 2).to(x_dtype).requires_grad_()
    w = torch.randn(4, 2, 3, 3).to(w_dtype).requires_grad_()
    g = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = adder2d(x, w, stride=2, padding=1, backend=backend)
        # backward inside the autocast region too: the policy switches autocast off there as well
        y.backward(g.to(y.dtype))
    _check_backend_ran(y, backend)
    cdt = compute_dtype_of(x_dtype, w_dtype)
    assert y.dtype == cdt
    assert x.grad.dtype == x_dtype and w.grad.dtype == w_dtype
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    yd = adder2d_reference(xd, wd, stride=2, padding=1)
    yd.backward(g.double())
    tol = dict(rtol=1e-12, atol=1e-12) if cdt == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.detach().double(), yd.detach(), **tol)
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad)):
        if got.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(got.double(), want, **tol)
        else:  # fp32 accumulation, one rounding to the operand's 16-bit dtype
            eps = torch.finfo(got.dtype).eps
            torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps)


@pytest.mark.timeout(60)
def test_fp32_operands_are_not_copied():
    """fp32 runs stay bit-identical to before the policy existed: no cast, the same tensors reach the
    backend."""
    seen = {}
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)

    def spy(xx, ww, *args):
        seen["x"], seen["w"] = xx, ww
        return adder2d_reference(xx, ww, *args)

    orig = dispatch.get_impl
    dispatch.get_impl = lambda name: spy
    try:
        adder2d(x, w)
    finally:
        dispatch.get_impl = orig
    assert seen["x"] is x and seen["w"] is w


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_adder_linear_follows_the_policy(backend):
    x = torch.randn(6, 10).bfloat16().requires_grad_()
    w = torch.randn(4, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = adder_linear(x, w, backend=backend)
    y.sum().backward()
    assert y.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    want = -(x.detach().float()[:, None, :] - w.detach()[None]).abs().sum(-1)
    torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("train", [True, False])
def test_fused_module_under_autocast_matches_unfused_pair(interp, train):
    """FusedAdderBN2d (triton kernels: fused BN-statistics / affine epilogues) on a bf16 input under
    autocast: fp32 output, the fast path taken, equal to the unfused reference pair on the same values."""
    ta_interp, _ = interp  # models/fusion.py and kernels/fused.py look the kernels up at call time
    adder = Adder2d(3, 5, 3, stride=2, padding=1, backend="reference")
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-30, -20)
        bn.running_var.uniform_(2, 4)
    a2, b2 = copy.deepcopy(adder), copy.deepcopy(bn)
    a2.backend = None
    f = fusion.FusedAdderBN2d(a2, b2, relu=True)
    f.train(train)
    bn.train(train)
    x = (torch.randn(2, 3, 7, 7) + 3.0).bfloat16()
    res = torch.randn(2, 5, 4, 4)
    calls = []
    fwd = ta_interp.adder2d_forward
    ta_interp.adder2d_forward = lambda *a, **k: calls.append(k) or fwd(*a, **k)
    try:
        x1 = x.clone().requires_grad_(train)
        x2 = x.clone().requires_grad_(train)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            y = f(x2, residual=res)
            y_ref = torch.relu(bn(adder(x1.float())) + res)
    finally:
        ta_interp.adder2d_forward = fwd
    assert len(calls) == 1 and calls[0].get("bn_stats", False) == train  # the fused kernel ran
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    if train:
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        assert x2.grad.dtype == torch.bfloat16
        torch.testing.assert_close(x2.grad, x1.grad, rtol=2**-7, atol=1e-2)
        torch.testing.assert_close(f.adder.weight.grad, adder.weight.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(f.bn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-4)
        assert f.bn.running_mean.dtype == torch.float32
