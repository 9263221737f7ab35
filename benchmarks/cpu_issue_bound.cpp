// Issue-throughput bound of the CPU fast path's p = 1 forward (issue 15), one thread, AVX2 + FMA.
//
//   g++ -O3 -march=native -std=c++17 -o /tmp/cpu_issue_bound benchmarks/cpu_issue_bound.cpp && /tmp/cpu_issue_bound
//
// Loops with 12 independent accumulators (latency hidden: 12 chains > 2 ops/cycle × 3-4 cycles), operands in
// registers or L1:
//   fma        acc += a·b                   vfmadd231ps, conv's inner op
//   fma_bc     oneDNN AVX2 conv's mix       per tap 4 broadcast inputs × 3 filter vectors: 12 vfmadd231ps m256
//   min_add    acc += min(x, w)             vminps + vaddps, the adder forward's op pair (registers only)
//   fwd_real   kernels/cpu_adder.cpp fwd_tile before issue 15's FMA change, MODE 1, OB = 12: per tap one x
//              vector load, − cx[k], Σx += x, then 12 × (vbroadcastss w from L1, vminps, vaddps)
//   min_mem    acc += min(bcast x, w[])     transposed tile: w vectors as memory operands, 4 positions × 3
//   min_only, add_only                      one op per accumulator: which pipes min and add use
//   min_fma    acc = min(x, w)·1 + acc      the add done by an FMA (exact: the product is exact)
//   fwd_fma    fwd_real with the FMA accumulate: the kernel's tile now
//   fwd_fma_sx  fwd_fma with Σx also as an FMA; fwd_fma_sx2: and the centring x − cx as an FMA (x·1 − cx)
//   mem_fma    min_mem with the FMA accumulate
//   fwd_prebc  fwd_fma with w pre-broadcast in memory (8 copies each): vminps's w is a memory operand
// Prints lane-MACs per ns (1 lane-MAC = one |x − w| or x·w term of one output); the fma loop runs at the
// 2 FMA/cycle peak of Zen 3, so lane-MAC/ns ÷ (fma's / 16) is lane-MACs per cycle. Best of REPS (argv[1],
// default 7), CPU time of this thread, all loops interleaved in every repetition. Built without
// -ffast-math so every loop is compiled as written (checked in the assembly: no spills, no hoisted min).
#include <immintrin.h>
#include <time.h>

#include <cstdio>
#include <cstring>

static double now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
// opaque to the compiler, emits nothing: keeps loop-invariant ops inside the loop
#define KEEP(v) asm volatile("" : "+x"(v))

constexpr long ITERS = 20'000'000;  // 12 vector ops × 8 lanes each: 1.92 G lane-MACs per run

static float fma_loop(float s) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.999999f);
  for (long it = 0; it < ITERS; ++it) {
    KEEP(a);
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
  }
  __m256 t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}

static float min_add_loop(float s) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  __m256 x = _mm256_set1_ps(0.5f), w0 = _mm256_set1_ps(0.25f), w1 = _mm256_set1_ps(0.75f);
  for (long it = 0; it < ITERS; ++it) {
    for (int i = 0; i < 12; i += 2) {
      KEEP(x);  // else min(x, w0) is computed once for all 6 accumulators
      acc[i] = _mm256_add_ps(acc[i], _mm256_min_ps(x, w0));
      acc[i + 1] = _mm256_add_ps(acc[i + 1], _mm256_min_ps(x, w1));
    }
  }
  __m256 t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}


// which pipes: min alone, add alone, and min with the add done by an FMA (acc = min·1 + acc)
template <int KIND> static float pipe_loop(float s) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  __m256 x = _mm256_set1_ps(0.5f), w0 = _mm256_set1_ps(0.25f), one = _mm256_set1_ps(1.0f);
  for (long it = 0; it < ITERS; ++it) {
    for (int i = 0; i < 12; ++i) {
      KEEP(x);
      if (KIND == 0) acc[i] = _mm256_min_ps(acc[i], x);  // min only (a chain per accumulator)
      if (KIND == 1) acc[i] = _mm256_add_ps(acc[i], x);  // add only
      if (KIND == 2) acc[i] = _mm256_fmadd_ps(_mm256_min_ps(x, w0), one, acc[i]);  // min + FMA
    }
  }
  __m256 t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}

// L1-resident operands: TAPS taps, x rows of 8 floats (TAPS·32 B), w packed tap-major, 12 per tap (TAPS·48 B)
constexpr int TAPS = 64;
alignas(64) static float X[TAPS * 8 + 64], Wt[TAPS * 12], CX[TAPS], WV[TAPS * 24], XB[TAPS * 4];

template <bool FMA, int SX = 0> static float fwd_real_loop(float s) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  __m256 sx = _mm256_setzero_ps();
  for (long it = 0; it < ITERS / TAPS; ++it) {
    const float* w = Wt;
    KEEP(sx);
    for (int k = 0; k < TAPS; ++k, w += 12) {
      __m256 xv = SX == 2 ? _mm256_fmsub_ps(_mm256_loadu_ps(X + 8 * k), one, _mm256_set1_ps(CX[k]))
                          : _mm256_sub_ps(_mm256_loadu_ps(X + 8 * k), _mm256_set1_ps(CX[k]));
      if (SX) sx = _mm256_fmadd_ps(xv, one, sx); else sx = _mm256_add_ps(sx, xv);
      for (int b = 0; b < 12; ++b) {
        const __m256 m = _mm256_min_ps(xv, _mm256_set1_ps(w[b]));
        acc[b] = FMA ? _mm256_fmadd_ps(m, one, acc[b]) : _mm256_add_ps(acc[b], m);  // m·1 + acc: exact m + acc
      }
    }
  }
  __m256 t = sx;
  for (int i = 0; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}


