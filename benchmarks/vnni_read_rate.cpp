// How fast a plain AVX512-VNNI int8 GEMV loop reads its weight, beside a plain load loop
// over the same bytes, outside kvflow: the bound kvflow's int8 kernels are measured against
// (docs/performance.md, "Intel Xeon with AMX"). Five readers, alternated over 10 rounds,
// medians in GB/s:
//   sum        64-byte loads added up, over one 358 MB int8 buffer;
//   rowmajor   one weight row at a time against x (vpdpbusd), as kvflow's weights lie;
//   packed16   16 rows interleaved per 4 columns, x broadcast, as llama.cpp repacks Q8_0;
//   model96    rowmajor over a qwen2.5-0.5b shape's 96 decoder weights, one OpenMP region
//              each, as a decode step calls them;
//   model96kv  the same with kvflow's per-block float conversion and per-row correction.
//
//   g++ -O3 -march=native -fopenmp benchmarks/vnni_read_rate.cpp -o /tmp/vnni_read_rate
//   OMP_NUM_THREADS=2 /tmp/vnni_read_rate [prefetch bytes, 0 for none]   (XOFF=n: x n bytes
//   off its 64-byte alignment)
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
#include <sys/mman.h>
using clk = std::chrono::steady_clock;
static const int K = 896; static const int64_t N = 400000;  // 358 MB
struct Wt { int8_t* p; int64_t n, k; };
int main(int argc, char** argv) {
  size_t bytes = N * K;
  int8_t* w = (int8_t*)aligned_alloc(2 << 20, bytes); madvise(w, bytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < bytes; ++i) w[i] = (int8_t)(i * 7 + 3);
  alignas(64) uint8_t xu[K]; for (int k = 0; k < K; ++k) xu[k] = k * 13;
  std::vector<float> y(N);
  int pf = argc > 1 ? atoi(argv[1]) : 0;
  auto sum = [&]() {
    long tot = 0;
    #pragma omp parallel for schedule(static) reduction(+:tot)
    for (int64_t c = 0; c < (int64_t)(bytes / 4096); ++c) {
      const char* p = (const char*)w + c * 4096; __m512i a = _mm512_setzero_si512(), b = a;
      for (int i = 0; i < 4096; i += 128) { a = _mm512_add_epi32(a, _mm512_load_si512(p + i)); b = _mm512_add_epi32(b, _mm512_load_si512(p + i + 64)); }
      tot += _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
    }
    return tot;
  };
  auto rowmajor = [&]() {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* r = w + n * K; __m512i a = _mm512_setzero_si512(), b = a;
      int k = 0;
      for (; k + 128 <= K; k += 128) {
        if (pf) { _mm_prefetch((const char*)r + k + pf, _MM_HINT_T0); _mm_prefetch((const char*)r + k + 64 + pf, _MM_HINT_T0); }
        a = _mm512_dpbusd_epi32(a, _mm512_load_si512(xu + k), _mm512_loadu_si512(r + k));
        b = _mm512_dpbusd_epi32(b, _mm512_load_si512(xu + k + 64), _mm512_loadu_si512(r + k + 64));
      }
      for (; k < K; k += 64) a = _mm512_dpbusd_epi32(a, _mm512_load_si512(xu + k), _mm512_loadu_si512(r + k));
      y[n] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
    }
  };
  // packed: for each 16-row group, for each 4-column k group, 64 bytes: row r's 4 bytes at 4r.
  auto packed = [&]() {
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < N / 16; ++g) {
      const int8_t* p = w + g * 16 * K; __m512i a = _mm512_setzero_si512(), b = a;
      for (int k = 0; k < K; k += 8) {
        if (pf) _mm_prefetch((const char*)p + k * 16 + pf, _MM_HINT_T0);
        int32_t x0, x1; memcpy(&x0, xu + k, 4); memcpy(&x1, xu + k + 4, 4);
        a = _mm512_dpbusd_epi32(a, _mm512_set1_epi32(x0), _mm512_loadu_si512(p + k * 16));
        b = _mm512_dpbusd_epi32(b, _mm512_set1_epi32(x1), _mm512_loadu_si512(p + k * 16 + 64));
      }
      _mm512_storeu_ps(&y[g * 16], _mm512_cvtepi32_ps(_mm512_add_epi32(a, b)));
    }
  };
  std::vector<Wt> model;
  size_t mbytes = 0;
  for (int l = 0; l < 24; ++l) {
    int64_t shp[4][2] = {{1152, 896}, {896, 896}, {9728, 896}, {896, 4864}};
    for (auto& sh : shp) {
      size_t b = sh[0] * sh[1]; int8_t* p = (int8_t*)aligned_alloc(2 << 20, (b + (2 << 20) - 1) / (2 << 20) * (2 << 20));
      madvise(p, b, MADV_HUGEPAGE); memset(p, 1, b); model.push_back({p, sh[0], sh[1]}); mbytes += b;
    }
  }
  alignas(64) static uint8_t xstore[4864 + 64]; uint8_t* xbig = xstore + (getenv("XOFF") ? atoi(getenv("XOFF")) : 0); for (int k = 0; k < 4864; ++k) xbig[k] = k;
  auto modelrun = [&]() {
    for (auto& m : model) {
      #pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < m.n; ++n) {
        const int8_t* r = m.p + n * m.k; __m512i a = _mm512_setzero_si512(), b = a;
        for (int k = 0; k < m.k; k += 128) {
          if (pf) { _mm_prefetch((const char*)r + k + pf, _MM_HINT_T0); _mm_prefetch((const char*)r + k + 64 + pf, _MM_HINT_T0); }
          a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(xbig + k), _mm512_loadu_si512(r + k));
          b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(xbig + k + 64), _mm512_loadu_si512(r + k + 64));
        }
        y[n] = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
      }
    }
  };
  alignas(64) static float xs[64]; for (int i = 0; i < 64; ++i) xs[i] = 0.01f * (i + 1);
  static int32_t wsum[64]; for (int i = 0; i < 64; ++i) wsum[i] = i;
  auto modelkv = [&]() {
    for (auto& m : model) {
      #pragma omp parallel for schedule(static)
      for (int64_t n = 0; n < m.n; ++n) {
        const int8_t* r = m.p + n * m.k; __m512 acc = _mm512_setzero_ps();
        for (int k = 0, b = 0; k < m.k; k += 128, ++b) {
          if (pf) { _mm_prefetch((const char*)r + k + pf, _MM_HINT_T0); _mm_prefetch((const char*)r + k + 64 + pf, _MM_HINT_T0); }
          __m512i d = _mm512_setzero_si512();
          d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(xbig + k), _mm512_loadu_si512(r + k));
          d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(xbig + k + 64), _mm512_loadu_si512(r + k + 64));
          acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xs[b]), acc);
        }
        float s = _mm512_reduce_add_ps(acc);
        for (int b = 0; b < m.k / 128; ++b) s -= 128.f * xs[b] * wsum[b];
        y[n] = s;
      }
    }
  };
  struct R { const char* n; std::vector<double> t; };
  R rs[5] = {{"sum", {}}, {"rowmajor", {}}, {"packed16", {}}, {"model96", {}}, {"model96kv", {}}};
  volatile long sink = 0;
  for (int round = 0; round < 10; ++round) {
    for (int i = 0; i < 5; ++i) {
      auto t = clk::now();
      if (i == 0) sink += sum(); else if (i == 1) rowmajor(); else if (i == 2) packed(); else if (i == 3) modelrun(); else modelkv();
      double s = std::chrono::duration<double>(clk::now() - t).count();
      if (round) rs[i].t.push_back((i >= 3 ? mbytes : bytes) / s / 1e9);
    }
  }
  for (auto& r : rs) { std::sort(r.t.begin(), r.t.end()); printf("%-10s pf=%d %.1f GB/s\n", r.n, pf, r.t[r.t.size() / 2]); }
}
