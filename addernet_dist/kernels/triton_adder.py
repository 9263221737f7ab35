"""Triton adder convolution: forward (with fused BN epilogues), ∂L/∂X and ∂L/∂F, no im2col anywhere.

Shape legend: N batch, C input channels, O output channels, H×W input, P×Q output (H', W'), R×S kernel,
M = N·P·Q output positions. x_nchw / y_nopq / g_nopq take arbitrary strides (NCHW and channels_last
run the same kernel); the filters are re-laid out on the host (tiny) as w_rsco (R, S, C, O) for the
forward — a row of O filters per tap is one contiguous load — and w_rsoc (R, S, O, C) for ∂L/∂X.

Semantics are those of ``addernet_dist.ops.reference.adder2d_reference`` (the specification):
    y = −Σ |x − w|^p   (zero padding is real: a padded tap contributes |0 − w|^p)
    ∂L/∂F = Σ g·(x − w)        grad_w="full"  (eq. 23)     | Σ g·sgn(x − w)          grad_w="sign"
    ∂L/∂X = Σ g·HardTanh(w − x) grad_x="hardtanh"           | Σ g·sgn(w−x)|w−x|^(p−1)  grad_x="lp"

Hot-loop structure (all three kernels): an outer-product ("rank-1 update") loop. Each program owns a
BLOCK_M × BLOCK_N tile of accumulators in registers; per reduction step it loads one column of BLOCK_M
values and one row of BLOCK_N values and updates every accumulator. Each thread therefore reuses every
loaded x across all its output channels, and the per-MAC work is the arithmetic only: for the p=1
forward `FADD d = x − w; FADD acc += |d|` (abs folded as an operand modifier) — see
benchmarks/kernel_report.py for the SASS count per MAC. Index math (tap position, padding masks) is
hoisted out of the channel loop; the channel loop is unrolled BLOCK_K times so its loop overhead and
pointer bumps are amortised.

General p (1 < p < 2): |d|^p = exp2(p·log2|d|) on the approximate SFU instructions (MUFU.LG2, MUFU.EX2;
|d| folded into LG2's operand). Both are accurate to ~2^-22 relative (PTX ISA: lg2.approx max abs error
2^-22.6 for the mantissa part, ex2.approx max rel error 2^-22.5), so |d|^p is within ~p·2^-22·ln2·|log2|d||
≈ 3e-6 relative for |d| ∈ [2^-8, 2^8], i.e. at the level of fp32 rounding of the K-term sum itself.
docs/kernels.md discusses the throughput (two SFU ops per MAC) and why we did not go polynomial.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from addernet_dist.kernels.tile_tuner import TileTuner
from addernet_dist.ops.reference import check_args, check_conv_args, compute_dtype

# P_MODE constexpr values: exact fast paths at the two ends of the ℓp schedule, one general path.
P_GENERAL, P_ONE, P_TWO = 0, 1, 2
# EPILOGUE constexpr values of the forward kernel.
EPI_NONE, EPI_BN_STATS, EPI_AFFINE = 0, 1, 2
# GX_MODE constexpr values of the ∂L/∂X kernel.
GX_HARDTANH, GX_SIGN, GX_LINEAR, GX_POW = 0, 1, 2, 3

_INT32_MAX = 2**31 - 1
# Filter rows are zero-padded to a multiple of this; every BLOCK_N of the forward/∂X configs (and the
# interpreter's) must divide it, or the unmasked filter loads would read past the buffer.
_W_PAD = 64
# ∂X filter rows per tap are padded to a multiple of this; every ∂X BLOCK_K must divide it.
_DX_O_PAD = 8


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
# Kernels call only triton.language builtins and this module's own @triton.jit helpers (tl.full, not
# tl.zeros; tl.reduce(·, tl.standard._sum_combine), not tl.sum): triton's library helpers are
# compiled-mode objects when triton was imported before TRITON_INTERPRET was set, and the interpreter
# (kernels/triton_testing.py) cannot call those. _sum_combine is only passed, never called by the
# interpreter: it recognises that exact object and uses np.sum (a Python combine function instead made
# the CPU tests 5× slower: one call per element).


@triton.jit
def _pow_abs(d, e, FAST_MATH: tl.constexpr):
    """|d|^e for 1 ≤ e ≤ 2 (e = p) or 0 < e < 1 (e = p − 1), as exp2(e·log2|d|); 0 at d = 0.

    FAST_MATH (CUDA, fp32): one PTX block = MUFU.LG2 (|d| folded in as an operand modifier), FMUL, MUFU.EX2:
    3 instructions where tl.log2/tl.exp2 cost ~25 (tl.log2 lowers to libdevice's accurate __nv_log2f, a
    polynomial: 32.9 vs 5.3 SASS instructions per MAC in the report). Accuracy: lg2.approx has ≤ 2^-22.6
    absolute error, ex2.approx ≤ 2^-22.5 relative (PTX ISA), so |d|^e is within ~(1 + e·ln2·|log2|d||)·2^-22
    relative — ≤ 2e-6 for |d| ∈ [2^-8, 2^8], the same order as fp32 rounding of the K-term sum. ftz flushes
    |d| < 2^-126 to 0, whose true contribution (< 2^-126) is below fp32 resolution of any sum it enters.
    The interpreter (CPU tests) has no inline PTX and takes the exp2/log2 branch: the same function.
    """
    if FAST_MATH:
        return tl.inline_asm_elementwise(
            """{
            .reg .f32 t;
            abs.f32 t, $1;
            lg2.approx.ftz.f32 t, t;
            mul.ftz.f32 t, t, $2;
            ex2.approx.ftz.f32 $0, t;
            }""",
            "=r,r,r",
            [d, e],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        # 0^e: log2(0) = −inf → exp2(−inf) = 0, the right limit for e > 0.
        return tl.exp2(e * tl.log2(tl.abs(d)))


# exp2 on the FMA pipe (no SFU): 2^y = 2^n · 2^f, n = round(y), f ∈ [−½, ½]. Degree-5 polynomial for 2^f,
# fitted for relative error on [−½, ½] (Lawson-weighted least squares, 7.5e-8 in exact arithmetic; 2.3e-7
# evaluated in fp32 with this range reduction over y ∈ [−126, 127], i.e. ex2.approx's 2^-22.5 ≈ 1.7e-7).
_E2_C0 = tl.constexpr(1.00000007)
_E2_C1 = tl.constexpr(0.69314697)
_E2_C2 = tl.constexpr(0.2402212)
_E2_C3 = tl.constexpr(0.05550713)
_E2_C4 = tl.constexpr(0.00967554)
_E2_C5 = tl.constexpr(0.00132765)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5·2^23: y + it holds round(y) in the low mantissa bits


@triton.jit
def _pow_abs_fma_exp2(d, e, FAST_MATH: tl.constexpr):
    """|d|^e like _pow_abs, with the exp2 on the FMA pipe instead of MUFU.EX2 (fp32 only).

    Why: the general-p forward is bound by the SFU (two MUFU per MAC at 16/clk/SM = 16 cycles per warp
    and MAC, against 5.4 issue cycles). Moving the exp2 of some MACs to ~12 FMA-pipe instructions (2
    clamps, 3 for the range reduction, 5 FFMA, 2 integer ops for the exponent) spends idle issue
    slots to free MUFU cycles: with half of the MACs on this path the model is max(12 MUFU, 10.6 issue)
    = 12 cycles per MAC instead of 16 (docs/kernels.md; 10.6 is the SASS report's count). The log2 stays on MUFU.LG2.
    Edges: |d| = 0 gives 2^-126 (≈ 1e-38, below the resolution of any sum it enters) instead of 0;
    |d|^e beyond fp32 saturates at 2^127.99 instead of inf; NaN propagates.
    """
    if FAST_MATH:
        y = tl.inline_asm_elementwise(
            """{
            .reg .f32 t;
            abs.f32 t, $1;
            lg2.approx.ftz.f32 t, t;
            mul.ftz.f32 $0, t, $2;
            }""",
            "=r,r,r",
            [d, e],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        y = e * tl.log2(tl.abs(d))
    y = tl.minimum(tl.maximum(y, -126.0, tl.PropagateNan.ALL), 127.99, tl.PropagateNan.ALL)
    t = y + _ROUND_MAGIC
    f = y - (t - _ROUND_MAGIC)
    q = ((((_E2_C5 * f + _E2_C4) * f + _E2_C3) * f + _E2_C2) * f + _E2_C1) * f + _E2_C0
    # t's mantissa is 2^22 + n: shifted by 23 the 2^22 leaves the word and n·2^23 is left, the exponent
    # increment (two's complement for n < 0)
    bits = q.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _adder_fwd_kernel(
    x_ptr,  # (N, C, H, W) input, any strides, fp32/fp16/bf16/fp64
    w_ptr,  # (R, S, C, OP) contiguous fp32/fp64 filters (w_rsco), O zero-padded to OP (a multiple of 64)
    y_ptr,  # (N, O, P, Q) output, any strides, input dtype
    part_ptr,  # (num_m_blocks, 2, O) fp32: per-block channel mean and M2 (EPILOGUE == EPI_BN_STATS)
    center_ptr,  # (O,) fp32 subtracted before the scale (EPILOGUE == EPI_AFFINE)
    scale_ptr,  # (O,) fp32 folded BN scale (EPILOGUE == EPI_AFFINE)
    shift_ptr,  # (O,) fp32 folded BN shift (EPILOGUE == EPI_AFFINE)
    res_ptr,  # (N, O, P, Q) residual added after the affine (HAS_RES)
    p,  # fp32 exponent, read only when P_MODE == P_GENERAL
    N,
    C,
    H,
    W,
    O,  # noqa: E741 (the shape legend letter)
    OP,  # padded O: the w_rsco row stride
    P,
    Q,
    sxn,  # x strides (elements)
    sxc,
    sxh,
    sxw,
    syn,  # y strides
    syc,
    syh,
    syw,
    srn,  # residual strides
    src,
    srh,
    srw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    P_MODE: tl.constexpr,
    FAST_MATH: tl.constexpr,  # approximate SFU log2/exp2 for the general-p path (CUDA, fp32)
    FMA_EXP2_OK: tl.constexpr,  # fp32 compute: the FMA-pipe exp2 may be used (EXP2_FMA)
    EPILOGUE: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 inputs
    BLOCK_M: tl.constexpr,  # output positions per program
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per unrolled step
    EXP2_FMA: tl.constexpr,  # general p: of each BLOCK_K channels, this many take the FMA-pipe exp2
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    PQ = P * Q
    M = N * PQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < O
    n_img = offs_m // PQ
    pq = offs_m % PQ
    oh = pq // Q
    ow = pq % Q
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + n_img * sxn

    # acc is (channels, positions): Triton's default layout spreads the LAST dim over the 32 lanes and the
    # warps and keeps the first dim inside each thread, so every thread owns BLOCK_N × BLOCK_M/(32·warps)
    # accumulators: per channel step it loads its few x values (coalesced across the warp) and the BLOCK_N
    # filter values (warp-uniform, one vector load) and does BLOCK_N·BLOCK_M/(32·warps) MACs in registers.
    # The (positions, channels) order puts one channel per thread and costs ~1 load per MAC (measured in
    # the SASS report: 4.6 vs 2.x instructions per MAC).
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, ACC_DTYPE)
    C_main = C - C % BLOCK_K
    for r in tl.static_range(R):
        ih = ih0 + r * dil_h
        h_ok = m_mask & (ih >= 0) & (ih < H)
        for s in tl.static_range(S):
            iw = iw0 + s * dil_w
            # Out-of-image taps load 0 and still contribute |0 − w|^p: padding is real (the spec).
            tap_ok = h_ok & (iw >= 0) & (iw < W)
            x_tap = x_img + ih * sxh + iw * sxw
            # No mask on w: the host pads O to OP, so the BLOCK_N-row load is unpredicated and vectorised
            # (LDG.128); a per-element mask cost 2 extra instructions per load in the SASS report.
            w_tap = w_ptr + (r * S + s) * C * OP + offs_n
            # Main channel loop: no channel mask (the tail below handles C % BLOCK_K). The |d|^p code is
            # written out in both loops instead of a @triton.jit helper: the interpreter re-patches
            # triton.language on every helper call, which made the CPU tests 25% slower.
            for c0 in range(0, C_main, BLOCK_K):
                for kk in tl.static_range(BLOCK_K):
                    xv = tl.load(x_tap + (c0 + kk) * sxc, mask=tap_ok, other=0.0).to(ACC_DTYPE)
                    wv = tl.load(w_tap + (c0 + kk) * OP).to(ACC_DTYPE)
                    d = xv[None, :] - wv[:, None]
                    if P_MODE == 1:
                        acc += tl.abs(d)
                    elif P_MODE == 2:
                        acc += d * d
                    elif FMA_EXP2_OK and kk < EXP2_FMA:
                        acc += _pow_abs_fma_exp2(d, p, FAST_MATH)
                    else:
                        acc += _pow_abs(d, p, FAST_MATH)
            for c in range(C_main, C):
                xv = tl.load(x_tap + c * sxc, mask=tap_ok, other=0.0).to(ACC_DTYPE)
                wv = tl.load(w_tap + c * OP).to(ACC_DTYPE)
                d = xv[None, :] - wv[:, None]
                if P_MODE == 1:
                    acc += tl.abs(d)
                elif P_MODE == 2:
                    acc += d * d
                else:
                    acc += _pow_abs(d, p, FAST_MATH)

    # Epilogue on the (channels, positions) tile: no transpose (it would round-trip through shared memory).
    y = -acc
    tile_mask = n_mask[:, None] & m_mask[None, :]
    if EPILOGUE == 2:
        # (y − center)·scale + shift rather than y·scale' + shift': adder outputs sit far from 0 (≈ −1000
        # around a spread of ~10), and folding the mean into the shift would cancel ~2 digits in fp32.
        center = tl.load(center_ptr + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)
        scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)
        shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0).to(ACC_DTYPE)
        y = (y - center[:, None]) * scale[:, None] + shift[:, None]
        if HAS_RES:
            r_off = n_img * srn + oh * srh + ow * srw
            res = tl.load(
                res_ptr + offs_n[:, None] * src + r_off[None, :], mask=tile_mask, other=0.0
            )
            y += res.to(ACC_DTYPE)
        if RELU:
            y = tl.maximum(y, 0.0)
    y_off = n_img * syn + oh * syh + ow * syw
    y_out = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_n[:, None] * syc + y_off[None, :], y_out, mask=tile_mask)
    if EPILOGUE == 1:
        # BatchNorm batch statistics from the registers, never re-reading y: per block the channel mean
        # and the sum of squared deviations from it (M2). Centring per block (Chan et al.'s parallel
        # variance) matters for adder outputs: they are large and negative (−Σ|x−w| ≈ −1000 for a
        # 3×3×128 layer) with a spread of O(10), so E[y²] − E[y]² would cancel ~5 of fp32's 7 digits.
        # Statistics use the value rounded to the storage dtype, i.e. exactly what an unfused BN reads.
        ys = y_out.to(ACC_DTYPE)
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
        mean = tl.reduce(tl.where(tile_mask, ys, 0.0), 1, tl.standard._sum_combine) / rows
        dev = tl.where(tile_mask, ys - mean[:, None], 0.0)
        m2 = tl.reduce(dev * dev, 1, tl.standard._sum_combine)
        part = part_ptr + pid_m * 2 * O + offs_n
        tl.store(part, mean.to(tl.float32), mask=n_mask)
        tl.store(part + O, m2.to(tl.float32), mask=n_mask)


@triton.jit
def _adder_bwd_dx_kernel(
    g_ptr,  # (N, O, P, Q) upstream gradient, any strides
    x_ptr,  # (N, C, H, W) saved input, any strides
    w_ptr,  # (R, S, OK, CP) contiguous fp32/fp64 filters (w_rsoc, pre-transformed for GX_MODE), zero-padded
    dx_ptr,  # (N, C, H, W) output gradient, same strides as x
    p,  # fp32 exponent, read only when GX_MODE == GX_POW
    N,
    C,
    CP,  # padded C: the w_rsoc row stride
    H,
    W,
    O,  # noqa: E741 (the shape legend letter)
    OK,  # O rounded up to a multiple of 8 (≥ BLOCK_K): the filter rows per tap in w_rsoc
    P,
    Q,
    sgn_,  # g strides
    sgc,
    sgh,
    sgw,
    sxn,  # x strides (dx uses the same strides)
    sxc,
    sxh,
    sxw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    GX_MODE: tl.constexpr,
    FAST_MATH: tl.constexpr,
    FMA_EXP2_OK: tl.constexpr,  # fp32 compute: the FMA-pipe exp2 may be used (EXP2_FMA)
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # input positions (n, ih, iw) per program
    BLOCK_N: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # output channels per unrolled step
    EXP2_FMA: tl.constexpr,  # GX_POW: of each BLOCK_K output channels, this many take the FMA-pipe exp2
):
    # Gather form: every input element sums over the (tap, output channel) pairs that read it, so no
    # atomics and no im2col. The x tile is loaded once and stays in registers; the tile is (channels,
    # positions) for the same per-thread register blocking as the forward.
    # Stride phases: program_id(2) picks the phase (a, b) = (ih mod stride_h, iw mod stride_w) and the
    # program's positions all lie in it. A tap (r, s) reads a position of that phase iff
    # (a + pad_h − r·dil_h) and (b + pad_w − s·dil_w) are multiples of the strides, the same for the
    # whole program, so the taps that never apply are skipped by a uniform branch instead of being
    # computed under a mask (stride 2, 3×3: 2.25 taps of 9 per position on average, not 9).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    pa = phase // stride_w
    pb = phase % stride_w
    Hp = (H - pa + stride_h - 1) // stride_h  # rows of this phase
    Wp = (W - pb + stride_w - 1) // stride_w
    HWp = Hp * Wp
    M = N * HWp
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    c_mask = offs_c < C
    n_img = offs_m // HWp
    hw = offs_m % HWp
    ih = pa + (hw // Wp) * stride_h
    iw = pb + (hw % Wp) * stride_w
    x_off = n_img * sxn + ih * sxh + iw * sxw
    tile_mask = c_mask[:, None] & m_mask[None, :]
    xt = tl.load(x_ptr + offs_c[:, None] * sxc + x_off[None, :], mask=tile_mask, other=0.0).to(
        ACC_DTYPE
    )
    g_img = g_ptr + n_img * sgn_
    # Hot-loop forms (2–3 SASS per MAC instead of 5–6 for clamp / sign selects):
    #   hardtanh(d) = 2·sat(d/2 + 1/2) − 1   host passes w/2 + 1/2, x/2 here: one FADD.SAT per MAC
    #   sgn(d)      = 2·sat(d·2^64 + 1/2) − 1  host passes w·2^64: FADD, FADD.SAT. Exact at d = 0 and for
    #                 |d| ≥ 2^-64 (scaling by 2^64 is exact), a ramp only for 0 < |d| < 2^-64.
    #   d (p = 2)   Σ g·(w − x) = Σ g·w − x·Σ g: one FFMA per MAC.
    # The "2·acc − Σg" and "− x·Σg" corrections are applied once in the epilogue (Σg per position).
    if GX_MODE == 0:
        xk = xt * 0.5
    elif GX_MODE == 1:
        xk = xt * 18446744073709551616.0  # 2^64
    else:
        xk = xt

    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, ACC_DTYPE)
    gsum = tl.full((BLOCK_M,), 0.0, ACC_DTYPE)
    for r in tl.static_range(R):
        th = ih + pad_h - r * dil_h
        oh = th // stride_h
        h_ok = m_mask & (th >= 0) & (oh * stride_h == th) & (oh < P)
        r_hits = (pa + pad_h - r * dil_h) % stride_h == 0  # C remainder: 0 iff divisible, any sign
        for s in tl.static_range(S):
            tw = iw + pad_w - s * dil_w
            ow = tw // stride_w
            tap_ok = h_ok & (tw >= 0) & (ow * stride_w == tw) & (ow < Q)
            # A masked g is 0, so whatever the factor is, the term (and its Σg share) vanishes; the
            # filter rows are zero-padded up to a multiple of BLOCK_K, so no tail loop is needed.
            g_tap = g_img + oh * sgh + ow * sgw
            w_tap = w_ptr + (r * S + s) * OK * CP + offs_c
            s_hits = (pb + pad_w - s * dil_w) % stride_w == 0
            # taps of other phases: zero trips (a uniform skip; the mask above still handles borders)
            o_end = tl.where(r_hits & s_hits, O, 0)
            for o0 in range(0, o_end, BLOCK_K):
                for kk in tl.static_range(BLOCK_K):
                    o = o0 + kk
                    gv = tl.load(g_tap + o * sgc, mask=tap_ok & (o < O), other=0.0).to(ACC_DTYPE)
                    wv = tl.load(w_tap + o * CP).to(ACC_DTYPE)
                    if GX_MODE == 0:
                        f = tl.minimum(tl.maximum(wv[:, None] - xk, 0.0), 1.0)
                        acc += gv[None, :] * f
                    elif GX_MODE == 1:
                        f = tl.minimum(tl.maximum((wv[:, None] - xk) + 0.5, 0.0), 1.0)
                        acc += gv[None, :] * f
                    elif GX_MODE == 2:
                        acc += gv[None, :] * wv[:, None]
                    else:
                        d = wv[:, None] - xt
                        if FMA_EXP2_OK and kk < EXP2_FMA:
                            mag = _pow_abs_fma_exp2(d, p - 1.0, FAST_MATH)
                        else:
                            mag = _pow_abs(d, p - 1.0, FAST_MATH)
                        acc += gv[None, :] * tl.where(d < 0, -mag, mag)
                    gsum += gv
    if GX_MODE == 0 or GX_MODE == 1:
        acc = 2.0 * acc - gsum[None, :]
    elif GX_MODE == 2:
        acc = acc - xt * gsum[None, :]
    tl.store(
        dx_ptr + offs_c[:, None] * sxc + x_off[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=tile_mask,
    )


@triton.jit
def _adder_bwd_dw_kernel(
    g_ptr,  # (N, O, P, Q) upstream gradient, any strides
    x_ptr,  # (N, C, H, W) saved input, any strides
    w_ptr,  # (O, C, R, S) filters, contiguous
    dw_ptr,  # fp32: (SPLIT, R·S, O, C) partials (deterministic) or (R·S, O, C) atomic target
    N,
    C,
    H,
    W,
    O,  # noqa: E741 (the shape legend letter)
    P,
    Q,
    sgn_,
    sgc,
    sgh,
    sgw,
    sxn,
    sxc,
    sxh,
    sxw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    R: tl.constexpr,
    S: tl.constexpr,
    SIGN: tl.constexpr,  # grad_w="sign"
    ATOMIC: tl.constexpr,  # float atomics into one buffer (non-deterministic order)
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # output channels per program (≥ 16: tl.dot)
    BLOCK_N: tl.constexpr,  # input channels per program (≥ 16)
    BLOCK_K: tl.constexpr,  # output positions per GEMM step (grad_w="full"; ≥ 16)
):
    # One program: a BLOCK_M(O) × BLOCK_N(C) tile of one tap (r, s), reduced over a slice of the
    # output rows (N·P rows of Q positions each).
    pid_t = tl.program_id(0)
    rs = tl.program_id(1)
    pid_split = tl.program_id(2)
    num_c_blocks = (C + BLOCK_N - 1) // BLOCK_N
    pid_o = pid_t // num_c_blocks
    pid_c = pid_t % num_c_blocks
    r = rs // S
    s = rs % S
    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = offs_o < O
    c_mask = offs_c < C
    tile_mask = o_mask[:, None] & c_mask[None, :]
    wt = tl.load(
        w_ptr + offs_o[:, None] * (C * R * S) + offs_c[None, :] * (R * S) + rs,
        mask=tile_mask,
        other=0.0,
    ).to(ACC_DTYPE)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, ACC_DTYPE)
    # The N·P output rows (n, oh) split evenly over the grid's third axis (chosen by the launcher, or
    # from the autotuned tile); a split past the end reduces nothing and writes zeros.
    n_split = tl.num_programs(2)
    rows_per_split = (N * P + n_split - 1) // n_split
    row0 = pid_split * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, N * P)
    if SIGN:
        # Σ g·sgn(x − w) has no product form: one rank-1 update per output position, with
        # sgn(d) = 2·sat(d·2^64 + 1/2) − 1 (see the ∂X kernel: FADD, FADD.SAT, FFMA per MAC instead of
        # 12 SASS for the select chain) and the "2·acc − Σg" correction after the loop.
        big = 18446744073709551616.0  # 2^64
        wk = wt * big
        gs = tl.full((BLOCK_M,), 0.0, ACC_DTYPE)
        for row in range(row0, row1):
            n_img = row // P
            oh = row % P
            ih = oh * stride_h - pad_h + r * dil_h
            h_ok = (ih >= 0) & (ih < H)
            g_row = g_ptr + n_img * sgn_ + oh * sgh + offs_o * sgc
            x_row = x_ptr + n_img * sxn + ih * sxh + offs_c * sxc
            for ow in range(0, Q):
                iw = ow * stride_w - pad_w + s * dil_w
                x_ok = h_ok & (iw >= 0) & (iw < W)
                gv = tl.load(g_row + ow * sgw, mask=o_mask, other=0.0).to(ACC_DTYPE)
                # Padded taps read x = 0 and contribute g·sgn(0 − w): padding is real in the forward too.
                xv = tl.load(x_row + iw * sxw, mask=c_mask & x_ok, other=0.0).to(ACC_DTYPE)
                u = (xv[None, :] * big - wk) + 0.5
                acc += gv[:, None] * tl.minimum(tl.maximum(u, 0.0), 1.0)
                gs += gv
        acc = 2.0 * acc - gs[:, None]
    else:
        # Σ_m g·(x − w) = (gᵀx) − w·Σ_m g: an implicit GEMM over BLOCK_K positions per step (x gathered
        # per tap, padded taps read 0), in IEEE fp32 FMA (no TF32), plus a row sum of g.
        gs2 = tl.full((BLOCK_M, BLOCK_K), 0.0, ACC_DTYPE)  # Σ_m g, reduced once after the loop
        PQ = P * Q
        pos1 = row1 * Q
        offs_k = tl.arange(0, BLOCK_K)
        for m0 in range(row0 * Q, pos1, BLOCK_K):
            m = m0 + offs_k
            m_ok = m < pos1
            n_img = m // PQ
            pq = m % PQ
            oh = pq // Q
            ow = pq % Q
            ih = oh * stride_h - pad_h + r * dil_h
            iw = ow * stride_w - pad_w + s * dil_w
            x_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            g_off = n_img * sgn_ + oh * sgh + ow * sgw
            x_off = n_img * sxn + ih * sxh + iw * sxw
            gt = tl.load(
                g_ptr + offs_o[:, None] * sgc + g_off[None, :],
                mask=o_mask[:, None] & m_ok[None, :],
                other=0.0,
            ).to(ACC_DTYPE)
            xt = tl.load(
                x_ptr + x_off[:, None] + offs_c[None, :] * sxc,
                mask=x_ok[:, None] & c_mask[None, :],
                other=0.0,
            ).to(ACC_DTYPE)
            acc = tl.dot(gt, xt, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
            gs2 += gt
        acc -= wt * tl.reduce(gs2, 1, tl.standard._sum_combine)[:, None]

    out_off = rs * O * C + offs_o[:, None] * C + offs_c[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptr + out_off, acc.to(tl.float32), mask=tile_mask)
    else:
        tl.store(dw_ptr + pid_split * (R * S * O * C) + out_off, acc.to(ACC_DTYPE), mask=tile_mask)


# ----------------------------------------------------------------------------------------------------------
# Tuning lists. Every entry compiles for sm_80 and sm_90 (tests/test_triton_aot.py); the first entry of
# each list is the interpreter/default config. Keys: the shapes that change the best tile.
# ----------------------------------------------------------------------------------------------------------
def _tile_config(m: int, n: int, k: int, warps: int, exp2_fma: int = 0) -> triton.Config:
    """A forward / ∂X tile; ``exp2_fma``: of each BLOCK_K step, the terms whose exp2 is on the FMA pipe."""
    kw = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "EXP2_FMA": exp2_fma}
    return triton.Config(kw, num_warps=warps, num_stages=1)


FWD_CONFIGS = [
    # BLOCK_M = 32 lanes × num_warps × (positions per thread) so that every warp sits on the position axis
    # and each thread keeps all BLOCK_N channels of its positions (see the comment on acc in the kernel).
    _tile_config(256, 16, 4, 4),
    _tile_config(128, 32, 4, 4),
    _tile_config(256, 32, 2, 4),
    _tile_config(128, 16, 4, 2),
    _tile_config(64, 8, 4, 2),
    # General p only (pruned otherwise): half of each channel step takes the FMA-pipe exp2, which the
    # model puts at 12 instead of 16 cycles per MAC; the autotuner measures it against the SFU-only tiles
    # above, so a GPU where the model is wrong keeps the faster one.
    _tile_config(256, 16, 4, 4, exp2_fma=2),
    _tile_config(128, 32, 4, 4, exp2_fma=2),
    _tile_config(256, 32, 2, 4, exp2_fma=1),
]


def _exp2_fma_pruner(mode_key: str, pow_mode: int):
    """Autotuner pruning: EXP2_FMA tiles differ from their SFU-only twins only where the kernel takes
    |d|^e in fp32 (``mode_key == pow_mode`` and FMA_EXP2_OK); elsewhere they would time duplicates."""

    def prune(configs, named_args, **kwargs):
        split_matters = kwargs.get(mode_key) == pow_mode and kwargs.get("FMA_EXP2_OK")
        return [c for c in configs if split_matters or c.kwargs["EXP2_FMA"] == 0]

    return prune


_prune_fwd_configs = _exp2_fma_pruner("P_MODE", P_GENERAL)


DX_CONFIGS = [
    # Same register blocking as the forward (BLOCK_M = 32 × num_warps × positions per thread); each thread
    # also keeps its BLOCK_N × positions x values, so the tiles are half the forward's.
    _tile_config(128, 16, 4, 4),
    _tile_config(256, 16, 4, 4),
    _tile_config(128, 32, 2, 4),
    _tile_config(64, 8, 4, 2),
    # ℓp mode at general p only (pruned otherwise), as the forward's EXP2_FMA tiles: |d|^(p−1) of half
    # the output channels of each step takes the FMA-pipe exp2 (model: 16 → 13.6 cycles per MAC).
    _tile_config(128, 16, 4, 4, exp2_fma=2),
    _tile_config(128, 32, 2, 4, exp2_fma=1),
]


_prune_dx_configs = _exp2_fma_pruner("GX_MODE", GX_POW)


DW_CONFIGS = [
    # (output channels, input channels, positions per GEMM step); tl.dot needs every dim ≥ 16.
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=2, num_stages=1),
    # The default's output tile and split with half its registers (sm_90, 3×3, full/deterministic: 93
    # instead of 247 per thread → 16 instead of 8 resident warps per SM): the hot loop's div/mod gathers
    # of x and g are load-latency bound, which the issue model (BENCHMARKS.md) assumes hidden.
    # addernet-selftest's speed check times both in the deterministic mode (DW_SELFTEST_CONFIGS).
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=1),
]
# The ∂F candidates the GPU self-test times against each other: the default and the low-register tile.
DW_SELFTEST_CONFIGS = (0, 4)
# Tile keys: the layer shape and code path, never the batch size N (kernels/tile_tuner.py: evaluation
# batches and a short last batch reuse the training batch's tile instead of re-tuning every layer).
_SHAPE_KEY = ["C", "O", "H", "W", "P", "Q", "R", "S"]
_SHAPE_KEY += ["stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
_FWD_KEY = _SHAPE_KEY + ["P_MODE", "FMA_EXP2_OK", "EPILOGUE", "HAS_RES", "RELU"]
_DX_KEY = _SHAPE_KEY + ["GX_MODE", "FMA_EXP2_OK"]
_DW_KEY = _SHAPE_KEY + ["SIGN", "ATOMIC"]


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _tuned(kind, kernel, configs, key, prune=None):
    """The kernel's TileTuner, or None in the interpreter (which runs INTERPRETER_CONFIGS: timing tiles
    there is pointless). Tests build a tuner under the interpreter themselves to exercise the mechanism."""
    if _interpreting():
        return None
    return TileTuner(kind, kernel, configs, key, prune)


_adder_fwd_tuned = _tuned("fwd", _adder_fwd_kernel, FWD_CONFIGS, _FWD_KEY, _prune_fwd_configs)
_adder_bwd_dx_tuned = _tuned("dx", _adder_bwd_dx_kernel, DX_CONFIGS, _DX_KEY, _prune_dx_configs)
# ∂F is tuned only in its atomic (non-deterministic) mode, where every config adds into the same
# buffer (zeroed between trials). The deterministic mode keeps DW_CONFIGS[0]: the tile sets the
# reduction split, so a config picked by timing (which varies run to run) would change the summation
# order and with it the bits that mode promises to reproduce.
_adder_bwd_dw_atomic_tuned = _tuned("dw", _adder_bwd_dw_kernel, DW_CONFIGS, _DW_KEY)


# The interpreter's cost is per executed block operation, so it runs big tiles by default (fewer programs:
# the fused ResNet-8 test took 21 s with FWD_CONFIGS[0]). Every tuning config is still interpreted on a
# small case by tests/test_triton_adder.py (the `config=` argument) and compiled by the AOT test.
INTERPRETER_CONFIGS = {
    "fwd": triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 8, "EXP2_FMA": 4}),
    "dx": triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 8, "EXP2_FMA": 4}),
    "dw": triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}),
}


def _default_config(kind: str, configs: list[triton.Config]) -> triton.Config:
    return INTERPRETER_CONFIGS[kind] if _interpreting() else configs[0]


def _launch(kernel, tuned, kind, configs, grid_fn, args, consts, config, reset=()):
    """Run ``kernel`` with an explicit config, the tuner's tile for this layer shape (GPU), or the
    interpreter's config. ``reset``: accumulation targets the tuner zeroes between its trials."""

    def run(cfg):
        meta = dict(cfg.kwargs)
        kernel[grid_fn(meta)](
            *args, **consts, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )

    if config is None and tuned is not None:
        config = tuned.choose(args, consts, run, reset)
    # the chosen tile runs last, so grid_fn's side effects (the BN partials' BLOCK_M) describe it
    run(config if config is not None else _default_config(kind, configs))


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"the triton adder backend needs CUDA tensors, got a tensor on {t.device}; use "
                "backend='cpu' or 'reference' on CPU (or set TRITON_INTERPRET=1 before importing "
                "triton to run the kernels in the interpreter, which is slow and meant for tests)"
            )
        if t.numel() > _INT32_MAX:
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} has more than 2^31-1 elements; the triton adder "
                "kernels index with int32 — split the batch"
            )


