// CPU fast path, input gradient: gx = sum_o g * f(w - x) and the phase-unpad layout.
// One translation unit per kernel, compiled once per dtype by addernet_dist.kernels.cpu_build
// (-DADDER_T=<type> -DADDER_SUF=<f32|f64>). Shared code: cpu_adder.h.
#include "cpu_adder.h"


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

template <typename T, int BYTES, bool PAIR>
static void gx_entry(const Geom& g, const T* P, const T* w, const T* go, T* GP, i64 n0, i64 n1, i64 c0, i64 c1,
                     T p, int mode, const i64* off) {
  typedef typename Vec<T, BYTES>::V V;
  if (mode == 1) gx<T, V, 1, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
  else if (mode == 2) gx<T, V, 2, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
  else if (mode == 3) gx<T, V, 3, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
  else gx<T, V, 0, PAIR>(g, P, w, go, GP, n0, n1, c0, c1, p, off);
}

typedef ADDER_T T;

// ---- flat variants (small or odd-width outputs) ---------------------------------------------------------
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
