// CPU fast path of the adder operator (addernet_dist.kernels.cpu_adder compiles and loads this file).
// Shipped as package data next to cpu_adder.py; the on-disk cache of the compiled object is keyed on this
// file's content, so an edit here recompiles on next use. See cpu_adder.py's docstring and
// docs/kernels_cpu.md for the design.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>
// (also for AVX2-only CPUs: without it their -march=native build failed on the _mm256 intrinsics
// below and the launcher silently fell back to a baseline x86-64 (SSE2) build, 4-12x slower)
#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
typedef int64_t i64;

// ---- threads ---------------------------------------------------------------------------------------------
// Every entry point takes a job list (njobs rows of ranges, e.g. images [n0, n1) or rows [r0, r1)) and runs
// the jobs on njobs OpenMP threads. Built with GCC's -fopenmp the object needs libgomp.so.1, the SONAME
// torch itself loads (torch/lib/libgomp.so.1), so the dynamic linker binds it to torch's copy: one OpenMP
// runtime and one thread pool for torch's ops and these kernels. The Python thread pool this replaces
// fought that pool: a torch op in the launcher (a zero_, a copy) woke torch's worker, which then spun on the
// second core while the Python pool's thread wanted it (ResNet-50 two-thread speed-up 1.03-1.08x). A job's
// result depends only on its range, never on which thread runs it, so results are deterministic for a given
// job list. Without OpenMP (other compilers) the pragma is ignored and the launcher calls one job at a time
// from its Python threads (adder_openmp() tells it which).
// One job runs on the calling thread without entering OpenMP at all (a forked child's launcher passes
// one job per call: libgomp's pool state is not valid after fork).
// run_job is never inlined, so both paths run ONE compiled copy of the job: inlined separately into the
// serial branch and into OpenMP's outlined region, -ffast-math reassociated the "sign" filter gradient's
// sums differently in each (1 ulp apart in fp64).
template <typename F> __attribute__((noinline)) static void run_job(const F& body, int j) { body(j); }
template <typename F> static void for_jobs(int njobs, const F& body) {
  if (njobs == 1) {
    run_job(body, 0);
    return;
  }
#pragma omp parallel for schedule(static, 1) num_threads(njobs)
  for (int j = 0; j < njobs; ++j) run_job(body, j);
}

// V: a GCC vector of BYTES bytes (16 fp32 lanes at 64 B: one AVX-512 register, two AVX2 ones).
template <typename T, int BYTES> struct Vec {
  typedef T V __attribute__((vector_size(BYTES)));
  static constexpr int N = BYTES / (int)sizeof(T);
};

// Partial vectors (TAIL: the first cnt lanes): a variable-length memcpy compiles to a call, ~10x a
// vector load; with AVX2 a masked load/store (vmaskmovps) instead — the 7×7 layers end every filter
// tile's 61 positions in one (ResNet-50 stage 4 3×3 forward: ~6.5x -> ~4x conv's time, Zen 3).
#if defined(__AVX2__) && !defined(__AVX512F__)
static inline __m256i tail_mask8(int cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif
// With AVX-512 a masked load/store of the first cnt lanes (k-mask), both widths and both precisions: through
// memcpy every tail cost a call, and ResNet-50's 56-wide rows end in a half vector of 16 fp32 lanes (forward
// of the 56×56 layers 3.5-3.9x conv's time with the AVX-512 build vs 2.0-2.5x with AVX2's whole ymm rows on
// the same Zen 4 machine).
#if defined(__AVX512F__)
template <typename V, typename T> static inline V ld_mask512(const T* p, int cnt) {
  const unsigned m = (1u << cnt) - 1;
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) return (V)_mm512_maskz_loadu_ps((__mmask16)m, p);
  if constexpr (sizeof(V) == 64 && sizeof(T) == 8) return (V)_mm512_maskz_loadu_pd((__mmask8)m, p);
#if defined(__AVX512VL__)
  if constexpr (sizeof(V) == 32 && sizeof(T) == 4) return (V)_mm256_maskz_loadu_ps((__mmask8)m, p);
  if constexpr (sizeof(V) == 32 && sizeof(T) == 8) return (V)_mm256_maskz_loadu_pd((__mmask8)m, p);
#endif
  V v = V{};
  std::memcpy(&v, p, cnt * sizeof(T));
  return v;
}
template <typename V, typename T> static inline void st_mask512(T* p, V v, int cnt) {
  const unsigned m = (1u << cnt) - 1;
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) _mm512_mask_storeu_ps(p, (__mmask16)m, (__m512)v);
  else if constexpr (sizeof(V) == 64 && sizeof(T) == 8) _mm512_mask_storeu_pd(p, (__mmask8)m, (__m512d)v);
#if defined(__AVX512VL__)
  else if constexpr (sizeof(V) == 32 && sizeof(T) == 4) _mm256_mask_storeu_ps(p, (__mmask8)m, (__m256)v);
  else if constexpr (sizeof(V) == 32 && sizeof(T) == 8) _mm256_mask_storeu_pd(p, (__mmask8)m, (__m256d)v);
