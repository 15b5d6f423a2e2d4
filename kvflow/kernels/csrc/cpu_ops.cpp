// kvflow's native CPU kernels: paged attention that reads the cache in place, a
// bandwidth-bound matrix-vector product for small batches, a mixture-of-experts layer's
// experts in one call, and fused glue (RMSNorm with the residual add, SiLU-and-multiply,
// RoPE, the KV write).
//
// float32 and bfloat16 tensors. Arithmetic is in float32 (bf16 attention multiplies bf16
// pairs into float32 sums where the CPU can); bfloat16 results are rounded at the same
// points as the PyTorch ops they replace, so that outputs stay within bf16 rounding of
// the eager path. AVX-512 paths where the compiler targets it (the build
// uses -march=native), plain loops otherwise.
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KVFLOW_AVX512 1
#endif

#if defined(KVFLOW_AVX512) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && \
    defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define KVFLOW_AMX 1
#endif

namespace {

using at::BFloat16;

// Whether every value of a contiguous int64 tensor lies in [low, bound): one pass over
// the data, where min() and max() dispatch two ATen reductions and two reads back, some
// 15 us a layer on a decode step's one token.
bool all_in_range(const torch::Tensor& values, int64_t bound, int64_t low = 0) {
  const int64_t* p = values.data_ptr<int64_t>();
  for (int64_t i = 0, n = values.numel(); i < n; ++i)
    if (p[i] < low || p[i] >= bound) return false;
  return true;
}

// a * b + c, fused where the CPU has FMA. The build turns off the compiler's own
// contraction (-ffp-contract=off), which fused some instances of one loop and not others
// (how a loop was unrolled or vectorized decided), so that one row's sum could differ with
// the number of rows beside it; the hot loops fuse here, explicitly and alike everywhere.
inline float fmadd(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

inline float to_f32(float x) { return x; }
inline float to_f32(BFloat16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f32(float x) { return static_cast<T>(x); }
// Round a float32 value to the tensor's dtype and back, as a bf16 PyTorch op would.
template <typename T> inline float rounded(float x) { return to_f32(from_f32<T>(x)); }

#ifdef KVFLOW_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16_masked(const BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// float32 -> bfloat16 bits, round to nearest even (finite inputs).
inline __m256i to_bf16_bits(__m512 x) {
  __m512i bits = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(x));
}
inline void store16_masked(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16_masked(BFloat16* p, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, to_bf16_bits(x));
}
// The value a dtype T holds after rounding x, as float32.
template <typename T> inline __m512 round16(__m512 x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(x)), 16));
  }
}
// exp(x), Cephes' polynomial: about 1 ulp in float32 over the whole range.
inline __m512 exp16(__m512 x) {
  // Below the clamp (masked scores are -inf) the result is exactly 0.
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-88.3762626647949f), _CMP_GE_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)),
                    _mm512_set1_ps(-88.3762626647949f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}
#endif

// The GEMVs' inner steps, inlined into their loops over weight rows whatever the compiler
// would judge: called per row or block, a step's call and return kept the core from running
// ahead into the next row's loads, and a bf16 GEMV read 80% of the DRAM rate that a sum
// reads on a 2-core Zen 4, against 94% inlined.
#define KVFLOW_INLINE __attribute__((always_inline)) inline
// The same for a lambda passed to a loop that calls it per group of rows.
#define KVFLOW_INLINE_LAMBDA __attribute__((always_inline))

// Runs f with a value of the C++ type of a float32 or bfloat16 tensor, so that each entry
// point states its kernel call once.
template <typename F>
void dispatch_float_or_bf16(at::ScalarType dtype, const char* name, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else if (dtype == at::kBFloat16) {
    f(BFloat16{});
  } else {
    TORCH_CHECK(false, name, ": float32 or bfloat16 tensors only, got ", dtype);
  }
}

// A kernel's result: `out` where the caller gives one (a captured decode step replays into
// the tensors it recorded, kvflow/worker/cpu_graphs.py, instead of copying a new result
// into them), else a new tensor. `out` may not share memory with what the kernel reads.
torch::Tensor result_tensor(const c10::optional<torch::Tensor>& out, at::IntArrayRef sizes,
                            at::ScalarType dtype, std::initializer_list<const torch::Tensor*> inputs,
                            const char* name) {
  if (!out.has_value()) return torch::empty(sizes, at::TensorOptions().dtype(dtype));
  TORCH_CHECK(out->sizes() == sizes && out->scalar_type() == dtype && out->is_contiguous() &&
                  out->device().is_cpu(),
              name, ": out must be a contiguous CPU tensor of shape ", sizes, " and dtype ", dtype);
  for (const torch::Tensor* input : inputs)
    if (input->defined()) at::assert_no_overlap(*out, *input);
  return *out;
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// ---------------------------------------------------------------------------------------
// y[m, n] = x[m, :] . w[n, :] (* scale[n]) (+ bias[n]) for a few rows m: every weight row
// is read once from memory and each loaded weight vector serves up to four rows of x, so
// the product runs at the memory's read rate. The weight is x's dtype, or int8 with a
// scale per row (weight-only quantization), widened to float32 in registers.
constexpr int64_t kGemvRows = 4;  // weight rows per group, at most
constexpr int64_t kGemvCols = 4;  // rows of x per pass over a group
// Software prefetch this far ahead in each weight row stream, by default: on a 2-core Zen 5
// it raised a whole model's GEMVs from about 39 to 44 GB/s (the hardware prefetchers alone
// lag).
constexpr int64_t kPrefetchBytes = 4096;

// How a GEMV reads its weight; the per-machine tuning (kvflow/kernels/tuning.py) picks one
// by measuring, since the best differs between microarchitectures. streams: weight rows read
// side by side (4, or 1: one row after another, a single sequential stream per thread; on a
// 2-core Zen 4 its hardware prefetcher kept up with one stream and not with four, 29 against
// 21 GB/s over a 0.5B model's weights). prefetch: bytes ahead of each stream to prefetch, 0
// for none. A variant computes every row of x alike, whatever their number.
struct GemvVariant {
  int64_t streams = kGemvRows;
  int64_t prefetch = kPrefetchBytes;
};

GemvVariant gemv_variant(int64_t streams, int64_t prefetch) {
  TORCH_CHECK(streams == 1 || streams == kGemvRows, "gemv: streams must be 1 or 4, not ",
              streams);
  TORCH_CHECK(prefetch >= 0 && prefetch <= (1 << 16), "gemv: prefetch must be 0 to 65536 "
              "bytes, not ", prefetch);
  return {streams, prefetch};
}

// Forced inline: GCC 12 found an out-of-line prefetch_ahead free of side effects (a
// prefetch has none it can see), marked it const and deleted its calls from the int8
// VNNI kernel, which then read its weight with no prefetch whatever the variant asked.
KVFLOW_INLINE void prefetch_ahead(const void* p, int64_t bytes) {
#ifdef KVFLOW_AVX512
  if (bytes) _mm_prefetch(static_cast<const char*>(p) + bytes, _MM_HINT_T0);
#endif
}

inline float to_f32(int8_t x) { return x; }

#ifdef KVFLOW_AVX512
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// R weight rows against MB rows of x. One row at a time (R = 1) would leave one dependency
// chain per row of x, so it keeps U = 2 accumulators over interleaved runs of columns, which
// it adds in a fixed order at the end: a variant's sums differ from another's by rounding,
// never from one batch size to another. (Two chains keep up with the memory; four read a
// little slower from it on a Zen 4, 91% of a sum's rate against 95%.)
template <typename T, typename W, int MB, int R>
KVFLOW_INLINE void gemv_group(const float* xf, const T* x, const W* w,
                              float (*sums)[kGemvRows], int64_t K, int64_t prefetch,
                              int64_t& k_done) {
  int64_t k = 0;
#ifdef KVFLOW_AVX512
  constexpr int U = R == 1 ? 2 : 1;
  __m512 acc[MB][R][U];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
#ifdef __AVX512BF16__
  // bf16 weights and activations: vdpbf16ps multiplies 32 pairs per instruction with no
  // widening, accumulating in float32. The second loop takes what the unrolled one left.
  if constexpr (std::is_same_v<T, BFloat16> && std::is_same_v<W, BFloat16>) {
    auto step = [&](int64_t kk, int u) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) {
        prefetch_ahead(w + r * K + kk, prefetch);
        wv[r] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(w + r * K + kk));
      }
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(x + m * K + kk));
        for (int r = 0; r < R; ++r) acc[m][r][u] = _mm512_dpbf16_ps(acc[m][r][u], wv[r], xv);
      }
    };
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; ++u) step(k + 32 * u, u);
    for (; k + 32 <= K; k += 32) step(k, 0);
  }
#endif
  // float32 FMAs: all of a float32 or int8 weight (or a bf16 one without vdpbf16ps), and
  // the last 16 columns a bf16 one may have left.
  auto step = [&](int64_t kk, int u) {
    __m512 wv[R];
    // One prefetch per 64-byte line: an int8 step covers a quarter of one.
    const bool new_line = (kk * sizeof(W)) % 64 == 0;
    for (int r = 0; r < R; ++r) {
      if (new_line) prefetch_ahead(w + r * K + kk, prefetch);
      wv[r] = load16(w + r * K + kk);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(xf + m * K + kk);
      for (int r = 0; r < R; ++r) acc[m][r][u] = _mm512_fmadd_ps(wv[r], xv, acc[m][r][u]);
    }
  };
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) step(k + 16 * u, u);
  for (; k + 16 <= K; k += 16) step(k, 0);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      __m512 total = acc[m][r][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][r][u]);
      sums[m][r] = _mm512_reduce_add_ps(total);
    }
#else
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) sums[m][r] = 0.f;
#endif
  k_done = k;
}

// sums[m][r] = x_m . w_r for mb (at most kGemvCols) rows of x and `rows` (at most R) weight
// rows from wg: gemv_group's vector loop over a whole group, then the columns it left (all
// of them for a part group). Each sum is reduced in the same order whatever mb is.
template <typename T, typename W, int R = kGemvRows>
KVFLOW_INLINE void gemv_sums(const float* xf, const T* x, const W* wg, int64_t rows,
                             int64_t mb, int64_t K, float (*sums)[kGemvRows],
                             int64_t prefetch) {
  int64_t k_done = 0;
  if (rows == R) {
    switch (mb) {
      case 1: gemv_group<T, W, 1, R>(xf, x, wg, sums, K, prefetch, k_done); break;
      case 2: gemv_group<T, W, 2, R>(xf, x, wg, sums, K, prefetch, k_done); break;
      case 3: gemv_group<T, W, 3, R>(xf, x, wg, sums, K, prefetch, k_done); break;
      default: gemv_group<T, W, 4, R>(xf, x, wg, sums, K, prefetch, k_done); break;
    }
  } else {
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t r = 0; r < kGemvRows; ++r) sums[m][r] = 0.f;
  }
  for (int64_t m = 0; m < mb; ++m) {
    const float* xm = xf + m * K;
    for (int64_t r = 0; r < rows; ++r) {
      const W* wr = wg + r * K;
      float s = sums[m][r];
      for (int64_t k = k_done; k < K; ++k) s = fmadd(to_f32(wr[k]), xm[k], s);
      sums[m][r] = s;
    }
  }
}

// Rows of x per pass over the weights: a large batch (a prefill chunk) is taken in blocks
// that stay in L2 while every weight row streams past them once, instead of streaming all
// of x once per group of weight rows. Each output is still reduced by gemv_group alone, so
// the blocking changes no result (batch invariance rests on this).
constexpr int64_t kGemvBlockRows = 64;

// How a GEMV's weight is shared among the threads: each thread reads its own contiguous
// share front to back (one sequential stream, as the prefetchers like), and a thread done
// with its share takes the last unread chunks of another's. A shared or virtual core runs
// late or slow often enough that fixed shares leave the other thread idle at the end of
// every call (on a 2-core Zen 4 guest, whole bf16 decode steps of a 0.5B model ran
// 1.03-1.13x faster with the helping, benchmarks/decode_builds.py). A chunk is a sixteenth
// of a share, and at least 16 KiB of weight: a 0.4 MB int4 weight still splits well.
constexpr int64_t kChunkBytes = 16 << 10;
constexpr int64_t kChunksPerThread = 16;

// A thread's chunks not yet taken, [front, back), in one word so that its owner (from the
// front) and a helper (from the back) never both take the last one.
struct alignas(64) ChunkRange {
  std::atomic<uint64_t> bounds;

  void set(int64_t front, int64_t back) {
    bounds.store(static_cast<uint64_t>(back) << 32 | static_cast<uint64_t>(front));
  }
  // The next chunk from the front (owner) or the back (helper), or -1 when none is left.
  int64_t take(bool from_front) {
    uint64_t now = bounds.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t front = now & 0xffffffffu, back = now >> 32;
      if (front >= back) return -1;
      const uint64_t next = from_front ? (back << 32 | (front + 1)) : ((back - 1) << 32 | front);
      if (bounds.compare_exchange_weak(now, next, std::memory_order_relaxed))
        return static_cast<int64_t>(from_front ? front : back - 1);
    }
  }
};

// fn(begin, end) over [0, groups) of group_bytes each; no result depends on the sharing.
template <typename F>
void weight_chunks(int64_t groups, int64_t group_bytes, const F& fn) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t bytes = std::max(kChunkBytes, groups * group_bytes / (threads * kChunksPerThread));
  const int64_t chunk = std::max<int64_t>(1, bytes / std::max<int64_t>(1, group_bytes));
  const int64_t chunks = (groups + chunk - 1) / chunk;
  const int64_t workers = std::min(threads, chunks);
  if (workers <= 1 || chunks >= (int64_t{1} << 32)) {
    if (groups > 0) fn(0, groups);
    return;
  }
  std::vector<ChunkRange> ranges(workers);
  for (int64_t t = 0; t < workers; ++t) ranges[t].set(chunks * t / workers, chunks * (t + 1) / workers);
  auto run = [&](int64_t c) { fn(c * chunk, std::min(groups, (c + 1) * chunk)); };
  at::parallel_for(0, workers, 1, [&](int64_t self, int64_t) {
    for (int64_t c = ranges[self].take(true); c >= 0; c = ranges[self].take(true)) run(c);
    for (int64_t o = 1; o < workers; ++o) {
      ChunkRange& other = ranges[(self + o) % workers];
      for (int64_t c = other.take(false); c >= 0; c = other.take(false)) run(c);
    }
  });
}

// y[n] = sums[n] * scale[n] + bias[n] in T (scale, bias: where not null), n < count: a run
// of a GEMV's outputs finished as vector work, with the same float32 multiply, add and
// rounding as one at a time.
template <typename T>
KVFLOW_INLINE void finish_rows(const float* sums, int64_t count, const T* scale, const T* bias,
                               T* y) {
  int64_t n = 0;
#ifdef KVFLOW_AVX512
  for (; n < count; n += 16) {
    const __mmask16 live = count - n >= 16 ? 0xffff : (1u << (count - n)) - 1;
    __m512 v = load16_masked(sums + n, live);
    if (scale) v = _mm512_mul_ps(v, load16_masked(scale + n, live));
    if (bias) v = _mm512_add_ps(v, load16_masked(bias + n, live));
    store16_masked(y + n, v, live);
  }
#endif
  for (; n < count; ++n) {
    float v = sums[n];
    if (scale) v *= to_f32(scale[n]);
    if (bias) v += to_f32(bias[n]);
    y[n] = from_f32<T>(v);
  }
}

// Output rows per run that finish_rows completes at once. An int8 row at 896 columns is 14
// vector loads; finished one at a time, its scale, bias, bf16 rounding and store were as
// much scalar work again (on a Xeon, a 1024 x 896 int8-activation GEMV over L2-resident
// weights took 12.5 us finished per row, 10.3 in runs with int8_group_q8's lane-0
// correction; whole int8+head decode steps ran 1.01x as fast). The bf16 GEMV's rows are
// twice as long, and its decode steps ran 0.97x as fast in runs: it finishes them one at a
// time.
constexpr int64_t kRunRows = 64;

// A GEMV's groups [begin, end) of R weight rows (N a multiple of R) against M rows of x,
// in runs of kRunRows outputs: sums_of(group, m0, mb, sums) fills sums[m][r] for x rows m0
// to m0 + mb - 1 and the group's rows (each group is read once for all of x's rows), and
// each run's outputs are then finished by finish_rows into y ([M, N]).
template <typename T, int R, typename Sums>
KVFLOW_INLINE void finish_in_runs(int64_t begin, int64_t end, int64_t M, int64_t N,
                                  const T* scale, const T* bias, T* y, const Sums& sums_of) {
  std::vector<float> run(M * kRunRows);
  float sums[kGemvCols][kGemvRows];
  for (int64_t g0 = begin; g0 < end; g0 += kRunRows / R) {
    const int64_t g1 = std::min(end, g0 + kRunRows / R);
    const int64_t first = g0 * R, count = (g1 - g0) * R;
    for (int64_t group = g0; group < g1; ++group) {
      for (int64_t m0 = 0; m0 < M; m0 += kGemvCols) {
        const int64_t mb = std::min(kGemvCols, M - m0);
        sums_of(group, m0, mb, sums);
        for (int64_t m = 0; m < mb; ++m)
          for (int64_t r = 0; r < R; ++r)
            run[(m0 + m) * kRunRows + group * R - first + r] = sums[m][r];
      }
    }
    for (int64_t m = 0; m < M; ++m)
      finish_rows(run.data() + m * kRunRows, count, scale ? scale + first : nullptr,
                  bias ? bias + first : nullptr, y + m * N + first);
  }
}

