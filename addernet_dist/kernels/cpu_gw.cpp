// CPU fast path, filter gradient ("sign" mode): gw = sum g * sgn(x - w).
// One translation unit per kernel, compiled once per dtype by addernet_dist.kernels.cpu_build
// (-DADDER_T=<type> -DADDER_SUF=<f32|f64>). Shared code: cpu_adder.h.
#include "cpu_adder.h"

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

template <typename T, int BYTES>
static void gw_entry(const Geom& g, const T* P, const T* w, const T* go, T* gw, i64 r0, i64 r1,
                     const i64* off) {
  gwk<T, typename Vec<T, BYTES>::V>(g, P, w, go, gw, r0, r1, off);
}

typedef ADDER_T T;

// jobs: njobs × (r0, r1); job j adds into its own O × K buffer gw + j·O·K (the launcher sums them in order)
extern "C" void CAT(adder_gw_, ADDER_SUF)(const i64* geom, const T* P, const T* w, const T* go, T* gw,
                                         const i64* jobs, int njobs, int wide, const i64* off) {
  const Geom g = mk(geom);
  for_jobs(njobs, [&](int j) {
    WIDE_OR_NARROW(gw_entry, g, P, w, go, gw + j * g.O * g.K(), jobs[2 * j], jobs[2 * j + 1], off);
  });
}