#endif
  else std::memcpy(p, &v, cnt * sizeof(T));
}
#endif
template <typename V, typename T, bool TAIL> static inline V ld(const T* p, int cnt) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (TAIL && sizeof(V) == 32 && sizeof(T) == 4) return (V)_mm256_maskload_ps(p, tail_mask8(cnt));
#endif
#if defined(__AVX512F__)
  if constexpr (TAIL) return ld_mask512<V, T>(p, cnt);
#endif
  V v = V{};
  std::memcpy(&v, p, TAIL ? cnt * sizeof(T) : sizeof(V));
  return v;
}
template <typename V, typename T, bool TAIL> static inline void st(T* p, V v, int cnt) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  if constexpr (TAIL && sizeof(V) == 32 && sizeof(T) == 4) {
    _mm256_maskstore_ps(p, tail_mask8(cnt), (__m256)v);
    return;
  }
#endif
#if defined(__AVX512F__)
  if constexpr (TAIL) {
    st_mask512<V, T>(p, v, cnt);
    return;
  }
#endif
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
// g·sgn(d): with AVX-512, g times vfixupimm's sign (above). With AVX2 the compare-and-select sign costs
// 5 ops (2 compares, 2 ands, sub) before the FMA; instead pick g or −g by d's sign bit (vblendvps) and
// zero the lanes where d == 0: 3 ops before the add. Exact (the same ±g or 0 is added).
template <typename V> static inline V gsign(V g, V ng, V d) {
  typedef __typeof__(d[0] + 0) T;
#if !defined(__AVX512F__) && defined(__AVX__)
  if constexpr (sizeof(V) == 32 && sizeof(T) == 4) {
    const __m256 sel = _mm256_blendv_ps((__m256)g, (__m256)ng, (__m256)d);
    return (V)_mm256_and_ps(sel, _mm256_cmp_ps((__m256)d, _mm256_setzero_ps(), _CMP_NEQ_UQ));
  }
#endif
  (void)ng;
  return g * vsign(d);
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
  // (q·e − hi) + q·log2 m
  const __m512 lo = _mm512_fmadd_round_ps(qv, l, _mm512_fmsub_round_ps(qv, e, hi, RN), RN);
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

// ---- register budgets ------------------------------------------------------------------------------------
// AVX-512 has 32 vector registers, AVX2 16. A tile's accumulators plus its operands must fit, or every
// tap spills and reloads them: the AVX-512 tiles (16 filters in the forward, 8 taps in ∂X, all in
// 64-byte vectors) need 19 and 17 of them, which on an AVX2 machine (two ymm per 64-byte vector: 38,
// 34) ran the ResNet-20 forward at 3.8 G adder-MAC/s and ∂X at ~1 (Zen 3, one thread).
// FWD_OB: filters per forward tile, acc[OB] + x + Σx + broadcast w; GX_KB: taps per ∂X tile,
// x[KB] + acc[KB] + g + −g + d.
#if defined(__AVX512F__)
template <typename V> constexpr int FWD_OB = 16;
template <typename V> constexpr int GX_KB = 8;
#else
template <typename V> constexpr int FWD_OB = sizeof(V) <= 32 ? 12 : 5;  // 12+3 = 15 ymm; 2·5+5 = 15
template <typename V> constexpr int GX_KB = sizeof(V) <= 32 ? 5 : 2;    // 10+3 = 13 ymm; 2·(4+3) = 14
#endif

// A per-thread buffer of at least n elements that lives as long as the thread (grown, never shrunk): a fresh
// std::vector of packed filters per call page-faults all of it (glibc hands large blocks back to the OS on
// free), which on this VM costs about as much as a GEMM over the same bytes (the filter gradient's O × K
// temporaries: 27 vs 7 ms on a 3×3 512→512 layer). Kept: the largest O·K seen (9 MiB fp32 at 3×3 512→512).
// TAG: independent buffers of one type (the forward's packed filters and their sums).
template <typename T, int TAG = 0> static T* scratch(size_t n) {
  static thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
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

// acc + m for the forward's p = 1 tiles, as the FMA m·1 + acc: exactly the same rounding (m·1 is exact,
// one rounding of the sum), but Zen 3 and Zen 4 run vminps and vaddps on the same two FP pipes and FMAs on
// two others: min + add sustains 1 vector-MAC per cycle, min + FMA 2 (benchmarks/cpu_issue_bound.cpp: 8 vs
// 16 lane-MACs/cycle register-resident on both, this 12-filter AVX2 tile's op mix 7.1 vs 10.7-11.0 on Zen 3).
// AVX-512 (Zen 4 splits a zmm op into two 256-bit halves on the same pipes) takes it too; on Intel's AVX-512
// cores add and FMA share ports 0 and 5, where it changes nothing. Only for tiles of >= 8 ymm accumulators:
// FMA's latency is 4 cycles to add's 3, which a 4-filter tile (4 chains, ~2 cycles of work per tap) would
// wait on.
#if defined(__FMA__) || defined(__AVX512F__)
#define ADDER_FMA_ACC 1
#if defined(__AVX512F__)
typedef __m512 OneVec;
static inline OneVec one_vec() { return _mm512_set1_ps(1.0f); }
#else
typedef __m256 OneVec;
static inline OneVec one_vec() { return _mm256_set1_ps(1.0f); }
#endif
template <typename V> static inline V acc_add(V acc, V m, OneVec one) {
  typedef __typeof__(acc[0] + 0) T;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4 && sizeof(V) == 64) return (V)_mm512_fmadd_ps((__m512)m, one, (__m512)acc);
  if constexpr (sizeof(T) == 4 && sizeof(V) == 32)
    return (V)_mm256_fmadd_ps((__m256)m, _mm512_castps512_ps256(one), (__m256)acc);
  return acc + m;
#else
  if constexpr (sizeof(T) == 4 && sizeof(V) == 32) {
    return (V)_mm256_fmadd_ps((__m256)m, one, (__m256)acc);
  } else if constexpr (sizeof(T) == 4 && sizeof(V) == 64) {
    union U { V v; __m256 h[2]; };
    U a, b;
    a.v = acc;
    b.v = m;
    a.h[0] = _mm256_fmadd_ps(b.h[0], one, a.h[0]);
    a.h[1] = _mm256_fmadd_ps(b.h[1], one, a.h[1]);
    return a.v;
  } else {
    return acc + m;
  }
#endif
}
#endif

// One tile: OB filters × one vector of output lanes (one row segment, or a row pair when PAIR).
template <typename T, typename V, int MODE, int OB, bool TAIL, bool PAIR>
static inline void fwd_tile(const T* xp, i64 rs, const i64* off, const T* w, T* y, i64 ys, i64 K, i64 L,
                            int cnt, bool two, T p, const T* cx, const T* sw, i64 Kn = -1, bool add = false,
                            i64 wk = 1) {
  // filter b's tap k at w[b·K + k·wk] (wk > 1: fwd_flat's packed tiles, K = 1 there); taps [0, Kn)
  // (Kn < 0: all K); add: y += this chunk's part (a later chunk of fwd_flat's tap blocking: sw = null
  // there, Σw went in with the first chunk)
  if (Kn < 0) Kn = K;
  V acc[OB];
  for (int b = 0; b < OB; ++b) acc[b] = V{};
  V sx = V{};
#ifdef ADDER_FMA_ACC
  const OneVec one = one_vec();
#endif
  for (i64 k = 0; k < Kn; ++k) {
    V xv = ldr<V, T, TAIL, PAIR>(xp + off[k], rs, cnt, two);
    if (MODE == 1) {
      xv -= cx[k];
      sx += xv;
    }
    for (int b = 0; b < OB; ++b) {
      const V wv = V{} + w[b * K + k * wk];
#ifdef ADDER_FMA_ACC
      if (MODE == 1 && OB * (int)(sizeof(V) / 32) >= 8) acc[b] = acc_add(acc[b], vmin(xv, wv), one);
      else if (MODE == 1) acc[b] += vmin(xv, wv);
#else
      if (MODE == 1) acc[b] += vmin(xv, wv);
#endif
      else if (MODE == 2) { V d = xv - wv; acc[b] += d * d; }
      else acc[b] += vpow<T, V>(vabs(xv - wv), p);
    }
  }
  for (int b = 0; b < OB; ++b) {
    // p = 1: y = −(Σx + Σw − 2·Σmin)
    const V out = MODE == 1 ? (acc[b] + acc[b]) - (sw ? sx + sw[b] : sx) : -acc[b];
    if (add) str<V, T, TAIL, PAIR, true>(y + b * L, ys, out, cnt, two);
    else str<V, T, TAIL, PAIR, false>(y + b * L, ys, out, cnt, two);
  }
}

// The forward's filters packed tile by tile, tap-major, for the tiles fwd_col / fwd_flat walk over filters
// [o0, o1) (FWD_OB<V>, then 4, then 1): tile at o holds w[o + b, k] at wp[(o − o0)·K + k·OB + b]. Read in
// place, a tile's OB rows lie K·4 bytes apart, which for K = 1024 or 2048 (ResNet-50's 1×1 layers) puts
// them all in the same L1 set (4 KiB aliasing) and missed on every tap: the AVX-512 row-pair forward of the
// 7×7 layers (K = 1024-4608) ran at 4.0-4.9x conv's time before it packed, the flat one (packed) at 2.4-2.8x.
// cx (p = 1): the packed values are the centred w − cx[k] (one rounding, as before in the launcher), and
// s[o − o0] = Σ_k (w − cx) of exactly those values, summed in double: the launcher's O × K subtraction
// and its sum cost 1.4 of the 16 ms of a batch-2 3×3 512→512 7×7 forward (a fresh 9.4 MB tensor).
//
// Part j of njobs of that packing into wp / s (indexed from o0): the tiles that start in the j-th share of
// the 16-filter tiles (the last share also takes the 4- and 1-filter tiles), so several threads pack one
// shared copy. Each thread packing its own copy of all O filters did not shrink with a second thread
// (ResNet-50 two-thread speed-up 1.65-1.70x against conv's 1.80-1.87x).
template <typename T, typename V>
static void fwd_pack_part(const Geom& g, const T* w, T* wp, T* s, i64 o0, i64 o1, const T* cx, int j, int njobs) {
  const i64 K = g.K();
  constexpr int OB = FWD_OB<V>;
  const i64 units = (o1 - o0) / OB;
  const i64 a = o0 + units * j / njobs * OB, b = j == njobs - 1 ? o1 : o0 + units * (j + 1) / njobs * OB;
  i64 o = o0;
  auto pack = [&](int ob) {
    for (; o + ob <= o1; o += ob) {
      if (o < a || o >= b) continue;
      T* t = wp + (o - o0) * K;
      if (cx) {
        double acc[32] = {};  // ob <= FWD_OB <= 16: ob independent sums, not one latency-bound chain each
        for (i64 k = 0; k < K; ++k)
          for (int c = 0; c < ob; ++c) {
            const T v = w[(o + c) * K + k] - cx[k];
            t[k * ob + c] = v;
            acc[c] += (double)v;
          }
        for (int c = 0; c < ob; ++c) s[o - o0 + c] = (T)acc[c];
      } else {
        for (i64 k = 0; k < K; ++k)
          for (int c = 0; c < ob; ++c) t[k * ob + c] = w[(o + c) * K + k];
      }
    }
  };
  pack(OB); pack(4); pack(1);
}

// The whole packing, into this thread's buffers; *sw = the sums (null without cx).
template <typename T, typename V>
static const T* fwd_pack(const Geom& g, const T* w, i64 o0, i64 o1, const T* cx = nullptr,
                         const T** sw = nullptr) {
  T* const wp = scratch<T>((o1 - o0) * g.K());
  T* const s = cx ? scratch<T, 1>(o1 - o0) : nullptr;
  fwd_pack_part<T, V>(g, w, wp, s, o0, o1, cx, 0, 1);
  if (sw) *sw = s;
  return wp;
}

// All O filters packed once, shared by every job, each of the njobs threads packing a part (the
// calling thread's buffers: they live until its next forward call).
template <typename T, int BYTES, bool PAIR = false>
static void fwd_pack_shared(const Geom& g, const T* w, const T* cx, int njobs, const T** wp, const T** sw) {
  T* const p = scratch<T, 2>(g.O * g.K());
  T* const s = cx ? scratch<T, 3>(g.O) : nullptr;
  for_jobs(njobs, [&](int j) { fwd_pack_part<T, typename Vec<T, BYTES>::V>(g, w, p, s, 0, g.O, cx, j, njobs); });
  *wp = p;
  *sw = s;
}

// wp: fwd_pack's tiles over all O filters, sw its sums
template <typename T, typename V, int MODE, bool TAIL, bool PAIR>
static inline void fwd_col(const T* xp, i64 rs, const i64* off, const T* wp, T* y, i64 ys, i64 K, i64 O, i64 L,
                           int cnt, bool two, T p, const T* cx, const T* sw) {
  i64 o = 0;
#define FWD_TILES(OB)                                                                                      \
  for (; o + OB <= O; o += OB)                                                                             \
    fwd_tile<T, V, MODE, OB, TAIL, PAIR>(xp, rs, off, wp + o * K, y + o * L, ys, 1, L, cnt, two, p, cx,    \
                                         sw ? sw + o : nullptr, K, false, OB);
  FWD_TILES(FWD_OB<V>) FWD_TILES(4) FWD_TILES(1)
#undef FWD_TILES
}

// rows r0..r1 of the flattened (n, oh) output rows; PAIR: two rows of one image per vector; w, sw: packed by
// fwd_pack<T, V>(g, w, 0, O, cx, &sw)
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
                           i64 O, i64 L, int cnt, bool two, T p, int s0 = 0, int s1 = KB) {
  V xv[KB], acc[KB];
  for (int b = 0; b < KB; ++b) { xv[b] = ldr<V, T, TAIL, PAIR>(xp + off[b], rs, cnt, two); acc[b] = V{}; }
  for (i64 o = 0; o < O; ++o) {
    const V gv = ldr<V, T, TAIL, PAIR>(go + o * L, gs, cnt, two);
    const V ngv = -gv;  // (gsign's blend operand on AVX2; dead code elsewhere)
    for (int b = 0; b < KB; ++b) {
      V d = w[o * K + b] - xv[b];
      if (MODE == 1) acc[b] += gsign(gv, ngv, d);
      else if (MODE == 2) acc[b] += gv * d;
      else if (MODE == 3) acc[b] += gv * vclamp1(d);
      else {
        acc[b] += (gv * vpow<T, V>(vabs(d), p - 1)) * vsign(d);  // × ±1 or 0: exact
      }
    }
  }
  // sequential read-add-write: the two rows of a pair overlap in GP, which is fine within one thread
  // (taps outside [s0, s1) belong to another job's channels: computed, not stored; see gx_flat)
  for (int b = s0; b < s1; ++b) str<V, T, TAIL, PAIR, true>(gp + off[b], rs, acc[b], cnt, two);
}