template <typename T, typename W, int R>
void gemv_impl(const T* x, const W* w, const T* scale, const T* bias, T* y, int64_t M,
               int64_t N, int64_t K, int64_t prefetch) {
  std::vector<float> widened;
  for (int64_t block = 0; block < M; block += kGemvBlockRows) {
    const int64_t block_rows = std::min(kGemvBlockRows, M - block);
    const T* xb = x + block * K;
    const float* xf;  // the block as float32, for the FMA paths and the tail
    if constexpr (std::is_same_v<T, float>) {
      xf = xb;
    } else {
      widened.resize(block_rows * K);
      for (int64_t i = 0; i < block_rows * K; ++i) widened[i] = to_f32(xb[i]);
      xf = widened.data();
    }
    T* yb = y + block * N;
    weight_chunks((N + R - 1) / R, R * K * sizeof(W), [&](int64_t begin, int64_t end) {
      float sums[kGemvCols][kGemvRows];
      for (int64_t group = begin; group < end; ++group) {
        const int64_t n0 = group * R;
        const int64_t rows = std::min<int64_t>(R, N - n0);
        const W* wg = w + n0 * K;
        for (int64_t m0 = 0; m0 < block_rows; m0 += kGemvCols) {
          const int64_t mb = std::min(kGemvCols, block_rows - m0);
          gemv_sums<T, W, R>(xf + m0 * K, xb + m0 * K, wg, rows, mb, K, sums, prefetch);
          for (int64_t m = 0; m < mb; ++m) {
            for (int64_t r = 0; r < rows; ++r) {
              float s = sums[m][r];
              if (scale) s *= to_f32(scale[n0 + r]);
              if (bias) s += to_f32(bias[n0 + r]);
              yb[(m0 + m) * N + n0 + r] = from_f32<T>(s);
            }
          }
        }
      }
    });
  }
}

// Runs f with the variant's weight rows side by side as a compile-time constant
// (std::integral_constant<int, R>), so that each entry point states its kernel call once.
template <typename F>
void dispatch_streams(const GemvVariant& v, F&& f) {
  if (v.streams == 1)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, kGemvRows>{});
}

void check_bias(const c10::optional<torch::Tensor>& bias, const torch::Tensor& x, int64_t n,
                const char* name) {
  TORCH_CHECK(!bias || (bias->numel() == n && bias->scalar_type() == x.scalar_type() &&
                        bias->device().is_cpu()), name, ": bias must be [out_features], x's dtype");
}

const void* bias_ptr(const c10::optional<torch::Tensor>& bias, torch::Tensor& holder) {
  if (!bias) return nullptr;
  holder = bias->contiguous();
  return holder.data_ptr();
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias,
                   int64_t streams, int64_t prefetch, c10::optional<torch::Tensor> out) {
  const GemvVariant variant = gemv_variant(streams, prefetch);
  check_cpu(x, "gemv x");
  check_cpu(w, "gemv w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: shapes");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w dtypes differ");
  check_bias(bias, w, w.size(0), "gemv");
  x = x.contiguous();
  w = w.contiguous();
  torch::Tensor b;
  const void* bp = bias_ptr(bias, b);
  auto y = result_tensor(out, {x.size(0), w.size(0)}, x.scalar_type(), {&x, &w, &b}, "gemv");
  dispatch_float_or_bf16(x.scalar_type(), "gemv", [&](auto tag) {
    using T = decltype(tag);
    dispatch_streams(variant, [&](auto rows) {
      gemv_impl<T, T, rows()>(x.data_ptr<T>(), w.data_ptr<T>(), nullptr, static_cast<const T*>(bp),
                              y.data_ptr<T>(), x.size(0), w.size(0), x.size(1), variant.prefetch);
    });
  });
  return y;
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale,
                        c10::optional<torch::Tensor> bias, int64_t streams, int64_t prefetch,
                        c10::optional<torch::Tensor> out) {
  const GemvVariant variant = gemv_variant(streams, prefetch);
  check_cpu(x, "int8_gemv x");
  check_cpu(w, "int8_gemv w");
  check_cpu(scale, "int8_gemv scale");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: shapes");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_gemv: w must be int8");
  TORCH_CHECK(scale.numel() == w.size(0) && scale.scalar_type() == x.scalar_type(),
              "int8_gemv: scale must be [out_features], x's dtype");
  check_bias(bias, x, w.size(0), "int8_gemv");
  x = x.contiguous();
  w = w.contiguous();
  scale = scale.contiguous();
  torch::Tensor b;
  const void* bp = bias_ptr(bias, b);
  auto y = result_tensor(out, {x.size(0), w.size(0)}, x.scalar_type(), {&x, &w, &scale, &b},
                         "int8_gemv");
  dispatch_float_or_bf16(x.scalar_type(), "int8_gemv", [&](auto tag) {
    using T = decltype(tag);
    dispatch_streams(variant, [&](auto rows) {
      gemv_impl<T, int8_t, rows()>(x.data_ptr<T>(), w.data_ptr<int8_t>(), scale.data_ptr<T>(),
                                   static_cast<const T*>(bp), y.data_ptr<T>(), x.size(0),
                                   w.size(0), x.size(1), variant.prefetch);
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------
// The same product for int4 weights (kvflow/quantization/int4.py): [N, K / 2] bytes in
// blocks of 16 rows; chunk c of a block (32 bytes) holds columns 4c to 4c + 3 of its rows,
// byte 2r + j row r's column 4c + j in its low nibble and 4c + 2 + j in its high one;
// w = q * scale + offset, per group of G columns (G a multiple of 32). Per group the
// product is scale * (q . x) + offset * sum(x), with sum(x) computed once per row of x.
constexpr int64_t kInt4Rows = 16;   // output rows per block, one per vector lane
constexpr int64_t kInt4Chunk = 32;  // bytes per chunk of 4 columns
constexpr int64_t kInt4Cols = 4;    // rows of x per pass over a block

inline int int4_at(const uint8_t* w, int64_t n, int64_t k, int64_t K) {
  const uint8_t byte = w[n / kInt4Rows * kInt4Rows * (K / 2) + k / 4 * kInt4Chunk +
                         n % kInt4Rows * 2 + k % 2];
  return k % 4 < 2 ? byte & 15 : byte >> 4;
}

// Where an int4 weight's scales and offsets are: [N, groups] each, or blocked as the vector
// kernels read them, [N / 16][groups][2][16] (a block's 16 scales of a group, then its 16
// offsets); the expert kernel keeps only the blocked copy.
template <typename T>
struct Int4Scales {
  const T* scale;
  const T* offset;
  const T* blocked;  // null: scale and offset
  int64_t groups;

  const T* block(int64_t b) const { return blocked + b * groups * 2 * kInt4Rows; }
  float at(int64_t n, int64_t g, int part) const {
    if (blocked) return to_f32(block(n / kInt4Rows)[(2 * g + part) * kInt4Rows + n % kInt4Rows]);
    return to_f32((part ? offset : scale)[n * groups + g]);
  }
  float scale_at(int64_t n, int64_t g) const { return at(n, g, 0); }
  float offset_at(int64_t n, int64_t g) const { return at(n, g, 1); }
};

// Row n's product.
template <typename T>
float int4_dot(const float* xf, const float* xsum, const uint8_t* w, int64_t n,
               const Int4Scales<T>& scales, int64_t K, int64_t G) {
  float total = 0.f;
  for (int64_t g = 0; g < K / G; ++g) {
    float dot = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) dot += int4_at(w, n, k, K) * xf[k];
    total += scales.scale_at(n, g) * dot + scales.offset_at(n, g) * xsum[g];
  }
  return total;
}

#if defined(KVFLOW_AVX512) && defined(__AVX512BF16__)
// bf16 activations: the bf16 with bits 0x4300 | q is exactly 128 + q, so a nibble becomes a
// bf16 with one AND-OR. A chunk's low nibbles are then 16 rows x columns (4c, 4c + 1), one
// row per lane, and its high ones 16 rows x (4c + 2, 4c + 3): vdpbf16ps against x's pair of
// those columns, broadcast, adds each row's two products into its lane. One FMA scales a
// group's sums for all 16 rows and another adds (offset - 128 * scale) * sum(x), so there
// are no horizontal sums. blocked: the block's scales and offsets, [groups][2][16] (a
// group's 16 scales, then its 16 offsets).
template <int MB>
KVFLOW_INLINE void int4_block_bf16(const BFloat16* x, const float* xsum, const uint8_t* w,
                                   const BFloat16* blocked, float (*sums)[kInt4Rows],
                                   int64_t K, int64_t G) {
  const int64_t groups = K / G;
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const __m512i one28 = _mm512_set1_epi16(0x4300);
  const uint32_t* pairs[MB];  // x's columns two by two, as vdpbf16ps reads them
  for (int m = 0; m < MB; ++m) pairs[m] = reinterpret_cast<const uint32_t*>(x + m * K);
  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // Four chains per row of x, so that vdpbf16ps's latency does not bound the loop.
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const uint8_t* p = w + k / 4 * kInt4Chunk;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
      __m512i nibbles[4];  // columns (k, k+1), (k+2, k+3), (k+4, k+5), (k+6, k+7)
      for (int c = 0; c < 2; ++c) {
        const __m512i words = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c * kInt4Chunk)));
        nibbles[2 * c + 1] = _mm512_or_si512(_mm512_srli_epi16(words, 4), one28);
        nibbles[2 * c] = _mm512_ternarylogic_epi32(words, low4, one28, 0xEA);  // (w & 15) | 0x4300
      }
      for (int m = 0; m < MB; ++m)
        for (int a = 0; a < 4; ++a)
          acc[m][a] = _mm512_dpbf16_ps(acc[m][a], (__m512bh)nibbles[a],
                                       (__m512bh)_mm512_set1_epi32(pairs[m][k / 2 + a]));
    }
    const __m512 s = load16(blocked + 2 * g * kInt4Rows);
    const __m512 o = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), s,
                                      load16(blocked + (2 * g + 1) * kInt4Rows));
    for (int m = 0; m < MB; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                       _mm512_add_ps(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(sum, s, total[m]);
      total[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xsum[m * groups + g]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(sums[m], total[m]);
}
#endif

// Whether bf16 activations take int4_block_bf16 (which reads blocked scales) on this build.
template <typename T>
constexpr bool int4_vector_path() {
#if defined(KVFLOW_AVX512) && defined(__AVX512BF16__)
  return std::is_same_v<T, BFloat16>;
#else
  return false;
#endif
}

// sums[m][r] = x_m . row n0 + r for the block of 16 rows at n0 and mb (at most kInt4Cols)
// rows of x (x, its float32 copy xf and its group sums xsum, each from its first row).
// block_scales: the block's blocked scales, which the vector path needs.
template <typename T>
void int4_block_sums(const T* x, const float* xf, const float* xsum, const uint8_t* w,
                     int64_t n0, const Int4Scales<T>& scales, const T* block_scales, int64_t mb,
                     int64_t K, int64_t G, float (*sums)[kInt4Rows]) {
#if defined(KVFLOW_AVX512) && defined(__AVX512BF16__)
  if constexpr (int4_vector_path<T>()) {
    const uint8_t* wb = w + n0 * (K / 2);
    switch (mb) {
      case 1: int4_block_bf16<1>(x, xsum, wb, block_scales, sums, K, G); break;
      case 2: int4_block_bf16<2>(x, xsum, wb, block_scales, sums, K, G); break;
      case 3: int4_block_bf16<3>(x, xsum, wb, block_scales, sums, K, G); break;
      default: int4_block_bf16<4>(x, xsum, wb, block_scales, sums, K, G); break;
    }
    return;
  }
#endif
  const int64_t groups = K / G;
  for (int64_t m = 0; m < mb; ++m)
    for (int64_t r = 0; r < kInt4Rows; ++r)
      sums[m][r] = int4_dot<T>(xf + m * K, xsum + m * groups, w, n0 + r, scales, K, G);
}

// x as the int4 products read it: float32 (xf, [M, K]) and summed per group of G columns
// (xsum, [M, K / G]).
template <typename T>
void int4_inputs(const T* x, int64_t M, int64_t K, int64_t G, float* xf, float* xsum) {
  const int64_t groups = K / G;
  std::fill_n(xsum, M * groups, 0.f);
  for (int64_t i = 0; i < M * K; ++i) {
    xf[i] = to_f32(x[i]);
    xsum[i / K * groups + i % K / G] += xf[i];
  }
}

// blocked: every block's scales and offsets as int4_block_bf16 reads them
// ([N / 16][groups][2][16]), prepared once per layer; null: gathered here, block by block.
template <typename T>
void int4_gemv_impl(const T* x, const uint8_t* w, const T* scale, const T* offset,
                    const T* blocked, const T* bias, T* y, int64_t M, int64_t N, int64_t K,
                    int64_t G) {
  const int64_t groups = K / G;
  std::vector<float> xf(M * K), xsum(M * groups);
  int4_inputs(x, M, K, G, xf.data(), xsum.data());
  const Int4Scales<T> scales{scale, offset, blocked, groups};
  weight_chunks(N / kInt4Rows, kInt4Rows * K / 2, [&](int64_t begin, int64_t end) {
    float sums[kInt4Cols][kInt4Rows];
    std::vector<T> gathered;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kInt4Rows;
      const T* block_scales = blocked ? scales.block(block) : nullptr;
      if (int4_vector_path<T>() && !block_scales) {
        gathered.resize(groups * 2 * kInt4Rows);
        for (int64_t r = 0; r < kInt4Rows; ++r)
          for (int64_t g = 0; g < groups; ++g) {
            gathered[2 * g * kInt4Rows + r] = scale[(n0 + r) * groups + g];
            gathered[(2 * g + 1) * kInt4Rows + r] = offset[(n0 + r) * groups + g];
          }
        block_scales = gathered.data();
      }
      for (int64_t m0 = 0; m0 < M; m0 += kInt4Cols) {
        const int64_t mb = std::min(kInt4Cols, M - m0);
        int4_block_sums<T>(x + m0 * K, xf.data() + m0 * K, xsum.data() + m0 * groups, w, n0,
                           scales, block_scales, mb, K, G, sums);
        for (int64_t m = 0; m < mb; ++m) {
          for (int64_t r = 0; r < kInt4Rows; ++r) {
            float s = sums[m][r];
            if (bias) s += to_f32(bias[n0 + r]);
            y[(m0 + m) * N + n0 + r] = from_f32<T>(s);
          }
        }
      }
    }
  });
}

// The checks both int4 kernels make of the packed weight and its scales; returns G.
int64_t check_int4(const torch::Tensor& w, const torch::Tensor& scale,
                   const torch::Tensor& offset, const char* name) {
  for (const auto* t : {&w, &scale, &offset}) check_cpu(*t, name);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, name, ": w must be 2-d uint8");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) > 0 &&
              K % scale.size(1) == 0 && offset.sizes() == scale.sizes() &&
              offset.scalar_type() == scale.scalar_type(),
              name, ": scale and offset must be [out_features, groups], one dtype");
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(N % kInt4Rows == 0 && K % 64 == 0 && G % 32 == 0, name,
              ": out_features must be a multiple of 16, in_features of 64, the group size of 32");
  return G;
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale,
                        torch::Tensor offset, c10::optional<torch::Tensor> bias,
                        c10::optional<torch::Tensor> blocked, c10::optional<torch::Tensor> out) {
  check_cpu(x, "int4_gemv x");
  const int64_t G = check_int4(w, scale, offset, "int4_gemv");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 2 * w.size(1), "int4_gemv: shapes");
  TORCH_CHECK(scale.scalar_type() == x.scalar_type(), "int4_gemv: scale and offset must be x's dtype");
  const int64_t K = x.size(1), N = w.size(0);
  check_bias(bias, x, N, "int4_gemv");
  x = x.contiguous();
  w = w.contiguous();
  scale = scale.contiguous();
  offset = offset.contiguous();
  torch::Tensor b, blocks;
  const void* bp = bias_ptr(bias, b);
  if (blocked) {
    TORCH_CHECK(blocked->sizes() == at::IntArrayRef({N / kInt4Rows, scale.size(1), 2, kInt4Rows}) &&
                    blocked->scalar_type() == x.scalar_type() && blocked->device().is_cpu(),
                "int4_gemv: blocked must be [out_features / 16, groups, 2, 16], x's dtype");
    blocks = blocked->contiguous();
  }
  auto y = result_tensor(out, {x.size(0), N}, x.scalar_type(), {&x, &w, &scale, &offset, &b},
                         "int4_gemv");
  dispatch_float_or_bf16(x.scalar_type(), "int4_gemv", [&](auto tag) {
    using T = decltype(tag);
    int4_gemv_impl<T>(x.data_ptr<T>(), w.data_ptr<uint8_t>(), scale.data_ptr<T>(),
                      offset.data_ptr<T>(), blocks.defined() ? blocks.data_ptr<T>() : nullptr,
                      static_cast<const T*>(bp), y.data_ptr<T>(), x.size(0), N, K, G);
  });
  return y;
}