def _hot_loop_layout(t: torch.Tensor) -> torch.Tensor:
    """NCHW-contiguous view or copy of the tensor that the forward / ∂X hot loop streams (x / g).

    Those loops load one channel at a time across a warp's 32 consecutive positions: for NCHW that is one
    128-byte line (fp32), for channels_last 32 lines C elements apart, i.e. 32 L1 wavefronts per load
    instead of 1. Model for the default forward tile (M=256, N=16, w=4): a warp issues ~80 cycles of
    FP32 work per channel step against 2 x loads; with the four sub-partitions sharing one L1, the
    uncoalesced loads need ~4 × 64 = 256 L1 cycles per ~80 issue cycles, an L1 bound ~3× slower than
    NCHW. The copy instead costs one read + write of the tensor at memory bandwidth: ~1 % of a 3×3
    ResNet-50 stage-3 layer's modelled time (12.8 MB of x vs 7.4 G adder-MACs at batch 64), up to ~40 %
    for the thinnest 1×1 layers (64 outputs per input element), still under the ~3× it replaces.
    Outputs (y, dx) keep the caller's memory format: each is stored once per element, not per MAC.
    """
    return t if t.is_contiguous() else t.contiguous()


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def _fast_math(dtype: torch.dtype) -> bool:
    """The SFU approximations on CUDA for fp32 compute; fp64 keeps exact exp2/log2, the interpreter has no PTX."""
    return not _interpreting() and compute_dtype(dtype) == torch.float32