// ∂X's filters for taps [k0, k1), packed tile by tile as the tap loops below walk them (tiles of KB taps
// from k0, then single taps): tile at k holds w[o, k + b] at wp[(k − k0)·O + o·KB + b]. Read in place, the
// tile's o loop steps K·4 bytes per filter: 4 KiB for a 1×1 layer with K = 1024 (1 KiB at K = 256), so
// every filter row falls in the same few L1 sets and missed (the forward's packing fixed the same thing).
// Values and order of operations are unchanged: results are bit-identical to the unpacked loop.
template <typename T, int KB> static const T* gx_pack(const Geom& g, const T* w, i64 k0, i64 k1) {
  const i64 K = g.K(), O = g.O;
  T* wp = scratch<T>(O * (k1 - k0));
  i64 k = k0;
  for (; k + KB <= k1; k += KB)
    for (i64 o = 0; o < O; ++o)
      for (int b = 0; b < KB; ++b) wp[(k - k0) * O + o * KB + b] = w[o * K + k + b];
  for (; k < k1; ++k)
    for (i64 o = 0; o < O; ++o) wp[(k - k0) * O + o] = w[o * K + k];
  return wp;
}

template <typename T, typename V, int MODE, bool PAIR>
static void gx(const Geom& g, const T* P, const T* w, const T* go, T* GP, i64 n0, i64 n1, i64 c0, i64 c1,
               T p, const i64* off) {
  constexpr int W = sizeof(V) / sizeof(T), H = PAIR ? W / 2 : W;
  const i64 L = g.L(), khw = g.KH * g.KW;
  const i64 k0 = c0 * khw, k1 = c1 * khw;
  const T* wp = gx_pack<T, GX_KB<V>>(g, w, k0, k1);
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
  for (; k + GX_KB<V> <= k1; k += GX_KB<V>)                                                               \
    gx_tile<T, V, MODE, GX_KB<V>, TAILV, PAIR>(xp, gp, g.Wq, off + k, wp + (k - k0) * g.O, gr, g.Wo, GX_KB<V>, \
                                               g.O, L, cnt, two, p);                                       \
  for (; k < k1; ++k)                                                                                      \
    gx_tile<T, V, MODE, 1, TAILV, PAIR>(xp, gp, g.Wq, off + k, wp + (k - k0) * g.O, gr, g.Wo, 1, g.O, L, cnt,    \
                                        two, p);
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
static Geom mk(const i64* a) {
  return Geom{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12]};
}

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