// ---------------------------------------------------------------------------------------
// The int8 and int4 products with x quantized as well, to int8 in blocks of B columns
// (scale = max |x| / 127 per block, q = x / scale rounded to nearest even), as llama.cpp
// quantizes activations for its integer dot products. vpdpbusd (AVX512-VNNI) then
// multiplies 64 weight-activation pairs per instruction, where the float paths above
// convert every weight before they multiply it. The price is x's rounding: at most half
// a step, 1/254 of its block's largest value (docs/benchmarks.md measures the perplexity).
#if defined(KVFLOW_AVX512) && defined(__AVX512VNNI__)
#define KVFLOW_VNNI 1
#endif

struct Int8Activations {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> scale;   // [M, K / B]
  std::vector<int32_t> sum;   // [M, K / B]: each block's sum of q
};

template <typename T>
Int8Activations quantize_activations(const T* x, int64_t M, int64_t K, int64_t B) {
  const int64_t blocks = M * (K / B);  // K % B == 0: blocks never straddle rows
  Int8Activations a{std::vector<int8_t>(M * K), std::vector<float>(blocks),
                    std::vector<int32_t>(blocks)};
  for (int64_t i = 0; i < blocks; ++i) {
    const T* xb = x + i * B;
    int8_t* qb = a.q.data() + i * B;
    float amax = 0.f;
    int64_t k = 0;
#ifdef KVFLOW_AVX512
    // The same values as the scalar loops below, 16 at a time: a decode step quantizes
    // every layer's input, on one thread before the GEMV's parallel part, and the scalar
    // loops took 8-10 us of a 22 us down projection (K = 4,864). The maximum skips NaNs
    // as std::max(amax, v) does (vmaxps returns its second operand when one is NaN), and
    // the conversion rounds to nearest even, as nearbyint does in the default mode.
    if (B % 16 == 0) {
      __m512 top = _mm512_setzero_ps();
      for (; k < B; k += 16) top = _mm512_max_ps(_mm512_abs_ps(load16(xb + k)), top);
      amax = _mm512_reduce_max_ps(top);
    }
#endif
    for (int64_t j = k; j < B; ++j) amax = std::max(amax, std::abs(to_f32(xb[j])));
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    k = 0;
#ifdef KVFLOW_AVX512
    if (B % 16 == 0) {
      const __m512 factor = _mm512_set1_ps(inverse);
      __m512i total = _mm512_setzero_si512();
      for (; k < B; k += 16) {
        // Narrowed first, so that a NaN (INT_MIN here) counts as the 0 it is stored as.
        const __m128i q = _mm512_cvtepi32_epi8(
            _mm512_cvtps_epi32(_mm512_mul_ps(load16(xb + k), factor)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + k), q);
        total = _mm512_add_epi32(total, _mm512_cvtepi8_epi32(q));
      }
      sum = _mm512_reduce_add_epi32(total);
    }
#endif
    for (; k < B; ++k) {
      const auto q = static_cast<int8_t>(std::nearbyint(to_f32(xb[k]) * inverse));
      qb[k] = q;
      sum += q;
    }
    a.scale[i] = amax / 127.f;
    a.sum[i] = sum;
  }
  return a;
}

#ifdef KVFLOW_VNNI
// int4: two chunks (columns 4c to 4c + 7) split into low and high nibbles give each row two
// bytes of each; interleaving the two vectors' 16-bit words (within 128-bit lanes, as
// vpunpck[lh]wd does) turns every 32-bit lane into one row's four columns in order. The
// low interleave holds rows 0-3 and 8-11, the high one rows 4-7 and 12-15, each for
// columns 4c..4c+3 in the lower 256 bits and 4c+4..4c+7 in the upper; x's two four-column
// words are spread to match by one permute of its 8 bytes. (A copy of x laid out so, 8
// bytes per column, outgrew the L1 cache at 4,864 columns and slowed a down projection's
// product by an eighth.) Each group's sums stay in int32 (at most 15 * 127 * G per lane)
// until one permute puts the rows in order.
template <typename T, int MB>
KVFLOW_INLINE void int4_block_q8(const int8_t* xq, const float* xscale, const int32_t* xsum,
                                 const uint8_t* w, const T* blocked,
                                 float (*sums)[kInt4Rows], int64_t K, int64_t G) {
  const int64_t groups = K / G;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lower = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i upper = _mm512_add_epi32(lower, _mm512_set1_epi32(8));
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i lo[MB], hi[MB];
    for (int m = 0; m < MB; ++m) lo[m] = hi[m] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const uint8_t* p = w + k / 4 * kInt4Chunk;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i bytes = _mm512_loadu_si512(p);
      const __m512i low = _mm512_and_si512(bytes, low4);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
      const __m512i rows_lo = _mm512_unpacklo_epi16(low, high);
      const __m512i rows_hi = _mm512_unpackhi_epi16(low, high);
      for (int m = 0; m < MB; ++m) {
        int64_t columns;  // x's columns k..k+7
        std::memcpy(&columns, xq + m * K + k, sizeof(columns));
        const __m512i xv = _mm512_permutexvar_epi32(spread, _mm512_set1_epi64(columns));
        lo[m] = _mm512_dpbusd_epi32(lo[m], rows_lo, xv);
        hi[m] = _mm512_dpbusd_epi32(hi[m], rows_hi, xv);
      }
    }
    const __m512 s = load16(blocked + 2 * g * kInt4Rows);
    const __m512 o = load16(blocked + (2 * g + 1) * kInt4Rows);
    for (int m = 0; m < MB; ++m) {
      const __m512i dot = _mm512_add_epi32(_mm512_permutex2var_epi32(lo[m], lower, hi[m]),
                                           _mm512_permutex2var_epi32(lo[m], upper, hi[m]));
      const float xs = xscale[m * groups + g];
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(xs)),
                                 total[m]);
      total[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs * xsum[m * groups + g]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(sums[m], total[m]);
}

// int8: vpdpbusd takes one unsigned operand, so x goes in as q + 128, and each block's dot
// starts at -128 * the row's weight sum over the block (wsum, kept in the plan), in lane 0:
// the integer sum is then exactly the signed one, with no scalar correction per row and
// block after the loop (which rounded, in float32, as many terms as the row has blocks).
// R weight rows side by side (a GemvVariant's streams); every sum is reduced alike for any R.
template <int MB, int R>
KVFLOW_INLINE void int8_group_q8(const uint8_t* xu, const float* xscale, const int8_t* w,
                                 const int32_t* wsum, float (*sums)[kGemvRows], int64_t K,
                                 int64_t B, int64_t prefetch) {
  const int64_t blocks = K / B;
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dot[MB][R];
    for (int r = 0; r < R; ++r) {
      const __m512i start =
          _mm512_zextsi128_si512(_mm_cvtsi32_si128(-128 * wsum[r * blocks + b]));
      for (int m = 0; m < MB; ++m) dot[m][r] = start;
    }
    for (int64_t k = b * B; k < (b + 1) * B; k += 64) {
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        prefetch_ahead(w + r * K + k, prefetch);
        wv[r] = _mm512_loadu_si512(w + r * K + k);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(xu + m * K + k);
        for (int r = 0; r < R; ++r) dot[m][r] = _mm512_dpbusd_epi32(dot[m][r], xv, wv[r]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xs = _mm512_set1_ps(xscale[m * (K / B) + b]);
      for (int r = 0; r < R; ++r)
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][r]), xs, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) sums[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}
#endif

// x's rows quantized for the int8 x int8 products: the activations, and under VNNI their
// unsigned copy (q + 128) that vpdpbusd takes.
struct Int8Inputs {
  Int8Activations a;
  std::vector<uint8_t> xu;  // [M, K], VNNI builds only
  int64_t K, B;
};

template <typename T>
Int8Inputs int8_inputs(const T* x, int64_t M, int64_t K, int64_t B) {
  Int8Inputs in{quantize_activations(x, M, K, B), {}, K, B};
#ifdef KVFLOW_VNNI
  in.xu.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) in.xu[i] = static_cast<uint8_t>(in.a.q[i] + 128);
#endif
  return in;
}

// sums[m][r] = x row m0 + m (m < mb) . int8 weight row r (r < R; rows K apart from w),
// wsum the rows' block sums [R, K / B]: each block's integer dot times x's block scale,
// before the weight's row scale.
template <int R>
KVFLOW_INLINE void int8_q8_sums(const Int8Inputs& in, int64_t m0, int64_t mb, const int8_t* w,
                                const int32_t* wsum, int64_t prefetch,
                                float (*sums)[kGemvRows]) {
  const int64_t K = in.K, B = in.B, blocks = K / B;
#ifdef KVFLOW_VNNI
  const uint8_t* xu = in.xu.data() + m0 * K;
  const float* xs = in.a.scale.data() + m0 * blocks;
  switch (mb) {
    case 1: int8_group_q8<1, R>(xu, xs, w, wsum, sums, K, B, prefetch); break;
    case 2: int8_group_q8<2, R>(xu, xs, w, wsum, sums, K, B, prefetch); break;
    case 3: int8_group_q8<3, R>(xu, xs, w, wsum, sums, K, B, prefetch); break;
    default: int8_group_q8<4, R>(xu, xs, w, wsum, sums, K, B, prefetch); break;
  }
#else
  for (int64_t m = 0; m < mb; ++m) {
    const float* xs = in.a.scale.data() + (m0 + m) * blocks;
    const int8_t* xq = in.a.q.data() + (m0 + m) * K;
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * B; k < (b + 1) * B; ++k) dot += xq[k] * w[r * K + k];
        s += xs[b] * dot;
      }
      sums[m][r] = s;
    }
  }
#endif
}

template <typename T, int R>
void int8_q8_impl(const T* x, const int8_t* w, const T* scale, const int32_t* wsum,
                  const T* bias, T* y, int64_t M, int64_t N, int64_t K, int64_t B,
                  int64_t prefetch) {
  const Int8Inputs in = int8_inputs(x, M, K, B);
  weight_chunks(N / R, R * K, [&](int64_t begin, int64_t end) {
    finish_in_runs<T, R>(begin, end, M, N, scale, bias, y,
                         [&](int64_t group, int64_t m0, int64_t mb,
                             float (*sums)[kGemvRows]) KVFLOW_INLINE_LAMBDA {
      const int64_t n0 = group * R;
      int8_q8_sums<R>(in, m0, mb, w + n0 * K, wsum + n0 * (K / B), prefetch, sums);
    });
  });
}

template <typename T>
void int4_q8_impl(const T* x, const uint8_t* w, const T* blocked, const T* bias, T* y,
                  int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  const Int8Activations a = quantize_activations(x, M, K, G);
  weight_chunks(N / kInt4Rows, kInt4Rows * K / 2, [&](int64_t begin, int64_t end) {
    float sums[kInt4Cols][kInt4Rows];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kInt4Rows;
      const T* scales = blocked + block * groups * 2 * kInt4Rows;
      for (int64_t m0 = 0; m0 < M; m0 += kInt4Cols) {
        const int64_t mb = std::min(kInt4Cols, M - m0);
        const float* xs = a.scale.data() + m0 * groups;
        const int32_t* xsum = a.sum.data() + m0 * groups;
#ifdef KVFLOW_VNNI
        const int8_t* xq = a.q.data() + m0 * K;
        const uint8_t* wb = w + n0 * (K / 2);
        switch (mb) {
          case 1: int4_block_q8<T, 1>(xq, xs, xsum, wb, scales, sums, K, G); break;
          case 2: int4_block_q8<T, 2>(xq, xs, xsum, wb, scales, sums, K, G); break;
          case 3: int4_block_q8<T, 3>(xq, xs, xsum, wb, scales, sums, K, G); break;
          default: int4_block_q8<T, 4>(xq, xs, xsum, wb, scales, sums, K, G); break;
        }
#else
        for (int64_t m = 0; m < mb; ++m) {
          const int8_t* xq = a.q.data() + (m0 + m) * K;
          for (int64_t r = 0; r < kInt4Rows; ++r) {
            float total = 0.f;
            for (int64_t g = 0; g < groups; ++g) {
              int32_t dot = 0;
              for (int64_t k = g * G; k < (g + 1) * G; ++k) dot += int4_at(w, n0 + r, k, K) * xq[k];
              const float x_scale = xs[m * groups + g];
              total += dot * (to_f32(scales[2 * g * kInt4Rows + r]) * x_scale) +
                       to_f32(scales[(2 * g + 1) * kInt4Rows + r]) * (x_scale * xsum[m * groups + g]);
            }
            sums[m][r] = total;
          }
        }
#endif
        for (int64_t m = 0; m < mb; ++m)
          for (int64_t r = 0; r < kInt4Rows; ++r) {
            float s = sums[m][r];
            if (bias) s += to_f32(bias[n0 + r]);
            y[(m0 + m) * N + n0 + r] = from_f32<T>(s);
          }
      }
    }
  });
}

torch::Tensor int8_gemv_q8(torch::Tensor x, torch::Tensor w, torch::Tensor scale,
                           torch::Tensor wsum, c10::optional<torch::Tensor> bias,
                           int64_t streams, int64_t prefetch, c10::optional<torch::Tensor> out) {
  const GemvVariant variant = gemv_variant(streams, prefetch);
  for (const auto* t : {&x, &w, &scale, &wsum}) check_cpu(*t, "int8_gemv_q8");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_gemv_q8: shapes");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_gemv_q8: w must be int8");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == x.scalar_type(),
              "int8_gemv_q8: scale must be [out_features], x's dtype");
  TORCH_CHECK(wsum.dim() == 2 && wsum.size(0) == N && wsum.size(1) > 0 &&
                  K % wsum.size(1) == 0 && K / wsum.size(1) % 64 == 0 &&
                  wsum.scalar_type() == at::kInt,
              "int8_gemv_q8: wsum must be int32 [out_features, blocks], blocks of a multiple "
              "of 64 columns");
  TORCH_CHECK(N % kGemvRows == 0, "int8_gemv_q8: out_features must be a multiple of 4");
  check_bias(bias, x, N, "int8_gemv_q8");
  x = x.contiguous();
  w = w.contiguous();
  scale = scale.contiguous();
  wsum = wsum.contiguous();
  torch::Tensor b;
  const void* bp = bias_ptr(bias, b);
  auto y = result_tensor(out, {x.size(0), N}, x.scalar_type(), {&x, &w, &scale, &wsum, &b},
                         "int8_gemv_q8");
  dispatch_float_or_bf16(x.scalar_type(), "int8_gemv_q8", [&](auto tag) {
    using T = decltype(tag);
    dispatch_streams(variant, [&](auto rows) {
      int8_q8_impl<T, rows()>(x.data_ptr<T>(), w.data_ptr<int8_t>(), scale.data_ptr<T>(),
                              wsum.data_ptr<int32_t>(), static_cast<const T*>(bp),
                              y.data_ptr<T>(), x.size(0), N, K, K / wsum.size(1),
                              variant.prefetch);
    });
  });
  return y;
}

torch::Tensor int4_gemv_q8(torch::Tensor x, torch::Tensor w, torch::Tensor blocked,
                           c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> out) {
  for (const auto* t : {&x, &w, &blocked}) check_cpu(*t, "int4_gemv_q8");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, "int4_gemv_q8: w must be 2-d uint8");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_gemv_q8: shapes");
  TORCH_CHECK(blocked.dim() == 4 && blocked.size(0) * kInt4Rows == N && blocked.size(1) > 0 &&
                  K % blocked.size(1) == 0 && blocked.size(2) == 2 &&
                  blocked.size(3) == kInt4Rows && blocked.scalar_type() == x.scalar_type(),
              "int4_gemv_q8: blocked must be [out_features / 16, groups, 2, 16], x's dtype");
  const int64_t G = K / blocked.size(1);
  TORCH_CHECK(N % kInt4Rows == 0 && K % 64 == 0 && G % 32 == 0, "int4_gemv_q8: out_features "
              "must be a multiple of 16, in_features of 64, the group size of 32");
  check_bias(bias, x, N, "int4_gemv_q8");
  x = x.contiguous();
  w = w.contiguous();
  blocked = blocked.contiguous();
  torch::Tensor b;
  const void* bp = bias_ptr(bias, b);
  auto y = result_tensor(out, {x.size(0), N}, x.scalar_type(), {&x, &w, &blocked, &b},
                         "int4_gemv_q8");
  dispatch_float_or_bf16(x.scalar_type(), "int4_gemv_q8", [&](auto tag) {
    using T = decltype(tag);
    int4_q8_impl<T>(x.data_ptr<T>(), w.data_ptr<uint8_t>(), blocked.data_ptr<T>(),
                    static_cast<const T*>(bp), y.data_ptr<T>(), x.size(0), N, K, G);
  });
  return y;
}

// ---------------------------------------------------------------------------------------
// A quantized weight dequantized into the dtype of its scales, for batches too large for the
// GEMVs, which then run a GEMM on it: one pass over the packed weight, each value computed
// in float32 as the PyTorch reference does (q * scale; q * scale + offset) and rounded to the
// dtype once. int8's equals the reference's; int4's multiply and add may be fused by the
// compiler, a float32 step from the reference's before that rounding.