// fwd_fma with the filter values pre-broadcast in memory (8 copies each): vminps takes its w as a memory
// operand, no vbroadcastss per MAC (8x the filter bytes in L1)
alignas(64) static float WB[TAPS * 12 * 8];
static float fwd_prebc_loop(float s) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  __m256 sx = _mm256_setzero_ps();
  for (long it = 0; it < ITERS / TAPS; ++it) {
    const float* w = WB;
    for (int k = 0; k < TAPS; ++k, w += 96) {
      __m256 xv = _mm256_sub_ps(_mm256_loadu_ps(X + 8 * k), _mm256_set1_ps(CX[k]));
      sx = _mm256_add_ps(sx, xv);
      for (int b = 0; b < 12; ++b)
        acc[b] = _mm256_fmadd_ps(_mm256_min_ps(xv, _mm256_load_ps(w + 8 * b)), one, acc[b]);
    }
  }
  __m256 t = sx;
  for (int i = 0; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}

template <bool FMA> static float min_mem_loop(float s) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  for (long it = 0; it < ITERS / TAPS; ++it) {
    const float* w = WV;
    const float* x = XB;
    for (int k = 0; k < TAPS; ++k, w += 24, x += 4) {
      for (int p = 0; p < 4; ++p) {
        const __m256 xb = _mm256_broadcast_ss(x + p);
        for (int f = 0; f < 3; ++f) {
          const __m256 m = _mm256_min_ps(xb, _mm256_load_ps(w + 8 * f));
          acc[3 * p + f] = FMA ? _mm256_fmadd_ps(m, one, acc[3 * p + f]) : _mm256_add_ps(acc[3 * p + f], m);
        }
      }
    }
  }
  __m256 t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}

static float fma_bc_loop(float s) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(s * i);
  for (long it = 0; it < ITERS / TAPS; ++it) {
    const float* w = WV;
    const float* x = XB;
    for (int k = 0; k < TAPS; ++k, w += 24, x += 4) {
      for (int p = 0; p < 4; ++p) {
        const __m256 xb = _mm256_broadcast_ss(x + p);
        for (int f = 0; f < 3; ++f) acc[3 * p + f] = _mm256_fmadd_ps(xb, _mm256_load_ps(w + 8 * f), acc[3 * p + f]);
      }
    }
  }
  __m256 t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_ps(t, acc[i]);
  return t[0];
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 7;
  for (int i = 0; i < TAPS * 8 + 64; ++i) X[i] = 0.001f * (i % 97);
  for (int i = 0; i < TAPS * 12; ++i) Wt[i] = 0.002f * (i % 89);
  for (int i = 0; i < TAPS * 24; ++i) WV[i] = 0.002f * (i % 83);
  for (int i = 0; i < TAPS * 4; ++i) XB[i] = 0.003f * (i % 79);
  for (int i = 0; i < TAPS; ++i) CX[i] = 0.01f;
  for (int i = 0; i < TAPS * 96; ++i) WB[i] = Wt[i / 8];
  struct {
    const char* name;
    float (*fn)(float);
    double macs;  // lane-MACs per run
  } loops[] = {
      {"fma", fma_loop, 96.0 * ITERS},
      {"fma_bc", fma_bc_loop, 96.0 * (ITERS / TAPS) * TAPS},
      {"min_add", min_add_loop, 96.0 * ITERS},
      {"fwd_real", fwd_real_loop<false>, 96.0 * (ITERS / TAPS) * TAPS},
      {"min_mem", min_mem_loop<false>, 96.0 * (ITERS / TAPS) * TAPS},
      {"min_only", pipe_loop<0>, 96.0 * ITERS},
      {"add_only", pipe_loop<1>, 96.0 * ITERS},
      {"min_fma", pipe_loop<2>, 96.0 * ITERS},
      {"fwd_fma", fwd_real_loop<true>, 96.0 * (ITERS / TAPS) * TAPS},
      {"mem_fma", min_mem_loop<true>, 96.0 * (ITERS / TAPS) * TAPS},
      {"fwd_fma_sx", fwd_real_loop<true, 1>, 96.0 * (ITERS / TAPS) * TAPS},
      {"fwd_fma_sx2", fwd_real_loop<true, 2>, 96.0 * (ITERS / TAPS) * TAPS},
      {"fwd_prebc", fwd_prebc_loop, 96.0 * (ITERS / TAPS) * TAPS},
  };
  constexpr int NL = sizeof(loops) / sizeof(loops[0]);
  double best[NL];
  for (int l = 0; l < NL; ++l) best[l] = 1e30;
  float sink = 0;
  for (int r = 0; r < reps; ++r)
    for (int l = 0; l < NL; ++l) {
      const double t0 = now();
      sink += loops[l].fn(1e-3f * r);
      const double t = now() - t0;
      if (t < best[l]) best[l] = t;
    }
  const double fma_rate = loops[0].macs / best[0] * 1e-9, ghz = fma_rate / 16;  // 2 FMA × 8 lanes per cycle
  std::printf("best of %d, one thread; clock implied by fma at 16 lane-MAC/cycle: %.2f GHz\n", reps, ghz);
  std::printf("%-12s %14s %16s %10s\n", "loop", "lane-MAC/ns", "lane-MAC/cycle", "vs fma");
  for (int l = 0; l < NL; ++l) {
    const double rate = loops[l].macs / best[l] * 1e-9;
    std::printf("%-12s %14.2f %16.2f %10.2f\n", loops[l].name, rate, rate / ghz, rate / fma_rate);
  }
  return sink == 12345.f;  // keeps the results live
}