// ---- inference epilogue: folded BatchNorm (+ residual) (+ ReLU) ----------------------------------------
// y ← relu?((y − center[o])·scale[o] + shift[o] (+ res)), rows r0..r1 of the flattened (n, oh) rows, every
// filter. (y − center)·scale + shift, not y·scale + (shift − center·scale): adder outputs sit far from 0
// (≈ −1000 around a spread of ~10) and folding the mean into the shift would cancel ~2 digits in fp32 (the
// Triton epilogue's form, kernels/triton_adder.py).
template <typename T>
static inline void epi_row(T* yr, const T* rr, i64 Wo, T c, T s, T b, int relu) {
  if (rr) {
    if (relu) for (i64 j = 0; j < Wo; ++j) yr[j] = std::max((yr[j] - c) * s + b + rr[j], T(0));
    else for (i64 j = 0; j < Wo; ++j) yr[j] = (yr[j] - c) * s + b + rr[j];
  } else {
    if (relu) for (i64 j = 0; j < Wo; ++j) yr[j] = std::max((yr[j] - c) * s + b, T(0));
    else for (i64 j = 0; j < Wo; ++j) yr[j] = (yr[j] - c) * s + b;
  }
}
template <typename T>
static void epilogue(const Geom& g, T* y, i64 r0, i64 r1, const T* center, const T* scale, const T* shift,
                     const T* res, int relu) {
  const i64 L = g.L();
  for (i64 r = r0; r < r1; ++r) {
    const i64 n = r / g.Ho, oh = r % g.Ho;
    for (i64 o = 0; o < g.O; ++o) {
      const i64 at = (n * g.O + o) * L + oh * g.Wo;
      epi_row(y + at, res ? res + at : nullptr, g.Wo, center[o], scale[o], shift[o], relu);
    }
  }
}