template <typename T>
void int8_dequantize_impl(const int8_t* w, const T* scale, T* out, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = w + n * K;
      T* dst = out + n * K;
      const float s = to_f32(scale[n]);
      int64_t k = 0;
#ifdef KVFLOW_AVX512
      const __m512 sv = _mm512_set1_ps(s);
      for (; k + 16 <= K; k += 16) store16(dst + k, _mm512_mul_ps(load16(row + k), sv));
#endif
      for (; k < K; ++k) dst[k] = from_f32<T>(static_cast<float>(row[k]) * s);
    }
  });
}

torch::Tensor int8_dequantize(torch::Tensor w, torch::Tensor scale,
                              c10::optional<torch::Tensor> out_) {
  check_cpu(w, "int8_dequantize w");
  check_cpu(scale, "int8_dequantize scale");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "int8_dequantize: w must be 2-d int8");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0),
              "int8_dequantize: scale must be [out_features]");
  w = w.contiguous();
  scale = scale.contiguous();
  auto out = result_tensor(out_, w.sizes(), scale.scalar_type(), {&w, &scale}, "int8_dequantize");
  dispatch_float_or_bf16(scale.scalar_type(), "int8_dequantize", [&](auto tag) {
    using T = decltype(tag);
    int8_dequantize_impl<T>(w.data_ptr<int8_t>(), scale.data_ptr<T>(), out.data_ptr<T>(),
                            w.size(0), w.size(1));
  });
  return out;
}

// int4: per block and run of 16 columns (4 chunks), a word permutation gathers each row's
// four words (its 4 columns of each chunk) into 64 bits, and variable shifts spread them
// over 16 lanes.
template <typename T>
void int4_dequantize_impl(const uint8_t* w, const Int4Scales<T>& scales, T* out, int64_t N,
                          int64_t K, int64_t G) {
  at::parallel_for(0, N / kInt4Rows, 1, [&](int64_t begin, int64_t end) {
#ifdef KVFLOW_AVX512
    // Word 4r + i of rows 0-7 (8-15): row r's word in chunk i of the run; A holds chunks
    // 0 and 1 (words 0-15, 16-31), B chunks 2 and 3 (words 32-47, 48-63 of the pair).
    alignas(64) int16_t order[2][32];
    for (int half = 0; half < 2; ++half)
      for (int r = 0; r < 8; ++r)
        for (int i = 0; i < 4; ++i) order[half][4 * r + i] = 16 * i + 8 * half + r;
    const __m512i orders[2] = {_mm512_load_si512(order[0]), _mm512_load_si512(order[1])};
    // Lane l is column l of the run: chunk l / 4, whose word is the low or high half of the
    // row's dword 0 (chunks 0, 1) or 1 (chunks 2, 3), then byte l % 2, nibble l % 4 / 2.
    const __m512i shifts = _mm512_setr_epi32(0, 8, 4, 12, 16, 24, 20, 28, 0, 8, 4, 12, 16, 24, 20, 28);
    const __m512i dword_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i low4 = _mm512_set1_epi32(15);
#endif
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kInt4Rows;
      const uint8_t* wb = w + n0 * (K / 2);
      int64_t k = 0;
#ifdef KVFLOW_AVX512
      for (; k + 16 <= K; k += 16) {
        const uint8_t* p = wb + k / 4 * kInt4Chunk;
        const __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 2 * kInt4Chunk);
        const __m512i rows[2] = {_mm512_permutex2var_epi16(a, orders[0], b),
                                 _mm512_permutex2var_epi16(a, orders[1], b)};
        const int64_t g = k / G;  // a run of 16 columns lies in one group
        for (int64_t r = 0; r < kInt4Rows; ++r) {
          const int64_t n = n0 + r;
          const __m512i dwords = _mm512_permutexvar_epi32(
              _mm512_add_epi32(dword_of_lane, _mm512_set1_epi32(2 * (r % 8))), rows[r / 8]);
          const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(dwords, shifts), low4));
          const __m512 scaled = _mm512_mul_ps(q, _mm512_set1_ps(scales.scale_at(n, g)));
          store16(out + n * K + k, _mm512_add_ps(scaled, _mm512_set1_ps(scales.offset_at(n, g))));
        }
      }
#endif
      for (; k < K; ++k) {
        for (int64_t r = 0; r < kInt4Rows; ++r) {
          const int64_t n = n0 + r, g = k / G;
          const float scaled = int4_at(wb, r, k, K) * scales.scale_at(n, g);
          out[n * K + k] = from_f32<T>(scaled + scales.offset_at(n, g));
        }
      }
    }
  });
}

torch::Tensor int4_dequantize(torch::Tensor w, torch::Tensor scale, torch::Tensor offset,
                              c10::optional<torch::Tensor> out_) {
  const int64_t G = check_int4(w, scale, offset, "int4_dequantize");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  w = w.contiguous();
  scale = scale.contiguous();
  offset = offset.contiguous();
  auto out = result_tensor(out_, {N, K}, scale.scalar_type(), {&w, &scale, &offset}, "int4_dequantize");
  dispatch_float_or_bf16(scale.scalar_type(), "int4_dequantize", [&](auto tag) {
    using T = decltype(tag);
    int4_dequantize_impl<T>(w.data_ptr<uint8_t>(),
                            {scale.data_ptr<T>(), offset.data_ptr<T>(), nullptr, scale.size(1)},
                            out.data_ptr<T>(), N, K, G);
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Paged attention over a ragged batch of decodes, short queries and prefill chunks,
// reading the cache in place: K blocks d-major, [num_blocks, num_kv_heads, head_dim,
// block_size], V blocks [num_blocks, num_kv_heads, block_size, head_dim]. A work item is
// (request, kv head, tile of up to kQueryTile queries, range of keys): every query row of
// the tile in that kv head's group attends over the range with an online softmax, one
// chunk of kChunk keys at a time, so that a row's max, exps and rescale are paid once per
// 64 keys rather than per block. Each chunk's keys and values are read once for all rows.
// - bfloat16 on a CPU with AVX512_BF16 (and head_dim a multiple of 16): the chunk's keys
//   and values are repacked into pairs and both products are bf16 GEMM tiles on vdpbf16ps
//   (float32 sums), the probabilities rounded to bf16 for the second as PyTorch's CPU
//   flash attention rounds them; twice the rate of float32 FMAs on the same units.
// - Otherwise scores are broadcast FMAs against the d-major keys (no horizontal sums) and
//   the widened values are weighted into each row's output.
// - A request with one tile of queries (a decode) splits a long context into partitions
//   so that every core works on one stream; partial results are merged afterwards
//   (flash-decoding). With split_context false it never does: each query's keys are then
//   read in one pass, chunk by chunk, whether it is a decode or sits in a prefill chunk.
// - A longer request (a prefill chunk) is split into query tiles, each attending over the
//   keys up to its last query (causal). Tiles cost more the later they sit, so threads
//   take items largest first from a shared counter.
// Chunks start at multiples of kChunk whatever the item's range, and a row's arithmetic
// on a chunk does not depend on the rows beside it: a query's output is bitwise the same
// as a decode and anywhere in a prefill chunk.
constexpr int64_t kPartition = 512;
constexpr int64_t kQueryTile = 16;
constexpr int64_t kChunk = 64;
static_assert(kPartition % kChunk == 0 && kChunk % 32 == 0, "partitions are whole chunks");

#if defined(KVFLOW_AVX512) && defined(__AVX512BF16__)
#define KVFLOW_BF16_PAIRS 1
#endif

template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef KVFLOW_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef KVFLOW_AVX512
  __m512 av = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] = fmadd(a, x[i], y[i]);
}

inline void scale_vec(float a, float* y, int64_t n) {
  int64_t i = 0;
#ifdef KVFLOW_AVX512
  const __m512 av = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(av, _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] *= a;
}

#ifdef KVFLOW_AVX512
// Lanes i of a vector at offset 16 * v whose position 16 * v + i lies in [a, b).
inline __mmask16 range_mask(int64_t v, int64_t a, int64_t b) {
  const int64_t lo = std::clamp<int64_t>(a - 16 * v, 0, 16);
  const int64_t hi = std::clamp<int64_t>(b - 16 * v, 0, 16);
  return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}
#endif

// The rows' step of the online softmax over a chunk: row r's scores s[r * kChunk + j] are
// attended for j in [a[r], b[r]) (maybe none). They become exp(score * scale - new max)
// there and 0 elsewhere, row_max and row_sum move on, and correction[r] is the factor the
// row's earlier output takes (1 for a row the chunk leaves alone); new_max is scratch.
// With pairs (the bf16 pair path) the exps go there instead, as kChunk / 2 pairs of bf16
// per row rounded to nearest even, and s is left as it was.
// Masked lanes are exactly 0 and the exps are summed lane-wise before one horizontal sum,
// so a chunk sums alike however much of it an item reads. The work goes in passes over
// all rows, so that one row's chain of max, exp and sum overlaps the next row's.
void softmax_chunk(float* s, int64_t rows, const int64_t* a, const int64_t* b, float scale,
                   float softcap, float* row_max, float* row_sum, float* correction,
                   float* new_max, [[maybe_unused]] uint32_t* pairs = nullptr) {
  if (softcap > 0.f) {  // Gemma 2: scores -> cap * tanh(scores / cap)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = a[r]; j < b[r]; ++j)
        s[r * kChunk + j] = softcap * std::tanh(s[r * kChunk + j] * scale / softcap);
    scale = 1.f;
  }
  const float lowest = -std::numeric_limits<float>::infinity();
#ifdef KVFLOW_AVX512
  static_assert(kChunk == 64, "a row's mask is one 64-bit word");
  auto row_mask = [&](int64_t r) -> uint64_t {  // bits [a[r], b[r])
    if (a[r] >= b[r]) return 0;
    const uint64_t below_b = b[r] >= 64 ? ~uint64_t{0} : (uint64_t{1} << b[r]) - 1;
    return below_b & ~((uint64_t{1} << a[r]) - 1);
  };
  const __m512 scale_v = _mm512_set1_ps(scale);
#endif
  // Pass 1: the chunk's max per row, kept in new_max. Rounding is monotonic and the scale
  // positive, so the max of the scaled scores is the scaled max.
  for (int64_t r = 0; r < rows; ++r) {
    const float* sr = s + r * kChunk;
#ifdef KVFLOW_AVX512
    const uint64_t mask = row_mask(r);
    __m512 m = _mm512_set1_ps(lowest);
    for (int64_t v = 0; v < kChunk / 16; ++v)
      m = _mm512_mask_max_ps(m, static_cast<__mmask16>(mask >> (16 * v)), m,
                             _mm512_loadu_ps(sr + 16 * v));
    new_max[r] = _mm512_reduce_max_ps(m) * scale;
#else
    new_max[r] = lowest;
    for (int64_t j = a[r]; j < b[r]; ++j) new_max[r] = std::max(new_max[r], sr[j] * scale);
#endif
  }
  // Pass 2: each row's new max and the factor on what it had, exp(old max - new max): 0
  // on its first chunk, exactly 1 (exp(0)) for a row left alone.
  for (int64_t r = 0; r < rows; ++r) {
    new_max[r] = a[r] < b[r] ? std::max(row_max[r], new_max[r]) : row_max[r];
    correction[r] = a[r] < b[r] ? row_max[r] - new_max[r] : 0.f;
  }
  int64_t r = 0;
#ifdef KVFLOW_AVX512
  for (; r < rows; r += 16) {
    const __mmask16 m = range_mask(0, 0, rows - r);
    _mm512_mask_storeu_ps(correction + r, m, exp16(_mm512_maskz_loadu_ps(m, correction + r)));
  }
#else
  for (; r < rows; ++r) correction[r] = std::exp(correction[r]);
#endif
  // Pass 3: the exps (of the scaled scores, masked lanes -inf) and their sums.
  for (r = 0; r < rows; ++r) {
    float* sr = s + r * kChunk;
    float sum = 0.f;
#ifdef KVFLOW_AVX512
    const uint64_t mask = row_mask(r);
    // A row left alone is -inf everywhere, and its max may be too: shift it by 0.
    const __m512 shift = _mm512_set1_ps(a[r] < b[r] ? new_max[r] : 0.f);
    __m512 sums = _mm512_setzero_ps();
    __m512 e[kChunk / 16];
    for (int64_t v = 0; v < kChunk / 16; ++v) {  // exp(-inf) is 0 in masked lanes
      const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(lowest),
                                          static_cast<__mmask16>(mask >> (16 * v)),
                                          _mm512_loadu_ps(sr + 16 * v), scale_v);
      e[v] = exp16(_mm512_sub_ps(x, shift));
      sums = _mm512_add_ps(sums, e[v]);
    }
#ifdef KVFLOW_BF16_PAIRS
    if (pairs) {
      for (int64_t v = 0; v < kChunk / 16; v += 2)
        _mm512_storeu_si512(pairs + r * kChunk / 2 + 8 * v,
                            (__m512i)_mm512_cvtne2ps_pbh(e[v + 1], e[v]));
    } else
#endif
    {
      for (int64_t v = 0; v < kChunk / 16; ++v) _mm512_storeu_ps(sr + 16 * v, e[v]);
    }
    sum = _mm512_reduce_add_ps(sums);
#else
    for (int64_t j = 0; j < kChunk; ++j) {
      sr[j] = j >= a[r] && j < b[r] ? std::exp(sr[j] * scale - new_max[r]) : 0.f;
      sum += sr[j];
    }
#endif
    row_max[r] = new_max[r];
    row_sum[r] = row_sum[r] * correction[r] + sum;
  }
}

// scores[r * stride + j] = q_r . key(o + j) for j < n, NR query rows at a time; kt is one
// head's d-major key block [head_dim][block_size].
template <typename T, int NR>
inline void score_block(const float* qf, int64_t head_dim, const T* kt, int64_t block_size,
                        int64_t o, int64_t n, float* scores, int64_t stride) {
#ifdef KVFLOW_AVX512
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; ++d) {
      const __m512 kv = load16_masked(kt + d * block_size + o + j, mask);
      for (int r = 0; r < NR; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qf[r * head_dim + d]), kv, acc[r]);
    }
    for (int r = 0; r < NR; ++r) _mm512_mask_storeu_ps(scores + r * stride + j, mask, acc[r]);
  }
#else
  for (int r = 0; r < NR; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float s = 0.f;
      for (int64_t d = 0; d < head_dim; ++d)
        s = fmadd(qf[r * head_dim + d], to_f32(kt[d * block_size + o + j]), s);
      scores[r * stride + j] = s;
    }
#endif
}

template <typename T>
void score_rows(const float* qf, int64_t rows, int64_t head_dim, const T* kt, int64_t block_size,
                int64_t o, int64_t n, float* scores, int64_t stride) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8)
    score_block<T, 8>(qf + r * head_dim, head_dim, kt, block_size, o, n, scores + r * stride,
                      stride);
  const float* q = qf + r * head_dim;
  float* out = scores + r * stride;
  switch (rows - r) {
    case 7: score_block<T, 7>(q, head_dim, kt, block_size, o, n, out, stride); break;
    case 6: score_block<T, 6>(q, head_dim, kt, block_size, o, n, out, stride); break;
    case 5: score_block<T, 5>(q, head_dim, kt, block_size, o, n, out, stride); break;
    case 4: score_block<T, 4>(q, head_dim, kt, block_size, o, n, out, stride); break;
    case 3: score_block<T, 3>(q, head_dim, kt, block_size, o, n, out, stride); break;
    case 2: score_block<T, 2>(q, head_dim, kt, block_size, o, n, out, stride); break;
    case 1: score_block<T, 1>(q, head_dim, kt, block_size, o, n, out, stride); break;
    default: break;
  }
}

// out[0, head_dim) = out * correction + sum over j in [j0, n) of p[j] * vf[j][.]: one row's
// output weighted by a chunk's widened values, 64 dimensions at a time in independent sums.
inline void weigh_values(const float* p, const float* vf, int64_t j0, int64_t n,
                         int64_t head_dim, float correction, float* out) {
#ifdef KVFLOW_AVX512
  for (int64_t d = 0; d < head_dim; d += 64) {
    __mmask16 mask[4];
    __m512 acc[4];
    for (int v = 0; v < 4; ++v) {
      mask[v] = range_mask(v, 0, head_dim - d);
      acc[v] = _mm512_mul_ps(_mm512_set1_ps(correction),
                             _mm512_maskz_loadu_ps(mask[v], out + d + 16 * v));
    }
    for (int64_t j = j0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int v = 0; v < 4; ++v)
        acc[v] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(mask[v], vf + j * head_dim + d + 16 * v),
                                 acc[v]);
    }
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + d + 16 * v, mask[v], acc[v]);
  }
#else
  for (int64_t d = 0; d < head_dim; ++d) {
    float a = out[d] * correction;
    for (int64_t j = j0; j < n; ++j) a = fmadd(p[j], vf[j * head_dim + d], a);
    out[d] = a;
  }
#endif
}

#ifdef KVFLOW_BF16_PAIRS
// Two rows of 16 bf16 each, interleaved: word 2i from the first, 2i + 1 from the second,
// so that lane i of the result, as 32 bits, is the pair (first[i], second[i]).
inline __m512i interleave16(__m256i first, __m256i second) {
  alignas(64) static const uint16_t index[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21,
                                                 6, 22, 7, 23, 8, 24, 9, 25, 10, 26, 11, 27,
                                                 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(
      _mm512_load_si512(index),
      _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1));
}