def _p_mode(p: float) -> int:
    return P_ONE if p == 1.0 else P_TWO if p == 2.0 else P_GENERAL


def adder2d_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    p: float,
    out_hw: tuple[int, int],
    *,
    bn_stats: bool = False,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward launcher. x (N, C, H, W) any strides × weight (O, C, R, S) → y (N, O, P, Q).

    y keeps x's memory format and dtype. ``bn_stats``: also return per-channel (mean, var) fp32 (O,)
    pair — biased batch variance — computed in the kernel's epilogue. ``scale``/``shift`` (O,) fp32:
    inference epilogue (y − center)·scale + shift (center (O,) defaults to 0) (+ residual (N, O, P, Q))
    (then ReLU if ``relu``).
    """
    _check_device(x, weight)
    n, c, h, w_ = x.shape
    o, _, r, s = weight.shape
    pp, qq = out_hw
    fmt = (
        torch.channels_last
        if x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
        else torch.contiguous_format
    )
    y = torch.empty((n, o, pp, qq), device=x.device, dtype=x.dtype, memory_format=fmt)
    _check_device(y)  # the output can be larger than the input (int32 indexing)
    # The hot loop reads x one channel at a time across a warp's 32 consecutive output positions; see
    # _hot_loop_layout for why it gets an NCHW copy of a channels_last x (y still comes out channels_last).
    x = _hot_loop_layout(x)
    o_pad = triton.cdiv(o, _W_PAD) * _W_PAD
    # fp32 (fp64) filters whatever the storage dtype: each thread converts every filter value it loads, so
    # bf16 filters cost one extra instruction per MAC (3.94 vs 2.5 SASS/MAC); the copy is tiny anyway.
    w_rsco = torch.zeros((r, s, c, o_pad), device=weight.device, dtype=compute_dtype(weight.dtype))
    w_rsco[..., :o] = weight.permute(2, 3, 1, 0)
    m = n * pp * qq
    epilogue = EPI_NONE
    part = y  # placeholder pointer for unused arguments
    if bn_stats:
        epilogue = EPI_BN_STATS
        # One row of partials per BLOCK_M: allocate for the smallest BLOCK_M of the tuning list.
        min_bm = min(cfg.kwargs["BLOCK_M"] for cfg in FWD_CONFIGS)
        part = torch.empty((triton.cdiv(m, min_bm), 2, o), device=x.device, dtype=torch.float32)
    if scale is not None:
        if bn_stats:
            raise ValueError(
                "bn_stats and the affine epilogue are exclusive (training vs inference)"
            )
        epilogue = EPI_AFFINE
        if shift is None:
            raise ValueError("the affine epilogue needs both scale and shift")
        scale = scale.to(device=x.device, dtype=torch.float32).contiguous()
        shift = shift.to(device=x.device, dtype=torch.float32).contiguous()
        if center is None:
            center = torch.zeros_like(scale)
        center = center.to(device=x.device, dtype=torch.float32).contiguous()
        for nm, t in (("scale", scale), ("shift", shift), ("center", center)):
            if t.shape != (o,):
                raise ValueError(
                    f"{nm} must have shape ({o},) (one value per output channel), got {tuple(t.shape)}"
                )
    if residual is not None:
        if scale is None:
            raise ValueError("a residual is only fused with the affine (inference) epilogue")
        if residual.shape != y.shape:
            raise ValueError(
                f"residual shape {tuple(residual.shape)} != output shape {tuple(y.shape)}"
            )
        _check_device(residual)
    res = residual if residual is not None else y
    used_bm = {}

    def grid(meta):
        used_bm["BLOCK_M"] = meta["BLOCK_M"]
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(o, meta["BLOCK_N"]))

    args = (
        x,
        w_rsco,
        y,
        part,
        center if center is not None else y,
        scale if scale is not None else y,
        shift if shift is not None else y,
        res,
        float(p),
        n,
        c,
        h,
        w_,
        o,
        o_pad,
        pp,
        qq,
        *x.stride(),
        *y.stride(),
        *res.stride(),
        *stride,
        *padding,
        *dilation,
    )
    consts = dict(
        R=r,
        S=s,
        P_MODE=_p_mode(p),
        FAST_MATH=_fast_math(x.dtype),
        FMA_EXP2_OK=compute_dtype(x.dtype) == torch.float32,
        EPILOGUE=epilogue,
        HAS_RES=residual is not None,
        RELU=bool(relu),
        ACC_DTYPE=_acc_dtype(x.dtype),
    )
    _launch(_adder_fwd_kernel, _adder_fwd_tuned, "fwd", FWD_CONFIGS, grid, args, consts, config)
    if not bn_stats:
        return y, None
    return y, _combine_bn_partials(part, m, used_bm["BLOCK_M"])


def _combine_bn_partials(
    part: torch.Tensor, m: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-block (mean, M2) into the batch mean and biased variance, in a fixed order (deterministic).

    Chan et al.: M2 = Σ_b M2_b + Σ_b n_b (mean_b − mean)²; done in fp64 because it is tiny ((M/BLOCK_M) × O).
    """
    nb = triton.cdiv(m, block_m)
    counts = torch.full((nb, 1), float(block_m), dtype=torch.float64, device=part.device)
    counts[-1] = m - (nb - 1) * block_m
    means = part[:nb, 0].double()
    m2 = part[:nb, 1].double()
    mean = (counts * means).sum(0) / m
    var = (m2.sum(0) + (counts * (means - mean) ** 2).sum(0)) / m
    return mean.float(), var.float()