// ---- flat variants (small or odd-width outputs) ---------------------------------------------------------
// The output positions of one image as ONE range q = oh·Wq + ow, q in [0, Lv), Lv = (Ho − 1)·Wq + Wo: tap k
// of every q sits at q + off[k] in P (for any stride: P is phase-split), so vectors run across row ends
// and only the image's last vector is partial. Rows of 14 or 7 (ResNet-50 stages 3-4) otherwise took a
// partial (memcpy) load on every tap of every vector. The Wq − Wo columns between rows are computed and
// thrown away (y is (N, O, Ho, Wq); the launcher keeps [..., :Wo]): 12 % of the lanes at 14 wide with a
// 3×3, none for 1×1 layers (Wq = Wo). Every access stays inside what the last real output reads.
// Loop order: filter tile outer, positions inner, so a tile's filters (12·K values) and the image's P
// stay in L2 while the positions stream (position-outer re-read all O·K filter values per vector: 2.4 MB
// for a 3×3 256→256 layer, 9.4 MB at 512→512).
template <typename T, typename V, int MODE, int OB>
static inline void fwd_flat_otile(const T* xi, const i64* off, const T* wp, T* y, i64 Kn, bool add, i64 Lf,
                                  i64 Lv, T p, const T* cx, const T* sw) {
  constexpr int W = sizeof(V) / sizeof(T);
  i64 q = 0;
  for (; q + W <= Lv; q += W)
    fwd_tile<T, V, MODE, OB, false, false>(xi + q, 0, off, wp, y + q, 0, 1, Lf, W, false, p, cx, sw, Kn, add, OB);
  if (q < Lv)
    fwd_tile<T, V, MODE, OB, true, false>(xi + q, 0, off, wp, y + q, 0, 1, Lf, (int)(Lv - q), false, p, cx, sw,
                                          Kn, add, OB);
}