// Keys [o, o + n) of a d-major block as pairs of dimensions: dst[p * ld + j] holds
// (k[2p][o + j], k[2p + 1][o + j]).
inline void pack_key_pairs(const BFloat16* kt, int64_t block_size, int64_t head_dim, int64_t o,
                           int64_t n, uint32_t* dst, int64_t ld) {
  for (int64_t p = 0; p < head_dim / 2; ++p) {
    const BFloat16* even = kt + 2 * p * block_size + o;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = range_mask(0, 0, n - j);
      _mm512_mask_storeu_epi32(dst + p * ld + j, m,
                               interleave16(_mm256_maskz_loadu_epi16(m, even + j),
                                            _mm256_maskz_loadu_epi16(m, even + block_size + j)));
    }
  }
}

// Value rows as pairs of keys: dst[d] holds (first[d], second[d]); a null row is zeros.
inline void pack_value_pair(const BFloat16* first, const BFloat16* second, int64_t head_dim,
                            uint32_t* dst) {
  for (int64_t d = 0; d < head_dim; d += 16) {
    const __m256i a = first ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first + d))
                            : _mm256_setzero_si256();
    const __m256i b = second ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(second + d))
                             : _mm256_setzero_si256();
    _mm512_storeu_si512(dst + d, interleave16(a, b));
  }
}

// c[r][16 * v + i] (+)= sum over k < k2 of a[r][k] . b[k][16 * v + i], NR rows by NV
// vectors: a bf16 GEMM tile whose elements are pairs (vdpbf16ps, float32 sums). Each lane
// sums its pairs in order k = 0, 1, ... whatever rows sit beside it.
template <int NR, int NV>
inline void pair_tile(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                      int64_t k2, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < k2; ++k) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + k * ldb + 16 * v);
    for (int r = 0; r < NR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + k]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <int NV>
void pair_rows(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t k2,
               float* c, int64_t ldc, int64_t rows, bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    pair_tile<4, NV>(a + r * lda, lda, b, ldb, k2, c + r * ldc, ldc, accumulate);
  a += r * lda;
  c += r * ldc;
  switch (rows - r) {
    case 3: pair_tile<3, NV>(a, lda, b, ldb, k2, c, ldc, accumulate); break;
    case 2: pair_tile<2, NV>(a, lda, b, ldb, k2, c, ldc, accumulate); break;
    case 1: pair_tile<1, NV>(a, lda, b, ldb, k2, c, ldc, accumulate); break;
    default: break;
  }
}

// Calls step(std::integral_constant<int, V>{}, j) for each group of V <= 4 vectors of 16
// columns starting at column j of n (a multiple of 16), 64 columns at a time.
template <typename Step>
KVFLOW_INLINE void by_column_groups(int64_t n, Step step) {
  for (int64_t j = 0; j < n; j += 64) {
    switch (std::min<int64_t>(4, (n - j) / 16)) {
      case 4: step(std::integral_constant<int, 4>{}, j); break;
      case 3: step(std::integral_constant<int, 3>{}, j); break;
      case 2: step(std::integral_constant<int, 2>{}, j); break;
      default: step(std::integral_constant<int, 1>{}, j); break;
    }
  }
}

// c[rows][n] (+)= a[rows][k2] . b[k2][n] in pairs; n a multiple of 16.
void pair_product(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t k2,
                  float* c, int64_t ldc, int64_t rows, int64_t n, bool accumulate) {
  by_column_groups(n, [&](auto nv, int64_t j) KVFLOW_INLINE_LAMBDA {
    pair_rows<decltype(nv)::value>(a, lda, b + j, ldb, k2, c + j, ldc, rows, accumulate);
  });
}

#endif

#ifdef KVFLOW_AMX
// Linux lends a process AMX's tile registers only when it asks (arch_prctl, Linux 5.16
// on); a kernel that refuses, or predates AMX, leaves the products on vdpbf16ps.
bool amx_usable() {
  static const bool granted = [] {
    constexpr int kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr int kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// Palette 1 with every tile 16 rows of 64 bytes: C tiles (0-3) 16 x 16 float32, A tiles
// 16 rows of 16 bf16 pairs, B tiles 16 pair-rows of 16 columns. The configuration is a
// thread's state, and other code (oneDNN) sets its own: each thread loads this one
// before its products and releases the tiles after.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct TileScope {
  TileScope() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.colsb[t] = 64;
      config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// c[16 m + i][16 t + j] (+)= sum over pairs k < k2 of a[16 m + i][k] . b[k][16 t + j] for
// NT column tiles: rows and k2 multiples of 16. The pairs are summed 16 at a time, in
// order, by tdpbf16ps (float32 sums); a row's result depends on its own row of a only.
template <int NT>
void amx_tiles(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t k2,
               float* c, int64_t ldc, int64_t rows, bool accumulate) {
  static_assert(NT >= 1 && NT <= 4, "four C tiles");
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;
  for (int64_t m = 0; m < rows; m += 16) {
    float* cm = c + m * ldc;
    if (accumulate) {
      _tile_loadd(0, cm, sc);
      if constexpr (NT > 1) _tile_loadd(1, cm + 16, sc);
      if constexpr (NT > 2) _tile_loadd(2, cm + 32, sc);
      if constexpr (NT > 3) _tile_loadd(3, cm + 48, sc);
    } else {
      _tile_zero(0);
      if constexpr (NT > 1) _tile_zero(1);
      if constexpr (NT > 2) _tile_zero(2);
      if constexpr (NT > 3) _tile_zero(3);
    }
    for (int64_t k = 0; k < k2; k += 16) {
      const uint32_t* bk = b + k * ldb;
      _tile_loadd(4, a + m * lda + k, sa);
      _tile_loadd(5, bk, sb);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (NT > 1) {
        _tile_loadd(6, bk + 16, sb);
        _tile_dpbf16ps(1, 4, 6);
      }
      if constexpr (NT > 2) {
        _tile_loadd(7, bk + 32, sb);
        _tile_dpbf16ps(2, 4, 7);
      }
      if constexpr (NT > 3) {
        _tile_loadd(5, bk + 48, sb);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, cm, sc);
    if constexpr (NT > 1) _tile_stored(1, cm + 16, sc);
    if constexpr (NT > 2) _tile_stored(2, cm + 32, sc);
    if constexpr (NT > 3) _tile_stored(3, cm + 48, sc);
  }
}

// c[rows][n] (+)= a[rows][k2] . b[k2][n] in pairs on AMX tiles, under a TileScope: rows
// and k2 multiples of 16, n of 16.
void amx_product(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t k2,
                 float* c, int64_t ldc, int64_t rows, int64_t n, bool accumulate) {
  by_column_groups(n, [&](auto nt, int64_t j) KVFLOW_INLINE_LAMBDA {
    amx_tiles<decltype(nt)::value>(a, lda, b + j, ldb, k2, c + j, ldc, rows, accumulate);
  });
}
#endif

// Whether paged_attention takes the bf16 pair path for these tensors.
template <typename T>
constexpr bool pairs_path(int64_t head_dim) {
#ifdef KVFLOW_BF16_PAIRS
  return std::is_same_v<T, BFloat16> && head_dim % 16 == 0;
#else
  return false;
#endif
}

// Whether the pair path multiplies on AMX tiles: every product in a call then does, so
// that a query's output stays the same wherever it sits. A query's head_dim / 2 pairs
// make whole A tiles (head_dim a multiple of 32).
template <typename T>
bool tiles_path(int64_t head_dim) {
#ifdef KVFLOW_AMX
  return pairs_path<T>(head_dim) && head_dim % 32 == 0 && amx_usable();
#else
  return false;
#endif
}

// The factor on a row's unnormalised output: 1 / its sum of exps, or, with gpt-oss's sink
// for its head (a learned logit that joins the softmax's denominator and weights no value),
// that sum with the sink's exp added, all relative to the larger of the row's max and sink.
inline float output_factor(float row_max, float row_sum, const float* sinks, int64_t head) {
  if (row_max == -std::numeric_limits<float>::infinity() || row_sum <= 0.f) return 0.f;
  if (sinks == nullptr) return 1.f / row_sum;
  const float top = std::max(row_max, sinks[head]);
  const float kept = std::exp(row_max - top);
  return kept / (row_sum * kept + std::exp(sinks[head] - top));
}

struct WorkItem {
  int64_t req, kv_head, part;
  int64_t q_begin, q_end;       // queries of the request, indices from its first query
  int64_t first_key, end_key;   // key positions attended
  int64_t partial;              // first scratch row of a split context, or -1
};

template <typename T>
void paged_attention_impl(T* out, const T* q, const T* k_cache, const T* v_cache,
                          const int32_t* block_tables, const int32_t* seq_lens,
                          const int32_t* query_start_loc, int64_t num_reqs, int64_t max_blocks,
                          int64_t num_heads, int64_t num_kv_heads, int64_t block_size,
                          int64_t head_dim, double scale, int64_t window, bool split_context,
                          float softcap, const float* sinks) {
  const int64_t group = num_heads / num_kv_heads;
  std::vector<WorkItem> items;
  std::vector<int64_t> parts_of(num_reqs);
  int64_t partial_rows = 0;
  for (int64_t b = 0; b < num_reqs; ++b) {
    const int64_t seq_len = seq_lens[b];
    const int64_t query_len = query_start_loc[b + 1] - query_start_loc[b];
    const int64_t num_computed = seq_len - query_len;
    // Keys before the first query's window can never be attended.
    auto first_key = [&](int64_t query_pos) {
      return window > 0 ? std::max<int64_t>(0, query_pos - window + 1) : int64_t{0};
    };
    if (query_len <= kQueryTile) {
      const int64_t first = first_key(num_computed);
      const int64_t parts = split_context
          ? std::max<int64_t>(1, (seq_len - first + kPartition - 1) / kPartition) : 1;
      parts_of[b] = parts;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t begin = first + p * kPartition;
          items.push_back({b, h, p, 0, query_len, begin,
                           parts > 1 ? std::min(seq_len, begin + kPartition) : seq_len,
                           parts > 1 ? partial_rows : -1});
          if (parts > 1) partial_rows += query_len * group;
        }
      }
      continue;
    }
    parts_of[b] = 1;
    for (int64_t t0 = 0; t0 < query_len; t0 += kQueryTile) {
      const int64_t t1 = std::min(query_len, t0 + kQueryTile);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        items.push_back({b, h, 0, t0, t1, first_key(num_computed + t0), num_computed + t1, -1});
    }
  }
  // Per partial row: running max, sum of exps, and the unnormalised output.
  std::vector<float> partial_ml(partial_rows * 2);
  std::vector<float> partial_acc(partial_rows * head_dim);
  const int64_t q_row_stride = num_heads * head_dim;
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto cost = [&](int64_t i) { return (items[i].q_end - items[i].q_begin) * (items[i].end_key - items[i].first_key); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next{0};
  const int64_t num_workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items.size()));

  const bool pairs = pairs_path<T>(head_dim);
  const bool tiles = tiles_path<T>(head_dim);

  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
#ifdef KVFLOW_AMX
    std::optional<TileScope> tile_scope;
    if (tiles) tile_scope.emplace();
#endif
    // Per row: query (float32, scaled, or bf16 pairs), output, scores of the chunk, and
    // the softmax's max, sum and rescale; per chunk: values widened or keys and values
    // repacked into pairs.
    std::vector<float> qf, acc, scores, vf, row_max, row_sum, correction, new_max;
    std::vector<int64_t> attend_from, attend_to;
    std::vector<uint32_t> q_pairs, p_pairs, k_pairs, v_pairs;
    if (pairs) {
      k_pairs.resize(head_dim / 2 * kChunk);
      v_pairs.resize(kChunk / 2 * head_dim);
    } else {
      vf.resize(kChunk * head_dim);
    }
    for (int64_t taken = next.fetch_add(1); taken < static_cast<int64_t>(items.size());
         taken = next.fetch_add(1)) {
      const WorkItem& item = items[order[taken]];
      const int64_t q0 = query_start_loc[item.req];
      const int64_t query_len = query_start_loc[item.req + 1] - q0;
      const int64_t tile = item.q_end - item.q_begin;
      const int64_t rows = tile * group;
      // AMX multiplies whole tiles of 16 rows: the rows past the item's are zero queries,
      // whose scores, probabilities and outputs are never read.
      const int64_t tile_rows = tiles ? (rows + 15) / 16 * 16 : rows;
      const int64_t seq_len = seq_lens[item.req];
      acc.assign(tile_rows * head_dim, 0.f);
      row_max.assign(rows, -std::numeric_limits<float>::infinity());
      row_sum.assign(rows, 0.f);
      for (auto* v : {&correction, &new_max}) v->resize(rows);
      attend_from.resize(rows);
      attend_to.resize(rows);
      scores.resize(tile_rows * kChunk);
      if (pairs) {
        q_pairs.assign(tile_rows * head_dim / 2, 0u);
        p_pairs.resize(tile_rows * kChunk / 2);
      } else {
        qf.resize(rows * head_dim);
      }
      for (int64_t i = 0; i < tile; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const T* src = q + (q0 + item.q_begin + i) * q_row_stride +
                         (item.kv_head * group + g) * head_dim;
          const int64_t r = i * group + g;
          if (pairs) {
            std::memcpy(q_pairs.data() + r * head_dim / 2, src, head_dim * sizeof(T));
          } else {
            widen(src, qf.data() + r * head_dim, head_dim);
            scale_vec(static_cast<float>(scale), qf.data() + r * head_dim, head_dim);
          }
        }
      const int32_t* table = block_tables + item.req * max_blocks;
      auto block_base = [&](int64_t pos) {
        return (table[pos / block_size] * num_kv_heads + item.kv_head) * block_size * head_dim;
      };
      // Keys are read from the block holding the item's first key on; the chunk reaches
      // back to a multiple of kChunk, and the keys before that block count as masked.
      const int64_t first_read = item.first_key - item.first_key % block_size;
      for (int64_t chunk = item.first_key - item.first_key % kChunk; chunk < item.end_key;
           chunk += kChunk) {
        const int64_t lo = std::max(chunk, first_read) - chunk;
        const int64_t n = std::min(chunk + kChunk, item.end_key) - chunk;
        [[maybe_unused]] const int64_t padded = (n + 15) / 16 * 16;  // whole vectors
#ifdef KVFLOW_BF16_PAIRS
        if (pairs) {
          for (int64_t p = 0; p < head_dim / 2; ++p) {
            std::fill(k_pairs.data() + p * kChunk, k_pairs.data() + p * kChunk + lo, 0u);
            std::fill(k_pairs.data() + p * kChunk + n, k_pairs.data() + p * kChunk + padded, 0u);
          }
        }
#endif
        for (int64_t s = chunk + lo; s < chunk + n;) {
          const int64_t o = s % block_size;
          const int64_t e = std::min(chunk + n, s - o + block_size);
          const int64_t base = block_base(s);
#ifdef KVFLOW_BF16_PAIRS
          if (pairs) {
            pack_key_pairs(reinterpret_cast<const BFloat16*>(k_cache) + base, block_size,
                           head_dim, o, e - s, k_pairs.data() + (s - chunk), kChunk);
            s = e;
            continue;
          }
#endif
          score_rows(qf.data(), rows, head_dim, k_cache + base, block_size, o, e - s,
                     scores.data() + (s - chunk), kChunk);
          widen(v_cache + base + o * head_dim, vf.data() + (s - chunk) * head_dim,
                (e - s) * head_dim);
          s = e;
        }
        for (int64_t i = 0; i < tile; ++i) {  // range, causal and window masks, per query
          const int64_t query_pos = seq_len - query_len + item.q_begin + i;
          int64_t from = std::max(lo, item.first_key - chunk);
          if (window > 0) from = std::max(from, query_pos - window + 1 - chunk);
          const int64_t to = std::min(n, query_pos + 1 - chunk);
          std::fill_n(attend_from.data() + i * group, group, from);
          std::fill_n(attend_to.data() + i * group, group, to);
        }
#ifdef KVFLOW_BF16_PAIRS
        if (pairs) {
          // Values as pairs of keys; keys outside [lo, n) are zeros.
          auto value_row = [&](int64_t j) -> const BFloat16* {
            if (j < lo || j >= n) return nullptr;
            const int64_t pos = chunk + j;
            return reinterpret_cast<const BFloat16*>(v_cache) + block_base(pos) +
                   pos % block_size * head_dim;
          };
          // Tiles sum all of the chunk's pairs, the keys outside [lo, n) as zero
          // probabilities against zero values.
          const int64_t p0 = tiles ? 0 : lo / 2, k2 = tiles ? kChunk / 2 : (n + 1) / 2;
          for (int64_t p = p0; p < k2; ++p)
            pack_value_pair(value_row(2 * p), value_row(2 * p + 1), head_dim,
                            v_pairs.data() + p * head_dim);
          // On tiles, 16 rows at a time go through scores, softmax and values, so that
          // their scores, probabilities and outputs stay in L1 between the steps.
          const int64_t step = tiles ? 16 : rows;
          for (int64_t r0 = 0; r0 < rows; r0 += step) {
            const int64_t block = std::min(step, rows - r0);
            const uint32_t* qb = q_pairs.data() + r0 * head_dim / 2;
            uint32_t* pb = p_pairs.data() + r0 * kChunk / 2;
            float* sb = scores.data() + r0 * kChunk;
            float* ab = acc.data() + r0 * head_dim;
            // c = (or +=) the block's rows of a times b: on tiles, its whole tile of 16.
            auto product = [&](const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                               int64_t k, float* c, int64_t ldc, int64_t n,
                               bool accumulate) KVFLOW_INLINE_LAMBDA {
#ifdef KVFLOW_AMX
              if (tiles) return amx_product(a, lda, b, ldb, k, c, ldc, 16, n, accumulate);
#endif
              pair_product(a, lda, b, ldb, k, c, ldc, block, n, accumulate);
            };
            product(qb, head_dim / 2, k_pairs.data(), kChunk, head_dim / 2, sb, kChunk, padded,
                    false);
            softmax_chunk(sb, block, attend_from.data() + r0, attend_to.data() + r0,
                          static_cast<float>(scale), softcap, row_max.data() + r0,
                          row_sum.data() + r0, correction.data() + r0, new_max.data() + r0, pb);
            for (int64_t r = 0; r < block; ++r)
              if (correction[r0 + r] != 1.f) scale_vec(correction[r0 + r], ab + r * head_dim, head_dim);
            product(pb + p0, kChunk / 2, v_pairs.data() + p0 * head_dim, head_dim, k2 - p0, ab,
                    head_dim, head_dim, true);
          }
          continue;
        }
#endif
        softmax_chunk(scores.data(), rows, attend_from.data(), attend_to.data(), 1.f, softcap,
                      row_max.data(), row_sum.data(), correction.data(), new_max.data());
        for (int64_t r = 0; r < rows; ++r)
          weigh_values(scores.data() + r * kChunk, vf.data(), lo, n, head_dim, correction[r],
                       acc.data() + r * head_dim);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = item.q_begin + r / group, g = r % group;
        if (item.partial < 0) {
          T* dst = out + (q0 + i) * q_row_stride + (item.kv_head * group + g) * head_dim;
          const float inv = output_factor(row_max[r], row_sum[r], sinks, item.kv_head * group + g);
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = from_f32<T>(acc[r * head_dim + d] * inv);
        } else {
          const int64_t row = item.partial + r;
          partial_ml[row * 2] = row_max[r];
          partial_ml[row * 2 + 1] = row_sum[r];
          std::copy_n(acc.data() + r * head_dim, head_dim, partial_acc.data() + row * head_dim);
        }
      }
    }
  });

  // Merge the partitions of split contexts: rescale each to the common max and sum.
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(head_dim);
    for (int64_t it = begin; it < end; ++it) {
      const WorkItem& first = items[it];
      if (first.partial < 0 || first.part != 0) continue;
      const int64_t parts = parts_of[first.req];
      const int64_t q0 = query_start_loc[first.req];
      const int64_t rows = (query_start_loc[first.req + 1] - q0) * group;
      for (int64_t r = 0; r < rows; ++r) {
        float max_all = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < parts; ++p)
          max_all = std::max(max_all, partial_ml[(items[it + p].partial + r) * 2]);
        std::fill(merged.begin(), merged.end(), 0.f);
        float sum = 0.f;
        if (max_all != -std::numeric_limits<float>::infinity()) {
          for (int64_t p = 0; p < parts; ++p) {
            const int64_t row = items[it + p].partial + r;
            const float m = partial_ml[row * 2];
            if (m == -std::numeric_limits<float>::infinity()) continue;
            const float weight = std::exp(m - max_all);
            sum += partial_ml[row * 2 + 1] * weight;
            axpy(weight, partial_acc.data() + row * head_dim, merged.data(), head_dim);
          }
        }
        const int64_t i = r / group, g = r % group;
        T* dst = out + (q0 + i) * q_row_stride + (first.kv_head * group + g) * head_dim;
        const float inv = output_factor(max_all, sum, sinks, first.kv_head * group + g);
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = from_f32<T>(merged[d] * inv);
      }
    }
  });
}

