// CPU fast path, forward: y = -sum_k |x - w|^p, the inference epilogue, the phase-pad layout.
// One translation unit per kernel, compiled once per dtype by addernet_dist.kernels.cpu_build
// (-DADDER_T=<type> -DADDER_SUF=<f32|f64>). Shared code: cpu_adder.h.
#include "cpu_adder.h"

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

template <typename T, int BYTES, bool PAIR>
static void fwd_entry(const Geom& g, const T* P, const T* w, T* y, i64 r0, i64 r1, T p, int mode, const i64* off,
                      const T* cx, const T* sw) {
  typedef typename Vec<T, BYTES>::V V;
  if (mode == 1) fwd<T, V, 1, PAIR>(g, P, w, y, r0, r1, p, off, cx, sw);
  else if (mode == 2) fwd<T, V, 2, PAIR>(g, P, w, y, r0, r1, p, off, nullptr, nullptr);
  else fwd<T, V, 0, PAIR>(g, P, w, y, r0, r1, p, off, nullptr, nullptr);
}

typedef ADDER_T T;

// ---- inference epilogue: folded BatchNorm (+ residual) (+ ReLU) ----------------------------------------
// y ← relu?((y − center[o])·scale[o] + shift[o] (+ res)), rows r0..r1 of the flattened (n, oh) rows, every
// filter. (y − center)·scale + shift, not y·scale + (shift − center·scale): adder outputs sit far from 0
// (≈ −1000 around a spread of ~10) and folding the mean into the shift would cancel ~2 digits in fp32 (the
// Triton epilogue's form, kernels/triton_kernels.py).
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