// Taps in chunks of kc (kc <= 0: all): a chunk's P (kc taps of one image) and a tile's kc filter values
// stay in L1/L2 while every position and tile reuses them; y accumulates over the chunks (p = 1 is
// linear in its three sums). Without it a 1×1 1024→256 layer at 14×14 streamed its 800 KB image from L3
// for every filter tile. Filters are packed tile by tile, tap-major (wp[k·OB + b]): read in place, the
// OB rows of a tile lie K·4 bytes apart, which for K = 1024 or 2048 (ResNet-50's 1×1 layers) puts all
// 12 in the same L1 set (4 KiB aliasing) and missed on every tap.
// wp, sw: fwd_pack_shared's packing of all O filters, or null to pack [o0, o1) here.
template <typename T, typename V, int MODE>
static void fwd_flat(const Geom& g, const T* P, const T* w, T* y, i64 n0, i64 n1, i64 o0, i64 o1, T p,
                     const i64* off, const T* cx, i64 kc, const T* wp = nullptr, const T* sw = nullptr) {
  const i64 K = g.K(), Lf = g.Ho * g.Wq, Lv = (g.Ho - 1) * g.Wq + g.Wo;
  if (kc <= 0 || kc > K) kc = K;
  if (!wp) wp = fwd_pack<T, V>(g, w, o0, o1, MODE == 1 ? cx : nullptr, &sw);  // the loop's tile order
  else wp += o0 * K, sw = sw ? sw + o0 : nullptr;
  for (i64 n = n0; n < n1; ++n) {
    const T* xi = P + n * g.img();
    T* yi = y + n * g.O * Lf;
    for (i64 k0 = 0; k0 < K; k0 += kc) {
      const i64 Kn = std::min(kc, K - k0);
      const bool add = k0 > 0;
      const T* cxk = cx ? cx + k0 : nullptr;
      i64 o = o0;
#define FLAT_TILES(OB)                                                                                     \
  for (; o + OB <= o1; o += OB)                                                                            \
    fwd_flat_otile<T, V, MODE, OB>(xi, off + k0, wp + (o - o0) * K + k0 * OB, yi + o * Lf, Kn, add,        \
                                   Lf, Lv, p, cxk, sw && !add ? sw + (o - o0) : nullptr);
      FLAT_TILES(FWD_OB<V>) FLAT_TILES(4) FLAT_TILES(1)
#undef FLAT_TILES
    }
  }
}

template <typename T>
static void epilogue_flat(const Geom& g, T* y, i64 n0, i64 n1, i64 o0, i64 o1, const T* center,
                          const T* scale, const T* shift, const T* res, int relu) {
  const i64 Lf = g.Ho * g.Wq, L = g.L();
  for (i64 n = n0; n < n1; ++n)
    for (i64 o = o0; o < o1; ++o)
      for (i64 oh = 0; oh < g.Ho; ++oh)
        epi_row(y + (n * g.O + o) * Lf + oh * g.Wq, res ? res + (n * g.O + o) * L + oh * g.Wo : nullptr, g.Wo,
                center[o], scale[o], shift[o], relu);
}

