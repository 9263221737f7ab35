"""The three Triton adder kernels: forward (with the fused BN epilogues), ∂L/∂X and ∂L/∂F.

Shapes, semantics and the hot-loop structure are described in triton_adder.py's docstring; the launchers
there (adder2d_forward, adder2d_grad_input, adder2d_grad_weight) are the only callers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from addernet_dist.kernels.triton_math import _pow_abs, _pow_abs_fma_exp2

# Kernels call only triton.language builtins and the package's own @triton.jit helpers (triton_math.py)
# (tl.full, not tl.zeros; tl.reduce(·, tl.standard._sum_combine), not tl.sum): triton's library helpers are
# compiled-mode objects when triton was imported before TRITON_INTERPRET was set, and the interpreter
# (kernels/triton_testing.py, which re-imports triton_math and this module together) cannot call those.
# _sum_combine is only passed, never called by the interpreter: it recognises that exact object and uses
# np.sum (a Python combine function instead made the CPU tests 5× slower: one call per element).


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
