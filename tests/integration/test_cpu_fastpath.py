"""The CPU fast path (kernels/cpu_adder.py) against the reference operator: forward and both gradients."""

from __future__ import annotations

import itertools
import random
import sys
import warnings

import pytest
import torch

from addernet_dist.kernels import cpu_adder, cpu_build
from addernet_dist.ops.reference import adder2d_reference, output_size

# batch, Cin, Cout, input (H, W), kernel, stride, padding, dilation, p
AXES = {
    "n": (1, 3),
    "cin": (1, 3, 7),
    "cout": (1, 5),
    "hw": ((1, 1), (5, 7), (13, 13)),
    "k": (1, 3, 5),
    "stride": (1, 2),
    "pad": (0, 1, 3),
    "dil": (1, 2),
    "p": (1.0, 1.5, 2.0),
}
MODES = [("lp", "full"), ("hardtanh", "sign"), ("lp", "sign"), ("hardtanh", "full")]


def _valid(c: dict) -> bool:
    ho, wo = output_size(
        *c["hw"], (c["k"], c["k"]), (c["stride"],) * 2, (c["pad"],) * 2, (c["dil"],) * 2
    )
    return ho >= 1 and wo >= 1


def _grid(count: int = 40) -> list[dict]:
    """A fixed random sample of the valid cartesian product (the full product has ~2700 cases)."""
    every = [dict(zip(AXES, v)) for v in itertools.product(*AXES.values())]
    valid = [c for c in every if _valid(c)]
    picked = random.Random(1234).sample(valid, count)
    for i, c in enumerate(picked):
        c["grad_x"], c["grad_w"] = MODES[i % len(MODES)]
    return picked


GRID = _grid()


def _run(fn, x, w, g, c):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xg, wg, c["stride"], c["pad"], c["dil"], c["p"], c["grad_x"], c["grad_w"])
    gx, gw = torch.autograd.grad(y, (xg, wg), g)
    return y, gx, gw


def _case(c: dict, dtype=torch.float64):
    x = torch.randn(c["n"], c["cin"], *c["hw"], dtype=dtype)
    w = torch.randn(c["cout"], c["cin"], c["k"], c["k"], dtype=dtype)
    ho, wo = output_size(
        *c["hw"], (c["k"], c["k"]), (c["stride"],) * 2, (c["pad"],) * 2, (c["dil"],) * 2
    )
    g = torch.randn(c["n"], c["cout"], ho, wo, dtype=dtype)
    return x, w, g


@pytest.fixture(scope="module", autouse=True)
def _built():
    # first use compiles the kernels (~6 s of CPU, cached per machine); fail loudly, never skip
    cpu_adder.build()


