"""The reference adder operator against an explicit float64 formula over a grid of odd shapes."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from addernet_dist.ops import adder2d, adder_linear
from addernet_dist.ops.reference import adder2d_reference, output_size
from tests.adder_formula import formula

SPACE = {
    "n": [1, 3],
    "cin": [1, 3, 7],
    "cout": [1, 5],
    "hw": [(1, 1), (5, 7), (13, 13)],
    "k": [1, 3, 5, 7],
    "stride": [1, 2],
    "padding": [0, 1, 3],
    "dilation": [1, 2],
    "p": [1.0, 1.5, 2.0],
}


def _valid(case: dict) -> bool:
    h, w = case["hw"]
    ho, wo = output_size(
        h,
        w,
        (case["k"], case["k"]),
        (case["stride"],) * 2,
        (case["padding"],) * 2,
        (case["dilation"],) * 2,
    )
    return ho >= 1 and wo >= 1


def pairwise_cases(space: dict, seed: int = 0) -> list[dict]:
    """A small set of valid cases in which every pair of parameter values appears together at least
    once (where such a valid case exists): covers the grid's interactions without its 5,184 products."""
    keys = list(space)
    allc = [dict(zip(keys, vals)) for vals in itertools.product(*space.values())]
    allc = [c for c in allc if _valid(c)]
    random.Random(seed).shuffle(allc)

    def pairs(c):
        return {(a, repr(c[a]), b, repr(c[b])) for a, b in itertools.combinations(keys, 2)}

    uncovered = set().union(*(pairs(c) for c in allc))
    chosen = []
    while uncovered:
        best = max(allc, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


# Two independent covering sets (~18 cases each) so every value pair is met in two different contexts.
CASES = pairwise_cases(SPACE, seed=0) + pairwise_cases(SPACE, seed=1)


def _id(c):
    return (
        f"n{c['n']}-c{c['cin']}-o{c['cout']}-{c['hw'][0]}x{c['hw'][1]}-k{c['k']}-s{c['stride']}"
        f"-p{c['padding']}-d{c['dilation']}-p{c['p']}"
    )


def test_grid_covers_every_value():
    for key, values in SPACE.items():
        assert {repr(c[key]) for c in CASES} == {repr(v) for v in values}, key
    keys = list(SPACE)
    for a, b in itertools.combinations(keys, 2):
        for va, vb in itertools.product(SPACE[a], SPACE[b]):
            exists = any(
                _valid(dict(zip(keys, v))) and v[keys.index(a)] == va and v[keys.index(b)] == vb
                for v in itertools.product(*SPACE.values())
            )
            met = any(c[a] == va and c[b] == vb for c in CASES)
            assert met or not exists, (a, va, b, vb)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("grad_x", ["lp", "hardtanh"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_float64_formula(case, grad_x):
    grad_w = "full" if case["n"] == 1 else "sign"  # both filter-gradient modes across the grid
    h, w = case["hw"]
    x = torch.randn(case["n"], case["cin"], h, w, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(
        case["cout"], case["cin"], case["k"], case["k"], dtype=torch.float64, requires_grad=True
    )
    s, pd, dl = (case["stride"],) * 2, (case["padding"],) * 2, (case["dilation"],) * 2
    y = adder2d_reference(x, wt, s, pd, dl, p=case["p"], grad_x=grad_x, grad_w=grad_w)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, gx_ref, gw_ref = formula(
        x.detach(), wt.detach(), g, s, pd, dl, case["p"], grad_x, grad_w
    )
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wt.grad, gw_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_float32_matches_formula(p):
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = adder2d_reference(x, w, 2, 1, 1, p=p)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, gx_ref, gw_ref = formula(
        x.detach(), w.detach(), g, (2, 2), (1, 1), (1, 1), p, "lp", "full"
    )
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.float32
    # fp32 sums of 27 terms of size O(1..10): relative error ~1e-6
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), gx_ref, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), gw_ref, rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    x = torch.randn(2, 8, 6, 6).to(dtype).requires_grad_()
    w = torch.randn(5, 8, 3, 3).to(dtype).requires_grad_()
    y = adder2d_reference(x, w, padding=1, p=1.5)
    y.backward(torch.ones_like(y))
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype
    # The same (already 16-bit-rounded) values computed in float64: the only error left is the final
    # rounding of the fp32 accumulator to 16 bits (≤ 2^-8 relative for bf16), not a 72-term 16-bit sum.
    y64, gx64, gw64 = formula(
        x.detach(),
        w.detach(),
        torch.ones(y.shape, dtype=torch.float64),
        (1, 1),
        (1, 1),
        (1, 1),
        1.5,
        "lp",
        "full",
    )
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y64, rtol=eps, atol=0)
    torch.testing.assert_close(w.grad.double(), gw64, rtol=2 * eps, atol=2 * eps)


def test_padding_is_real_padding():
    # A 1×1 input with padding 1 and a 3×3 filter: 8 of the 9 taps read padded zeros, which contribute |0 − w|.
    x = torch.tensor([[[[2.0]]]])
    w = torch.arange(9.0).reshape(1, 1, 3, 3) - 4.0
    y = adder2d_reference(x, w, padding=1)
    expected = -(w.abs().sum() - w[0, 0, 1, 1].abs() + (2.0 - w[0, 0, 1, 1]).abs())
    assert y.shape == (1, 1, 1, 1)
    assert y.item() == pytest.approx(expected.item())


def test_lp_grad_at_p1_is_sign_and_continuous_in_p():
    x = torch.tensor([[0.3, -2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64)
    adder_linear(x, w, p=1.0).sum().backward()
    assert x.grad.tolist() == [[-1.0, 1.0, 0.0]]  # sgn(w − x), sgn(0) = 0
    g1 = x.grad.clone()
    x.grad = None
    adder_linear(x, w, p=1.0 + 1e-9).sum().backward()
    torch.testing.assert_close(x.grad, g1, atol=1e-8, rtol=0)
    x.grad = None
    adder_linear(x, w, p=1.0, grad_x="hardtanh").sum().backward()
    assert x.grad.tolist() == [[-0.3, 1.0, 0.0]]  # HardTanh(w − x)


def test_filter_gradient_is_full_precision_for_every_p():
    x = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    for p in (1.0, 1.3, 2.0):
        w = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
        adder_linear(x, w, p=p).sum().backward()
        assert w.grad.tolist() == [[2.0, -2.0]]  # X − F, independent of p
        w.grad = None
        adder_linear(x, w, p=p, grad_w="sign").sum().backward()
        assert w.grad.tolist() == [[1.0, -1.0]]


def test_chunking_is_exact():
    x = torch.randn(3, 4, 10, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    outs = []
    for chunk in (1 << 30, 6 * 36 * 8 * 7):  # one chunk vs chunks of 7 patch rows (300 rows in all)
        y = adder2d_reference(
            x, w, padding=1, p=1.5, grad_x="hardtanh", grad_w="sign", max_chunk_bytes=chunk
        )
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        outs.append((y, gx, gw))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12)


def test_public_adder2d_defaults_to_reference_semantics():
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        adder2d(x, w, 2, 1, 1, p=1.5),
        adder2d_reference(x, w, 2, 1, 1, p=1.5),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 2.5}, "p must lie in"),
        ({"grad_x": "sign"}, "grad_x must be one of"),
        ({"grad_w": "exact"}, "grad_w must be one of"),
        ({"stride": 0}, "stride >= 1"),
        ({"padding": -1}, "padding >= 0"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adder2d_reference(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), **kwargs)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="input has 4 channels but weight expects 3"):
        adder2d_reference(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="too small for kernel"):
        adder2d_reference(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="NCHW"):
        adder2d_reference(torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_adder2d_arguments_positional_or_by_name_are_one_convention(backend):
    # ops.reference.adder2d_args is the one home of the arguments of adder2d and every backend
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    pos = adder2d(x, w, 2, 1, 1, 1.5, "hardtanh", "sign", backend=backend)
    gx_pos, gw_pos = torch.autograd.grad(pos.sum(), (x, w))
    kw = adder2d(x, w, stride=2, padding=1, dilation=1, p=1.5, grad_x="hardtanh", grad_w="sign", backend=backend)
    gx_kw, gw_kw = torch.autograd.grad(kw.sum(), (x, w))
    y_ref, gx_ref, gw_ref = formula(
        x.detach(), w.detach(), torch.ones_like(pos), (2, 2), (1, 1), (1, 1), 1.5, "hardtanh", "sign"
    )
    for a, b, ref in ((pos, kw, y_ref), (gx_pos, gx_kw, gx_ref), (gw_pos, gw_kw, gw_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.detach(), ref, rtol=1e-10, atol=1e-10)
    # defaults: stride 1, padding 0, dilation 1, p 1, lp, full
    default = adder2d(x, w, 1, 0, 1, 1.0, "lp", "full", backend=backend)
    torch.testing.assert_close(adder2d(x, w, backend=backend), default, rtol=0, atol=0)
    assert adder2d(x, w, backend=backend).shape == (2, 4, 5, 5)
    with pytest.raises(TypeError):
        adder2d(x, w, strides=2, backend=backend)
    xl, wl = x.detach().reshape(14, 21), w.detach().reshape(4, 27)[:, :21]
    lin_pos = adder_linear(xl, wl, 1.5, "hardtanh", "sign", backend=backend)
    lin_kw = adder_linear(xl, wl, p=1.5, grad_x="hardtanh", grad_w="sign", backend=backend)
    torch.testing.assert_close(lin_pos, lin_kw, rtol=0, atol=0)
    torch.testing.assert_close(lin_pos, -(xl[:, None, :] - wl[None]).abs().pow(1.5).sum(-1), rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError):
        adder_linear(xl, wl, 1.5, "lp", "full", 2)


def test_adder2d_forward_cpu_takes_no_gradient_modes():
    from addernet_dist.kernels import cpu_adder

    if not cpu_adder.is_available():
        pytest.skip(f"the CPU fast path did not build: {cpu_adder.unavailable_reason()}")
    x, w, ones = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.ones(3)
    y = cpu_adder.adder2d_forward_cpu(x, w, 1, 1, 1, 1.0, scale=ones, shift=torch.zeros(3))
    torch.testing.assert_close(y, adder2d_reference(x, w, padding=1), rtol=1e-5, atol=1e-3)
    with pytest.raises(TypeError, match="no gradient modes"):
        cpu_adder.adder2d_forward_cpu(x, w, scale=ones, shift=ones, grad_x="hardtanh")
    with pytest.raises(TypeError, match="no gradient modes"):
        cpu_adder.adder2d_forward_cpu(x, w, 1, 0, 1, 1.0, "lp", scale=ones, shift=ones)
