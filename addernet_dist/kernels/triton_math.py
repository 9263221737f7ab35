"""Triton adder math: the mode constants shared by the kernels and their launchers, and the |d|^e helpers
(@triton.jit) the kernels call. Layering: triton_math -> triton_kernels -> triton_tiles -> triton_adder
(launchers, autograd Function, the public entry points)."""

from __future__ import annotations

import triton
import triton.language as tl

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
# |d|^e helpers (called by the kernels in triton_kernels.py; see the note there on what kernels may call)
# ----------------------------------------------------------------------------------------------------------


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