@pytest.mark.timeout(60)
def test_grid_covers_every_axis_value():
    for axis, values in AXES.items():
        assert {c[axis] if axis != "hw" else c["hw"] for c in GRID} == set(values), axis
    assert {(c["grad_x"], c["grad_w"]) for c in GRID} == set(MODES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("c", GRID, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_reference_fp64(c):
    x, w, g = _case(c)
    got = _run(cpu_adder.adder2d_cpu, x, w, g, c)
    want = _run(adder2d_reference, x, w, g, c)
    for name, a, b in zip(("y", "grad_x", "grad_w"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("modes", MODES[:2])
def test_fp32_resnet_like_layer(p, modes):
    # a CIFAR ResNet stage-2 layer at batch 2: full 16-lane vectors, 16-filter blocks, 8-tap blocks
    c = dict(n=2, cin=16, cout=32, hw=(16, 16), k=3, stride=1, pad=1, dil=1, p=p)
    c["grad_x"], c["grad_w"] = modes
    x, w, g = _case(c, torch.float32)
    got = _run(cpu_adder.adder2d_cpu, x, w, g, c)
    want = _run(adder2d_reference, x.double(), w.double(), g.double(), c)
    for name, a, b in zip(("y", "grad_x", "grad_w"), got, want):
        assert a.dtype == torch.float32, name
        # fp32 sums of 144 (y) to 512 (grad_w) terms of O(1): relative error ~1e-6 measured
        torch.testing.assert_close(
            a.double(), b, rtol=2e-5, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(dtype):
    c = dict(n=2, cin=3, cout=5, hw=(9, 11), k=3, stride=2, pad=1, dil=1, p=1.5)
    c["grad_x"], c["grad_w"] = "lp", "full"
    x, w, g = (t.to(dtype) for t in _case(c, torch.float32))
    got = _run(cpu_adder.adder2d_cpu, x, w, g, c)
    # the spec on the same 16-bit values, computed in fp64 and rounded once to the storage dtype
    want = _run(adder2d_reference, x.double(), w.double(), g.double(), c)
    # fp32 accumulation then one rounding to 16 bits: at most one 16-bit ulp (2·eps relative) from the
    # fp64 value rounded once (bf16: 2^-7, fp16: 2^-10); atol covers sums that cancel to ~0.
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("y", "grad_x", "grad_w"), got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(
            a, b.to(dtype), rtol=2 * eps, atol=2 * eps, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("grad_x,grad_w", [("lp", "sign"), ("hardtanh", "sign")])
def test_ties_follow_sign_of_zero(grad_x, grad_w):
    # integer-valued data makes x == w (and padded zeros == w) frequent: sgn(0) = 0 must hold exactly
    x = torch.randint(-2, 3, (2, 3, 6, 6)).double()
    w = torch.randint(-2, 3, (4, 3, 3, 3)).double()
    g = torch.randint(-3, 4, (2, 4, 6, 6)).double()
    c = dict(stride=1, pad=1, dil=1, p=1.0, grad_x=grad_x, grad_w=grad_w)
    got = _run(cpu_adder.adder2d_cpu, x, w, g, c)
    want = _run(adder2d_reference, x, w, g, c)
    assert (x[:, :, None] == w.flatten()[None, None, :, None, None]).any()  # ties are present
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# Output widths around the vector-layout switch (fp32: <= 8 wide rows go two to a 64-byte vector, one
# row <= 8 wide alone takes 32-byte vectors, wider rows take 64-byte ones): (H, W) input at pad 1, k 3.
NARROW = [
    (8, 8),  # ResNet-20 stage 3: full row pairs
    (7, 7),  # ResNet-18/50 stage 4 (flat on AVX-512: 4 vectors either way; pairs with AVX2)
    (15, 7),  # 7 of 8 lanes per half (tail), odd row count (a lone last row): pairs (8 vectors, flat 9)
    (4, 4),  # rows shorter than the distance back to the pair's second row (Wq = 6 < 8; flat on AVX-512)
    (1, 6),  # one output row: no pair, 32-byte vectors
    (5, 11),  # 11 wide: one 64-byte vector per row, tail of 11 lanes
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hw", NARROW, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize(
    "p,grad_x", [(1.0, "lp"), (1.5, "lp"), (2.0, "lp"), (1.0, "hardtanh")], ids=str
)
def test_fp32_narrow_rows_and_row_pairs(hw, p, grad_x, threads):
    # batch 3 with 2 threads splits the forward's (image, row) list mid-pair on some shapes
    c = dict(n=3, cin=5, cout=6, hw=hw, k=3, stride=1, pad=1, dil=1, p=p)
    c["grad_x"], c["grad_w"] = grad_x, "full"
    x, w, g = _case(c, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = _run(cpu_adder.adder2d_cpu, x, w, g, c)
    finally:
        torch.set_num_threads(before)
    want = _run(adder2d_reference, x.double(), w.double(), g.double(), c)
    for name, a, b in zip(("y", "grad_x", "grad_w"), got, want):
        # fp32 sums of 45 (y) to 3·6·H·W (grad_w) O(1) terms
        torch.testing.assert_close(
            a.double(), b, rtol=1e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hw", NARROW, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("grad_x", ["lp", "hardtanh"])
def test_fp32_ties_and_clamp_edges_are_exact(hw, grad_x):
    # integer data: x == w (sgn 0) and |w − x| == 1 (the clamp's edge) are frequent. Every product
    # g·sgn and g·clamp is exact and the sums are small integers, so fp32 must equal fp64 exactly:
    # this pins the one-instruction sgn (vfixupimm) and clamp (vrange) to the reference's values.
    c = dict(n=2, cin=3, cout=4, hw=hw, k=3, stride=1, pad=1, dil=1, p=1.0)
    c["grad_x"], c["grad_w"] = grad_x, "sign"
    ho, wo = hw
    x = torch.randint(-2, 3, (2, 3, ho, wo)).float()
    w = torch.randint(-2, 3, (4, 3, 3, 3)).float()
    g = torch.randint(-3, 4, (2, 4, ho, wo)).float()
    got = _run(cpu_adder.adder2d_cpu, x, w, g, c)
    want = _run(adder2d_reference, x.double(), w.double(), g.double(), c)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("offset", [0.0, 1000.0, -300.0])
def test_fp32_p1_forward_error_is_that_of_the_direct_sum(offset):
    # The p = 1 forward sums x, w and min(x, w) instead of |x − w| (fewer instructions; kernels/
    # cpu_adder.py, fwd_tile). Uncentred, a shared offset of 1000 would cost ~1000x the direct sum's
    # rounding error; centring by the filters' channel mean keeps it at the reference's level.
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9) + offset
    w = torch.randn(12, 16, 3, 3) + offset
    exact = adder2d_reference(x.double(), w.double(), padding=0)
    fast_err = (cpu_adder.adder2d_cpu(x, w, padding=0).double() - exact).abs().max()
    ref_err = (adder2d_reference(x, w, padding=0).double() - exact).abs().max()
    # (with an offset the reference is often exact: the |x − w| are coarse multiples of 2^-14; then the
    # bound is a few fp32 ulps of the output. Uncentred, the error is 0.04-0.18 here.)
    ulp = torch.finfo(torch.float32).eps * exact.abs().max()
    assert fast_err <= 4 * ref_err + 4 * ulp, (fast_err.item(), ref_err.item())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p", [1.001, 1.25, 1.5, 1.999])
def test_fp32_general_p_power_is_accurate_over_a_wide_range(p):
    # fp32 general p runs an inline 2^(q·log2|d|) (AVX-512 polynomials; libmvec's exp/log elsewhere).
    # A 1×1 layer with one zero filter gives y = −|x|^p and grad_x = g·sgn(x)|x|^(p−1) element by
    # element: check both against fp64 over |x| in [2^-20, 2^20] and at 0. Bound: 3e-6 relative, the
    # size of fp32 exp(q·log a) itself (1.2-2.0e-6 measured with numpy's float32 exp/log; ours 0.5-1.2e-6).
    a = torch.logspace(-20, 20, 4001, base=2.0)
    x = torch.cat([a, -a, torch.zeros(3)]).reshape(1, 1, 1, -1)
    w = torch.zeros(1, 1, 1, 1)
    g = torch.ones(1, 1, 1, x.shape[-1])
    xg = x.clone().requires_grad_()
    y = cpu_adder.adder2d_cpu(xg, w, p=p)
    (gx,) = torch.autograd.grad(y, xg, g)
    xd = x.double()
    want_y = -(xd.abs() ** p)
    want_gx = torch.sign(-xd) * xd.abs() ** (p - 1)  # d = w − x
    nz = xd != 0
    assert ((y.double() - want_y)[nz] / want_y[nz]).abs().max() < 3e-6
    assert ((gx.double() - want_gx)[nz] / want_gx[nz]).abs().max() < 3e-6
    assert torch.equal(y[~nz], torch.zeros_like(y[~nz])) and torch.equal(
        gx[~nz], torch.zeros_like(gx[~nz])
    )


@pytest.mark.timeout(60)
def test_thread_count_and_layout_do_not_change_results():
    c = dict(stride=2, pad=1, dil=1, p=1.0, grad_x="lp", grad_w="full")
    x = torch.randn(3, 5, 13, 13, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    g = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(cpu_adder.adder2d_cpu, x, w, g, c)
        torch.set_num_threads(2)
        two = _run(cpu_adder.adder2d_cpu, x, w, g, c)
        # batch 1 < 2 threads: the input gradient splits by channel instead of by image
        single = _run(cpu_adder.adder2d_cpu, x[:1], w, g[:1], c)
        last = _run(cpu_adder.adder2d_cpu, x.to(memory_format=torch.channels_last), w, g, c)
        strided = _run(
            cpu_adder.adder2d_cpu, x.transpose(2, 3).contiguous().transpose(2, 3), w, g, c
        )
    finally:
        torch.set_num_threads(before)
    for a, b, cl, st in zip(one, two, last, strided):
        # the per-thread filter-gradient partial sums are added in a different grouping: rounding only
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, cl, rtol=0, atol=0)
        torch.testing.assert_close(b, st, rtol=0, atol=0)
    torch.testing.assert_close(single[0], two[0][:1], rtol=0, atol=0)
    torch.testing.assert_close(single[1], two[1][:1], rtol=0, atol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "c,hw,k,stride,pad",
    [(5, 13, 3, 2, 1), (8, 13, 3, 2, 1), (5, 14, 3, 1, 1), (7, 9, 3, 1, 1), (6, 13, 1, 1, 0), (3, 28, 3, 1, 1)],
)
def test_input_gradient_of_a_small_batch_does_not_depend_on_the_thread_count(c, hw, k, stride, pad, dtype):
    # A batch smaller than the thread count splits ∂X by input channel. The flat ∂X sums a pixel's
    # contributions tile by tile, so its tap tiles must lie on one grid whatever the channel range: tiles
    # that started at the job's first tap changed the last bit on AVX-512 (8-tap tiles; 5 channels of 9
    # taps split at channel 2). Thread counts 2 and 3 put the split at different channels.
    x = torch.randn(1, c, hw, hw, dtype=dtype)
    w = torch.randn(6, c, k, k, dtype=dtype)
    before = torch.get_num_threads()
    grads = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            xg = x.clone().requires_grad_()
            y = cpu_adder.adder2d_cpu(xg, w, stride=stride, padding=pad, p=1.0)
            g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            grads.append(torch.autograd.grad(y, xg, g)[0])
    finally:
        torch.set_num_threads(before)
    assert grads[0].abs().sum() > 0
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], rtol=0, atol=0)


@pytest.mark.timeout(120)
def test_backward_scratch_is_per_thread_and_rezeroed():
    # ∂X reuses one zeroed scratch buffer per thread (_zeroed_scratch): two threads running backward
    # at once on different shapes, each alternating a large and a small layer (the small one reuses the
    # large one's dirty buffer), must each get exactly their single-threaded results.
    import threading

    c = dict(stride=2, pad=1, dil=1, p=1.0, grad_x="hardtanh", grad_w="full")
    cases = [
        [_case(dict(n=2, cin=c_in, cout=4, hw=hw, k=3, **c)) for hw in ((15, 15), (6, 5))]
        for c_in in (3, 5)
    ]
    want = [[_run(cpu_adder.adder2d_cpu, *xwg, c) for xwg in pair] for pair in cases]
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(15):
                for xwg, ref in zip(cases[i], want[i]):
                    for a, b in zip(_run(cpu_adder.adder2d_cpu, *xwg, c), ref):
                        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        except BaseException as e:  # surfaced below: a thread's assert would be lost otherwise
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.timeout(60)
def test_empty_batch_and_frozen_weight():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = cpu_adder.adder2d_cpu(x, w, padding=1)
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    # only the input needs a gradient: the filter gradient is never computed
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = cpu_adder.adder2d_cpu(x, w.detach(), padding=1, p=2.0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(adder2d_reference(x, w.detach(), padding=1, p=2.0).sum(), x)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(60)
def test_bad_input_names_the_problem():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="CPU tensors"):
        cpu_adder.adder2d_cpu(x.to("meta"), w.to("meta"))
    with pytest.raises(ValueError, match="channels"):
        cpu_adder.adder2d_cpu(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="p must lie in"):
        cpu_adder.adder2d_cpu(x, w, p=3.0)
    with pytest.raises(ValueError, match="grad_x"):
        cpu_adder.adder2d_cpu(x, w, grad_x="sign")


@pytest.fixture
def _fresh_build_state(monkeypatch, tmp_path):
    """Forget the loaded library for one test (restored afterwards); builds go to an empty cache."""
    monkeypatch.setattr(cpu_build, "_lib", None)
    monkeypatch.setattr(cpu_build, "_error", None)
    monkeypatch.setenv("ADDERNET_CACHE_DIR", str(tmp_path))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cxx", ["false", "/nonexistent/c++"])
def test_failed_build_is_a_clear_error_and_the_dispatcher_falls_back(
    _fresh_build_state, monkeypatch, cxx
):
    # `false` is a compiler that always fails; a missing path (with an empty PATH) means no compiler.
    # One fallback, in the dispatcher (issue 14): adder2d_cpu itself raises, naming the cause and the fix.
    from addernet_dist.ops import adder2d, dispatch

    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("CXX", cxx)
    if cxx.startswith("/nonexistent"):
        monkeypatch.setenv("PATH", "")
    assert not cpu_adder.is_available()
    reason = cpu_adder.unavailable_reason()
    assert reason
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="CPU fast path is unavailable") as e:
        cpu_adder.adder2d_cpu(x, w, padding=1)
    assert reason in str(e.value) and "C++ compiler" in str(e.value) and "backend=None" in str(e.value)
    with pytest.warns(RuntimeWarning, match="'cpu' is unavailable: its build failed"):
        y = adder2d(x, w, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        y2 = adder2d(x, w, padding=1, backend="cpu")
    want = adder2d_reference(x, w, padding=1)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(y2, want, rtol=0, atol=0)


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_adder.py"
    spec = importlib.util.spec_from_file_location("bench_adder", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_adder"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(120)
def test_benchmark_baselines_compute_the_adder_operator():
    # the speed-ups in BENCHMARKS.md are only meaningful if the baselines compute the same thing
    bench = _bench_module()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    want = adder2d_reference(x, w, 2, 1, 1, 1.0, "hardtanh", "full")
    g = torch.randn_like(want)
    want_gx, want_gw = torch.autograd.grad(want, (x, w), g)
    for fn in (bench.original_adder2d, bench.cdist_adder2d):
        torch.testing.assert_close(fn(x, w, 2, 1), want, rtol=1e-12, atol=1e-12)
    # the original code: HardTanh input gradient, X − F filter gradient rescaled to norm √k / 5
    gx, gw = torch.autograd.grad(bench.original_adder2d(x, w, 2, 1), (x, w), g)
    torch.testing.assert_close(gx, want_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        gw, want_gw / want_gw.norm() * w.numel() ** 0.5 / 5, rtol=1e-12, atol=1e-12
    )


@pytest.mark.timeout(120)
def test_benchmark_script_runs_on_cpu(capsys):
    bench = _bench_module()
    bench.main(
        ["--device", "cpu", "--shapes", "resnet20", "--batch", "1", "--repeat", "1"]
        + ["--skip-compile-time", "--methods", "fast,cdist,original"]
    )
    out = capsys.readouterr().out
    assert out.count("| fast |") == 5 and out.count("| original |") == 5
    assert "- cdist:" in out


@pytest.mark.timeout(60)
def test_failed_build_is_not_retried_on_every_call(_fresh_build_state, monkeypatch, tmp_path):
    log = tmp_path / "calls.log"
    cxx = tmp_path / "broken-c++"
    cxx.write_text(f"#!/bin/sh\necho x >> {log}\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    assert not cpu_adder.is_available()
    calls = log.read_text().count("x")
    assert calls > 0
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="unavailable"):
            cpu_adder.adder2d_cpu(x, w)
    assert not cpu_adder.is_available()
    assert log.read_text().count("x") == calls  # the compiler never ran again


MEMORY_SCRIPT = """
import json, sys, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from addernet_dist.kernels.cpu_adder import adder2d_cpu
which, n = sys.argv[1], int(sys.argv[2])

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))

# warm-up: load the kernels, start the thread pool and autograd on a tiny problem
xs = torch.randn(1, 2, 5, 5, requires_grad=True)
adder2d_cpu(xs, torch.randn(3, 2, 3, 3, requires_grad=True), padding=1).sum().backward()
# ResNet-50 stage-1 3x3 adder layer (64 -> 64, 56x56, pad 1) at batch n
x = torch.randn(n, 64, 56, 56, requires_grad=True)
w = torch.randn(64, 64, 3, 3, requires_grad=True)
g = torch.randn(n, 64, 56, 56)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: import-time peaks must not count
before = rss_now()
if which == "null":  # same output and input-gradient tensors, no operator memory: autograd's own cost
    (x * 1.0).backward(g)
else:
    cols = F.unfold(x.detach(), 3, padding=1) if which == "fast+im2col" else None
    adder2d_cpu(x, w, padding=1, p=1.5).backward(g)
print(json.dumps({"extra_bytes": peak_rss() - before}))
"""


def _extra_bytes(which: str, batch: int) -> int:
    from tests.train_helpers import script_json

    return script_json(MEMORY_SCRIPT, which, str(batch))["extra_bytes"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_extra_memory_is_a_few_inputs_not_an_im2col():
    input_bytes = 8 * 64 * 56 * 56 * 4  # 6.1 MiB
    null = _extra_bytes("null", 8)  # measured 46 MiB: output, input gradient, autograd's buffers
    fast = _extra_bytes("fast", 8) - null  # measured 16 MiB (P, its gradient, oneDNN chunk scratch)
    # stated bound (kernels/cpu_adder.py): the padded input P, its gradient buffer and the un-padding
    # copy of the input gradient — about 3 inputs; an im2col of this layer alone is 9 inputs (55 MiB)
    assert fast < 4 * input_bytes, f"{fast / 2**20:.1f} MiB beyond autograd's own"
    # control: the same measurement does see a column tensor when one is materialised
    assert _extra_bytes("fast+im2col", 8) - null > 4 * input_bytes


def _child_forward(q):
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float64).reshape(2, 3, 6, 6) / 50
    w = torch.linspace(-1, 1, 4 * 3 * 9, dtype=torch.float64).reshape(4, 3, 3, 3)
    q.put(cpu_adder.adder2d_cpu(x, w, padding=1).sum().item())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_forked_child_can_use_the_kernels_after_the_parent_did():
    # DataLoader workers and torchrun-spawned helpers fork a parent whose thread pool is already
    # running; the child has none of its threads and must build its own instead of waiting forever
    import multiprocessing as mp

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        q = mp.get_context("fork").Queue()
        _child_forward(q)  # the parent uses (and so starts) the pool
        want = q.get(timeout=30)
        proc = mp.get_context("fork").Process(target=_child_forward, args=(q,))
        proc.start()
        got = q.get(timeout=60)
        proc.join(timeout=30)
    finally:
        torch.set_num_threads(before)
    assert proc.exitcode == 0
    assert got == want


@pytest.mark.timeout(60)
def test_benchmark_resnet20_shapes_and_counts_are_the_models_layers():
    # bench_adder.py's network total (BENCHMARKS.md, "the network's 18 3x3 adder layers") weighs each
    # shape by its count: those must be the adder ResNet-20's own 3×3 layers, shape for shape
    from collections import Counter

    from addernet_dist.models import create_model
    from addernet_dist.nn import Adder2d

    bench = _bench_module()
    want = Counter()
    model = create_model("resnet20", num_classes=10)
    sizes = {}

    def hook(mod, inp, _out):
        sizes[mod] = inp[0].shape[-1]

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Adder2d)]
    model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    for m, hw in sizes.items():
        if m.weight.shape[-1] == 3:
            o, c = m.weight.shape[:2]
            want[(c, o, hw, m.stride[0] if isinstance(m.stride, tuple) else m.stride)] += 1
    got = Counter({(s.cin, s.cout, s.hw, s.stride): s.count for s in bench.SHAPES["resnet20"]()})
    assert got == want and sum(got.values()) == 18


@pytest.mark.timeout(120)
def test_built_for_this_cpu_when_the_compiler_can(tmp_path):
    # The kernels must compile with -march=native wherever the compiler accepts it: on an AVX2-only
    # CPU the source once failed there (immintrin.h was included for AVX-512 only) and the launcher
    # silently loaded its baseline x86-64 fallback, 4-12x slower.
    import subprocess

    cxx = cpu_build._compiler()
    probe = tmp_path / "t.cpp"
    probe.write_text("int main() { return 0; }\n")
    ok = subprocess.run([cxx, "-march=native", "-c", str(probe), "-o", str(tmp_path / "t.o")])
    if ok.returncode != 0:
        pytest.skip("this compiler rejects -march=native (the fallback build is then expected)")
    assert cpu_build._arch == ["-march=native"]


# (n, cin, cout, (h, w), k, stride, pad): 14-, 7-, 11→6- and 36-wide outputs take the flat position range
FLAT_CASES = [
    (2, 37, 19, (14, 14), 3, 1, 1),
    (1, 33, 21, (7, 7), 1, 1, 0),
    (2, 9, 13, (13, 11), 3, 2, 1),
    (3, 20, 6, (11, 13), 1, 2, 0),
    (2, 5, 7, (36, 36), 1, 1, 0),  # a plane over 32×32 with Wq = Wo (1×1): flat, y and g used as they are
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [1, 64 << 10])
@pytest.mark.parametrize("case", FLAT_CASES)
def test_flat_positions_and_tap_chunks_match_the_reference(case, chunk, monkeypatch):
    # fwd_flat / gx_flat: one position range per image (rows of 14 or 7 otherwise end in partial
    # vectors), filters packed per tile, taps in chunks (chunk = 1 byte: 16 taps per chunk, so y
    # accumulates over several chunks and the last one is partial)
    monkeypatch.setattr(cpu_adder, "_FLAT_CHUNK_BYTES", chunk)
    n, cin, cout, hw, k, s, pd = case
    for dtype in (torch.float32, torch.float64):
        g = cpu_adder._Geom((n, cin, *hw), (cout, cin, k, k), (s, s), (pd, pd), (1, 1),
                            output_size(*hw, (k, k), (s, s), (pd, pd), (1, 1)), dtype)  # fmt: skip
        # (rows of <= 8 fp32 pair up in 16-lane vectors on AVX-512 instead)
        for mode in (1, 3):
            assert g.flat_for(mode) or (g.wide_for(mode) == 2 and hw[1] < 14), (case, dtype)
        x = torch.randn(n, cin, *hw, dtype=dtype)
        w = torch.randn(cout, cin, k, k, dtype=dtype)
        for p, grad_x in ((1.0, "lp"), (2.0, "hardtanh"), (1.5, "lp"), (1.0, "hardtanh")):
            c = dict(stride=s, pad=pd, dil=1, p=p, grad_x=grad_x, grad_w="full")
            y = adder2d_reference(x, w, s, pd, 1, p)
            gy = torch.randn_like(y)
            got = _run(cpu_adder.adder2d_cpu, x, w, gy, c)
            want = _run(adder2d_reference, x.double(), w.double(), gy.double(), c)
            tol = 1e-12 if dtype == torch.float64 else 3e-6
            for name, a, b in zip(("y", "gx", "gw"), got, want):
                err = ((a.double() - b).abs().max() / b.abs().max()).item()
                assert err < tol, (case, dtype, p, grad_x, name, err)


# (n, cin, cout, (h, w), k, stride, pad): row path, flat path (14/7/odd widths), batch 1 < 2 threads
# (filter-range split of the flat forward, channel split of ∂X), strided layout calls
OMP_CASES = [
    (3, 5, 7, (13, 13), 3, 2, 1),
    (1, 33, 29, (14, 14), 1, 1, 0),
    (2, 9, 13, (7, 7), 3, 1, 1),
    (1, 6, 5, (11, 9), 3, 1, 2),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", OMP_CASES)
def test_openmp_threads_give_the_python_threads_results(case, monkeypatch):
    # for_jobs (cpu_adder.h) runs a launcher's job list on OpenMP threads in one call; each job must
    # compute exactly what the same job computes as a call of its own (the Python-thread path, one call
    # per job): forward (row and flat), ∂X, the "sign" filter gradient with its per-job buffers, the
    # layout passes and the fused epilogue, at 2 threads, bit for bit.
    assert cpu_build._lib.adder_openmp() == 1  # GCC builds with -fopenmp (see _OPENMP_FLAGS)
    n, cin, cout, hw, k, s, pd = case
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(n, cin, *hw, dtype=dtype)
            w = torch.randn(cout, cin, k, k, dtype=dtype)
            ho, wo = output_size(*hw, (k, k), (s, s), (pd, pd), (1, 1))
            gy = torch.randn(n, cout, ho, wo, dtype=dtype)
            scale, shift, center = (torch.randn(cout, dtype=dtype) for _ in range(3))
            res = []
            for omp in (True, False):
                monkeypatch.setattr(cpu_build, "_use_openmp", omp)
                out = []
                for p, grad_x, grad_w in ((1.0, "lp", "sign"), (2.0, "hardtanh", "full"), (1.5, "lp", "full")):
                    c = dict(stride=s, pad=pd, dil=1, p=p, grad_x=grad_x, grad_w=grad_w)
                    out += _run(cpu_adder.adder2d_cpu, x, w, gy, c)
                out.append(cpu_adder.adder2d_forward_cpu(x, w, s, pd, 1, 1.0, scale=scale, shift=shift,
                                                         center=center, residual=gy, relu=True))  # fmt: skip
                res.append(out)
            for a, b in zip(*res):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            # and both are the operator (a job list that skipped a job would agree with itself)
            want = _run(adder2d_reference, x.double(), w.double(), gy.double(),
                        dict(stride=s, pad=pd, dil=1, p=1.0, grad_x="lp", grad_w="sign"))  # fmt: skip
            for a, b in zip(res[0][:2], want[:2]):
                assert ((a.double() - b).abs().max() / b.abs().max()).item() < 3e-6
    finally:
        torch.set_num_threads(before)


@pytest.mark.timeout(60)
def test_kernels_share_torchs_openmp_runtime():
    # One OpenMP runtime in the process: the kernels' libgomp.so.1 must be the copy torch loaded (a
    # second runtime would bring a second thread pool spinning on the same 2 cores). Checked in a
    # fresh process: this one holds whatever other tests loaded (scikit-learn's own libgomp, loaded by
    # tests/unit/test_analyze.py, made this test pass or fail with the order the tests ran in).
    from tests.train_helpers import script_json

    gomp = script_json(OPENMP_SCRIPT)
    assert len(gomp) == 1, gomp


OPENMP_SCRIPT = """
import json
import torch
from addernet_dist.kernels import cpu_build
cpu_build.build()
maps = open("/proc/self/maps").read().splitlines()
print(json.dumps(sorted({ln.split()[-1] for ln in maps if "gomp" in ln or "libomp" in ln or "iomp" in ln})))
"""


# (n, cin, cout, (h, w), k, stride, pad, dil): 3×3 (padding read from P), strided 1×1 and 3×3 (the saved
# input, padded per image), dilation, odd sizes
GEMM_GW_CASES = [
    (2, 5, 7, (9, 11), 3, 1, 1, 1),
    (3, 4, 6, (13, 13), 1, 2, 0, 1),
    (2, 3, 5, (12, 10), 3, 2, 1, 1),
    (1, 6, 4, (11, 9), 3, 1, 2, 2),
    (2, 3, 3, (10, 13), 3, 2, 2, 2),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", GEMM_GW_CASES)
def test_gemm_filter_gradient_matches_the_reference(case, monkeypatch):
    # _gw_gemm: the "full" filter gradient as per-image GEMMs over an as_strided im2col (taken on
    # ResNet-50's many-channel layers; forced here on small ones by lowering its channel threshold)
    monkeypatch.setattr(cpu_adder, "_GW_GEMM_MIN_CHANNELS", 1)
    n, cin, cout, hw, k, s, pd, d = case
    for dtype in (torch.float64, torch.float32):
        g = cpu_adder._Geom((n, cin, *hw), (cout, cin, k, k), (s, s), (pd, pd), (d, d),
                            output_size(*hw, (k, k), (s, s), (pd, pd), (d, d)), dtype)  # fmt: skip
        assert cpu_adder._gw_by_gemm(g) == (k > 1 or s > 1)
        x = torch.randn(n, cin, *hw, dtype=dtype)
        w = torch.randn(cout, cin, k, k, dtype=dtype)
        c = dict(stride=s, pad=pd, dil=d, p=1.0, grad_x="lp", grad_w="full")
        gy = torch.randn_like(adder2d_reference(x, w, s, pd, d))
        got = _run(cpu_adder.adder2d_cpu, x, w, gy, c)[2]
        want = _run(adder2d_reference, x.double(), w.double(), gy.double(), c)[2]
        tol = 1e-12 if dtype == torch.float64 else 3e-6
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol, (case, dtype)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hw,s", [((13, 13), 2), ((12, 11), 3), ((7, 10), (2, 3)), ((1, 5), 2)])
def test_strided_1x1_runs_as_a_dense_layer_on_the_subsampled_input(hw, s):
    # _strided_1x1_as_dense: a 1×1 stride-s layer without padding is the stride-1 layer on x[::s, ::s]
    # (odd sizes: the floor in the output size drops the last row/column); autograd scatters ∂X back
    sh, sw = (s, s) if isinstance(s, int) else s
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(2, 5, *hw, dtype=dtype)
        w = torch.randn(7, 5, 1, 1, dtype=dtype)
        out_hw = output_size(*hw, (1, 1), (sh, sw), (0, 0), (1, 1))
        xs, st, _ = cpu_adder._strided_1x1_as_dense(x, w, (sh, sw), (0, 0), (1, 1), out_hw)
        assert st == (1, 1) and tuple(xs.shape[-2:]) == out_hw
        gy = torch.randn(2, 7, *out_hw, dtype=dtype)
        for grad_x, grad_w in (("lp", "full"), ("hardtanh", "sign")):
            c = dict(stride=(sh, sw), pad=0, dil=1, p=1.0, grad_x=grad_x, grad_w=grad_w)
            got = _run(cpu_adder.adder2d_cpu, x, w, gy, c)
            want = _run(adder2d_reference, x.double(), w.double(), gy.double(), c)
            tol = 1e-12 if dtype == torch.float64 else 3e-6
            for name, a, b in zip(("y", "gx", "gw"), got, want):
                err = ((a.double() - b).abs().max() / b.abs().max()).item()
                assert err < tol, (hw, s, dtype, name, err)
        scale, shift = torch.rand(7, dtype=dtype) + 0.5, torch.randn(7, dtype=dtype)
        # (no ReLU: adder outputs are all negative, so a ReLU'd output could be all zeros)
        fused = cpu_adder.adder2d_forward_cpu(x, w, (sh, sw), 0, 1, 1.0, scale=scale, shift=shift)
        ref = adder2d_reference(x.double(), w.double(), (sh, sw), 0, 1, 1.0)
        ref = ref * scale.double()[:, None, None] + shift.double()[:, None, None]
        assert ((fused.double() - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.mark.timeout(120)
def test_thread_scaling_benchmark_runs_on_cpu(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_adder_threads.py"
    spec = importlib.util.spec_from_file_location("bench_adder_threads", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = torch.get_num_threads()
    try:
        mod.main(["--repeat", "1", "--batch", "1"])
    finally:
        torch.set_num_threads(before)
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == len(mod.SHAPES) and all(r.count("2T/1T") == 4 for r in rows)
