"""CPU fast path of the adder operator: direct (im2col-free) C++ kernels, compiled once per machine.

Shape legend: N batch, C in-channels, O out-channels, kh×kw kernel, K = C·kh·kw taps, Ho×Wo output,
L = Ho·Wo positions, s stride, d dilation. ``P`` is the *phased padded input*: x zero-padded, then split into
s_h×s_w stride phases, layout (N, C, s_h, s_w, Hq, Wq). In P, tap k = (c, i, j) of output (oh, ow) sits at
``P[n, c, (i·d_h) % s_h, (j·d_w) % s_w, oh + (i·d_h)//s_h, ow + (j·d_w)//s_w]`` — consecutive ``ow`` are
consecutive in memory for every stride, so every kernel loads whole vectors along ``ow`` with no im2col.

Vectors run along ``ow``: 16 fp32 lanes (AVX-512), or two output rows per vector when a row is at most 8
wide (``wide = 2``: ResNet-20 stage 3, ResNet stage 4), so narrow late-stage layers still use full
64-byte instructions.

Kernels (all compute exactly what ``addernet_dist.ops.reference`` computes; see the contract there):
  _fwd     y[n,o,oh,ow]  = −Σ_k |x − w[o,k]|^p            tile: 16 filters × one vector of ow, loop over k
  _gx      gx[n,k,pos]   = Σ_o g[n,o,pos]·f(w[o,k] − x)    tile: 8 taps × one vector of ow, loop over o;
                           scattered into the padded-phase gradient buffer (col2im fused, no column tensor)
  _gw      gw[o,k]       = Σ_{n,pos} g·sgn(x − w)  (the "sign" ablation)  tile: 4 filters × 4 taps
The "full" filter gradient Σ g·(x − w) = Σ g·x − w·Σ g is a convolution's filter gradient plus a rank-1
term, so it runs in aten (oneDNN), not here.
Why C++ and not torch.compile: ``F.unfold`` alone takes 250 ms for a 32×16×32×32 input on this machine (the
fast path's whole forward is ~5 ms), and inductor recompiles per layer shape/p; this file compiles in ~3 s once
per machine (cached on disk), takes p as a runtime argument and every shape as runtime sizes.

Memory: no im2col. Extra memory is P (the padded input, saved for backward instead of the input), the
gradient buffer of the same size in backward, and one O×K filter-gradient buffer per thread.

Threads: the kernels release the GIL (ctypes), so ``torch.get_num_threads()`` Python threads run them on
disjoint work (rows for the forward and the filter gradient, images or channel ranges for the input gradient,
whose scatter would race between neighbouring rows). The per-thread filter-gradient buffers are summed in a
fixed order, so results are deterministic for a given thread count.

If no C++ compiler is found or compilation fails, ``adder2d_cpu`` falls back to the reference with ONE
warning per process (``is_available()`` reports it, so the dispatcher can route around it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from addernet_dist.ops.reference import (
    adder2d_reference,
    check_args,
    check_conv_args,
    compute_dtype,
)

__all__ = ["adder2d_cpu", "is_available", "unavailable_reason", "build"]

# fmt: off
_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
typedef int64_t i64;

// V: a GCC vector of BYTES bytes (16 fp32 lanes at 64 B: one AVX-512 register, two AVX2 ones).
template <typename T, int BYTES> struct Vec {
  typedef T V __attribute__((vector_size(BYTES)));
  static constexpr int N = BYTES / (int)sizeof(T);
};

template <typename V, typename T, bool TAIL> static inline V ld(const T* p, int cnt) {
  V v = V{};
  std::memcpy(&v, p, TAIL ? cnt * sizeof(T) : sizeof(V));
  return v;
}
template <typename V, typename T, bool TAIL> static inline void st(T* p, V v, int cnt) {
  std::memcpy(p, &v, TAIL ? cnt * sizeof(T) : sizeof(V));
}
template <typename V> static inline V vabs(V d) { return d < 0 ? -d : d; }

// Row pairs: rows of Wo <= W/2 lanes (ResNet-20 stage 3: 8 fp32, ResNet-18/50 stage 4: 7) fill only
// half of a 64-byte vector, so PAIR kernels put two output rows in one vector: the low half from row r,
// the high half from row r + 1, RS elements further on. TAIL: CNT < W/2 valid lanes per half.
// With AVX-512 a pair is one masked load plus one masked merge-load (no shuffle); assembling it through
// memory instead stalls store-to-load forwarding and made the stage-3 forward 1.4x SLOWER than 8 lanes.
#if defined(__AVX512F__)
template <typename T, typename V> struct Pair512;
template <typename V> struct Pair512<float, V> {
  static inline V ld(const float* p, i64 rs, __mmask16 lo, __mmask16 hi) {
    return (V)_mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(lo, p), hi, p + rs - 8);
  }
  static inline void st(float* p, i64 rs, V v, __mmask16 lo, __mmask16 hi) {
    _mm512_mask_storeu_ps(p, lo, (__m512)v);
    _mm512_mask_storeu_ps(p + rs - 8, hi, (__m512)v);
  }
};
template <typename V> struct Pair512<double, V> {
  static inline V ld(const double* p, i64 rs, __mmask8 lo, __mmask8 hi) {
    return (V)_mm512_mask_loadu_pd(_mm512_maskz_loadu_pd(lo, p), hi, p + rs - 4);
  }
  static inline void st(double* p, i64 rs, V v, __mmask8 lo, __mmask8 hi) {
    _mm512_mask_storeu_pd(p, lo, (__m512d)v);
    _mm512_mask_storeu_pd(p + rs - 4, hi, (__m512d)v);
  }
};
#endif
template <typename V, typename T, bool TAIL>
static inline void pair_masks(int cnt, bool two, unsigned& lo, unsigned& hi) {
  constexpr int H = (int)(sizeof(V) / sizeof(T)) / 2;
  const unsigned half = TAIL ? (1u << cnt) - 1 : (1u << H) - 1;
  lo = half;
  hi = two ? half << H : 0;
}
// (two = false: a lone last row; its high half is zero and row r + 1, which may lie past the end of the
// buffer, is never read)
template <typename V, typename T, bool TAIL, bool PAIR>
static inline V ldr(const T* p, i64 rs, int cnt, bool two) {
  if constexpr (!PAIR) {
    return ld<V, T, TAIL>(p, cnt);
  } else {
    constexpr int H = (int)(sizeof(V) / sizeof(T)) / 2;
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64) {
      unsigned lo, hi;
      pair_masks<V, T, TAIL>(cnt, two, lo, hi);
      return Pair512<T, V>::ld(p, rs, lo, hi);
    }
#endif
    V v = V{};
    std::memcpy(&v, p, (TAIL ? cnt : H) * sizeof(T));
    if (two) std::memcpy(reinterpret_cast<T*>(&v) + H, p + rs, (TAIL ? cnt : H) * sizeof(T));
    return v;
  }
}
// Store (ADD: add into) the low half at p and, when TWO, the high half at p + rs.
template <typename V, typename T, bool TAIL, bool PAIR, bool ADD>
static inline void str(T* p, i64 rs, V v, int cnt, bool two) {
  if constexpr (!PAIR) {
    st<V, T, TAIL>(p, ADD ? ld<V, T, TAIL>(p, cnt) + v : v, cnt);
  } else {
    constexpr int H = (int)(sizeof(V) / sizeof(T)) / 2;
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64) {
      unsigned lo, hi;
      pair_masks<V, T, TAIL>(cnt, two, lo, hi);
      if (ADD) v += Pair512<T, V>::ld(p, rs, lo, hi);
      Pair512<T, V>::st(p, rs, v, lo, hi);
      return;
    }
#endif
    const int m = TAIL ? cnt : H;
    const T* lanes = reinterpret_cast<const T*>(&v);
    for (int h = 0; h < (two ? 2 : 1); ++h) {
      T* dst = p + h * rs;
      if (ADD) for (int j = 0; j < m; ++j) dst[j] += lanes[h * H + j];
      else std::memcpy(dst, lanes + h * H, m * sizeof(T));
    }
  }
}

// sgn(d) in {-1, 0, +1} and clamp(d, -1, 1) in ONE instruction each where AVX-512 has them, so the ℓ1
// and HardTanh input gradients cost 3 vector ops per lane-MAC (sub, this, FMA) instead of 4:
// vfixupimm maps the class of d (zero / negative / positive / ±inf) to a constant from a nibble table;
// vrange "absmin(d, 1) with d's sign" is clamp. The products g·sgn are exact, so results are
// bit-identical to the compare-and-select fallback.
template <typename V> static inline V vsign(V d) {
  typedef __typeof__(d[0] + 0) T;
  // tokens (class -> response): QNaN->src, SNaN->QNaN(src), ±0->+0, +1->+1, -inf->-1, +inf->+1,
  // negative->-1, positive->+1
  constexpr int TABLE = (int)0xA9A9A821u;
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4)
    return (V)_mm512_fixupimm_ps((__m512)d, (__m512)d, _mm512_set1_epi32(TABLE), 0);
  if constexpr (sizeof(V) == 64 && sizeof(T) == 8)
    return (V)_mm512_fixupimm_pd((__m512d)d, (__m512d)d, _mm512_set1_epi64(TABLE), 0);
#if defined(__AVX512VL__)
  if constexpr (sizeof(V) == 32 && sizeof(T) == 4)
    return (V)_mm256_fixupimm_ps((__m256)d, (__m256)d, _mm256_set1_epi32(TABLE), 0);
#endif
#endif
  const V zero = V{}, one = zero + 1;
  return (d > 0 ? one : zero) - (d < 0 ? one : zero);
}
template <typename V> static inline V vclamp1(V d) {
  typedef __typeof__(d[0] + 0) T;
#if defined(__AVX512DQ__)
  constexpr int ABSMIN_SIGN_OF_A = 0x2;  // imm[1:0] = 10 absolute min, imm[3:2] = 00 sign from d
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4)
    return (V)_mm512_range_ps((__m512)d, _mm512_set1_ps(1.0f), ABSMIN_SIGN_OF_A);
  if constexpr (sizeof(V) == 64 && sizeof(T) == 8)
    return (V)_mm512_range_pd((__m512d)d, _mm512_set1_pd(1.0), ABSMIN_SIGN_OF_A);
#if defined(__AVX512VL__)
  if constexpr (sizeof(V) == 32 && sizeof(T) == 4)
    return (V)_mm256_range_ps((__m256)d, _mm256_set1_ps(1.0f), ABSMIN_SIGN_OF_A);
#endif
#endif
  const V one = V{} + 1;
  return d > one ? one : (d < -one ? -one : d);
}

// |a|^q for a >= 0 as exp(q·log a): vectorised by GCC through libmvec (-ffast-math). 0 stays 0 (q > 0).
template <typename T, typename V> static inline V vpow_libm(V a, T q) {
  constexpr int W = sizeof(V) / sizeof(T);
  V r;
  for (int j = 0; j < W; ++j) r[j] = a[j] > 0 ? std::exp(q * std::log(a[j])) : T(0);
  return r;
}

#if defined(__AVX512F__)
// fp32 a^q inline, 2^(q·log2 a) from AVX-512's exponent/mantissa split: a = 2^e·m, m in [0.75, 1.5)
// (vgetmant/vgetexp), log2 m = t·Q(t) with t = m − 1 and Q of degree 7, q·(e + log2 m) split into an
// integer n and a fraction f in [−0.5, 0.5] (the q·e product carried in two floats, so a large |e| costs
// no accuracy), 2^f by a degree-5 polynomial, then vscalef. ~30 vector ops and no calls: libmvec's
// exp/log (vpow_libm) are calls, around which every live accumulator (16 in the forward tile) is
// spilled and reloaded; this is 1.6-1.8x faster. Relative error <= 1.2e-6, as fp32 exp(q·log a) itself
// (tests/test_cpu_fastpath.py, |a| in [2^-20, 2^20]); a = 0 gives 0.
static inline __m512 pow16(__m512 a, float q) {
#define HORNER(acc, x, c) acc = _mm512_fmadd_ps(acc, x, _mm512_set1_ps(c))
  const __m512 m = _mm512_getmant_ps(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  const __m512 e = _mm512_sub_ps(_mm512_getexp_ps(a), _mm512_getexp_ps(m));  // m < 1 took one exponent
  const __m512 t = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  // log2(1 + t) = t·Q(t), Q of degree 7 (relative error 1.8e-7 on [−0.25, 0.5], fitted here)
  __m512 l = _mm512_set1_ps(-9.61605671e-02f);
  HORNER(l, t, 2.04124348e-01f); HORNER(l, t, -2.50651909e-01f); HORNER(l, t, 2.90073856e-01f);
  HORNER(l, t, -3.60335338e-01f); HORNER(l, t, 4.80847502e-01f); HORNER(l, t, -7.21350693e-01f);
  HORNER(l, t, 1.44269525e+00f);
  l = _mm512_mul_ps(l, t);
  // The explicitly rounded forms (…_round_ps) are opaque to -ffast-math, which would otherwise fold
  // q·e − hi to 0 and (hi − n) + lo into (hi + lo) − n, losing the low part (measured: 6e-6 instead of
  // 1e-6 relative error at |e| ~ 100).
  constexpr int RN = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 qv = _mm512_set1_ps(q);
  const __m512 hi = _mm512_mul_round_ps(qv, e, RN);
  const __m512 lo = _mm512_fmadd_round_ps(qv, l, _mm512_fmsub_round_ps(qv, e, hi, RN), RN);  // (q·e − hi) + q·log2 m
  const __m512 n = _mm512_roundscale_ps(_mm512_add_round_ps(hi, lo, RN), RN);
  const __m512 f = _mm512_add_round_ps(_mm512_sub_round_ps(hi, n, RN), lo, RN);  // hi − n is exact
  // 2^f on [−0.5, 0.5], degree 5 (relative error 1.0e-7)
  __m512 r = _mm512_set1_ps(1.33934907e-03f);
  HORNER(r, f, 9.67603229e-03f); HORNER(r, f, 5.55034986e-02f); HORNER(r, f, 2.40221075e-01f);
  HORNER(r, f, 6.93147191e-01f); HORNER(r, f, 1.00000008e+00f);
#undef HORNER
  r = _mm512_scalef_ps(r, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ), r);
}
#endif

template <typename T, typename V> static inline V vpow(V a, T q) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) return (V)pow16((__m512)a, q);
#endif
  return vpow_libm<T, V>(a, q);
}

// ---- geometry ----------------------------------------------------------------------------------------
struct Geom {
  i64 N, C, O, KH, KW, SH, SW, DH, DW, Hq, Wq, Ho, Wo;
  i64 K() const { return C * KH * KW; }
  i64 L() const { return Ho * Wo; }
  i64 img() const { return C * SH * SW * Hq * Wq; }  // P elements per image
};

// off[k]: offset in one image of P of tap k for output (0, 0); output (oh, ow) adds oh·Wq + ow.
static void tap_offsets(const Geom& g, i64* off) {
  i64 k = 0;
  for (i64 c = 0; c < g.C; ++c)
    for (i64 i = 0; i < g.KH; ++i)
      for (i64 j = 0; j < g.KW; ++j, ++k) {
        i64 ph = (i * g.DH) % g.SH, qh = (i * g.DH) / g.SH;
        i64 pw = (j * g.DW) % g.SW, qw = (j * g.DW) / g.SW;
        off[k] = ((c * g.SH + ph) * g.SW + pw) * g.Hq * g.Wq + qh * g.Wq + qw;
      }
}

// floor division (C++'s / truncates: W = 1, b = 1, PW = 0 must give -1, not 0)
static inline i64 floordiv(i64 a, i64 b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// ---- layout: x (N, C, H, W) <-> P (N, C, SH, SW, Hq, Wq) ------------------------------------------------
// P[n, c, a, b, t, u] = x[n, c, t·SH + a − PH, u·SW + b − PW], 0 outside the image. Each P row is a zero
// head, a copy (stride SW along x's row) and a zero tail. In torch these are 1 + SH·SW strided copies
// that ran at ~3 GB/s and cost 10% of a stride-2 layer's forward+backward (0.6 ms of 6, ResNet-20
// stage-2 down, batch 32); here one pass, rows written once, images [n0, n1).
template <typename T>
static void phase_pad(const Geom& g, i64 H, i64 W, i64 PH, i64 PW, const T* x, T* P, i64 n0, i64 n1) {
  const i64 WW = 2 * g.Wq;
  std::vector<T> row(g.SW == 2 ? WW : 0);
  for (i64 nc = n0 * g.C; nc < n1 * g.C; ++nc) {
    const T* xi = x + nc * H * W;
    T* pc = P + nc * g.SH * g.SW * g.Hq * g.Wq;
    if (g.SW == 2) {
      // stride-2 columns: zero-pad the image row into `row` (one contiguous copy), then split it into
      // the two phase rows in one interleaved loop that GCC vectorises (2x the strided loop below)
      const i64 j1 = std::min(W, WW - PW);  // image columns that land inside the padded row
      for (i64 a = 0; a < g.SH; ++a)
        for (i64 t = 0; t < g.Hq; ++t) {
          T* d0 = pc + (a * 2 * g.Hq + t) * g.Wq;
          T* d1 = d0 + g.Hq * g.Wq;
          const i64 i = t * g.SH + a - PH;
          if (i < 0 || i >= H) {
            std::fill(d0, d0 + g.Wq, T(0));
            std::fill(d1, d1 + g.Wq, T(0));
            continue;
          }
          std::fill(row.begin(), row.end(), T(0));
          if (j1 > 0) std::memcpy(row.data() + PW, xi + i * W, j1 * sizeof(T));
          const T* r = row.data();
          for (i64 u = 0; u < g.Wq; ++u) { d0[u] = r[2 * u]; d1[u] = r[2 * u + 1]; }
        }
      continue;
    }
    for (i64 a = 0; a < g.SH; ++a)
      for (i64 b = 0; b < g.SW; ++b) {
        // u range whose column j = u·SW + b − PW lies in [0, W)
        const i64 u0 = std::min(g.Wq, std::max<i64>(0, (PW - b + g.SW - 1) / g.SW));
        const i64 u1 = std::max(u0, std::min(g.Wq, floordiv(W - 1 + PW - b, g.SW) + 1));
        for (i64 t = 0; t < g.Hq; ++t) {
          T* dst = pc + ((a * g.SW + b) * g.Hq + t) * g.Wq;
          const i64 i = t * g.SH + a - PH;
          if (i < 0 || i >= H || u1 <= u0) { std::fill(dst, dst + g.Wq, T(0)); continue; }
          const T* src = xi + i * W + b - PW;
          std::fill(dst, dst + u0, T(0));
          if (g.SW == 1) std::memcpy(dst + u0, src + u0, (u1 - u0) * sizeof(T));
          else for (i64 u = u0; u < u1; ++u) dst[u] = src[u * g.SW];
          std::fill(dst + u1, dst + g.Wq, T(0));
        }
      }
  }
}

// The inverse for gradients: gx[n, c, i, j] = GP[...] of the same position; pixels that no tap reads (the
// floor in the output size, beyond Hq/Wq) get 0.
template <typename T>
static void phase_unpad(const Geom& g, i64 H, i64 W, i64 PH, i64 PW, const T* GP, T* gx, i64 n0, i64 n1) {
  const i64 WW = 2 * g.Wq;
  std::vector<T> row(g.SW == 2 ? WW : 0);
  for (i64 nc = n0 * g.C; nc < n1 * g.C; ++nc) {
    T* gi = gx + nc * H * W;
    const T* pc = GP + nc * g.SH * g.SW * g.Hq * g.Wq;
    for (i64 i = 0; i < H; ++i) {
      T* dst = gi + i * W;
      const i64 t = (i + PH) / g.SH, a = (i + PH) % g.SH;
      if (t >= g.Hq) { std::fill(dst, dst + W, T(0)); continue; }
      if (g.SW == 2) {
        // interleave the two phase rows into the padded row, then one contiguous copy (the mirror of
        // phase_pad); image columns past the padded row (never read by a tap) get 0
        const T* s0 = pc + (a * 2 * g.Hq + t) * g.Wq;
        const T* s1 = s0 + g.Hq * g.Wq;
        T* r = row.data();
        for (i64 u = 0; u < g.Wq; ++u) { r[2 * u] = s0[u]; r[2 * u + 1] = s1[u]; }
        const i64 j1 = std::max<i64>(0, std::min(W, WW - PW));
        std::memcpy(dst, r + PW, j1 * sizeof(T));
        std::fill(dst + j1, dst + W, T(0));
        continue;
      }
      for (i64 b = 0; b < g.SW; ++b) {
        const T* src = pc + ((a * g.SW + b) * g.Hq + t) * g.Wq;
        const i64 u0 = std::min(g.Wq, std::max<i64>(0, (PW - b + g.SW - 1) / g.SW));
        const i64 u1 = std::max(u0, std::min(g.Wq, floordiv(W - 1 + PW - b, g.SW) + 1));
        // columns j = u·SW + b − PW for u in [u0, u1); the others of this phase (j >= the last read
        // column) are zeroed below
        if (g.SW == 1) std::memcpy(dst + u0 - PW, src + u0, (u1 - u0) * sizeof(T));
        else for (i64 u = u0; u < u1; ++u) dst[u * g.SW + b - PW] = src[u];
      }
      // pixels past the last column any tap reads: u·SW + b − PW >= Wq·SW − PW
      for (i64 j = std::max<i64>(0, g.Wq * g.SW - PW); j < W; ++j) dst[j] = T(0);
    }
  }
}

// ---- forward: y = -sum_k |x - w|^p -------------------------------------------------------------------
// p = 1 (MODE 1) uses |x − w| = x + w − 2·min(x, w):  Σ_k |x − w| = Σ_k x + Σ_k w − 2·Σ_k min(x, w).
// Σ_k x is shared by every filter of a position (one add per tap per vector, 1/OB of the work) and Σ_k w
// is a per-filter constant, so the hot loop is min + add, 2 vector ops per 16 MACs instead of 3 (sub,
// abs, add): 1.3-1.5x on the forward. Rounding: the three sums are O(K·|x|, K·|w|) where the direct sum is
// O(K·|x − w|), which would cancel badly when x and w share a large offset; so both are centred first,
// per input channel, by the mean of that channel's filters (cx, per tap; the caller passes w − cx and
// Σ_k (w − cx)): min(x, w) − c = min(x − c, w − c) exactly in real arithmetic, and after centring every
// sum is of the size of the direct one's terms.
template <typename V> static inline V vmin(V a, V b) {
  typedef __typeof__(a[0] + 0) T;
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) return (V)_mm512_min_ps((__m512)a, (__m512)b);
  if constexpr (sizeof(V) == 64 && sizeof(T) == 8) return (V)_mm512_min_pd((__m512d)a, (__m512d)b);
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32 && sizeof(T) == 4) return (V)_mm256_min_ps((__m256)a, (__m256)b);
#endif
  return a < b ? a : b;
}

// One tile: OB filters × one vector of output lanes (one row segment, or a row pair when PAIR).
template <typename T, typename V, int MODE, int OB, bool TAIL, bool PAIR>
static inline void fwd_tile(const T* xp, i64 rs, const i64* off, const T* w, T* y, i64 ys, i64 K, i64 L,
                            int cnt, bool two, T p, const T* cx, const T* sw) {
  V acc[OB];
  for (int b = 0; b < OB; ++b) acc[b] = V{};
  V sx = V{};
  for (i64 k = 0; k < K; ++k) {
    V xv = ldr<V, T, TAIL, PAIR>(xp + off[k], rs, cnt, two);
    if (MODE == 1) {
      xv -= cx[k];
      sx += xv;
    }
    for (int b = 0; b < OB; ++b) {
      const V wv = V{} + w[b * K + k];
      if (MODE == 1) acc[b] += vmin(xv, wv);
      else if (MODE == 2) { V d = xv - wv; acc[b] += d * d; }
      else acc[b] += vpow<T, V>(vabs(xv - wv), p);
    }
  }
  for (int b = 0; b < OB; ++b) {
    // p = 1: y = −(Σx + Σw − 2·Σmin)
    const V out = MODE == 1 ? (acc[b] + acc[b]) - (sx + sw[b]) : -acc[b];
    str<V, T, TAIL, PAIR, false>(y + b * L, ys, out, cnt, two);
  }
}

template <typename T, typename V, int MODE, bool TAIL, bool PAIR>
static inline void fwd_col(const T* xp, i64 rs, const i64* off, const T* w, T* y, i64 ys, i64 K, i64 O, i64 L,
                           int cnt, bool two, T p, const T* cx, const T* sw) {
  i64 o = 0;
#define FWD_TILES(OB)                                                                                      \
  for (; o + OB <= O; o += OB)                                                                             \
    fwd_tile<T, V, MODE, OB, TAIL, PAIR>(xp, rs, off, w + o * K, y + o * L, ys, K, L, cnt, two, p, cx,     \
                                         sw ? sw + o : nullptr);
  FWD_TILES(16) FWD_TILES(4) FWD_TILES(1)
#undef FWD_TILES
}

// rows r0..r1 of the flattened (n, oh) output rows; PAIR: two rows of one image per vector
template <typename T, typename V, int MODE, bool PAIR>
static void fwd(const Geom& g, const T* P, const T* w, T* y, i64 r0, i64 r1, T p, const i64* off, const T* cx,
                const T* sw) {
  constexpr int W = sizeof(V) / sizeof(T), H = PAIR ? W / 2 : W;
  const i64 K = g.K(), L = g.L();
  for (i64 r = r0; r < r1;) {
    const i64 n = r / g.Ho, oh = r % g.Ho;
    const bool two = PAIR && oh + 1 < g.Ho && r + 1 < r1;
    const T* xrow = P + n * g.img() + oh * g.Wq;
    T* yrow = y + n * g.O * L + oh * g.Wo;
    for (i64 ow = 0; ow < g.Wo; ow += H) {
      const int cnt = (int)(g.Wo - ow < H ? g.Wo - ow : H);
      if (cnt == H)
        fwd_col<T, V, MODE, false, PAIR>(xrow + ow, g.Wq, off, w, yrow + ow, g.Wo, K, g.O, L, cnt, two, p, cx, sw);
      else
        fwd_col<T, V, MODE, true, PAIR>(xrow + ow, g.Wq, off, w, yrow + ow, g.Wo, K, g.O, L, cnt, two, p, cx, sw);
    }
    r += two ? 2 : 1;
  }
}

// ---- input gradient: gx = sum_o g * f(w - x), scattered into the phased padded buffer GP ------------
// MODE 0: lp general p: sgn(d)|d|^(p-1); 1: lp p=1: sgn(d); 2: lp p=2: d; 3: hardtanh: clamp(d, -1, 1)
template <typename T, typename V, int MODE, int KB, bool TAIL, bool PAIR>
static inline void gx_tile(const T* xp, T* gp, i64 rs, const i64* off, const T* w, const T* go, i64 gs, i64 K,
                           i64 O, i64 L, int cnt, bool two, T p) {
  V xv[KB], acc[KB];
  for (int b = 0; b < KB; ++b) { xv[b] = ldr<V, T, TAIL, PAIR>(xp + off[b], rs, cnt, two); acc[b] = V{}; }
  for (i64 o = 0; o < O; ++o) {
    const V gv = ldr<V, T, TAIL, PAIR>(go + o * L, gs, cnt, two);
    for (int b = 0; b < KB; ++b) {
      V d = w[o * K + b] - xv[b];
      if (MODE == 1) acc[b] += gv * vsign(d);
      else if (MODE == 2) acc[b] += gv * d;
      else if (MODE == 3) acc[b] += gv * vclamp1(d);
      else {
        acc[b] += (gv * vpow<T, V>(vabs(d), p - 1)) * vsign(d);  // × ±1 or 0: exact
      }
    }
  }
  // sequential read-add-write: the two rows of a pair overlap in GP, which is fine within one thread
  for (int b = 0; b < KB; ++b) str<V, T, TAIL, PAIR, true>(gp + off[b], rs, acc[b], cnt, two);
}

template <typename T, typename V, int MODE, bool PAIR>
static void gx(const Geom& g, const T* P, const T* w, const T* go, T* GP, i64 n0, i64 n1, i64 c0, i64 c1,
               T p, const i64* off) {
  constexpr int W = sizeof(V) / sizeof(T), H = PAIR ? W / 2 : W;
  const i64 K = g.K(), L = g.L(), khw = g.KH * g.KW;
  const i64 k0 = c0 * khw, k1 = c1 * khw;
  for (i64 n = n0; n < n1; ++n) {
    for (i64 oh = 0; oh < g.Ho; oh += PAIR ? 2 : 1) {
      const bool two = PAIR && oh + 1 < g.Ho;
      const i64 base = n * g.img() + oh * g.Wq;
      const T* gorow = go + n * g.O * L + oh * g.Wo;
      for (i64 ow = 0; ow < g.Wo; ow += H) {
        const int cnt = (int)(g.Wo - ow < H ? g.Wo - ow : H);
        const T* xp = P + base + ow;
        T* gp = GP + base + ow;
        const T* gr = gorow + ow;
        i64 k = k0;
#define GX_TILES(TAILV)                                                                                    \
  for (; k + 8 <= k1; k += 8)                                                                              \
    gx_tile<T, V, MODE, 8, TAILV, PAIR>(xp, gp, g.Wq, off + k, w + k, gr, g.Wo, K, g.O, L, cnt, two, p);   \
  for (; k < k1; ++k)                                                                                      \
    gx_tile<T, V, MODE, 1, TAILV, PAIR>(xp, gp, g.Wq, off + k, w + k, gr, g.Wo, K, g.O, L, cnt, two, p);
        if (cnt == H) { GX_TILES(false) } else { GX_TILES(true) }
#undef GX_TILES
      }
    }
  }
}

// ---- filter gradient, "sign" mode: gw[o,k] += sum_pos g * sgn(x - w) ----------------------------------
template <typename T, typename V, int OB, int KB>
static inline void gw_block(const Geom& g, const T* P, const T* w, const T* go, T* gw, const i64* off, i64 o,
                            i64 k, i64 r0, i64 r1) {
  constexpr int W = sizeof(V) / sizeof(T);
  const i64 K = g.K(), L = g.L();
  V acc[OB][KB];
  for (int a = 0; a < OB; ++a)
    for (int b = 0; b < KB; ++b) acc[a][b] = V{};
  const V zero = V{};
  T wv[OB][KB];
  for (int a = 0; a < OB; ++a)
    for (int b = 0; b < KB; ++b) wv[a][b] = w[(o + a) * K + k + b];
  for (i64 r = r0; r < r1; ++r) {
    const i64 n = r / g.Ho, oh = r % g.Ho;
    const T* xrow = P + n * g.img() + oh * g.Wq;
    const T* grow = go + n * g.O * L + oh * g.Wo;
    for (i64 ow = 0; ow < g.Wo; ow += W) {
      const int cnt = (int)(g.Wo - ow < W ? g.Wo - ow : W);
      V gv[OB], xv[KB];
      // tails load zeros past the row end: g = 0 makes those lanes contribute nothing
      if (cnt == W) {
        for (int a = 0; a < OB; ++a) gv[a] = ld<V, T, false>(grow + (o + a) * L + ow, cnt);
        for (int b = 0; b < KB; ++b) xv[b] = ld<V, T, false>(xrow + off[k + b] + ow, cnt);
      } else {
        for (int a = 0; a < OB; ++a) gv[a] = ld<V, T, true>(grow + (o + a) * L + ow, cnt);
        for (int b = 0; b < KB; ++b) xv[b] = ld<V, T, true>(xrow + off[k + b] + ow, cnt);
      }
      for (int a = 0; a < OB; ++a)
        for (int b = 0; b < KB; ++b) {
          V d = xv[b] - wv[a][b];
          acc[a][b] += (d > 0 ? gv[a] : zero) - (d < 0 ? gv[a] : zero);
        }
    }
  }
  for (int a = 0; a < OB; ++a)
    for (int b = 0; b < KB; ++b) {
      T s = 0;
      for (int j = 0; j < W; ++j) s += acc[a][b][j];
      gw[(o + a) * K + k + b] += s;
    }
}

template <typename T, typename V>
static void gwk(const Geom& g, const T* P, const T* w, const T* go, T* gw, i64 r0, i64 r1, const i64* off) {
  const i64 K = g.K(), O = g.O;
  // ~256 KiB of images at a time (their P and g stay in L2 while every (o, k) block reads them); small
  // images are grouped so each block's 4×4 horizontal sums are amortised over many rows (ResNet-20
  // stage 3: 6 images of 8 rows instead of 1)
  const i64 per_img = (g.img() + O * g.L()) * (i64)sizeof(T);
  const i64 imgs = std::max<i64>(1, (256 << 10) / per_img);
  for (i64 rs = r0; rs < r1;) {
    const i64 re = std::min(r1, (rs / g.Ho + imgs) * g.Ho);
    i64 o = 0;
    for (; o + 4 <= O; o += 4) {
      i64 k = 0;
      for (; k + 4 <= K; k += 4) gw_block<T, V, 4, 4>(g, P, w, go, gw, off, o, k, rs, re);
      for (; k < K; ++k)
        for (int a = 0; a < 4; ++a) gw_block<T, V, 1, 1>(g, P, w, go, gw, off, o + a, k, rs, re);
    }
    for (; o < O; ++o) {
      for (i64 k = 0; k < K; ++k) gw_block<T, V, 1, 1>(g, P, w, go, gw, off, o, k, rs, re);
    }
    rs = re;
  }
}

// ---- entry points: geom = (N, C, O, KH, KW, SH, SW, DH, DW, Hq, Wq, Ho, Wo) ----------------------------
// wide: 0 = 32-byte vectors (fp32 only), 1 = 64-byte, 2 = 64-byte holding two output rows
static Geom mk(const i64* a) { return Geom{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12]}; }

template <typename T, int BYTES, bool PAIR>
static void fwd_entry(const Geom& g, const T* P, const T* w, T* y, i64 r0, i64 r1, T p, int mode, const i64* off,
                      const T* cx, const T* sw) {
  typedef typename Vec<T, BYTES>::V V;
  if (mode == 1) fwd<T, V, 1, PAIR>(g, P, w, y, r0, r1, p, off, cx, sw);
  else if (mode == 2) fwd<T, V, 2, PAIR>(g, P, w, y, r0, r1, p, off, nullptr, nullptr);
  else fwd<T, V, 0, PAIR>(g, P, w, y, r0, r1, p, off, nullptr, nullptr);
}
template <typename T, int BYTES, bool PAIR>
static void gx_entry(const Geom& g, const T* P, const T* w, const T* go, T* GP, i64 n0, i64 n1, i64 c0, i64 c1,
                     T p, int mode, const i64* off) {
  typedef typename Vec<T, BYTES>::V V;
  if (mode == 1) gx<T, V, 1, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
  else if (mode == 2) gx<T, V, 2, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
  else if (mode == 3) gx<T, V, 3, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
  else gx<T, V, 0, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
}
template <typename T, int BYTES>
static void gw_entry(const Geom& g, const T* P, const T* w, const T* go, T* gw, i64 r0, i64 r1,
                     const i64* off) {
  gwk<T, typename Vec<T, BYTES>::V>(g, P, w, go, gw, r0, r1, off);
}

// One translation unit per (kernel, dtype), chosen by -DADDER_<KIND> -DADDER_T=<type> -DADDER_SUF=<suffix>,
// so the six compile in parallel. fp64 (tests, checks) only gets 64-byte vectors: half the instantiations.
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
typedef ADDER_T T;
#define WIDE_OR_NARROW(FN, ...)                                     \
  do {                                                              \
    if (wide || sizeof(T) == 8) FN<T, 64>(__VA_ARGS__);             \
    else if constexpr (sizeof(T) == 4) FN<T, 32>(__VA_ARGS__);      \
  } while (0)
// forward and input gradient: wide = 2 puts two output rows in each 64-byte vector (see ldr)
#define VECTORS(FN, ...)                                                  \
  do {                                                                    \
    if (wide == 2) FN<T, 64, true>(__VA_ARGS__);                          \
    else if (wide || sizeof(T) == 8) FN<T, 64, false>(__VA_ARGS__);       \
    else if constexpr (sizeof(T) == 4) FN<T, 32, false>(__VA_ARGS__);     \
  } while (0)

#ifdef ADDER_FWD
// mode 1 (p = 1): w is the centred filter bank w − cx, cx the per-tap centre (K), sw = Σ_k (w − cx) (O)
extern "C" void CAT(adder_fwd_, ADDER_SUF)(const i64* geom, const T* P, const T* w, T* y, i64 r0, i64 r1,
                                          double p, int mode, int wide, const i64* off, const T* cx,
                                          const T* sw) {
  VECTORS(fwd_entry, mk(geom), P, w, y, r0, r1, (T)p, mode, off, cx, sw);
}
extern "C" void CAT(adder_phase_pad_, ADDER_SUF)(const i64* geom, i64 H, i64 W, i64 PH, i64 PW, const T* x,
                                                T* P, i64 n0, i64 n1) {
  phase_pad<T>(mk(geom), H, W, PH, PW, x, P, n0, n1);
}
#if ADDER_OFFSETS
extern "C" void adder_tap_offsets(const i64* geom, i64* off) { tap_offsets(mk(geom), off); }
#endif
#endif
#ifdef ADDER_GX
extern "C" void CAT(adder_gx_, ADDER_SUF)(const i64* geom, const T* P, const T* w, const T* go, T* GP,
                                         i64 n0, i64 n1, i64 c0, i64 c1, double p, int mode, int wide,
                                         const i64* off) {
  VECTORS(gx_entry, mk(geom), P, w, go, GP, n0, n1, c0, c1, (T)p, mode, off);
}
extern "C" void CAT(adder_phase_unpad_, ADDER_SUF)(const i64* geom, i64 H, i64 W, i64 PH, i64 PW,
                                                  const T* GP, T* gx, i64 n0, i64 n1) {
  phase_unpad<T>(mk(geom), H, W, PH, PW, GP, gx, n0, n1);
}
#endif
#ifdef ADDER_GW
extern "C" void CAT(adder_gw_, ADDER_SUF)(const i64* geom, const T* P, const T* w, const T* go, T* gw,
                                         i64 r0, i64 r1, int wide, const i64* off) {
  WIDE_OR_NARROW(gw_entry, mk(geom), P, w, go, gw, r0, r1, off);
}
#endif
"""
# fmt: on