// ∂X over the flat range: go is (N, O, Ho, Wq) with zeros in the Wq − Wo thrown-away columns, so those
// lanes add exactly 0 (into pixels of the same image and channel range: no race between threads).
// Tap tile outer, positions inner: the tile's O·KB filter values stay in L1 while the image's g streams.
// That order sums a pixel's contributions by (tile, position, tap), so the tiles must not depend on the
// job's channel range [c0, c1) (batches smaller than the thread count split by channel): tiles lie on
// one grid over all K taps, [t, t + KB) for t = 0, KB, ... up to K − K % KB, then single taps; a job
// runs the grid's tiles that hold any of its taps and stores only its own. Tiles that started at k0
// changed ∂X in the last bit between 1 and 2 threads (AVX-512, KB = 8, 3×3 layer of 5 channels).
template <typename T, typename V, int MODE>
static void gx_flat(const Geom& g, const T* P, const T* w, const T* go, T* GP, i64 n0, i64 n1, i64 c0, i64 c1,
                    T p, const i64* off) {
  constexpr int W = sizeof(V) / sizeof(T), KB = GX_KB<V>;
  const i64 Lf = g.Ho * g.Wq, Lv = (g.Ho - 1) * g.Wq + g.Wo, khw = g.KH * g.KW;
  const i64 k0 = c0 * khw, k1 = c1 * khw, Kt = g.K() - g.K() % KB;  // [0, Kt): the tile grid
  const i64 t0 = k0 < Kt ? k0 - k0 % KB : k0;                          // first grid tile (or single)
  const i64 t1 = k1 <= Kt ? (k1 + KB - 1) / KB * KB : k1;              // end of what is packed
  const T* wp = gx_pack<T, KB>(g, w, t0, t1);
  for (i64 n = n0; n < n1; ++n) {
    const T* xi = P + n * g.img();
    T* gi = GP + n * g.img();
    const T* gn = go + n * g.O * Lf;
    auto tiles = [&](auto kb, i64 k, int s0, int s1) {
      constexpr int B = decltype(kb)::value;
      const T* wk = wp + (k - t0) * g.O;
      i64 q = 0;
      for (; q + W <= Lv; q += W)
        gx_tile<T, V, MODE, B, false, false>(xi + q, gi + q, 0, off + k, wk, gn + q, 0, B, g.O, Lf, W, false, p, s0,
                                             s1);
      if (q < Lv)
        gx_tile<T, V, MODE, B, true, false>(xi + q, gi + q, 0, off + k, wk, gn + q, 0, B, g.O, Lf, (int)(Lv - q),
                                            false, p, s0, s1);
    };
    i64 k = t0;
    for (; k < k1 && k < Kt; k += KB)
      tiles(std::integral_constant<int, KB>{}, k, (int)(k0 > k ? k0 - k : 0), (int)(k1 < k + KB ? k1 - k : KB));
    for (; k < k1; ++k) tiles(std::integral_constant<int, 1>{}, k, 0, 1);
  }
}

