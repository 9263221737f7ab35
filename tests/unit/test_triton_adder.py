"""Triton adder kernels under the interpreter (CPU CI) against the reference operator (the spec).

Shapes are odd on purpose (batch 1, Cin 3, Cout 5, 7×7 / 13×13, stride 2, dilation 2, rectangular
kernels) and chosen so that every loop of the kernels runs: the unrolled channel loop and its tail
(C = 6 with BLOCK_K = 4), several channel blocks (Cout 17 > BLOCK_N = 16), partial position blocks.
fp64 cases check the algorithm to 1e-10; fp32/bf16/fp16 cases check the storage and accumulation paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# the tuning lists, for parametrisation (the interpreted module in the fixture has the same ones)
from addernet_dist.kernels.triton_adder import DW_CONFIGS as _DW_CONFIGS  # noqa: E402
from addernet_dist.kernels.triton_adder import DX_CONFIGS as _DX_CONFIGS  # noqa: E402
from addernet_dist.kernels.triton_adder import FWD_CONFIGS as _FWD_CONFIGS  # noqa: E402
from addernet_dist.kernels.triton_testing import interpreted_modules
from addernet_dist.ops.reference import adder2d_reference
from tests.helpers import run_adder

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


@pytest.fixture(scope="module")
def ta():
    with interpreted_modules("addernet_dist.kernels.triton_adder") as (mod,):
        yield mod


# (N, C, O, (H, W), (kh, kw), stride, padding, dilation, p, grad_x, grad_w)
CASES = [
    (1, 3, 5, (7, 7), (3, 3), 1, 1, 1, 1.0, "lp", "full"),
    (1, 3, 5, (13, 13), (3, 3), 2, 0, 2, 1.5, "hardtanh", "sign"),
    (1, 3, 5, (7, 7), (3, 3), 2, 1, 1, 2.0, "lp", "full"),
    (1, 3, 5, (9, 9), (3, 3), 1, 1, 1, 1.5, "lp", "full"),
    (2, 3, 5, (7, 7), (3, 3), 1, 0, 2, 1.0, "hardtanh", "full"),
    (1, 3, 5, (7, 7), (3, 3), 2, 1, 1, 1.0, "lp", "sign"),
    (1, 6, 17, (5, 6), (3, 1), (2, 1), (1, 0), 1, 2.0, "lp", "sign"),
    (1, 6, 5, (6, 5), (1, 3), 1, (0, 2), (1, 2), 1.5, "hardtanh", "full"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"N{c[0]}C{c[1]}O{c[2]}p{c[8]}-{c[9]}-{c[10]}"
)
def test_forward_and_both_grads_match_reference_fp64(ta, case):
    n, c, o, hw, k, stride, pad, dil, p, gx, gw = case
    x = torch.randn(n, c, *hw, dtype=torch.float64)
    w = torch.randn(o, c, *k, dtype=torch.float64)
    kw = dict(stride=stride, padding=pad, dilation=dil, p=p, grad_x=gx, grad_w=gw)
    y_ref = adder2d_reference(x, w, **kw)
    g = torch.randn_like(y_ref)
    y, dx, dw = run_adder(ta.adder2d_triton, x, w, g, **kw)
    y_r, dx_r, dw_r = run_adder(adder2d_reference, x, w, g, **kw)
    assert y.shape == y_r.shape
    torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, dw_r, rtol=1e-10, atol=1e-10)


@pytest.mark.timeout(60)
def test_padding_is_real(ta):
    # x = 0 everywhere: every output is −Σ|w|^p, including at the borders where taps fall in the padding.
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    y = ta.adder2d_triton(x, w, padding=1, p=1.0)
    expected = -w.abs().sum((1, 2, 3))
    torch.testing.assert_close(y, expected[None, :, None, None].expand(1, 3, 4, 4))


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0·inf in numpy
# (stride, kernel, dilation, H, W): sizes where every pixel that no tap reads lies in a stride phase that
# no tap reads (not merely past the last output, which a phase-level skip cannot see)
@pytest.mark.parametrize(
    "stride,kernel,dil,h,w", [(2, 1, 1, 7, 8), (3, 2, 1, 8, 8), (2, 3, 2, 7, 8)]
)
def test_dx_skips_the_taps_of_other_stride_phases(ta, stride, kernel, dil, h, w):
    # ∂X runs one stride phase per program and skips taps that never read it. Observable: give every
    # filter an infinite weight. A tap computed under a mask adds 0·inf = NaN; a skipped tap adds
    # nothing, so the pixels of unread phases keep an exact 0 gradient (inf/NaN everywhere else).
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    wt = torch.full((3, 2, kernel, kernel), float("inf"), dtype=torch.float64)
    span = dil * (kernel - 1) + 1
    ho, wo = (h - span) // stride + 1, (w - span) // stride + 1
    g = torch.randn(1, 3, ho, wo, dtype=torch.float64)
    st, pd, dl = (stride, stride), (0, 0), (dil, dil)
    dx = ta.adder2d_grad_input(g, x, wt, st, pd, dl, 2.0, "lp")  # p = 2: Σ g·(w − x)
    read = torch.zeros(h, w, dtype=torch.bool)
    for i in range(kernel):
        for j in range(kernel):
            r0, c0 = i * dil, j * dil
            read[
                r0 : r0 + (ho - 1) * stride + 1 : stride, c0 : c0 + (wo - 1) * stride + 1 : stride
            ] = True
    assert (~read).any() and read.any()
    assert torch.equal(dx[:, :, ~read], torch.zeros_like(dx[:, :, ~read]))
    assert not dx[:, :, read].isfinite().any()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cfg_index", range(len(_FWD_CONFIGS)))
def test_every_forward_config_matches_reference(ta, cfg_index):
    cfg = ta.FWD_CONFIGS[cfg_index]
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    w = torch.randn(18, 5, 3, 3, dtype=torch.float64)
    if cfg.kwargs["EXP2_FMA"]:
        # a general-p-only config: its FMA-pipe exp2 runs in fp32 compute
        x, w, p, tol = x.float(), w.float(), 1.5, dict(rtol=2e-6, atol=1e-4)
    else:
        p, tol = 1.0, dict(rtol=1e-10, atol=1e-10)
    y, _ = ta.adder2d_forward(x, w, (1, 1), (1, 1), (1, 1), p, (9, 7), config=cfg)
    y_r = adder2d_reference(x.double(), w.double(), padding=1, p=p)
    torch.testing.assert_close(y.double(), y_r, **tol)


@pytest.mark.timeout(60)
# the overflow cases overflow numpy's fp32 sum in the interpreter on purpose (→ −inf is asserted below)
@pytest.mark.filterwarnings("ignore:overflow encountered in add:RuntimeWarning")
def test_fma_pipe_exp2_accuracy_and_edges(ta):
    # 1×1 filters of zeros over 4 equal channels, BLOCK_K = EXP2_FMA = 4: every term takes the FMA-pipe
    # exp2 and y = −4·|v|^p exactly in the spec. |v| spans 2^-40 … 2^40 (y from ~1e-48·4 to ~1e48).
    import triton

    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 8, "BLOCK_K": 4, "EXP2_FMA": 4})
    v = torch.cat([torch.logspace(-12, 12, 2001, base=10.0), torch.tensor([0.0, 3.0e38])])
    v = torch.cat([v, -v, torch.tensor([float("nan")])]).float()
    x = v.view(1, 1, 1, -1).expand(1, 4, 1, -1).contiguous()
    w = torch.zeros(5, 4, 1, 1)
    for p in (1.05, 1.5, 1.95):
        y, _ = ta.adder2d_forward(x, w, (1, 1), (0, 0), (1, 1), p, (1, v.numel()), config=cfg)
        y = y[0, 0, 0].double()
        want = -4 * v.double().abs() ** p
        normal = want.abs().lt(3e38) & want.abs().gt(1e-37)
        # The exp2 alone: against 2^t for the very fp32 t = p·log2|v| the kernel forms (the interpreter's
        # log2 is numpy's), to the polynomial's 2.3e-7 plus the fp32 rounding of the 4-term sum.
        with np.errstate(divide="ignore", invalid="ignore"):
            t = torch.from_numpy(np.float32(p) * np.log2(np.abs(v.numpy()))).double()
        torch.testing.assert_close(y[normal], -4 * torch.exp2(t)[normal], rtol=4e-7, atol=0)
        # End to end: rounding t costs ~p·ln2·|log2|v||·2^-24 relative on top (as for the SFU path);
        # within |v| ∈ [2^-8, 2^8] that stays under 2e-6 (docs/kernels.md).
        mid = normal & v.abs().ge(2**-8) & v.abs().le(2**8)
        torch.testing.assert_close(y[mid], want[mid], rtol=2e-6, atol=0)
        assert (y[v == 0].abs() < 1e-37).all()  # 0^p: 2^-126 per term, not 0, and not NaN
        over = v.isfinite() & want.abs().gt(torch.finfo(torch.float32).max)
        assert over.sum() >= 2 and (y[over] == -float("inf")).all()  # overflow: −inf, as the spec
        assert y[-1].isnan()  # NaN propagates through the clamps


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cfg_index", range(len(_DX_CONFIGS)))
def test_every_dx_config_matches_reference(ta, cfg_index):
    cfg = ta.DX_CONFIGS[cfg_index]
    x = torch.randn(1, 5, 6, 5, dtype=torch.float64)
    w = torch.randn(9, 5, 3, 3, dtype=torch.float64)
    g = torch.randn(1, 9, 3, 3, dtype=torch.float64)
    if cfg.kwargs["EXP2_FMA"]:
        # an ℓp-at-general-p-only config: its FMA-pipe exp2 runs in fp32 compute
        x, w, g, p, tol = x.float(), w.float(), g.float(), 1.5, dict(rtol=2e-6, atol=1e-5)
    else:
        p, tol = 1.0, dict(rtol=1e-10, atol=1e-10)
    _, dx_r, _ = run_adder(
        adder2d_reference, x.double(), w.double(), g.double(), stride=2, padding=1, p=p
    )
    dx = ta.adder2d_grad_input(g, x, w, (2, 2), (1, 1), (1, 1), p, "lp", config=cfg)
    torch.testing.assert_close(dx.double(), dx_r, **tol)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cfg_index", range(len(_DW_CONFIGS)))
def test_every_dw_config_matches_reference(ta, cfg_index):
    x = torch.randn(1, 5, 6, 5, dtype=torch.float64)
    w = torch.randn(9, 5, 3, 3, dtype=torch.float64)
    g = torch.randn(1, 9, 3, 3, dtype=torch.float64)
    args = ((2, 2), (1, 1), (1, 1))
    _, _, dw_r = run_adder(adder2d_reference, x, w, g, stride=2, padding=1, p=1.0)
    dw = ta.adder2d_grad_weight(g, x, w, *args, "full", config=ta.DW_CONFIGS[cfg_index])
    torch.testing.assert_close(dw, dw_r, rtol=1e-10, atol=1e-10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("c,o", [(3, 5), (9, 11)], ids=["C3", "C9"])
def test_fp32_general_and_fast_paths(ta, p, c, o):
    # C = 9 with the interpreter's BLOCK_K = 8 runs the unrolled channel loop (whose first EXP2_FMA = 4
    # terms, and ∂X's first 4 output channels per step, take the FMA-pipe exp2 at p = 1.5) and the tail.
    x = torch.randn(1, c, 7, 7)
    w = torch.randn(o, c, 3, 3)
    kw = dict(stride=1, padding=1, p=p, grad_x="lp", grad_w="full")
    g = torch.randn(1, o, 7, 7)
    y, dx, dw = run_adder(ta.adder2d_triton, x, w, g, **kw)
    y_r, dx_r, dw_r = run_adder(adder2d_reference, x.double(), w.double(), g.double(), **kw)
    # fp32 sums of 27-81 terms of size O(1): ~1e-6 relative; the interpreter's exp2/log2 are numpy's.
    torch.testing.assert_close(y, y_r.float(), rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(dx, dx_r.float(), rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(dw, dw_r.float(), rtol=2e-6, atol=1e-4)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_storage_channels_last(ta, dtype):
    x = torch.randn(1, 3, 7, 7).to(dtype).to(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3).to(dtype)
    g = torch.randn(1, 5, 4, 4).to(dtype)
    kw = dict(stride=2, padding=1, p=1.5, grad_x="hardtanh", grad_w="full")
    y, dx, dw = run_adder(ta.adder2d_triton, x, w, g, **kw)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    # The same rounded values, computed in fp64: the only differences are fp32 accumulation and the
    # final rounding to 16 bits (bf16: 8 mantissa bits → 2^-8 relative).
    y_r, dx_r, dw_r = run_adder(adder2d_reference, x.double(), w.double(), g.double(), **kw)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y.double(), y_r, **tol)
    torch.testing.assert_close(dx.double(), dx_r, **tol)
    torch.testing.assert_close(dw.double(), dw_r, rtol=tol["rtol"], atol=tol["atol"] * 10)


@pytest.mark.timeout(90)
def test_channels_last_matches_nchw_and_streams_nchw(ta, monkeypatch):
    # channels_last in → channels_last y and dx, bitwise equal to the NCHW run; the hot-loop operands
    # (x of the forward, g of ∂X) reach the kernels NCHW-contiguous (coalesced loads, see
    # _hot_loop_layout), while the once-per-element operands keep the caller's layout (no extra copy).
    x = torch.randn(2, 6, 7, 7)
    w = torch.randn(5, 6, 3, 3)
    g = torch.randn(2, 5, 4, 4)
    kw = dict(stride=2, padding=1, p=1.0, grad_x="hardtanh", grad_w="full")
    seen = {}
    launch = ta._launch

    def spy(kernel, tuned, kind, configs, grid_fn, args, consts, config):
        seen[kind] = args[:2]
        return launch(kernel, tuned, kind, configs, grid_fn, args, consts, config)

    y_n, dx_n, dw_n = run_adder(ta.adder2d_triton, x, w, g, **kw)
    monkeypatch.setattr(ta, "_launch", spy)
    cl = torch.channels_last
    y_c, dx_c, dw_c = run_adder(
        ta.adder2d_triton, x.to(memory_format=cl), w, g.to(memory_format=cl), **kw
    )
    assert y_c.is_contiguous(memory_format=cl) and not y_c.is_contiguous()
    assert dx_c.is_contiguous(memory_format=cl) and not dx_c.is_contiguous()
    assert seen["fwd"][0].is_contiguous()  # x, streamed per channel
    assert seen["dx"][0].is_contiguous()  # g, streamed per output channel
    assert seen["dx"][1].is_contiguous(memory_format=cl)  # x, loaded once: not copied
    for a, b in ((y_c, y_n), (dx_c, dx_n), (dw_c, dw_n)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.timeout(90)
def test_dw_deterministic_is_bitwise_reproducible_and_atomic_matches(ta):
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(5, 4, 3, 3)
    g = torch.randn(1, 5, 5, 5)
    args = ((1, 1), (1, 1), (1, 1), "full")
    a = ta.adder2d_grad_weight(g, x, w, *args, deterministic=True)
    b = ta.adder2d_grad_weight(g, x, w, *args, deterministic=True)
    assert torch.equal(a, b)
    c = ta.adder2d_grad_weight(g, x, w, *args, deterministic=False)
    _, _, dw_r = run_adder(adder2d_reference, x.double(), w.double(), g.double(), padding=1)
    torch.testing.assert_close(a, dw_r.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(c, dw_r.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(60)
def test_bn_statistics_epilogue(ta):
    # A large common offset (|y| ~ 1e3 above a spread of ~10): E[y²] − E[y]² would lose most digits.
    x = torch.randn(2, 6, 7, 7) + 30.0
    w = torch.randn(17, 6, 3, 3)
    y, (mean, var) = ta.adder2d_forward(x, w, (1, 1), (1, 1), (1, 1), 1.0, (7, 7), bn_stats=True)
    y_ref = adder2d_reference(x.double(), w.double(), padding=1)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-3)
    yd = y.double()
    torch.testing.assert_close(mean.double(), yd.mean((0, 2, 3)), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(
        var.double(), yd.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-4
    )
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (17,)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_res", [False, True])
def test_inference_epilogue_affine_residual_relu(ta, with_res):
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    scale = torch.rand(5) + 0.01
    shift = torch.randn(5) * 20
    res = torch.randn(1, 5, 4, 4, dtype=torch.float64) * 20 if with_res else None
    y, _ = ta.adder2d_forward(
        x, w, (2, 2), (1, 1), (1, 1), 1.5, (4, 4), scale=scale, shift=shift, residual=res, relu=True
    )
    expected = (
        adder2d_reference(x, w, stride=2, padding=1, p=1.5) * scale.double()[:, None, None]
        + shift.double()[:, None, None]
    )
    if with_res:
        expected = expected + res
    expected = expected.clamp_min(0)
    assert (expected == 0).any() and (expected > 0).any()  # the ReLU is exercised both ways
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.timeout(30)
def test_bad_arguments_raise_clear_errors(ta):
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(TypeError, match="dtype"):
        ta.adder2d_triton(x, torch.randn(4, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="channels"):
        ta.adder2d_triton(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"p must lie in \[1, 2\]"):
        ta.adder2d_triton(x, torch.randn(4, 3, 3, 3), p=3.0)
    with pytest.raises(ValueError, match="residual"):
        ta.adder2d_forward(
            x, torch.randn(4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1.0, (3, 3),
            residual=torch.randn(1, 4, 3, 3),
        )  # fmt: skip