# ---- build & load --------------------------------------------------------------------------------------

# -ffast-math lets GCC call libmvec's vector exp/log for fp64 general p (~8x the scalar libm loop; fp32
# uses the inline pow16, whose exponent split is written with explicitly rounded intrinsics); it is
# given to the compile step only: linking a shared object with it (GCC < 13) pulls in crtfastmath.o, whose
# constructor would switch the whole process to flush-denormals-to-zero.
_COMPILE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-ffast-math"]
_ARCH_FLAG_CHOICES = (["-march=native"], [])  # native first; plain if the compiler rejects it

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_warned = False


def _cache_dir() -> Path:
    root = os.environ.get("ADDERNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "addernet_dist"
    )
    return Path(root) / "cpu_adder"


def _cpu_signature() -> str:
    # -march=native code is only valid on CPUs with the same ISA extensions: key the cache on them so a
    # home directory shared by different machines never loads an object built for another one.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(force: bool = False) -> ctypes.CDLL:
    """Compile (once per machine, cached on disk) and load the kernels; raises RuntimeError on failure."""
    global _lib, _error
    with _lock:
        if _lib is not None and not force:
            return _lib
        if _error is not None and not force:  # failed once: don't recompile on every call
            raise RuntimeError(_error)
        cxx = _compiler()
        if cxx is None:
            _error = "no C++ compiler found (set CXX or install g++)"
            raise RuntimeError(_error)
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        errors = []
        for arch in _ARCH_FLAG_CHOICES:
            key = hashlib.sha256(
                "\0".join(
                    [_SOURCE, cxx, version, *arch, *_COMPILE_FLAGS, _cpu_signature()]
                ).encode()
            ).hexdigest()[:16]
            out = _cache_dir() / f"cpu_adder_{key}.so"
            if not out.exists() or force:
                try:
                    _compile(cxx, arch, out)
                except RuntimeError as e:
                    errors.append(str(e))
                    continue
            try:
                lib = ctypes.CDLL(str(out))
            except OSError as e:
                errors.append(f"loading {out}: {e}")
                continue
            _declare(lib)
            _lib, _error = lib, None
            return lib
        _error = "; ".join(errors)
        raise RuntimeError(_error)