void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                     torch::Tensor v_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                     torch::Tensor query_start_loc, double scale, int64_t window,
                     bool split_context, double softcap, std::optional<torch::Tensor> sinks) {
  for (auto* t : {&out, &q, &k_cache, &v_cache, &block_tables, &seq_lens, &query_start_loc})
    check_cpu(*t, "paged_attention inputs");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "paged_attention: tensors must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
              query_start_loc.scalar_type() == at::kInt, "paged_attention: int32 metadata");
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_attention: q, out [tokens, heads, head_dim]; caches 4-d");
  TORCH_CHECK(v_cache.size(3) == q.size(2) && k_cache.size(2) == q.size(2) &&
              k_cache.size(3) == v_cache.size(2) && k_cache.size(1) == v_cache.size(1),
              "paged_attention: K cache must be [blocks, kv_heads, head_dim, block_size] and V "
              "cache [blocks, kv_heads, block_size, head_dim]");
  TORCH_CHECK(q.size(1) % v_cache.size(1) == 0, "paged_attention: heads must be a multiple of kv heads");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type(), "paged_attention: dtypes differ");
  block_tables = block_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  query_start_loc = query_start_loc.contiguous();
  const int64_t num_reqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.numel() == num_reqs + 1 && block_tables.size(0) == num_reqs,
              "paged_attention: one block table and seq_len per request, num_reqs + 1 offsets");
  if (sinks) {
    check_cpu(*sinks, "paged_attention sinks");
    TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->dim() == 1 &&
                sinks->size(0) == q.size(1) && sinks->is_contiguous(),
                "paged_attention: sinks must be float32 [heads], contiguous");
  }
  dispatch_float_or_bf16(q.scalar_type(), "paged_attention", [&](auto tag) {
    using T = decltype(tag);
    paged_attention_impl<T>(out.data_ptr<T>(), q.data_ptr<T>(), k_cache.data_ptr<T>(),
                            v_cache.data_ptr<T>(), block_tables.data_ptr<int32_t>(),
                            seq_lens.data_ptr<int32_t>(), query_start_loc.data_ptr<int32_t>(),
                            num_reqs, block_tables.size(1), q.size(1), v_cache.size(1),
                            v_cache.size(2), q.size(2), scale, window, split_context,
                            static_cast<float>(softcap),
                            sinks ? sinks->data_ptr<float>() : nullptr);
  });
}

// ---------------------------------------------------------------------------------------
// Glue. Row-parallel loops; bf16 rounding where the eager ops round.

// KV write: k, v [tokens, kv_heads, head_dim] to their slots: V blocks [block_size,
// head_dim] per head, K blocks d-major [head_dim, block_size] (see paged_attention).
template <typename T>
void write_kv_impl(T* kc, T* vc, const T* k, const T* v, const int64_t* slot, int64_t tokens,
                   int64_t heads, int64_t dim, int64_t block_size) {
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slot[t] < 0) continue;  // a padding token of a captured step: written nowhere
      const int64_t block = slot[t] / block_size, offset = slot[t] % block_size;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t head_base = (block * heads + h) * block_size * dim;
        const T* ks = k + (t * heads + h) * dim;
        std::memcpy(vc + head_base + offset * dim, v + (t * heads + h) * dim, dim * sizeof(T));
        for (int64_t d = 0; d < dim; ++d) kc[head_base + d * block_size + offset] = ks[d];
      }
    }
  });
}

void write_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slot_mapping) {
  for (auto* t : {&k_cache, &v_cache, &k, &v, &slot_mapping}) check_cpu(*t, "write_kv inputs");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k.dim() == 3 && v.sizes() == k.sizes(),
              "write_kv: caches [blocks, kv_heads, ...] and k, v [tokens, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "write_kv: caches must be contiguous");
  const int64_t block_size = v_cache.size(2);
  TORCH_CHECK(v_cache.size(1) == k.size(1) && v_cache.size(3) == k.size(2) &&
              k_cache.size(2) == k.size(2) && k_cache.size(3) == block_size,
              "write_kv: K cache must be [blocks, kv_heads, head_dim, block_size] and V cache "
              "[blocks, kv_heads, block_size, head_dim] for k, v of ", k.sizes());
  TORCH_CHECK(k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k.scalar_type() &&
              v.scalar_type() == k.scalar_type(), "write_kv: dtypes differ");
  k = k.contiguous();
  v = v.contiguous();
  auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == k.size(0), "write_kv: one slot per token");
  TORCH_CHECK(all_in_range(slots, v_cache.size(0) * block_size, -1),
              "write_kv: slot out of range (-1: a padding token, written nowhere)");
  dispatch_float_or_bf16(k.scalar_type(), "write_kv", [&](auto tag) {
    using T = decltype(tag);
    write_kv_impl<T>(k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), k.data_ptr<T>(),
                     v.data_ptr<T>(), slots.data_ptr<int64_t>(), k.size(0), k.size(1), k.size(2),
                     block_size);
  });
}

// out = weight * norm(x) where x is (x + residual) when a residual is given; that sum is
// written back into residual (the next layer's residual stream). A weight in x's dtype
// multiplies norm(x) rounded to that dtype (Llama's weight * x.to(dtype)); a float32 weight
// multiplies it in float32, rounded once after (Gemma's (1 + w) * x, cast after).
template <typename T, typename W>
void rms_norm_impl(T* out, T* x, T* residual, const W* weight, int64_t rows, int64_t dim,
                   float eps) {
  constexpr bool round_first = !std::is_same<W, float>::value;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(dim);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * dim;
      T* res = residual ? residual + r * dim : nullptr;
      float sq = 0.f;
      int64_t d = 0;
#ifdef KVFLOW_AVX512
      __m512 acc = _mm512_setzero_ps();
      for (; d + 16 <= dim; d += 16) {
        __m512 v = load16(xr + d);
        if (res) {
          v = round16<T>(_mm512_add_ps(v, load16(res + d)));
          store16(res + d, v);
        }
        _mm512_storeu_ps(h.data() + d, v);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      sq = _mm512_reduce_add_ps(acc);
#endif
      for (; d < dim; ++d) {
        float v = to_f32(xr[d]);
        if (res) {
          v = rounded<T>(v + to_f32(res[d]));
          res[d] = from_f32<T>(v);
        }
        h[d] = v;
        sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sq / dim + eps);
      T* o = out + r * dim;
      d = 0;
#ifdef KVFLOW_AVX512
      const __m512 inv_v = _mm512_set1_ps(inv);
      for (; d + 16 <= dim; d += 16) {
        __m512 n = _mm512_mul_ps(_mm512_loadu_ps(h.data() + d), inv_v);
        if (round_first) n = round16<T>(n);
        store16(o + d, _mm512_mul_ps(load16(weight + d), n));
      }
#endif
      for (; d < dim; ++d) {
        float n = h[d] * inv;
        if (round_first) n = rounded<T>(n);
        o[d] = from_f32<T>(to_f32(weight[d]) * n);
      }
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> residual,
                       double eps, c10::optional<torch::Tensor> out_) {
  check_cpu(x, "rms_norm x");
  TORCH_CHECK(x.is_contiguous() && (!residual || residual->is_contiguous()), "rms_norm: contiguous");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(-1) &&
              (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat),
              "rms_norm: weight must be [dim], x's dtype or float32");
  TORCH_CHECK(!residual || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
              "rms_norm: residual must match x");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  const torch::Tensor res_t = residual ? *residual : torch::Tensor();
  auto out = result_tensor(out_, x.sizes(), x.scalar_type(), {&x, &weight, &res_t}, "rms_norm");
  const bool float_weight = weight.scalar_type() == at::kFloat;
  dispatch_float_or_bf16(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    T* res = residual ? residual->data_ptr<T>() : nullptr;
    if (float_weight)
      rms_norm_impl<T, float>(out.data_ptr<T>(), x.data_ptr<T>(), res, weight.data_ptr<float>(),
                              rows, dim, static_cast<float>(eps));
    else
      rms_norm_impl<T, T>(out.data_ptr<T>(), x.data_ptr<T>(), res, weight.data_ptr<T>(), rows,
                          dim, static_cast<float>(eps));
  });
  return out;
}

// out[i] = silu(gate[i]) * up[i] for one row of d, rounded after the silu as F.silu would.
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t d) {
  int64_t i = 0;
#ifdef KVFLOW_AVX512
  for (; i + 16 <= d; i += 16) {
    const __m512 g = load16(gate + i);
    const __m512 silu = _mm512_div_ps(
        g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(out + i, _mm512_mul_ps(round16<T>(silu), load16(up + i)));
  }
#endif
  for (; i < d; ++i) {
    const float g = to_f32(gate[i]);
    out[i] = from_f32<T>(rounded<T>(g / (1.f + std::exp(-g))) * to_f32(up[i]));
  }
}

// [rows, 2 * d] -> [rows, d]: silu(gate) * up.
template <typename T>
void silu_and_mul_impl(T* out, const T* x, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      silu_and_mul_row(x + r * 2 * d, x + r * 2 * d + d, out + r * d, d);
  });
}

torch::Tensor silu_and_mul(torch::Tensor x, c10::optional<torch::Tensor> out_) {
  check_cpu(x, "silu_and_mul x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) % 2 == 0,
              "silu_and_mul: the last dimension holds gate and up, an even size");
  x = x.contiguous();
  const int64_t d = x.size(-1) / 2, rows = x.numel() / (2 * d);
  auto sizes = x.sizes().vec();
  sizes.back() = d;
  auto out = result_tensor(out_, sizes, x.scalar_type(), {&x}, "silu_and_mul");
  dispatch_float_or_bf16(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_impl<T>(out.data_ptr<T>(), x.data_ptr<T>(), rows, d);
  });
  return out;
}

// The greedy choice: each row's index of its largest value, the first of ties, and the
// first NaN where there is one (as torch.max(dim=-1).indices). PyTorch reduces a row on one
// thread: 130-220 us over a 151,936-token vocabulary on a Zen 4, a step's whole sampling.
// A row here is split among the threads, each segment's (value, index) combined in order.
struct Choice {
  float value;
  int64_t index;
  bool nan;
};

template <typename T>
Choice segment_argmax(const T* x, int64_t lo, int64_t hi) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t k = lo;
  bool nan = false;
#ifdef KVFLOW_AVX512
  __m512 m = _mm512_set1_ps(best);
  for (; k + 16 <= hi && !nan; k += 16) {
    const __m512 v = load16(x + k);
    nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0;
    m = _mm512_max_ps(m, v);
  }
  best = _mm512_reduce_max_ps(m);
#endif
  for (; k < hi && !nan; ++k) {
    const float v = to_f32(x[k]);
    nan = std::isnan(v);
    best = std::max(best, v);
  }
  for (k = lo; k < hi; ++k) {  // the first index holding it (NaN: the first NaN)
    int64_t first = -1;
#ifdef KVFLOW_AVX512
    if (k + 16 <= hi) {
      const __m512 v = load16(x + k);
      const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                                : _mm512_cmp_ps_mask(v, _mm512_set1_ps(best), _CMP_EQ_OQ);
      if (hit) first = k + __builtin_ctz(hit);
      k += 15;
    } else
#endif
    {
      const float v = to_f32(x[k]);
      if (nan ? std::isnan(v) : v == best) first = k;
    }
    if (first >= 0) return {nan ? std::numeric_limits<float>::quiet_NaN() : best, first, nan};
  }
  return {best, lo, nan};  // not reached for hi > lo
}

torch::Tensor argmax_rows(torch::Tensor x) {
  check_cpu(x, "argmax_rows x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_rows: x must be [rows, columns], columns > 0");
  x = x.contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  auto out = torch::empty({rows}, x.options().dtype(at::kLong));
  // Segments of at least 16K columns, as many per row as there are threads for a row each.
  const int64_t threads = at::get_num_threads();
  const int64_t per_row = std::max<int64_t>(1, std::min<int64_t>(
      (threads + rows - 1) / rows, cols / (16 << 10)));
  std::vector<Choice> choices(rows * per_row);
  dispatch_float_or_bf16(x.scalar_type(), "argmax_rows", [&](auto tag) {
    using T = decltype(tag);
    const T* data = x.data_ptr<T>();
    at::parallel_for(0, rows * per_row, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = i / per_row, part = i % per_row;
        choices[i] = segment_argmax(data + row * cols, cols * part / per_row,
                                    cols * (part + 1) / per_row);
      }
    });
  });
  int64_t* chosen = out.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row) {
    Choice best = choices[row * per_row];
    for (int64_t part = 1; part < per_row && !best.nan; ++part) {
      const Choice& next = choices[row * per_row + part];
      if (next.nan || next.value > best.value) best = next;  // ties keep the earlier
    }
    chosen[row] = best.index;
  }
  return out;
}