def adder2d_grad_input(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    p: float,
    grad_x: str,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """∂L/∂X launcher: g (N, O, P, Q) → dx (N, C, H, W), same strides and dtype as x."""
    _check_device(g, x, weight)
    n, c, h, w_ = x.shape
    o, _, r, s = weight.shape
    pp, qq = g.shape[2:]
    dx = torch.empty_like(x)  # keeps x's strides: the kernel writes dx with x's strides
    # g is the hot-loop operand here (x is loaded once per program and dx stored once): see
    # _hot_loop_layout. dx keeps x's memory format.
    g = _hot_loop_layout(g)
    c_pad = triton.cdiv(c, _W_PAD) * _W_PAD
    if grad_x == "hardtanh":
        mode = GX_HARDTANH
    else:
        mode = GX_SIGN if p == 1.0 else GX_LINEAR if p == 2.0 else GX_POW
    o_pad = triton.cdiv(o, _DX_O_PAD) * _DX_O_PAD
    w_rsoc = torch.zeros(
        (r, s, o_pad, c_pad), device=weight.device, dtype=compute_dtype(weight.dtype)
    )
    w_t = weight.permute(2, 3, 0, 1).to(w_rsoc.dtype)
    if mode == GX_HARDTANH:
        w_t = w_t * 0.5 + 0.5  # see the hot-loop forms in _adder_bwd_dx_kernel
    elif mode == GX_SIGN:
        w_t = w_t * 2.0**64
    w_rsoc[:, :, :o, :c] = w_t
    sh, sw = stride
    m = n * triton.cdiv(h, sh) * triton.cdiv(w_, sw)  # positions of the largest stride phase (0, 0)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]), sh * sw)

    args = (
        g,
        x,
        w_rsoc,
        dx,
        float(p),
        n,
        c,
        c_pad,
        h,
        w_,
        o,
        o_pad,
        pp,
        qq,
        *g.stride(),
        *x.stride(),
    )
    args = args + (*stride, *padding, *dilation)
    consts = dict(
        R=r,
        S=s,
        GX_MODE=mode,
        FAST_MATH=_fast_math(x.dtype),
        FMA_EXP2_OK=compute_dtype(x.dtype) == torch.float32,
        ACC_DTYPE=_acc_dtype(x.dtype),
    )
    _launch(_adder_bwd_dx_kernel, _adder_bwd_dx_tuned, "dx", DX_CONFIGS, grid, args, consts, config)
    return dx


# Enough programs to fill an H100 (132 SMs × a few resident programs) before splitting the reduction.
_DW_TARGET_PROGRAMS = 132 * 4
# The interpreter runs programs one after another, ~0.1 s each at 64×64 tiles: 528 programs made one
# ∂F of a 16-channel 3×3 layer take 29 s (vs 2 s). 18 still splits 3×3 layers in two and 1×1 layers
# further, so the partial-sum path stays exercised on CPU.
_DW_TARGET_PROGRAMS_INTERPRETER = 18


def adder2d_grad_weight(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    grad_w: str,
    deterministic: bool = True,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """∂L/∂F launcher: → dw (O, C, R, S) in weight's dtype.

    The reduction over the N·P output rows is split across programs. ``deterministic``: each split writes
    its own fp32 partial and the partials are summed in a fixed order (bitwise reproducible; extra memory
    ≤ ~_DW_TARGET_PROGRAMS tiles) with the fixed config DW_CONFIGS[0]. Otherwise the splits
    ``atomic_add`` into one buffer and the tile is autotuned over DW_CONFIGS per shape (on a GPU).
    """
    _check_device(g, x, weight)
    n, c, h, w_ = x.shape
    o, _, r, s = weight.shape
    pp, qq = g.shape[2:]
    rows = n * pp
    acc_dt = torch.float64 if compute_dtype(x.dtype) == torch.float64 else torch.float32
    atomic = not deterministic

    def split_for(bm: int, bn: int) -> int:
        # enough programs to fill the GPU (~_DW_TARGET_PROGRAMS), never more splits than rows
        tiles = triton.cdiv(o, bm) * triton.cdiv(c, bn)
        target = _DW_TARGET_PROGRAMS_INTERPRETER if _interpreting() else _DW_TARGET_PROGRAMS
        return max(1, min(rows, target // max(1, tiles * r * s)))

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        return (triton.cdiv(o, bm) * triton.cdiv(c, bn), r * s, split_for(bm, bn))

    w_c = weight.contiguous()
    args = (g, x, w_c)
    sizes = (n, c, h, w_, o, pp, qq, *g.stride(), *x.stride(), *stride, *padding, *dilation)
    consts = dict(R=r, S=s, SIGN=grad_w == "sign", ATOMIC=atomic, ACC_DTYPE=_acc_dtype(x.dtype))
    if atomic:
        buf = torch.zeros((r * s, o, c), device=x.device, dtype=torch.float32)
        _launch(
            _adder_bwd_dw_kernel,
            _adder_bwd_dw_atomic_tuned,
            "dw",
            DW_CONFIGS,
            grid,
            (*args, buf, *sizes),
            consts,
            config,
            reset=(buf,),
        )
    else:
        cfg = config if config is not None else _default_config("dw", DW_CONFIGS)
        split = split_for(cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])
        buf = torch.empty((split, r * s, o, c), device=x.device, dtype=acc_dt)
        _launch(
            _adder_bwd_dw_kernel, None, "dw", DW_CONFIGS, grid, (*args, buf, *sizes), consts, cfg
        )
    dw = buf if atomic else buf.sum(0)
    return dw.reshape(r, s, o, c).permute(2, 3, 0, 1).to(weight.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
class AdderTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, stride, padding, dilation, p, grad_x, grad_w, deterministic, out_hw
    ):
        y, _ = adder2d_forward(x, weight, stride, padding, dilation, p, out_hw)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, p, grad_x, grad_w, deterministic)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, p, grad_x, grad_w, deterministic = ctx.conf
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = adder2d_grad_input(g, x, weight, stride, padding, dilation, p, grad_x)
        if ctx.needs_input_grad[1]:
            dw = adder2d_grad_weight(g, x, weight, stride, padding, dilation, grad_w, deterministic)
        return dx, dw, None, None, None, None, None, None, None, None


def resolve_deterministic(deterministic: bool | None) -> bool:
    """None → follow ``torch.use_deterministic_algorithms``; float atomics are the only nondeterminism."""
    from addernet_dist.device_policy import deterministic_grad_weight

    return deterministic_grad_weight(deterministic, torch.are_deterministic_algorithms_enabled())


def adder2d_triton(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    p: float = 1.0,
    grad_x: str = "lp",
    grad_w: str = "full",
    *,
    deterministic: bool | None = True,
) -> torch.Tensor:
    """Adder convolution on the Triton kernels; same arguments and results as ``adder2d_reference``.

    input (N, C, H, W) in NCHW or channels_last, fp32/fp64/fp16/bf16 (16-bit accumulates in fp32);
    weight (O, C, R, S). ``deterministic`` (∂L/∂F only): True (default) reduces fixed-order partials,
    False uses float atomics, None follows ``torch.are_deterministic_algorithms_enabled()``.
    """
    check_args(p, grad_x, grad_w)
    stride, padding, dilation, out_hw = check_conv_args(input, weight, stride, padding, dilation)
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)):
        # The kernels take any strides, but ∂L/∂X is written with x's strides into empty_like(x), which
        # only keeps strides for dense tensors: make sliced/overlapping views dense first.
        input = input.contiguous()
    if input.dtype != weight.dtype:
        raise TypeError(
            f"input dtype {input.dtype} != weight dtype {weight.dtype}; cast one of them"
        )
    if not math.isfinite(float(p)):
        raise ValueError(f"p must be finite, got {p}")
    return AdderTritonFunction.apply(
        input,
        weight,
        stride,
        padding,
        dilation,
        float(p),
        grad_x,
        grad_w,
        resolve_deterministic(deterministic),
        out_hw,
    )
