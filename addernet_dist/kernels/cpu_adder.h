// Common header of the CPU fast path (addernet_dist.kernels.cpu_build compiles the three units that include it:
// cpu_fwd.cpp, cpu_gx.cpp, cpu_gw.cpp, each once per dtype: 6 objects, compiled in parallel, one .so).
// Shipped as package data next to cpu_adder.py; the on-disk cache of the compiled object is keyed on the
// content of all four files, so an edit here recompiles on next use. See cpu_adder.py's docstring and
// docs/kernels_cpu.md for the design. Everything here is static / templates: each unit instantiates what
// it uses.
#pragma once
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
// One specialisation per element type T, written once: the intrinsics' suffix SUF (ps/pd), the mask type,
// the half width H (8 floats, 4 doubles) and the vector type VEC (the preprocessor emits the same code).
#define PAIR512(T, MASK, SUF, H, VEC)                                                      \
  template <typename V> struct Pair512<T, V> {                                             \
    static inline V ld(const T* p, i64 rs, MASK lo, MASK hi) {                             \
      return (V)_mm512_mask_loadu_##SUF(_mm512_maskz_loadu_##SUF(lo, p), hi, p + rs - H); \
    }                                                                                      \
    static inline void st(T* p, i64 rs, V v, MASK lo, MASK hi) {                           \
      _mm512_mask_storeu_##SUF(p, lo, (VEC)v);                                             \
      _mm512_mask_storeu_##SUF(p + rs - H, hi, (VEC)v);                                    \
    }                                                                                      \
  };
PAIR512(float, __mmask16, ps, 8, __m512)
PAIR512(double, __mmask8, pd, 4, __m512d)
#undef PAIR512
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

// ---- entry points: geom = (N, C, O, KH, KW, SH, SW, DH, DW, Hq, Wq, Ho, Wo) ----------------------------
// wide: 0 = 32-byte vectors (fp32 only), 1 = 64-byte, 2 = 64-byte holding two output rows
static Geom mk(const i64* a) {
  return Geom{a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12]};
}

// Each unit is compiled once per dtype with -DADDER_T=<type> -DADDER_SUF=<suffix> (cpu_build._UNITS).
// fp64 (tests, checks) only gets 64-byte vectors: half the instantiations.
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
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