// Rotate-half RoPE in place on q [tokens, heads, dim] and k [tokens, kv_heads, dim] (each
// may be a strided view of the fused qkv output, and dim the leading part of each head
// where the rotary is partial), cos/sin [max_positions, dim] float32.
// Rounded as q * cos.to(dtype) + rotate_half(q) * sin.to(dtype) would be.
template <typename T>
void rotary_impl(T* x, int64_t tokens, int64_t heads, int64_t token_stride,
                 int64_t head_stride, int64_t dim, const int64_t* positions, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(dim), s(dim);
    for (int64_t t = begin; t < end; ++t) {
      const float* cp = cos + positions[t] * dim;
      const float* sp = sin + positions[t] * dim;
      for (int64_t d = 0; d < dim; ++d) {
        c[d] = rounded<T>(cp[d]);
        s[d] = rounded<T>(sp[d]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + t * token_stride + h * head_stride;
        for (int64_t d = 0; d < half; ++d) {
          const float a = to_f32(v[d]), b = to_f32(v[d + half]);
          v[d] = from_f32<T>(rounded<T>(a * c[d]) + rounded<T>(-b * s[d]));
          v[d + half] = from_f32<T>(rounded<T>(b * c[d + half]) + rounded<T>(a * s[d + half]));
        }
      }
    }
  });
}

void rotary_embedding(torch::Tensor positions, torch::Tensor q, torch::Tensor k,
                      torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "rotary_embedding: head dims must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat && cos.size(1) == q.size(2),
              "rotary_embedding: cos/sin float32 [positions, head_dim]");
  auto pos = positions.to(at::kLong).contiguous();
  TORCH_CHECK(pos.numel() == q.size(0) && pos.numel() == k.size(0), "rotary_embedding: one position per token");
  TORCH_CHECK(all_in_range(pos, cos.size(0)), "rotary_embedding: position beyond the cos/sin cache");
  cos = cos.contiguous();
  sin = sin.contiguous();
  for (auto* t : {&q, &k}) {
    dispatch_float_or_bf16(t->scalar_type(), "rotary_embedding", [&](auto tag) {
      using T = decltype(tag);
      rotary_impl<T>(t->data_ptr<T>(), t->size(0), t->size(1), t->stride(0), t->stride(1), t->size(2),
                     pos.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>());
    });
  }
}

// ---------------------------------------------------------------------------------------
// Mixture-of-experts layers (kvflow/layers/moe.py): every expert of a layer in one call.
// A projection holds every expert's weights, [E, N, K]: in x's dtype, int8 with a scale per
// row ([E, N]), or int4 with its blocked scales ([E, N / 16, groups, 2, 16]); gate and up
// are one projection of 2 * I rows (gate's, then up's), down one of H rows. The step's
// (token, expert) choices are sorted by expert. An expert with at most gemv_max_rows rows
// runs through the GEMV loops above, the work spread over (expert, block of output rows)
// items so that a decode step with one row per expert keeps every core busy; an expert
// with more rows is dequantized (where quantized) and multiplied by ATen's GEMM, one
// expert after another, each GEMM on every core. Each row's projections are rounded to x's
// dtype as the PyTorch path's per-expert products are, and each token's rows are weighted
// and summed in float32 in its top-k order, then rounded once.

enum class Activation { kSilu, kGeluTanh, kClampedSwiGLU };

struct ActivationSpec {
  Activation kind;
  float alpha, limit;  // the clamped SwiGLU's
};

ActivationSpec activation_spec(const std::string& name, double alpha, double limit) {
  if (name == "silu") return {Activation::kSilu, 0.f, 0.f};
  if (name == "gelu_tanh") return {Activation::kGeluTanh, 0.f, 0.f};
  TORCH_CHECK(name == "clamped_swiglu", "moe_experts: activation must be silu, gelu_tanh or "
              "clamped_swiglu, got ", name);
  return {Activation::kClampedSwiGLU, static_cast<float>(alpha), static_cast<float>(limit)};
}

// out = act(gate) * up for one row of n, rounded to T after each op that the PyTorch
// modules (kvflow/layers/activation.py) round after.
template <typename T>
void activate_row(const ActivationSpec& act, const T* gate, const T* up, T* out, int64_t n) {
  if (act.kind == Activation::kSilu) {
    silu_and_mul_row(gate, up, out, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_f32(gate[i]), u = to_f32(up[i]);
    if (act.kind == Activation::kGeluTanh) {  // F.gelu(approximate="tanh")'s formula
      const float inner = 0.7978845608028654f * (g + 0.044715f * (g * g * g));
      out[i] = from_f32<T>(rounded<T>(0.5f * g * (1.f + std::tanh(inner))) * u);
    } else {  // gpt-oss: (clamp(up) + 1) * gate * sigmoid(alpha * gate), gate clamped above
      const float gc = std::min(g, act.limit);
      const float uc = std::min(std::max(u, -act.limit), act.limit);
      const float sig = rounded<T>(1.f / (1.f + std::exp(-rounded<T>(gc * act.alpha))));
      out[i] = from_f32<T>(rounded<T>(uc + 1.f) * rounded<T>(gc * sig));
    }
  }
}

// One projection of every expert: weights of type W (T; int8; int4 as bytes, [E, N, K / 2]),
// scales as the format has them (none for T), bias [E, N] or null.
template <typename T, typename W>
struct ExpertProjection {
  static constexpr bool kInt4 = std::is_same_v<W, uint8_t>;
  // Weight rows per work item: a GEMV group, or an int4 block.
  static constexpr int64_t kRows = kInt4 ? kInt4Rows : kGemvRows;

  const W* w;
  const T* scales;
  const T* bias;
  int64_t N, K, G;  // G: the int4 group size
  GemvVariant variant;  // how the GEMV loops read a T or int8 weight (int4's is one stream)
  // int8 weights' block sums [E, N, K / B] where the GEMV loops take x quantized to int8 in
  // blocks of B columns (the int8_gemv_q8 products); null: x as floats
  const int32_t* wsum = nullptr;
  int64_t B = 0;

  int64_t groups() const { return kInt4 ? K / G : 0; }
  const W* weight(int64_t e) const { return w + e * N * (kInt4 ? K / 2 : K); }
  const T* scales_of(int64_t e) const {
    return scales ? scales + e * N * (kInt4 ? 2 * groups() : 1) : nullptr;
  }
  Int4Scales<T> int4_scales(int64_t e) const { return {nullptr, nullptr, scales_of(e), groups()}; }
  float bias_at(int64_t e, int64_t n) const { return bias ? to_f32(bias[e * N + n]) : 0.f; }
};

// sums[m][r] = row m of x (m < mb, at most 4) . expert e's weight row n0 + r (r < rows),
// scaled; x comes as T, as float32 (xf), for int4 summed per group (xsum), and where
// the projection takes int8 activations as q8's rows row .. row + mb.
template <typename T, typename W>
void expert_sums(const ExpertProjection<T, W>& p, int64_t e, const T* x, const float* xf,
                 const float* xsum, const Int8Inputs* q8, int64_t row, int64_t n0,
                 int64_t rows, int64_t mb, float (*sums)[kInt4Rows]) {
  if constexpr (ExpertProjection<T, W>::kInt4) {
    const Int4Scales<T> scales = p.int4_scales(e);
    int4_block_sums<T>(x, xf, xsum, p.weight(e), n0, scales, scales.block(n0 / kInt4Rows), mb,
                       p.K, p.G, sums);
  } else {
    const W* w = p.weight(e) + n0 * p.K;
    const bool int8_x = p.wsum != nullptr;
    // x . `count` weight rows from the item's row r, side by side (count 1: one row), by the
    // float GEMV's loops or, where the projection takes x quantized, the int8 ones.
    auto dot = [&](int64_t r, int64_t count, float (*out)[kGemvRows]) {
      if constexpr (std::is_same_v<W, int8_t>) {
        if (int8_x) {
          const int32_t* wsum = p.wsum + (e * p.N + n0 + r) * (p.K / p.B);
          if (count == 1)
            int8_q8_sums<1>(*q8, row, mb, w + r * p.K, wsum, p.variant.prefetch, out);
          else
            int8_q8_sums<kGemvRows>(*q8, row, mb, w + r * p.K, wsum, p.variant.prefetch, out);
          return;
        }
      }
      if (count == 1)
        gemv_sums<T, W, 1>(xf, x, w + r * p.K, 1, mb, p.K, out, p.variant.prefetch);
      else
        gemv_sums<T, W>(xf, x, w + r * p.K, count, mb, p.K, out, p.variant.prefetch);
    };
    float s[kGemvCols][kGemvRows];
    // One stream: the item's rows one after another; the int8 loops take whole groups only.
    if (p.variant.streams == 1 || (int8_x && rows < kGemvRows)) {
      for (int64_t r = 0; r < rows; ++r) {
        float one[kGemvCols][kGemvRows];
        dot(r, 1, one);
        for (int64_t m = 0; m < mb; ++m) s[m][r] = one[m][0];
      }
    } else {
      dot(0, rows, s);
    }
    const T* scale = p.scales_of(e);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t r = 0; r < rows; ++r)
        sums[m][r] = scale ? s[m][r] * to_f32(scale[n0 + r]) : s[m][r];
  }
}

// Output rows per work item of the GEMV experts: a run long enough that a thread streams
// each weight from memory for a while (gate's rows, then up's) before it jumps elsewhere
// (4-row items, one jump per 8 KB of a bf16 row, read at 15 GB/s a core on a Zen 4 where
// the dense GEMVs read 30); a multiple of the GEMVs' groups and of int4's blocks.
constexpr int64_t kItemRows = 32;

// expert_sums over an item's rows n0 .. n0 + width (width <= kItemRows), one group or
// int4 block at a time: the same sums, row by row, as expert_sums gives.
template <typename T, typename W>
void expert_item_sums(const ExpertProjection<T, W>& p, int64_t e, const T* x, const float* xf,
                      const float* xsum, const Int8Inputs* q8, int64_t row, int64_t n0,
                      int64_t width, int64_t mb, float (*sums)[kItemRows]) {
  float part[kInt4Cols][kInt4Rows];
  for (int64_t r0 = 0; r0 < width; r0 += ExpertProjection<T, W>::kRows) {
    const int64_t rows = std::min(ExpertProjection<T, W>::kRows, width - r0);
    expert_sums(p, e, x, xf, xsum, q8, row, n0 + r0, rows, mb, part);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t r = 0; r < rows; ++r) sums[m][r0 + r] = part[m][r];
  }
}

// Rows [0, rows) of x (K columns) as the GEMV loops read them: float32 (x itself where it
// is float32 and the weights are not int4), and for int4 weights summed per group of G.
template <typename T, bool kInt4>
const float* gemv_inputs(const T* x, int64_t rows, int64_t K, int64_t G, std::vector<float>& xf,
                         std::vector<float>& xsum) {
  if constexpr (!kInt4 && std::is_same_v<T, float>) {
    return x;
  } else {
    xf.resize(rows * K);
    if (kInt4) xsum.resize(rows * (K / G));
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      if constexpr (kInt4)
        int4_inputs(x + begin * K, end - begin, K, G, xf.data() + begin * K,
                    xsum.data() + begin * (K / G));
      else
        widen(x + begin * K, xf.data() + begin * K, (end - begin) * K);
    });
    return xf.data();
  }
}

// Runs f(i) for every i < n on all threads, which take chunks of items from a shared
// counter: items cost unlike amounts (experts have unlike numbers of rows), which a static
// split would leave to whichever thread drew the dear ones.
template <typename F>
void parallel_items(int64_t n, const F& f) {
  if (n == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  const int64_t chunk = std::max<int64_t>(1, n / (8 * threads));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(chunk); begin < n; begin = next.fetch_add(chunk))
      for (int64_t i = begin; i < std::min(n, begin + chunk); ++i) f(i);
  });
}

// For each GEMV expert and block of up to `block` of its `outputs` output rows (the items
// spread over threads by parallel_items), each run of up to kInt4Cols of the expert's input
// rows: body(e, n0, width, row, mb) computes outputs n0 .. n0 + width of rows row .. row + mb.
template <typename F>
void expert_row_blocks(const std::vector<int64_t>& experts, const std::vector<int64_t>& counts,
                       const std::vector<int64_t>& start, int64_t outputs, int64_t block,
                       const F& body) {
  const int64_t blocks = (outputs + block - 1) / block;
  parallel_items(static_cast<int64_t>(experts.size()) * blocks, [&](int64_t item) {
    const int64_t e = experts[item / blocks], n0 = item % blocks * block;
    const int64_t width = std::min(block, outputs - n0);
    for (int64_t m0 = 0; m0 < counts[e]; m0 += kInt4Cols)
      body(e, n0, width, start[e] + m0, std::min(kInt4Cols, counts[e] - m0));
  });
}

// Expert e's weight as a [N, K] tensor of T for ATen's GEMM: the stored one, or dequantized
// into buffer (allocated on first use, reused for every expert of the call).
template <typename T, typename W>
torch::Tensor dense_expert_weight(const ExpertProjection<T, W>& p, int64_t e,
                                  torch::Tensor& buffer, const at::TensorOptions& options) {
  if constexpr (std::is_same_v<W, T>) {
    return torch::from_blob(const_cast<T*>(p.weight(e)), {p.N, p.K}, options);
  } else {
    if (!buffer.defined()) buffer = torch::empty({p.N, p.K}, options);
    if constexpr (ExpertProjection<T, W>::kInt4)
      int4_dequantize_impl<T>(p.weight(e), p.int4_scales(e), buffer.data_ptr<T>(), p.N, p.K, p.G);
    else
      int8_dequantize_impl<T>(p.weight(e), p.scales_of(e), buffer.data_ptr<T>(), p.N, p.K);
    return buffer;
  }
}

template <typename T, typename W>
c10::optional<torch::Tensor> expert_bias(const ExpertProjection<T, W>& p, int64_t e,
                                         const at::TensorOptions& options) {
  if (!p.bias) return c10::nullopt;
  return torch::from_blob(const_cast<T*>(p.bias + e * p.N), {p.N}, options);
}

template <typename T, typename W>
void moe_experts_impl(const torch::Tensor& x, const float* weights, const int64_t* ids,
                      int64_t top_k, int64_t num_experts, const ExpertProjection<T, W>& gate_up,
                      const ExpertProjection<T, W>& down, const ActivationSpec& act,
                      int64_t gemv_max_rows, T* out) {
  using P = ExpertProjection<T, W>;
  const int64_t tokens = x.size(0), hidden = down.N, inner = down.K, choices = tokens * top_k;
  const T* xp = x.data_ptr<T>();
  const auto options = x.options();
  // Each choice's row in expert order: the experts the GEMV loops take first, so that their
  // rows are one run, then the others.
  std::vector<int64_t> counts(num_experts, 0), start(num_experts, 0), gemv_experts, gemm_experts;
  for (int64_t i = 0; i < choices; ++i) ++counts[ids[i]];
  for (int64_t e = 0; e < num_experts; ++e)
    if (counts[e]) (counts[e] <= gemv_max_rows ? gemv_experts : gemm_experts).push_back(e);
  int64_t rows = 0;
  for (const auto* experts : {&gemv_experts, &gemm_experts})
    for (int64_t e : *experts) {
      start[e] = rows;
      rows += counts[e];
    }
  const int64_t gemv_rows = gemm_experts.empty() ? rows : start[gemm_experts[0]];
  std::vector<int64_t> position(choices), next = start;
  for (int64_t i = 0; i < choices; ++i) position[i] = next[ids[i]]++;  // stable, as argsort

  auto xs = torch::empty({choices, hidden}, options);
  T* xsp = xs.data_ptr<T>();
  at::parallel_for(0, choices, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memcpy(xsp + position[i] * hidden, xp + i / top_k * hidden, hidden * sizeof(T));
  });
  auto hs = torch::empty({choices, inner}, options);
  auto ys = torch::empty({choices, hidden}, options);
  T* hsp = hs.data_ptr<T>();
  T* ysp = ys.data_ptr<T>();

  // The GEMV experts: gate and up together, then down.
  std::vector<float> xf_buffer, xsum_buffer;
  const float* xf = gemv_inputs<T, P::kInt4>(xsp, gemv_rows, hidden, gate_up.G, xf_buffer,
                                             xsum_buffer);
  const Int8Inputs xq = gate_up.wsum ? int8_inputs(xsp, gemv_rows, hidden, gate_up.B)
                                     : Int8Inputs{};
  expert_row_blocks(gemv_experts, counts, start, inner, kItemRows,
                    [&](int64_t e, int64_t n0, int64_t width, int64_t row, int64_t mb) {
    float gate[kInt4Cols][kItemRows], up[kInt4Cols][kItemRows];
    T g[kItemRows], u[kItemRows];
    const T* xr = xsp + row * hidden;
    const float* xfr = xf + row * hidden;
    const float* xsum = P::kInt4 ? xsum_buffer.data() + row * gate_up.groups() : nullptr;
    expert_item_sums(gate_up, e, xr, xfr, xsum, &xq, row, n0, width, mb, gate);
    expert_item_sums(gate_up, e, xr, xfr, xsum, &xq, row, inner + n0, width, mb, up);
    for (int64_t m = 0; m < mb; ++m) {
      for (int64_t r = 0; r < width; ++r) {
        g[r] = from_f32<T>(gate[m][r] + gate_up.bias_at(e, n0 + r));
        u[r] = from_f32<T>(up[m][r] + gate_up.bias_at(e, inner + n0 + r));
      }
      activate_row(act, g, u, hsp + (row + m) * inner + n0, width);
    }
  });
  std::vector<float> hf_buffer, hsum_buffer;
  const float* hf = gemv_inputs<T, P::kInt4>(hsp, gemv_rows, inner, down.G, hf_buffer,
                                             hsum_buffer);
  const Int8Inputs hq = down.wsum ? int8_inputs(hsp, gemv_rows, inner, down.B) : Int8Inputs{};
  expert_row_blocks(gemv_experts, counts, start, hidden, kItemRows,
                    [&](int64_t e, int64_t n0, int64_t width, int64_t row, int64_t mb) {
    float sums[kInt4Cols][kItemRows];
    expert_item_sums(down, e, hsp + row * inner, hf + row * inner,
                     P::kInt4 ? hsum_buffer.data() + row * down.groups() : nullptr, &hq, row,
                     n0, width, mb, sums);
    for (int64_t m = 0; m < mb; ++m)
      for (int64_t r = 0; r < width; ++r)
        ysp[(row + m) * hidden + n0 + r] = from_f32<T>(sums[m][r] + down.bias_at(e, n0 + r));
  });

  // The GEMM experts, one at a time.
  torch::Tensor gate_up_buffer, down_buffer;
  for (int64_t e : gemm_experts) {
    const auto gu = at::linear(xs.narrow(0, start[e], counts[e]),
                               dense_expert_weight(gate_up, e, gate_up_buffer, options),
                               expert_bias(gate_up, e, options));
    const T* gup = gu.template data_ptr<T>();
    at::parallel_for(0, counts[e], 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        activate_row(act, gup + r * 2 * inner, gup + r * 2 * inner + inner,
                     hsp + (start[e] + r) * inner, inner);
    });
    ys.narrow(0, start[e], counts[e]).copy_(
        at::linear(hs.narrow(0, start[e], counts[e]),
                   dense_expert_weight(down, e, down_buffer, options),
                   expert_bias(down, e, options)));
  }

  // Each token's rows, weighted in float32 and summed in its top-k order (product, then
  // sum, as the PyTorch path's (out * weights).sum(1)).
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < top_k; ++j) {
        const float w = weights[t * top_k + j];
        const T* y = ysp + position[t * top_k + j] * hidden;
        for (int64_t h = 0; h < hidden; ++h) acc[h] += w * to_f32(y[h]);
      }
      for (int64_t h = 0; h < hidden; ++h) out[t * hidden + h] = from_f32<T>(acc[h]);
    }
  });
}