#ifdef ADDER_FWD
// mode 1 (p = 1): cx is the per-tap centre (K); the kernel centres the filters as it packs them (fwd_pack).
// scale != null: the inference epilogue (above) on every block of rows right after the block is computed,
// while its outputs (<= ~64 KiB) are still in L1/L2: one pass over y in memory, as a fused kernel.
// jobs: njobs × (r0, r1) row ranges
extern "C" void CAT(adder_fwd_, ADDER_SUF)(const i64* geom, const T* P, const T* w, T* y, const i64* jobs,
                                          int njobs, double p, int mode, int wide, const i64* off, const T* cx,
                                          const T* center, const T* scale, const T* shift, const T* res,
                                          int relu) {
  const Geom g = mk(geom);
  const T *wp = nullptr, *sw = nullptr;  // packed (and for p = 1 centred) once, shared by the jobs
  VECTORS(fwd_pack_shared, g, w, mode == 1 ? cx : nullptr, njobs, &wp, &sw);
  for_jobs(njobs, [&](int j) {
    const i64 r0 = jobs[2 * j], r1 = jobs[2 * j + 1];
    if (!scale) {
      VECTORS(fwd_entry, g, P, wp, y, r0, r1, (T)p, mode, off, cx, sw);
      return;
    }
    // even-sized blocks (paired rows stay paired), each <= 64 KiB of outputs
    const i64 rows = std::max<i64>(2, ((64 << 10) / (i64)(sizeof(T) * g.O * g.Wo)) & ~(i64)1);
    for (i64 b0 = r0; b0 < r1; b0 += rows) {
      const i64 b1 = std::min(r1, b0 + rows);
      VECTORS(fwd_entry, g, P, wp, y, b0, b1, (T)p, mode, off, cx, sw);
      epilogue<T>(g, y, b0, b1, center, scale, shift, res, relu);
    }
  });
}
// flat forward (see fwd_flat): images [n0, n1), filters [o0, o1); y is (N, O, Ho, Wq). 32-byte fp32 vectors
// where AVX-512 is absent (wide = 0), else 64-byte.
// jobs: njobs × (n0, n1, o0, o1)
extern "C" void CAT(adder_fwd_flat_, ADDER_SUF)(const i64* geom, const T* P, const T* w, T* y, const i64* jobs,
                                               int njobs, double p, int mode, int wide, const i64* off,
                                               const T* cx, const T* center, const T* scale, const T* shift,
                                               const T* res, int relu, i64 kc) {
  const Geom g = mk(geom);
  // jobs over images (every job all O filters): one shared packing, each thread packing a part; jobs over
  // filter ranges pack their own range
  bool all_filters = true;
  for (int j = 0; j < njobs; ++j) all_filters = all_filters && jobs[4 * j + 2] == 0 && jobs[4 * j + 3] == g.O;
  const T *wp = nullptr, *sw = nullptr;
  if (all_filters) WIDE_OR_NARROW(fwd_pack_shared, g, w, mode == 1 ? cx : nullptr, njobs, &wp, &sw);
  for_jobs(njobs, [&](int j) {
    const i64 n0 = jobs[4 * j], n1 = jobs[4 * j + 1], o0 = jobs[4 * j + 2], o1 = jobs[4 * j + 3];
    auto run = [&](auto bytes) {
      typedef typename Vec<T, decltype(bytes)::value>::V V;
      if (mode == 1) fwd_flat<T, V, 1>(g, P, w, y, n0, n1, o0, o1, (T)p, off, cx, kc, wp, sw);
      else if (mode == 2) fwd_flat<T, V, 2>(g, P, w, y, n0, n1, o0, o1, (T)p, off, nullptr, kc, wp, sw);
      else fwd_flat<T, V, 0>(g, P, w, y, n0, n1, o0, o1, (T)p, off, nullptr, kc, wp, sw);
    };
    if (wide || sizeof(T) == 8) run(std::integral_constant<int, 64>{});
    else if constexpr (sizeof(T) == 4) run(std::integral_constant<int, 32>{});
    if (scale) epilogue_flat<T>(g, y, n0, n1, o0, o1, center, scale, shift, res, relu);
  });
}
// jobs: njobs × (n0, n1)
extern "C" void CAT(adder_phase_pad_, ADDER_SUF)(const i64* geom, i64 H, i64 W, i64 PH, i64 PW, const T* x,
                                                T* P, const i64* jobs, int njobs) {
  const Geom g = mk(geom);
  for_jobs(njobs, [&](int j) { phase_pad<T>(g, H, W, PH, PW, x, P, jobs[2 * j], jobs[2 * j + 1]); });
}
#if ADDER_OFFSETS
extern "C" void adder_tap_offsets(const i64* geom, i64* off) { tap_offsets(mk(geom), off); }
// filters per forward tile for 32- or 64-byte vectors: the flat forward's filter-range split between
// threads falls on multiples of it, so every filter is computed by the same tile code whatever the split
// (bitwise the same result for an image alone or in a batch)
extern "C" int adder_fwd_ob(int bytes) {
  return bytes == 32 ? FWD_OB<Vec<float, 32>::V> : FWD_OB<Vec<float, 64>::V>;
}
extern "C" int adder_openmp() {  // 1: the entry points run their job lists on OpenMP threads
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}
extern "C" int adder_vector_bytes() {  // the launcher picks 32-byte fp32 vectors where 64 would split
#if defined(__AVX512F__)
  return 64;
#else
  return 32;
#endif
}
#endif
#endif
#ifdef ADDER_GX
// jobs: njobs × (n0, n1, c0, c1)
extern "C" void CAT(adder_gx_, ADDER_SUF)(const i64* geom, const T* P, const T* w, const T* go, T* GP,
                                         const i64* jobs, int njobs, double p, int mode, int wide,
                                         const i64* off) {
  const Geom g = mk(geom);
  for_jobs(njobs, [&](int j) {
    const i64* a = jobs + 4 * j;
    VECTORS(gx_entry, g, P, w, go, GP, a[0], a[1], a[2], a[3], (T)p, mode, off);
  });
}
extern "C" void CAT(adder_gx_flat_, ADDER_SUF)(const i64* geom, const T* P, const T* w, const T* go, T* GP,
                                              const i64* jobs, int njobs, double p, int mode, int wide,
                                              const i64* off) {
  const Geom g = mk(geom);
  for_jobs(njobs, [&](int j) {
    const i64 n0 = jobs[4 * j], n1 = jobs[4 * j + 1], c0 = jobs[4 * j + 2], c1 = jobs[4 * j + 3];
    auto run = [&](auto bytes) {
      typedef typename Vec<T, decltype(bytes)::value>::V V;
      if (mode == 1) gx_flat<T, V, 1>(g, P, w, go, GP, n0, n1, c0, c1, (T)p, off);
      else if (mode == 2) gx_flat<T, V, 2>(g, P, w, go, GP, n0, n1, c0, c1, (T)p, off);
      else if (mode == 3) gx_flat<T, V, 3>(g, P, w, go, GP, n0, n1, c0, c1, (T)p, off);
      else gx_flat<T, V, 0>(g, P, w, go, GP, n0, n1, c0, c1, (T)p, off);
    };
    if (wide || sizeof(T) == 8) run(std::integral_constant<int, 64>{});
    else if constexpr (sizeof(T) == 4) run(std::integral_constant<int, 32>{});
  });
}
// jobs: njobs × (n0, n1)
extern "C" void CAT(adder_phase_unpad_, ADDER_SUF)(const i64* geom, i64 H, i64 W, i64 PH, i64 PW,
                                                  const T* GP, T* gx, const i64* jobs, int njobs) {
  const Geom g = mk(geom);
  for_jobs(njobs, [&](int j) { phase_unpad<T>(g, H, W, PH, PW, GP, gx, jobs[2 * j], jobs[2 * j + 1]); });
}
#endif
#ifdef ADDER_GW
// jobs: njobs × (r0, r1); job j adds into its own O × K buffer gw + j·O·K (the launcher sums them in order)
extern "C" void CAT(adder_gw_, ADDER_SUF)(const i64* geom, const T* P, const T* w, const T* go, T* gw,
                                         const i64* jobs, int njobs, int wide, const i64* off) {
  const Geom g = mk(geom);
  for_jobs(njobs, [&](int j) {
    WIDE_OR_NARROW(gw_entry, g, P, w, go, gw + j * g.O * g.K(), jobs[2 * j], jobs[2 * j + 1], off);
  });
}
#endif