# (kernel, C type, symbol suffix): one object file each, compiled concurrently (~2x faster on 2 cores)
_UNITS = [
    (k, t, suf) for t, suf in (("float", "f32"), ("double", "f64")) for k in ("FWD", "GX", "GW")
]


def _compile(cxx: str, arch: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private temp dir, then rename: concurrent processes (torchrun ranks) never see a
    # half-written object, and the last rename wins with identical content.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, so = Path(tmp, "k.cpp"), Path(tmp, "k.so")
        src.write_text(_SOURCE)
        objs, procs = [], []
        for kind, ctype, suf in _UNITS:
            obj = Path(tmp, f"{kind.lower()}_{suf}.o")
            defs = [f"-DADDER_{kind}", f"-DADDER_T={ctype}", f"-DADDER_SUF={suf}"]
            defs.append(f"-DADDER_OFFSETS={int(kind == 'FWD' and suf == 'f32')}")
            cmd = [cxx, *_COMPILE_FLAGS, *arch, *defs, "-c", str(src), "-o", str(obj)]
            objs.append(obj)
            procs.append((cmd, _spawn(cmd)))
        errors = []
        for cmd, proc in procs:  # reap every compiler process, even after one failed
            try:
                _wait(cmd, proc)
            except RuntimeError as e:
                errors.append(str(e))
        if errors:
            raise RuntimeError(errors[0])
        link = [cxx, "-shared", *map(str, objs), "-o", str(so), "-lm"]
        _wait(link, _spawn(link))
        os.replace(so, out)


def _spawn(cmd: list[str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ
        )
    except OSError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed: {e}") from e


def _wait(cmd: list[str], proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        raise RuntimeError(f"{' '.join(cmd)} timed out") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")


def _declare(lib: ctypes.CDLL) -> None:
    vp, i64, dbl, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.adder_tap_offsets.argtypes = [vp, vp]
    for suf in ("f32", "f64"):
        getattr(lib, f"adder_fwd_{suf}").argtypes = [
            *(vp, vp, vp, vp, i64, i64, dbl, cint, cint, vp, vp, vp)
        ]
        getattr(lib, f"adder_gx_{suf}").argtypes = [
            *(vp, vp, vp, vp, vp),
            *(i64, i64, i64, i64),
            dbl,
            cint,
            cint,
            vp,
        ]
        getattr(lib, f"adder_gw_{suf}").argtypes = [vp, vp, vp, vp, vp, i64, i64, cint, vp]
        for kind in ("phase_pad", "phase_unpad"):
            getattr(lib, f"adder_{kind}_{suf}").argtypes = [
                vp,
                i64,
                i64,
                i64,
                i64,
                vp,
                vp,
                i64,
                i64,
            ]
        for kind in ("fwd", "gx", "gw", "phase_pad", "phase_unpad"):
            getattr(lib, f"adder_{kind}_{suf}").restype = None


def is_available() -> bool:
    """True when the kernels are compiled and loaded (compiles them on first call, ~3 s)."""
    try:
        build()
        return True
    except RuntimeError:
        return False


def unavailable_reason() -> str | None:
    """Why ``is_available()`` is False (compiler output), or None."""
    return None if is_available() else _error


# ---- threads -------------------------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None


def _reset_pool_after_fork() -> None:
    global _pool, _pool_key
    _pool, _pool_key = None, None  # a forked child (DataLoader worker) inherits no live threads


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _run(fn, jobs: list[tuple]) -> None:
    """Run ``fn(*job)`` for every job, on up to torch.get_num_threads() threads (ctypes drops the GIL)."""
    global _pool, _pool_key
    if len(jobs) == 1:
        fn(*jobs[0])
        return
    key = (os.getpid(), len(jobs))
    if _pool_key != key:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_key = ThreadPoolExecutor(len(jobs), thread_name_prefix="adder_cpu"), key
    for f in [_pool.submit(fn, *job) for job in jobs]:
        f.result()


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


# ---- launchers -----------------------------------------------------------------------------------------

_MODE_FWD = {1.0: 1, 2.0: 2}  # anything else: general p (mode 0)


class _Geom:
    """Sizes of one call plus the phased padded layout; ``arr`` is what the C side reads."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation, out_hw, dtype):
        n, c, h, w = x_shape
        o, _, kh, kw = w_shape
        (sh, sw), (dh, dw) = stride, dilation
        ho, wo = out_hw
        # padded extent actually read: last output's last tap, rounded up to whole stride phases
        hq = -(-((ho - 1) * sh + (kh - 1) * dh + 1) // sh)
        wq = -(-((wo - 1) * sw + (kw - 1) * dw + 1) // sw)
        self.n, self.c, self.h, self.w, self.o, self.kh, self.kw = n, c, h, w, o, kh, kw
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.hq, self.wq, self.ho, self.wo = hq, wq, ho, wo
        self.arr = torch.tensor(
            [n, c, o, kh, kw, sh, sw, dh, dw, hq, wq, ho, wo], dtype=torch.int64
        )
        self.k = c * kh * kw
        # 64-byte vectors (16 fp32 lanes) unless a row is too short to fill them; 32-byte vectors
        # then waste fewer lanes (ResNet-20 stage 3 has 8-wide rows: 100% vs 50% lane use).
        esize = 4 if dtype == torch.float32 else 8
        self.wide = int(wo * esize > 32)
        # Forward and ∂X: rows of at most half a 64-byte vector go two to a vector (wide = 2): stage 3
        # of ResNet-20 (8 fp32) then uses 16-lane instead of 8-lane instructions.
        self.vec = 2 if 2 * wo * esize <= 64 and ho >= 2 else self.wide
        self.off = torch.empty(self.k, dtype=torch.int64)
        _lib_or_raise().adder_tap_offsets(self.arr.data_ptr(), self.off.data_ptr())

    def wide_for(self, mode: int) -> int:
        # General p (mode 0) always takes 64-byte vectors: the fp32 power (pow16) exists only for
        # them, and for fp64 GCC maps only those onto libmvec's vector exp/log (_ZGVeN8v_*); an
        # 8-lane fp32 loop called scalar expf/logf, 10x slower (ResNet-20 stage 3, p = 1.5: 0.14 vs
        # 1.5 G adder-MAC/s), far worse than half-empty lanes. Narrow rows pair up anyway (vec = 2).
        return 1 if mode == 0 and self.vec == 0 else self.vec

    def _layout_call(self, kind: str, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        fn = getattr(_lib_or_raise(), f"adder_{kind}_{_suffix(src.dtype)}")
        (ph, pw), a = self.padding, (self.arr.data_ptr(), self.h, self.w)
        _run(
            fn,
            [
                (*a, ph, pw, src.data_ptr(), dst.data_ptr(), n0, n1)
                for n0, n1 in _split(self.n, torch.get_num_threads())
            ],
        )
        return dst

    def phase_pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → P (N, C, s_h, s_w, Hq, Wq), zeros outside the image (C++, one pass)."""
        (sh, sw) = self.stride
        P = x.new_empty(self.n, self.c, sh, sw, self.hq, self.wq)
        return self._layout_call("phase_pad", x.contiguous(), P)

    def phase_unpad(self, gp: torch.Tensor) -> torch.Tensor:
        """Inverse of phase_pad for gradients: P-layout (N, C, s_h, s_w, Hq, Wq) → (N, C, H, W).

        Image pixels no tap reads (the floor in the output size) get 0."""
        out = gp.new_empty(self.n, self.c, self.h, self.w)
        return self._layout_call("phase_unpad", gp, out)


def _lib_or_raise() -> ctypes.CDLL:
    return _lib if _lib is not None else build()


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def _forward(g: _Geom, P: torch.Tensor, w_ok: torch.Tensor, p: float) -> torch.Tensor:
    lib = _lib_or_raise()
    y = P.new_empty(g.n, g.o, g.ho, g.wo)
    fn = getattr(lib, f"adder_fwd_{_suffix(P.dtype)}")
    mode = _MODE_FWD.get(p, 0)
    rows = _split(g.n * g.ho, torch.get_num_threads())
    cx = sw = None
    if mode == 1:
        # the min form of p = 1 (see fwd_tile): centre each input channel by its filters' mean
        w64 = w_ok.double()
        c = w64.view(g.o, g.c, g.kh * g.kw).mean((0, 2))
        # rounded to 8 significant bits: an offset shrinks >= 256x, and x − c stays exact for
        # integer or other coarse data (then every sum is exact, as the direct one is)
        mant, expo = torch.frexp(c)
        c = torch.ldexp(torch.round(mant * 256) / 256, expo)
        cx64 = c.repeat_interleave(g.kh * g.kw)
        w_ok = (w64 - cx64).to(P.dtype).contiguous()
        cx, sw = cx64.to(P.dtype), (w64 - cx64).sum(1).to(P.dtype)
    a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), y.data_ptr())
    extra = (cx.data_ptr(), sw.data_ptr()) if mode == 1 else (None, None)
    _run(fn, [(*a, r0, r1, p, mode, g.wide_for(mode), g.off.data_ptr(), *extra) for r0, r1 in rows])
    return y


_scratch = threading.local()


def _zeroed_scratch(like: torch.Tensor) -> torch.Tensor:
    """A zeroed tensor shaped like ``like``, carved from this thread's reusable buffer.

    ∂X scatters into a P-layout buffer that lives only until phase_unpad has read it. A fresh
    zeros_like page-faults all of it on every call (glibc returns big blocks to the OS on free): on the
    stride-2 ResNet-20 layers, batch 32, that was ~7 % of the layer's forward+backward (4.79 vs 5.25 ms).
    One buffer per thread (autograd may run backward on several threads), grown to the largest P seen.
    """
    n = like.numel()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != like.dtype or buf.numel() < n:
        buf = _scratch.buf = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(like.shape).zero_()


def _grad_input(g: _Geom, P, w_ok, g_out, p: float, grad_x: str) -> torch.Tensor:
    lib = _lib_or_raise()
    gp = _zeroed_scratch(P)
    fn = getattr(lib, f"adder_gx_{_suffix(P.dtype)}")
    mode = 3 if grad_x == "hardtanh" else _MODE_FWD.get(p, 0)
    t = torch.get_num_threads()
    # neighbouring rows of one image scatter into overlapping input pixels: split by image, or (for
    # batches smaller than the thread count) by input channel, whose taps never overlap
    if g.n >= t or g.c == 1:
        jobs = [(n0, n1, 0, g.c) for n0, n1 in _split(g.n, t)]
    else:
        jobs = [(0, g.n, c0, c1) for c0, c1 in _split(g.c, t)]
    a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), g_out.data_ptr(), gp.data_ptr())
    _run(fn, [(*a, *j, p, mode, g.wide_for(mode), g.off.data_ptr()) for j in jobs])
    return g.phase_unpad(gp)