// A projection's tensors checked against the format W: weights [experts, N, K] (int4:
// K / 2 bytes), int8 scales [experts, N], int4 blocked scales [experts, N / 16, groups, 2,
// 16], bias [experts, N]; all contiguous (a copy of every expert's weights per call would
// cost more than the call).
template <typename T, typename W>
ExpertProjection<T, W> expert_projection(const torch::Tensor& w,
                                         const c10::optional<torch::Tensor>& scales,
                                         const c10::optional<torch::Tensor>& bias,
                                         const c10::optional<torch::Tensor>& wsum,
                                         int64_t experts, int64_t N, int64_t K,
                                         const char* name, GemvVariant variant) {
  using P = ExpertProjection<T, W>;
  TORCH_CHECK(w.is_contiguous() && w.sizes() == at::IntArrayRef({experts, N, P::kInt4 ? K / 2 : K}),
              "moe_experts: ", name, " must be contiguous [experts, ", N, ", ",
              P::kInt4 ? K / 2 : K, "], got ", w.sizes());
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->sizes() == at::IntArrayRef({experts, N}) &&
                        bias->scalar_type() == c10::CppTypeToScalarType<T>::value &&
                        bias->device().is_cpu()),
              "moe_experts: ", name, " bias must be contiguous [experts, ", N, "], x's dtype");
  constexpr bool unquantized = std::is_same_v<W, T>;
  TORCH_CHECK(unquantized != scales.has_value(), "moe_experts: ", name,
              unquantized ? " takes no scales in x's dtype" : " needs its scales");
  const T* scale_ptr = nullptr;
  int64_t G = 0;
  if (scales) {
    TORCH_CHECK(scales->is_contiguous() && scales->device().is_cpu() &&
                    scales->scalar_type() == c10::CppTypeToScalarType<T>::value,
                "moe_experts: ", name, " scales must be contiguous, x's dtype");
    if constexpr (P::kInt4) {
      TORCH_CHECK(scales->dim() == 5 && scales->size(0) == experts &&
                      scales->size(1) * kInt4Rows == N && scales->size(2) > 0 &&
                      K % scales->size(2) == 0 && scales->size(3) == 2 &&
                      scales->size(4) == kInt4Rows,
                  "moe_experts: ", name, " int4 scales must be blocked, [experts, ", N / kInt4Rows,
                  ", groups, 2, 16]");
      G = K / scales->size(2);
      TORCH_CHECK(N % kInt4Rows == 0 && K % 64 == 0 && G % 32 == 0, "moe_experts: ", name,
                  " int4 needs rows a multiple of 16, columns of 64, a group size of 32");
    } else {
      TORCH_CHECK(scales->sizes() == at::IntArrayRef({experts, N}), "moe_experts: ", name,
                  " int8 scales must be [experts, ", N, "]");
    }
    scale_ptr = scales->data_ptr<T>();
  }
  P p{w.data_ptr<W>(), scale_ptr, bias ? bias->data_ptr<T>() : nullptr, N, K, G, variant};
  if (wsum) {
    TORCH_CHECK((std::is_same_v<W, int8_t>), "moe_experts: ", name, " weight sums are int8's");
    TORCH_CHECK(wsum->device().is_cpu() && wsum->is_contiguous() &&
                    wsum->scalar_type() == at::kInt && wsum->dim() == 3 &&
                    wsum->size(0) == experts && wsum->size(1) == N && wsum->size(2) > 0 &&
                    K % wsum->size(2) == 0 && (K / wsum->size(2)) % 64 == 0,
                "moe_experts: ", name, " weight sums must be contiguous int32 [experts, ", N,
                ", blocks], blocks of a multiple of 64 columns");
    p.wsum = wsum->data_ptr<int32_t>();
    p.B = K / wsum->size(2);
  }
  return p;
}

torch::Tensor moe_experts(torch::Tensor x, torch::Tensor weights, torch::Tensor ids,
                          torch::Tensor gate_up, c10::optional<torch::Tensor> gate_up_scales,
                          c10::optional<torch::Tensor> gate_up_bias, torch::Tensor down,
                          c10::optional<torch::Tensor> down_scales,
                          c10::optional<torch::Tensor> down_bias, const std::string& activation,
                          double alpha, double limit, int64_t gemv_max_rows, int64_t streams,
                          int64_t prefetch, c10::optional<torch::Tensor> gate_up_wsum,
                          c10::optional<torch::Tensor> down_wsum) {
  for (const auto* t : {&x, &weights, &ids, &gate_up, &down}) check_cpu(*t, "moe_experts");
  const GemvVariant variant = gemv_variant(streams, prefetch);
  TORCH_CHECK(x.dim() == 2 && weights.dim() == 2 && ids.sizes() == weights.sizes() &&
                  ids.size(0) == x.size(0) && ids.size(1) > 0,
              "moe_experts: x must be [tokens, hidden], weights and ids [tokens, top_k]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && weights.scalar_type() == at::kFloat,
              "moe_experts: ids must be int64 and weights float32");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0) &&
                  gate_up.size(1) % 2 == 0 && down.size(1) == x.size(1) &&
                  gate_up.scalar_type() == down.scalar_type(),
              "moe_experts: gate_up must be [experts, 2 * inner, hidden] and down [experts, "
              "hidden, inner], in one format");
  const ActivationSpec act = activation_spec(activation, alpha, limit);
  const int64_t experts = gate_up.size(0), hidden = x.size(1), inner = gate_up.size(1) / 2;
  x = x.contiguous();
  weights = weights.contiguous();
  ids = ids.contiguous();
  TORCH_CHECK(all_in_range(ids, experts), "moe_experts: an expert id out of range");
  auto out = torch::empty_like(x);
  dispatch_float_or_bf16(x.scalar_type(), "moe_experts", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto weight_tag) {
      using W = decltype(weight_tag);
      const auto gu = expert_projection<T, W>(gate_up, gate_up_scales, gate_up_bias,
                                              gate_up_wsum, experts, 2 * inner, hidden,
                                              "gate_up", variant);
      const auto dn = expert_projection<T, W>(down, down_scales, down_bias, down_wsum, experts,
                                              hidden, inner, "down", variant);
      TORCH_CHECK(!gu.wsum == !dn.wsum, "moe_experts: weight sums for both projections or "
                  "neither");
      moe_experts_impl<T, W>(x, weights.data_ptr<float>(), ids.data_ptr<int64_t>(),
                             ids.size(1), experts, gu, dn, act, gemv_max_rows,
                             out.data_ptr<T>());
    };
    if (gate_up.scalar_type() == x.scalar_type()) {
      run(T{});
    } else if (gate_up.scalar_type() == at::kChar) {
      run(int8_t{});
    } else {
      TORCH_CHECK(gate_up.scalar_type() == at::kByte, "moe_experts: weights must be x's dtype, "
                  "int8 or int4 (uint8), got ", gate_up.scalar_type());
      TORCH_CHECK(inner % kInt4Rows == 0, "moe_experts: int4 needs an inner size that is a "
                  "multiple of 16, not ", inner);
      run(uint8_t{});
    }
  });
  return out;
}

std::string vector_paths() {
#ifdef KVFLOW_AVX512
  std::string paths = "avx512";
#ifdef __AVX512BF16__
  paths += "+bf16";
#endif
#ifdef KVFLOW_VNNI
  paths += "+vnni";
#endif
#ifdef KVFLOW_AMX
  if (amx_usable()) paths += "+amx";  // the bf16 attention's products on tiles
#endif
  return paths;
#else
  return "scalar";
#endif
}

// ---------------------------------------------------------------------------------------
// A captured decode step (kvflow/worker/cpu_graphs.py) replayed from here: each recorded
// kernel call bound once to its arguments, the calls then run in order with no Python
// between them. Through Python each call cost a few microseconds of interpreter and
// argument conversion, and more on a machine whose caches the step's weight stream had
// just flushed (on a Xeon, a small op after a step's GEMVs took 77 us, 1 us after none).
// ATen operations a step records stay Python callables, called in their place.

using ReplayStep = std::function<void()>;
// Binds a kernel to its arguments (all of them, in order) and, for a kernel that returned
// a fresh tensor where the step had none to pass as `out`, the recorded tensor its result
// is copied into.
using Binder = ReplayStep (*)(const py::tuple& args, const std::vector<torch::Tensor>& into);

template <typename R, typename... Args, size_t... I>
ReplayStep bind_call(R (*fn)(Args...), const py::tuple& args,
                     const std::vector<torch::Tensor>& into, std::index_sequence<I...>) {
  TORCH_CHECK(args.size() == sizeof...(Args), "Program: a kernel of ", sizeof...(Args),
              " parameters given ", args.size(), " arguments");
  auto values = std::make_tuple(py::cast<std::decay_t<Args>>(args[I])...);
  if constexpr (std::is_same_v<R, torch::Tensor>) {
    if (!into.empty()) {
      torch::Tensor recorded = into[0];
      return [fn, values, recorded]() mutable { recorded.copy_(std::apply(fn, values)); };
    }
  } else {
    TORCH_CHECK(into.empty(), "Program: a kernel that returns no tensor has none to copy");
  }
  return [fn, values]() { std::apply(fn, values); };
}

template <typename R, typename... Args>
ReplayStep bind_function(R (*fn)(Args...), const py::tuple& args,
                         const std::vector<torch::Tensor>& into) {
  return bind_call(fn, args, into, std::index_sequence_for<Args...>{});
}

template <auto F>
ReplayStep bind_kernel(const py::tuple& args, const std::vector<torch::Tensor>& into) {
  return bind_function(F, args, into);
}

std::unordered_map<std::string, Binder>& binders() {
  static std::unordered_map<std::string, Binder> table;
  return table;
}

// Defines a kernel in the module and makes it one a Program can bind.
template <auto F, typename... Extra>
void def_kernel(py::module_& m, const char* name, Extra&&... extra) {
  m.def(name, F, std::forward<Extra>(extra)...);
  binders()[name] = &bind_kernel<F>;
}

class Program {
 public:
  void add_kernel(const std::string& name, const py::tuple& args,
                  const std::vector<torch::Tensor>& into) {
    const auto binder = binders().find(name);
    TORCH_CHECK(binder != binders().end(), "Program: no kernel named ", name);
    steps_.push_back(binder->second(args, into));
  }
  void add_python(py::object call) { steps_.push_back([call]() { call(); }); }
  void run() const {
    for (const ReplayStep& step : steps_) step();
  }
  size_t size() const { return steps_.size(); }

 private:
  std::vector<ReplayStep> steps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // streams and prefetch: a GemvVariant, chosen per machine by kvflow/kernels/tuning.py.
  def_kernel<&gemv>(m, "gemv", "y = x @ w.T (+ bias) for a few rows of x", py::arg("x"),
                    py::arg("w"), py::arg("bias"), py::arg("streams") = kGemvRows,
                    py::arg("prefetch") = kPrefetchBytes, py::arg("out") = py::none());
  def_kernel<&int8_gemv>(m, "int8_gemv", "y = x @ (w * scale[:, None]).T (+ bias), w int8, "
                         "for a few rows of x", py::arg("x"), py::arg("w"), py::arg("scale"),
                         py::arg("bias"), py::arg("streams") = kGemvRows,
                         py::arg("prefetch") = kPrefetchBytes, py::arg("out") = py::none());
  def_kernel<&int4_gemv>(m, "int4_gemv", "y = x @ dequantized(w).T (+ bias), w packed int4 "
                         "(kvflow/quantization/int4.py)", py::arg("x"), py::arg("w"),
                         py::arg("scale"), py::arg("offset"), py::arg("bias"),
                         py::arg("blocked") = py::none(), py::arg("out") = py::none());
  def_kernel<&int8_gemv_q8>(m, "int8_gemv_q8", "int8_gemv with x quantized to int8 per block "
                            "of columns, wsum [out_features, blocks] each block's weight sum",
                            py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("wsum"),
                            py::arg("bias"), py::arg("streams") = kGemvRows,
                            py::arg("prefetch") = kPrefetchBytes, py::arg("out") = py::none());
  def_kernel<&int4_gemv_q8>(m, "int4_gemv_q8", "int4_gemv with x quantized to int8 per group, "
                            "reading the blocked scales", py::arg("x"), py::arg("w"),
                            py::arg("blocked"), py::arg("bias"), py::arg("out") = py::none());
  def_kernel<&int8_dequantize>(m, "int8_dequantize", "w * scale[:, None] in scale's dtype, "
                               "w int8", py::arg("w"), py::arg("scale"),
                               py::arg("out") = py::none());
  def_kernel<&int4_dequantize>(m, "int4_dequantize", "the weight packed int4 w stands for, in "
                               "scale's dtype", py::arg("w"), py::arg("scale"), py::arg("offset"),
                               py::arg("out") = py::none());
  def_kernel<&paged_attention>(m, "paged_attention", "attention of a ragged batch over a paged "
                               "cache", py::arg("out"), py::arg("q"), py::arg("k_cache"),
                               py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
                               py::arg("query_start_loc"), py::arg("scale"), py::arg("window"),
                               py::arg("split_context"), py::arg("softcap"),
                               py::arg("sinks") = py::none());
  def_kernel<&write_kv>(m, "write_kv", "write k, v to their slots (K d-major inside blocks)");
  def_kernel<&rms_norm>(m, "rms_norm", "RMSNorm, optionally fused with the residual add",
                        py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("eps"),
                        py::arg("out") = py::none());
  def_kernel<&silu_and_mul>(m, "silu_and_mul", "silu(gate) * up", py::arg("x"),
                            py::arg("out") = py::none());
  def_kernel<&argmax_rows>(m, "argmax_rows", "each row's first index of its largest value (of "
                           "its first NaN where it has one), as torch.max(dim=-1).indices",
                           py::arg("x"));
  def_kernel<&rotary_embedding>(m, "rotary_embedding", "rotate-half RoPE in place");
  def_kernel<&moe_experts>(m, "moe_experts", "a mixture-of-experts layer's experts: each "
                           "token's top-k experts' down(act(gate_up(x))), weighted and summed",
                           py::arg("x"), py::arg("weights"), py::arg("ids"), py::arg("gate_up"),
                           py::arg("gate_up_scales"), py::arg("gate_up_bias"), py::arg("down"),
                           py::arg("down_scales"), py::arg("down_bias"), py::arg("activation"),
                           py::arg("alpha"), py::arg("limit"), py::arg("gemv_max_rows"),
                           py::arg("streams") = kGemvRows, py::arg("prefetch") = kPrefetchBytes,
                           py::arg("gate_up_wsum") = py::none(),
                           py::arg("down_wsum") = py::none());
  m.def("vector_paths", &vector_paths,
        "which vector paths were compiled: avx512 (+bf16, +vnni) or scalar");
  py::class_<Program>(m, "Program", "a captured step's kernel calls, replayed in order")
      .def(py::init<>())
      .def("add_kernel", &Program::add_kernel, "a call of the kernel `name`: its arguments, "
           "all of them in order, and where a fresh result is copied (empty: nowhere)",
           py::arg("name"), py::arg("args"), py::arg("into"))
      .def("add_python", &Program::add_python, "a Python callable, called in its place",
           py::arg("call"))
      .def("run", &Program::run)
      .def("__len__", &Program::size);
}
