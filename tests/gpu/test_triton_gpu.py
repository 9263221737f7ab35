"""GPU tier of the Triton adder kernels: compiled kernels (autotuned, SFU fast math) at ResNet layer sizes
and bf16, against the reference operator. Skipped without CUDA (tests/conftest.py skips `gpu` items)."""

from __future__ import annotations

import copy

import pytest
import torch

from addernet_dist.ops.reference import adder2d_reference
from tests.helpers import run_adder
from tests.logit_checks import assert_logits_vary, spread_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ResNet-18/50 layer shapes (batch reduced): 3×3 stage convs, a strided one, a 1×1 bottleneck.
SHAPES = [
    (8, 64, 64, 56, 3, 1, 1),
    (8, 128, 128, 28, 3, 1, 1),
    (8, 128, 256, 28, 3, 2, 1),
    (8, 256, 64, 56, 1, 1, 0),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p,grad_x", [(1.0, "lp"), (1.5, "lp"), (2.0, "hardtanh")])
def test_large_shapes_fp32(shape, p, grad_x):
    from addernet_dist.kernels.triton_adder import adder2d_triton

    n, c, o, hw, k, stride, pad = shape
    x = torch.randn(n, c, hw, hw, device=DEV)
    w = torch.randn(o, c, k, k, device=DEV)
    kw = dict(stride=stride, padding=pad, p=p, grad_x=grad_x, grad_w="full")
    y_r = adder2d_reference(x.double(), w.double(), **kw)
    g = torch.randn_like(y_r).float()
    y, dx, dw = run_adder(adder2d_triton, x, w, g, **kw)
    _, dx_r, dw_r = run_adder(adder2d_reference, x.double(), w.double(), g.double(), **kw)
    # fp32 accumulation over K = C·k·k ≤ 2304 terms; SFU log2/exp2 ≤ ~2e-6 relative for p = 1.5.
    assert _rel_err(y, y_r) < 1e-5
    assert _rel_err(dx, dx_r) < 1e-5
    assert _rel_err(dw, dw_r) < 1e-5


@pytest.mark.timeout(600)
@pytest.mark.parametrize("p", [1.2, 1.5, 1.8])
def test_every_general_p_tile_compiled(p):
    # Each forward and ∂X tuning config, pinned (no autotuning), at a ResNet stage-2 size: the SFU-only
    # tiles and the EXP2_FMA tiles (compiled MUFU.LG2 + FMA-pipe exp2) against the fp64 reference.
    from addernet_dist.kernels import triton_adder as ta

    x = torch.randn(8, 128, 28, 28, device=DEV)
    w = torch.randn(64, 128, 3, 3, device=DEV)
    g = torch.randn(8, 64, 28, 28, device=DEV)
    conv = ((1, 1), (1, 1), (1, 1))
    y_r = adder2d_reference(x.double(), w.double(), padding=1, p=p)
    _, dx_r, _ = run_adder(adder2d_reference, x.double(), w.double(), g.double(), padding=1, p=p)
    for cfg in ta.FWD_CONFIGS:
        y, _ = ta.adder2d_forward(x, w, *conv, p, (28, 28), config=cfg)
        assert _rel_err(y, y_r) < 1e-5, cfg
    for cfg in ta.DX_CONFIGS:
        dx = ta.adder2d_grad_input(g, x, w, *conv, p, "lp", config=cfg)
        assert _rel_err(dx, dx_r) < 1e-5, cfg


@pytest.mark.timeout(600)
@pytest.mark.parametrize("p", [1.0, 1.5])
def test_bf16_channels_last(p):
    from addernet_dist.kernels.triton_adder import adder2d_triton

    x = torch.randn(16, 64, 28, 28, device=DEV).bfloat16().to(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3, device=DEV).bfloat16()
    kw = dict(stride=1, padding=1, p=p, grad_x="lp", grad_w="full")
    g = torch.randn(16, 128, 28, 28, device=DEV).bfloat16()
    y, dx, dw = run_adder(adder2d_triton, x, w, g, **kw)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    y_r, dx_r, dw_r = run_adder(adder2d_reference, x.double(), w.double(), g.double(), **kw)
    # Inputs are the same bf16 values; only fp32 accumulation and the final bf16 rounding differ.
    assert _rel_err(y, y_r) < 1e-2
    assert _rel_err(dx, dx_r) < 1e-2
    assert _rel_err(dw, dw_r) < 1e-2


@pytest.mark.timeout(600)
def test_dw_deterministic_bitwise_and_atomic_close():
    from addernet_dist.kernels.triton_adder import adder2d_grad_weight

    x = torch.randn(32, 64, 28, 28, device=DEV)
    w = torch.randn(64, 64, 3, 3, device=DEV)
    g = torch.randn(32, 64, 28, 28, device=DEV)
    args = ((1, 1), (1, 1), (1, 1), "full")
    a = adder2d_grad_weight(g, x, w, *args, deterministic=True)
    b = adder2d_grad_weight(g, x, w, *args, deterministic=True)
    # the atomic mode autotunes over DW_CONFIGS on its first call: every trial run adds into the same
    # buffer, so a missing reset between trials would show up as a multiple of the gradient here
    c = adder2d_grad_weight(g, x, w, *args, deterministic=False)
    d = adder2d_grad_weight(g, x, w, *args, deterministic=False)  # the tuned config, cached
    assert torch.equal(a, b)
    assert _rel_err(c, a) < 1e-5
    assert _rel_err(d, a) < 1e-5


@pytest.mark.timeout(600)
def test_fused_resnet18_matches_unfused():
    from addernet_dist.models import create_model
    from addernet_dist.models.fusion import FusedAdderBN2d, fuse_adder_bn

    model = create_model("resnet18", num_classes=10, backend="reference").to(DEV)
    x = torch.randn(4, 3, 64, 64, device=DEV)
    # eval-mode logits that vary across images and depend on every BN parameter (the precondition
    # is exercised on CPU by tests/unit/test_logit_checks.py with this exact setup)
    spread_model(model, x)
    fused = fuse_adder_bn(copy.deepcopy(model))
    for m in fused.modules():
        if isinstance(m, FusedAdderBN2d):
            m.adder.backend = None  # the Triton fast path
    with torch.no_grad():
        for mode in ("train", "eval"):
            getattr(model, mode)(), getattr(fused, mode)()
            want = model(x)
            if mode == "eval":
                assert_logits_vary(want)
            assert _rel_err(fused(x), want) < 1e-4