def _grad_weight(g: _Geom, P, w_ok, g_out, grad_w: str, x=None) -> torch.Tensor:
    if grad_w == "full":
        # Σ_m g·(x − w) = (Σ_m g·x) − w·Σ_m g. The first term is exactly a convolution's filter
        # gradient, so it goes to aten (oneDNN on x86): 2.0-5.8x faster than the direct kernel below on
        # the ResNet-20 layers (one thread, e.g. stage 3: 1.1 vs 6.5 ms at batch 32), same fp32 rounding
        # size (max rel. difference 0.5-2.7e-6). Stride 1 reads the padded input P directly (a valid
        # convolution over it gives exactly Ho × Wo); strided layers pass the saved input and padding.
        if x is None:
            xin, stride, padding = P.view(g.n, g.c, g.hq, g.wq), (1, 1), (0, 0)
        else:
            xin, stride, padding = x, g.stride, g.padding
        # oneDNN keeps reordered copies of its input and g (~2 images' worth of scratch per image;
        # 12.8 MiB for a batch-8 ResNet-50 stage-1 layer): chunks of <= 2 MiB of (input + g) bound
        # that scratch whatever the batch, at no cost in time here (ResNet-20 layers, batch 32:
        # 0.85-1.15x the one-call time, faster on the largest where a chunk stays in L2)
        per_image = (xin[0].numel() + g_out[0].numel()) * xin.element_size()
        chunk = max(1, (2 << 20) // per_image)
        w4 = w_ok.view(g.o, g.c, g.kh, g.kw)
        gxw = None
        for i in range(0, g.n, chunk):
            part = torch.ops.aten.convolution_backward(
                *(g_out[i : i + chunk], xin[i : i + chunk], w4, None),
                *(stride, padding, g.dilation, False, (0, 0), 1, (False, True, False)),
            )[1]
            gxw = part if gxw is None else gxw.add_(part)
        return gxw.reshape(g.o, g.k) - w_ok * g_out.sum((0, 2, 3))[:, None]
    lib = _lib_or_raise()
    fn = getattr(lib, f"adder_gw_{_suffix(P.dtype)}")
    rows = _split(g.n * g.ho, torch.get_num_threads())
    parts = w_ok.new_zeros(len(rows), g.o, g.k)
    a = (g.arr.data_ptr(), P.data_ptr(), w_ok.data_ptr(), g_out.data_ptr())
    _run(
        fn,
        [
            (*a, parts[i].data_ptr(), r0, r1, g.wide, g.off.data_ptr())
            for i, (r0, r1) in enumerate(rows)
        ],
    )
    return parts.sum(0)


# ---- autograd ------------------------------------------------------------------------------------------


class AdderCPUFunction(torch.autograd.Function):
    """adder2d on CPU tensors; same arguments and semantics as ``adder2d_reference``."""

    @staticmethod
    def forward(ctx, input, weight, stride, padding, dilation, p, grad_x, grad_w, out_hw):
        cdt = compute_dtype(input.dtype)
        g = _Geom(input.shape, weight.shape, stride, padding, dilation, out_hw, cdt)
        x = input.to(cdt)
        P = g.phase_pad(x)
        w_ok = weight.to(cdt).reshape(g.o, g.k).contiguous()
        # the "full" filter gradient of a strided layer convolves the input itself (see _grad_weight);
        # stride 1 reads P, so nothing more is kept
        strided = g.stride != (1, 1) and grad_w == "full"
        ctx.save_for_backward(P, w_ok, x.contiguous() if strided else None)
        ctx.conf = (g, p, grad_x, grad_w, input.dtype, weight.dtype)
        if g.n == 0 or g.o == 0:
            return input.new_zeros(g.n, g.o, g.ho, g.wo)
        return _forward(g, P, w_ok, p).to(input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        P, w_ok, x = ctx.saved_tensors
        g, p, grad_x, grad_w, x_dtype, w_dtype = ctx.conf
        g_out = grad_out.to(P.dtype).contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if g.n == 0 or g.o == 0:
                gx = torch.zeros(g.n, g.c, g.h, g.w, dtype=x_dtype)
            else:
                gx = _grad_input(g, P, w_ok, g_out, p, grad_x).to(x_dtype)
        if ctx.needs_input_grad[1]:
            if g.n == 0 or g.o == 0:
                gw = torch.zeros(g.o, g.k, dtype=w_dtype)
            else:
                gw = _grad_weight(g, P, w_ok, g_out, grad_w, x).to(w_dtype)
            gw = gw.reshape(g.o, g.c, g.kh, g.kw)
        return gx, gw, None, None, None, None, None, None, None


def adder2d_cpu(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    p: float = 1.0,
    grad_x: str = "lp",
    grad_w: str = "full",
) -> torch.Tensor:
    """Adder convolution on CPU: (N, C, H, W) × (O, C, kh, kw) → (N, O, H', W'), = ``adder2d_reference``.

    fp32/fp64 compute in their own dtype; fp16/bf16 compute in fp32 and return the input dtype. Falls
    back to the reference (one warning per process) when the kernels cannot be compiled.
    """
    global _warned
    check_args(p, grad_x, grad_w)
    stride, padding, dilation, out_hw = check_conv_args(input, weight, stride, padding, dilation)
    if input.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(
            f"the 'cpu' adder backend needs CPU tensors, got input on {input.device} and weight on "
            f"{weight.device}; use backend=None (auto) or 'triton' for CUDA tensors"
        )
    if not is_available():
        if not _warned:
            _warned = True
            warnings.warn(
                f"addernet CPU fast path unavailable ({_error}); using the reference operator "
                "(slow). Install a C++ compiler (g++) to enable it.",
                RuntimeWarning,
                stacklevel=2,
            )
        return adder2d_reference(input, weight, stride, padding, dilation, p, grad_x, grad_w)
    return AdderCPUFunction.apply(
        input, weight, stride, padding, dilation, float(p), grad_x, grad_w, out_hw
    )


if __name__ == "__main__":  # `python -m addernet_dist.kernels.cpu_adder`: build and report
    print("available:", is_available(), unavailable_reason() or "", file=sys.stderr)
