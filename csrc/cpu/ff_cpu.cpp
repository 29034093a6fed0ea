// CPU kernels of the FF goodness losses (SPEC 2), registered for the CPU dispatch key.
//
// Each sample is independent: forward reads its activations once (token mean, then the two
// energies of ff_math.h), backward reads them once more and writes dL/dh. Samples are split over
// threads with at::parallel_for; per-sample terms go to a buffer that is then summed in sample
// order, so the loss does not depend on the thread count (bitwise reproducible).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "../checks.h"
#include "../ff_math.h"
#include "simd.h"

namespace ffkern {
namespace cpu {
namespace {

// The energies' reductions keep kLanes independent partial sums in GCC vector types (the compiler
// vectorizes them without reassociating a float reduction, which it may not do without
// -ffast-math), then add the lanes as a fixed tree: lanes k and k + n/2, then again on the half.
// log2(kLanes) vector adds instead of kLanes dependent scalar adds and extracts: with those, a row
// of D = 64 took ~49 cycles (262 scalar adds in the AVX-512 clone; 2^20 floats of [B, 64] ran at
// half the copy rate). The order of every add is fixed by the source, not by the instruction set.
//
// The kLanes sums are held as kLanes / W vectors of 32 bytes (W = 8 floats or 4 doubles), lane k in
// part k / W: one 64-byte vector type is a register only where the target has 64-byte registers;
// GCC kept it on the stack in the AVX2 clone (a store and reload of every partial sum per step:
// the [2048, 512] goodness forward took 490 us on an AVX2 EPYC against 115 us for torch's (h*h).sum).
// Adding part p and part p + P/2 is adding lane k and lane k + kLanes/2: the same tree, the same bits.
constexpr int kLanes = 16;

template <typename acc_t>
struct Parts {
  static constexpr int W = 32 / sizeof(acc_t);  // lanes per part
  static constexpr int P = kLanes / W;          // parts
  typedef acc_t Vec __attribute__((vector_size(32)));
  Vec v[P];
};

template <typename acc_t, int N>
struct LaneTree {
  static FFKERN_ALWAYS_INLINE acc_t sum(const acc_t* x) {
    typedef acc_t Half __attribute__((vector_size(N / 2 * sizeof(acc_t))));
    Half lo, hi;
    std::memcpy(&lo, x, sizeof(lo));
    std::memcpy(&hi, x + N / 2, sizeof(hi));
    const Half s = lo + hi;
    acc_t half[N / 2];
    std::memcpy(half, &s, sizeof(s));
    return LaneTree<acc_t, N / 2>::sum(half);
  }
};
template <typename acc_t>
struct LaneTree<acc_t, 1> {
  static FFKERN_ALWAYS_INLINE acc_t sum(const acc_t* x) { return x[0]; }
};

template <typename acc_t>
FFKERN_ALWAYS_INLINE acc_t lane_sum(Parts<acc_t> a) {
  constexpr int W = Parts<acc_t>::W;
  for (int n = Parts<acc_t>::P; n > 1; n /= 2) {
    for (int p = 0; p < n / 2; ++p) a.v[p] += a.v[p + n / 2];
  }
  acc_t x[W];
  std::memcpy(x, &a.v[0], sizeof(x));
  return LaneTree<acc_t, W>::sum(x);
}

// Part p of kLanes values of x (lanes p W .. p W + W - 1) as a vector of acc_t.
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE typename Parts<acc_t>::Vec load_part(const T* x) {
  typename Parts<acc_t>::Vec v;
  if constexpr (std::is_same_v<T, acc_t>) {
    std::memcpy(&v, x, sizeof(v));
  } else {
    for (int k = 0; k < Parts<acc_t>::W; ++k) v[k] = static_cast<acc_t>(x[k]);
  }
  return v;
}

// Sum of squares of n values: 2 kLanes partial sums while 2 kLanes values are left, folded to kLanes
// (lane k + lane k + kLanes), then kLanes at a time, then the lane tree; the tail of the last
// n % kLanes values added in order, then the tree. Two sets of accumulators: with one, each add
// waited for the previous one's result (an add's latency per 64 bytes: 48 GB/s from L3 on one core
// of the AVX2 EPYC where torch's sum reads 68 GB/s).
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE acc_t sum_squares(const T* x, int64_t n) {
  constexpr int W = Parts<acc_t>::W, P = Parts<acc_t>::P;
  Parts<acc_t> lanes = {}, more = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    for (int p = 0; p < P; ++p) {
      const auto v = load_part<T, acc_t>(x + i + p * W);
      const auto u = load_part<T, acc_t>(x + i + kLanes + p * W);
      lanes.v[p] += v * v;
      more.v[p] += u * u;
    }
  }
  for (int p = 0; p < P; ++p) lanes.v[p] += more.v[p];
  for (; i + kLanes <= n; i += kLanes) {
    for (int p = 0; p < P; ++p) {
      const auto v = load_part<T, acc_t>(x + i + p * W);
      lanes.v[p] += v * v;
    }
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(x[i]) * static_cast<acc_t>(x[i]);
  return tail + lane_sum<acc_t>(lanes);
}

// sum_squares and, in the same pass, the plain sum of the n values (*sum; SFFA's activity term),
// in the same order.
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE acc_t sum_squares_and_sum(const T* x, int64_t n, acc_t* sum) {
  constexpr int W = Parts<acc_t>::W, P = Parts<acc_t>::P;
  Parts<acc_t> lanes = {}, plain = {}, more = {}, more_plain = {};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    for (int p = 0; p < P; ++p) {
      const auto v = load_part<T, acc_t>(x + i + p * W);
      const auto u = load_part<T, acc_t>(x + i + kLanes + p * W);
      lanes.v[p] += v * v;
      plain.v[p] += v;
      more.v[p] += u * u;
      more_plain.v[p] += u;
    }
  }
  for (int p = 0; p < P; ++p) {
    lanes.v[p] += more.v[p];
    plain.v[p] += more_plain.v[p];
  }
  for (; i + kLanes <= n; i += kLanes) {
    for (int p = 0; p < P; ++p) {
      const auto v = load_part<T, acc_t>(x + i + p * W);
      lanes.v[p] += v * v;
      plain.v[p] += v;
    }
  }
  acc_t tail = 0, tail_plain = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    tail += v * v;
    tail_plain += v;
  }
  *sum = tail_plain + lane_sum<acc_t>(plain);
  return tail + lane_sum<acc_t>(lanes);
}

// E0, E1 of the mean x [dim]; with sum non-null also the sum of its entries, in the same pass.
template <typename T, typename acc_t>
FFKERN_ALWAYS_INLINE void half_energies(const T* x, int64_t dim, acc_t* e0, acc_t* e1, acc_t* sum) {
  const int64_t half = dim / 2;
  if (sum == nullptr) {
    *e0 = sum_squares<T, acc_t>(x, half);
    *e1 = sum_squares<T, acc_t>(x + half, dim - half);
    return;
  }
  acc_t s0, s1;
  *e0 = sum_squares_and_sum<T, acc_t>(x, half, &s0);
  *e1 = sum_squares_and_sum<T, acc_t>(x + half, dim - half, &s1);
  *sum = s0 + s1;
}

// Energies E0 (first D/2 features) and E1 (the rest) of one sample h [T, D], from the token mean
// over tokens skip..T-1. With a single token in the mean ([B, D], or [B, T, D] with skip = T-1) the
// mean is that row itself: read in place, nothing copied. Otherwise the mean goes to m [D].
// Returns the mean's address (the row, or m), which write_grad reads. With sum non-null, *sum is
// the sum of the mean's D entries (SFFA's activity term), taken in the pass of the energies. With
// e0 null only the mean is formed (goodness's backward: dg/dh = 2 m / (D T') needs no energies).
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE const void* sample_energies(const in_t* h, int64_t tokens, int64_t dim, int64_t skip, acc_t* m,
                                                 acc_t* e0, acc_t* e1, acc_t* sum) {
  const in_t* first = h + skip * dim;
  if (tokens - skip == 1 && std::is_same_v<in_t, acc_t>) {
    if (e0 != nullptr) half_energies<in_t, acc_t>(first, dim, e0, e1, sum);
    return first;
  }
  for (int64_t d = 0; d < dim; ++d) m[d] = static_cast<acc_t>(first[d]);
  if (tokens - skip > 1) {
    for (int64_t t = skip + 1; t < tokens; ++t) {
      const in_t* row = h + t * dim;
      for (int64_t d = 0; d < dim; ++d) m[d] += static_cast<acc_t>(row[d]);
    }
    const acc_t inv_count = acc_t(1) / acc_t(tokens - skip);
    for (int64_t d = 0; d < dim; ++d) m[d] *= inv_count;
  }
  if (e0 != nullptr) half_energies<acc_t, acc_t>(m, dim, e0, e1, sum);
  return m;
}

// c m + k, SFFA's activity term's gradient. float32 (the instruction-set clones and the streamed
// path) takes one fused multiply-add, so that every clone and both store paths give the same bits
// (GCC would contract c m + k into an FMA where the target has one and not elsewhere); the
// portable types compile for the baseline ISA, where nothing is contracted.
template <typename acc_t>
FFKERN_ALWAYS_INLINE acc_t affine(acc_t c, acc_t m, acc_t k) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return std::fma(c, m, k);
  } else {
    return c * m + k;
  }
}

// dL/dh of one sample: dL/dE_half(d) * 2 m_d / T' (+ shift, when shifted) for the mean's tokens,
// 0 for skipped ones. mean: what sample_energies returned (in_t when it is the row itself, else
// acc_t). shift: SFFA's activity term's constant (sffa_activity_shift); without it no add at all.
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE void write_grad(in_t* dh, int64_t tokens, int64_t dim, int64_t skip, const void* mean,
                                     bool mean_is_row, acc_t d0, acc_t d1, bool shifted, acc_t shift) {
  const int64_t half = dim / 2;
  // 2 dL/dE / T'; one token ([B, D]) skips the two divisions by 1 (the same bits)
  const bool one = tokens - skip == 1;
  const acc_t c0 = one ? acc_t(2) * d0 : acc_t(2) * d0 / acc_t(tokens - skip);
  const acc_t c1 = one ? acc_t(2) * d1 : acc_t(2) * d1 / acc_t(tokens - skip);
  for (int64_t t = 0; t < skip; ++t) {
    in_t* row = dh + t * dim;
    for (int64_t d = 0; d < dim; ++d) row[d] = in_t(0);
  }
  // restrict: dh (a fresh output) never overlaps the mean it is written from
  const auto fill = [&](const auto* __restrict m) {
    for (int64_t t = skip; t < tokens; ++t) {
      in_t* __restrict row = dh + t * dim;
      if (shifted) {
        for (int64_t d = 0; d < half; ++d) row[d] = static_cast<in_t>(affine(c0, static_cast<acc_t>(m[d]), shift));
        for (int64_t d = half; d < dim; ++d) row[d] = static_cast<in_t>(affine(c1, static_cast<acc_t>(m[d]), shift));
      } else {
        for (int64_t d = 0; d < half; ++d) row[d] = static_cast<in_t>(c0 * static_cast<acc_t>(m[d]));
        for (int64_t d = half; d < dim; ++d) row[d] = static_cast<in_t>(c1 * static_cast<acc_t>(m[d]));
      }
    }
  };
  if (mean_is_row) {
    fill(static_cast<const in_t*>(mean));
  } else {
    fill(static_cast<const acc_t*>(mean));
  }
}

// Gradients larger than the caches are written with non-temporal (streaming) stores: a plain
// store first reads the line it writes (read for ownership), so dh would cost a read and a write
// of memory; streamed it costs the write only, which is what a copy costs. Small gradients keep
// plain stores, so that they are still in cache for whoever reads them next. The values are the
// same products either way (bitwise).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FFKERN_HAVE_STREAM 1
// One body per vector width: AVX-512 (64-byte stores) and AVX2 + FMA (32-byte stores; the AVX2 EPYC
// this was measured on has no AVX-512). The head up to the store alignment and the tail are scalar;
// mul and fma are single roundings in every path, so all give the same bits as write_grad.
#define FFKERN_STREAM_LOOPS(ISA, SUFFIX, VEC, WIDTH, SET1, LOADU, MUL, FMADD, STREAM, ZERO)            \
  __attribute__((target(ISA))) void stream_scaled_##SUFFIX(float* dst, const float* src, int64_t n, float c) { \
    int64_t i = 0;                                                                                      \
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & (4 * WIDTH - 1)) != 0; ++i) dst[i] = c * src[i]; \
    const VEC vc = SET1(c);                                                                             \
    for (; i + WIDTH <= n; i += WIDTH) STREAM(dst + i, MUL(vc, LOADU(src + i)));                        \
    for (; i < n; ++i) dst[i] = c * src[i];                                                             \
  }                                                                                                     \
  __attribute__((target(ISA))) void stream_affine_##SUFFIX(float* dst, const float* src, int64_t n, float c, \
                                                          float k) {                                   \
    int64_t i = 0;                                                                                      \
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & (4 * WIDTH - 1)) != 0; ++i)                 \
      dst[i] = std::fma(c, src[i], k);                                                                  \
    const VEC vc = SET1(c), vk = SET1(k);                                                               \
    for (; i + WIDTH <= n; i += WIDTH) STREAM(dst + i, FMADD(vc, LOADU(src + i), vk));                  \
    for (; i < n; ++i) dst[i] = std::fma(c, src[i], k);                                                 \
  }                                                                                                     \
  __attribute__((target(ISA))) void stream_zeros_##SUFFIX(float* dst, int64_t n) {                      \
    int64_t i = 0;                                                                                      \
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & (4 * WIDTH - 1)) != 0; ++i) dst[i] = 0.0f;  \
    const VEC zero = ZERO();                                                                            \
    for (; i + WIDTH <= n; i += WIDTH) STREAM(dst + i, zero);                                           \
    for (; i < n; ++i) dst[i] = 0.0f;                                                                   \
  }
FFKERN_STREAM_LOOPS("avx512f", avx512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_fmadd_ps,
                    _mm512_stream_ps, _mm512_setzero_ps)
FFKERN_STREAM_LOOPS("avx2,fma", avx2, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_fmadd_ps,
                    _mm256_stream_ps, _mm256_setzero_ps)
#undef FFKERN_STREAM_LOOPS

// 2: AVX-512, 1: AVX2 + FMA, 0: no streaming stores (plain write_grad).
int stream_isa() {
  static const int isa = __builtin_cpu_supports("avx512f")                                   ? 2
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1
                                                                                              : 0;
  return isa;
}
void stream_scaled(float* dst, const float* src, int64_t n, float c) {
  stream_isa() == 2 ? stream_scaled_avx512(dst, src, n, c) : stream_scaled_avx2(dst, src, n, c);
}
void stream_affine(float* dst, const float* src, int64_t n, float c, float k) {
  stream_isa() == 2 ? stream_affine_avx512(dst, src, n, c, k) : stream_affine_avx2(dst, src, n, c, k);
}
void stream_zeros(float* dst, int64_t n) { stream_isa() == 2 ? stream_zeros_avx512(dst, n) : stream_zeros_avx2(dst, n); }
bool can_stream() { return stream_isa() > 0; }
// Streaming stores are weakly ordered: fence them before the thread's results are used.
void store_fence() { _mm_sfence(); }
#else
void stream_scaled(float*, const float*, int64_t, float) {}
void stream_affine(float*, const float*, int64_t, float, float) {}
void stream_zeros(float*, int64_t) {}
bool can_stream() { return false; }
void store_fence() {}
#endif

bool stream_output(int64_t output_bytes) { return output_bytes >= kStreamBytes && can_stream(); }

// write_grad for float32 with streaming stores (same values as write_grad).
void write_grad_streamed(float* dh, int64_t tokens, int64_t dim, int64_t skip, const float* m, float d0, float d1,
                         bool shifted, float shift) {
  const int64_t half = dim / 2;
  const bool one = tokens - skip == 1;  // as write_grad
  const float c0 = one ? 2.0f * d0 : 2.0f * d0 / float(tokens - skip);
  const float c1 = one ? 2.0f * d1 : 2.0f * d1 / float(tokens - skip);
  stream_zeros(dh, skip * dim);
  for (int64_t t = skip; t < tokens; ++t) {
    float* row = dh + t * dim;
    if (shifted) {
      stream_affine(row, m, half, c0, shift);
      stream_affine(row + half, m + half, dim - half, c1, shift);
    } else {
      stream_scaled(row, m, half, c0);
      stream_scaled(row + half, m + half, dim - half, c1);
    }
  }
}

// The per-sample work, n samples of a block per call: sample j is h + j * stride; where its mean is
// formed (several tokens, or a 16-bit row) it goes to m + j * dim, for the caller to keep; means[j]
// is what write_grad reads and is_row[j] whether that is the row of h itself (in_t). e0 null: the
// means only. float32 (the common case) gets one copy per instruction set (FFKERN_CLONES, AVX-512
// where the CPU has it; a portable build is SSE2 otherwise), the other types the portable
// template. A block per call, not a sample: a [B, 64] row is 4 cache lines, and a call per row
// through the clones' resolver is a large share of its work (the [16384, 64] goodness forward:
// 109 us with a call per row, 80 us with a call per block).
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE void energies_n(const in_t* h, int64_t n, int64_t stride, int64_t tokens, int64_t dim, int64_t skip,
                                     acc_t* m, acc_t* e0, acc_t* e1, acc_t* sums, const void** means, bool* is_row) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t* mj = m + j * dim;
    const void* mean = sample_energies<in_t, acc_t>(h + j * stride, tokens, dim, skip, mj, e0 ? e0 + j : nullptr,
                                                    e0 ? e1 + j : nullptr, sums ? sums + j : nullptr);
    means[j] = mean;
    is_row[j] = mean != mj;
  }
}

template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE void grads_n(in_t* dh, int64_t n, int64_t tokens, int64_t dim, int64_t skip,
                                  const void* const* means, const bool* is_row, const acc_t* d0, const acc_t* d1,
                                  bool shifted, acc_t shift) {
  for (int64_t j = 0; j < n; ++j) {
    write_grad<in_t, acc_t>(dh + j * tokens * dim, tokens, dim, skip, means[j], is_row[j], d0[j], d1[j], shifted,
                            shift);
  }
}

template <typename in_t, typename acc_t>
struct Sample {
  static void energies(const in_t* h, int64_t n, int64_t stride, int64_t tokens, int64_t dim, int64_t skip, acc_t* m,
                       acc_t* e0, acc_t* e1, acc_t* sums, const void** means, bool* is_row) {
    energies_n<in_t, acc_t>(h, n, stride, tokens, dim, skip, m, e0, e1, sums, means, is_row);
  }
  static void grads(in_t* dh, int64_t n, int64_t tokens, int64_t dim, int64_t skip, const void* const* means,
                    const bool* is_row, const acc_t* d0, const acc_t* d1, bool /*stream*/, bool shifted = false,
                    acc_t shift = acc_t(0)) {
    grads_n<in_t, acc_t>(dh, n, tokens, dim, skip, means, is_row, d0, d1, shifted, shift);
  }
};

FFKERN_CLONES void energies_f32(const float* h, int64_t n, int64_t stride, int64_t tokens, int64_t dim, int64_t skip,
                                float* m, float* e0, float* e1, float* sums, const void** means, bool* is_row) {
  energies_n<float, float>(h, n, stride, tokens, dim, skip, m, e0, e1, sums, means, is_row);
}
FFKERN_CLONES void grads_f32(float* dh, int64_t n, int64_t tokens, int64_t dim, int64_t skip, const void* const* means,
                             const bool* is_row, const float* d0, const float* d1, bool shifted, float shift) {
  grads_n<float, float>(dh, n, tokens, dim, skip, means, is_row, d0, d1, shifted, shift);
}
template <>
struct Sample<float, float> {
  static void energies(const float* h, int64_t n, int64_t stride, int64_t tokens, int64_t dim, int64_t skip, float* m,
                       float* e0, float* e1, float* sums, const void** means, bool* is_row) {
    energies_f32(h, n, stride, tokens, dim, skip, m, e0, e1, sums, means, is_row);
  }
  static void grads(float* dh, int64_t n, int64_t tokens, int64_t dim, int64_t skip, const void* const* means,
                    const bool* is_row, const float* d0, const float* d1, bool stream, bool shifted = false,
                    float shift = 0.0f) {
    if (!stream) {
      grads_f32(dh, n, tokens, dim, skip, means, is_row, d0, d1, shifted, shift);
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      write_grad_streamed(dh + j * tokens * dim, tokens, dim, skip, static_cast<const float*>(means[j]), d0[j], d1[j],
                          shifted, shift);
    }
  }
};

// ---- per-sample loss terms, a block of samples at a time ------------------------------------------
// Each sample of FF and SymBa costs softplus / sigmoid (2-4 exp and log1p). As library calls, once
// per sample, they cost more than the sample's energies at small D: at [16384, 64] fp32 (2^20) the FF
// forward took 653 us against 234 us for the two inputs' energies alone (~13 ns a call). So the
// kernels form the energies of a block of samples first and then the block's terms in one loop,
// which float32 vectorizes with simd::exp and log1p_unit (SFFA's std::log stays a call; it is one
// log per input and sample, and SFFA was already below compile's time).
constexpr int kBlock = 64;

// Samples per block: kBlock, fewer for wide rows so that the block's token means (when they are
// formed in a buffer: [B, T, D] without saved means, or 16-bit inputs) stay in L1/L2.
int64_t block_for(int64_t dim) { return std::max<int64_t>(1, std::min<int64_t>(kBlock, 4096 / std::max<int64_t>(1, dim))); }

// log1p(u) for u in [0, 1] (softplus's e^-|x|), vectorizable: log1p(u) = 2 atanh(s) with
// s = u / (2 + u) in [0, 1/3] formed without cancellation, by the odd series to s^15 (the first
// term left out is s^17 / 17 <= (1/3)^16 / 17 ~ 1.4e-9 relative to s). NaN stays NaN.
FFKERN_ALWAYS_INLINE float log1p_unit(float u) {
  const float s = u / (2.0f + u);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// ff_math.h's softplus and sigmoid with the vectorizable exp (simd::exp: within 1 ulp; overflow to
// inf gives sigmoid 0, as it should).
FFKERN_ALWAYS_INLINE float softplus_f32(float x) {
  return (x > 0.0f ? x : 0.0f) + log1p_unit(simd::exp_nonpositive(-std::fabs(x)));
}
FFKERN_ALWAYS_INLINE float sigmoid_f32(float x) { return 1.0f / (1.0f + simd::exp(-x)); }

// The energies of a block of samples: h+ (e0p, e1p) and h- (e0n, e1n).
template <typename acc_t>
struct BlockEnergies {
  acc_t e0p[kBlock], e1p[kBlock], e0n[kBlock], e1n[kBlock];
};

// pair_term of each of the n samples of a block.
template <typename acc_t>
void block_terms(int loss, acc_t param, acc_t gscale, const BlockEnergies<acc_t>& e, int64_t n, acc_t* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = pair_term<acc_t>(loss, param, gscale, e.e0p[j], e.e1p[j], e.e0n[j], e.e1n[j]);
}
FFKERN_CLONES void block_terms_f32(int loss, float param, float gscale, const BlockEnergies<float>& e, int64_t n,
                                   float* out) {
  if (loss == kLossFF) {
    for (int64_t j = 0; j < n; ++j) {
      const float gp = (e.e0p[j] + e.e1p[j]) * gscale, gn = (e.e0n[j] + e.e1n[j]) * gscale;
      out[j] = softplus_f32(param - gp) + softplus_f32(gn - param);
    }
  } else if (loss == kLossSymBa) {
    for (int64_t j = 0; j < n; ++j) {
      const float gp = (e.e0p[j] + e.e1p[j]) * gscale, gn = (e.e0n[j] + e.e1n[j]) * gscale;
      out[j] = softplus_f32(-param * (gp - gn));
    }
  } else {
    block_terms<float>(loss, param, gscale, e, n, out);
  }
}
// pair_grad of each of the n samples: dL/dE0, dL/dE1 of h+ (dp0, dp1) and of h- (dn0, dn1).
template <typename acc_t>
void block_grads(int loss, acc_t param, acc_t gscale, const BlockEnergies<acc_t>& e, acc_t scale, int64_t n,
                 acc_t* dp0, acc_t* dp1, acc_t* dn0, acc_t* dn1) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t dp[2], dn[2];
    pair_grad<acc_t>(loss, param, gscale, e.e0p[j], e.e1p[j], e.e0n[j], e.e1n[j], scale, dp, dn);
    dp0[j] = dp[0];
    dp1[j] = dp[1];
    dn0[j] = dn[0];
    dn1[j] = dn[1];
  }
}
FFKERN_CLONES void block_grads_f32(int loss, float param, float gscale, const BlockEnergies<float>& e, float scale,
                                   int64_t n, float* dp0, float* dp1, float* dn0, float* dn1) {
  if (loss != kLossFF && loss != kLossSymBa) {
    block_grads<float>(loss, param, gscale, e, scale, n, dp0, dp1, dn0, dn1);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {  // as pair_grad: dg/dE = gscale for both halves
    const float gp = (e.e0p[j] + e.e1p[j]) * gscale, gn = (e.e0n[j] + e.e1n[j]) * gscale;
    float dgp, dgn;
    if (loss == kLossFF) {
      dgp = -sigmoid_f32(param - gp);
      dgn = sigmoid_f32(gn - param);
    } else {
      const float sg = param * sigmoid_f32(-param * (gp - gn));
      dgp = -sg;
      dgn = sg;
    }
    dp0[j] = dp1[j] = scale * dgp * gscale;
    dn0[j] = dn1[j] = scale * dgn * gscale;
  }
}

// The block functions for one accumulation type: float32 takes the vectorized clones.
template <typename acc_t>
struct Block {
  static void terms(int loss, acc_t param, acc_t gscale, const BlockEnergies<acc_t>& e, int64_t n, acc_t* out) {
    block_terms<acc_t>(loss, param, gscale, e, n, out);
  }
  static void grads(int loss, acc_t param, acc_t gscale, const BlockEnergies<acc_t>& e, acc_t scale, int64_t n,
                    acc_t* dp0, acc_t* dp1, acc_t* dn0, acc_t* dn1) {
    block_grads<acc_t>(loss, param, gscale, e, scale, n, dp0, dp1, dn0, dn1);
  }
};
template <>
struct Block<float> {
  static void terms(int loss, float param, float gscale, const BlockEnergies<float>& e, int64_t n, float* out) {
    block_terms_f32(loss, param, gscale, e, n, out);
  }
  static void grads(int loss, float param, float gscale, const BlockEnergies<float>& e, float scale, int64_t n,
                    float* dp0, float* dp1, float* dn0, float* dn1) {
    block_grads_f32(loss, param, gscale, e, scale, n, dp0, dp1, dn0, dn1);
  }
};

// The token means of a block, where they are formed in a buffer: a buffer per thread, kept between
// calls. A std::vector per call was a small allocation above the fresh gradient on the heap; its
// free let glibc trim the heap top, so the next call's gradient was page-faulted in again (~250
// faults a call at [2048, 512] x 2, against none for a torch op of the same outputs).
template <typename acc_t>
acc_t* thread_scratch(int64_t n) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

int64_t grain_for(int64_t per_sample) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, per_sample)); }

// The token means [B, D] the forward returns for the backward (acc type): only where a sample's
// mean is not one row of h (T' = T - skip_tokens > 1); an empty tensor otherwise, and the backward
// then reads that row of h in place.
at::Tensor token_mean_output(const at::Tensor& h, const TokenShape& s, int64_t skip_tokens) {
  const bool saved = s.tokens - skip_tokens > 1;
  return saved ? at::empty({s.batch, s.dim}, h.options().dtype(compute_type(h.scalar_type())))
               : at::empty({0}, h.options().dtype(compute_type(h.scalar_type())));
}

// A saved token mean given to a backward op: defined and non-empty, else null (read h instead).
const at::Tensor* saved_mean(const char* name, const std::optional<at::Tensor>& mean, const at::Tensor& h,
                             const TokenShape& s) {
  if (!mean.has_value() || !mean->defined() || mean->numel() == 0) return nullptr;
  TORCH_CHECK(mean->dim() == 2 && mean->size(0) == s.batch && mean->size(1) == s.dim, name, " must be [B, D] = [",
              s.batch, ", ", s.dim, "] (the forward's token means), got shape ", mean->sizes());
  TORCH_CHECK(mean->scalar_type() == compute_type(h.scalar_type()), name, " must be ", compute_type(h.scalar_type()),
              " (the accumulation type of ", h.scalar_type(), "), got ", mean->scalar_type());
  TORCH_CHECK(mean->device() == h.device() && mean->is_contiguous(), name, " must be contiguous, on ", h.device());
  return &*mean;
}

// pair_loss_fused's per-sample energies given to pair_loss_backward: defined and non-empty, else
// null (formed again from the means or h).
const at::Tensor* saved_energies(const std::optional<at::Tensor>& energies, const at::Tensor& h,
                                 const TokenShape& s) {
  if (!energies.has_value() || !energies->defined() || energies->numel() == 0) return nullptr;
  TORCH_CHECK(energies->dim() == 2 && energies->size(0) == s.batch && energies->size(1) == 4,
              "energies must be [B, 4] = [", s.batch, ", 4] (the forward's (E0+, E1+, E0-, E1-)), got shape ",
              energies->sizes());
  TORCH_CHECK(energies->scalar_type() == compute_type(h.scalar_type()), "energies must be ",
              compute_type(h.scalar_type()), " (the accumulation type of ", h.scalar_type(), "), got ",
              energies->scalar_type());
  TORCH_CHECK(energies->device() == h.device() && energies->is_contiguous(), "energies must be contiguous, on ",
              h.device());
  return &*energies;
}

// The energies of n samples for a backward: from their saved token means (saved non-null: [n, D],
// acc type; T' rows of dh are the same function of the mean) or from h (n samples of [T, D]), means
// formed at m + j * dim where needed. Sets means[j], is_row[j] for write_grad (is_row: the mean is
// a row of h, in_t). With e0 null, the means only.
template <typename in_t, typename acc_t>
FFKERN_ALWAYS_INLINE void backward_energies(const acc_t* saved, const in_t* h, int64_t n, int64_t tokens, int64_t dim,
                                            int64_t skip, acc_t* m, acc_t* e0, acc_t* e1, const void** means,
                                            bool* is_row) {
  if (saved != nullptr) {
    if (e0 != nullptr) Sample<acc_t, acc_t>::energies(saved, n, dim, 1, dim, 0, m, e0, e1, nullptr, means, is_row);
    for (int64_t j = 0; j < n; ++j) {  // read in place; acc_t, not a row of h
      means[j] = saved + j * dim;
      is_row[j] = false;
    }
    return;
  }
  Sample<in_t, acc_t>::energies(h, n, tokens * dim, tokens, dim, skip, m, e0, e1, nullptr, means, is_row);
}

// Returns (g [B], token means [B, D] or empty: token_mean_output).
std::tuple<at::Tensor, at::Tensor> goodness_fused(const at::Tensor& h_in, std::string kind, int64_t skip_tokens) {
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_activations("h", h_in, skip_tokens);
  const at::Tensor h = h_in.detach().contiguous();
  at::Tensor g = at::empty({s.batch}, h.options().dtype(compute_type(h.scalar_type())));
  at::Tensor means = token_mean_output(h, s, skip_tokens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ffkern_goodness_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    acc_t* gp = g.data_ptr<acc_t>();
    acc_t* mp = means.numel() ? means.data_ptr<acc_t>() : nullptr;
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    const int64_t block = block_for(s.dim);
    at::parallel_for(0, s.batch, grain_for(s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      acc_t* const mbuf = thread_scratch<acc_t>(block * s.dim);
      acc_t e0[kBlock], e1[kBlock];
      const void* means_b[kBlock];
      bool is_row[kBlock];
      for (int64_t b = b0; b < b1; b += block) {
        const int64_t n = std::min(block, b1 - b);
        acc_t* m = mp != nullptr ? mp + b * s.dim : mbuf;  // the means go straight to the output
        Sample<scalar_t, acc_t>::energies(hp + b * s.tokens * s.dim, n, s.tokens * s.dim, s.tokens, s.dim, skip_tokens,
                                          m, e0, e1, nullptr, means_b, is_row);
        for (int64_t j = 0; j < n; ++j) gp[b + j] = (e0[j] + e1[j]) * gscale;
      }
    });
  });
  return {g, means};
}

at::Tensor goodness_backward(const at::Tensor& grad_in, const at::Tensor& h_in, std::string kind, int64_t skip_tokens,
                             const std::optional<at::Tensor>& mean_in) {
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_activations("h", h_in, skip_tokens);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == s.batch, "grad must be [B] with B=", s.batch, ", got ",
              grad_in.sizes());
  const at::Tensor* saved = saved_mean("mean", mean_in, h_in, s);
  // with the saved means h is not read: only its shape matters, so no contiguous copy of it
  const at::Tensor h = saved != nullptr ? h_in.detach() : h_in.detach().contiguous();
  at::Tensor dh = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ffkern_goodness_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor grad = grad_in.detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gr = grad.data_ptr<acc_t>();
    const scalar_t* hp = saved != nullptr ? nullptr : h.data_ptr<scalar_t>();
    const acc_t* sm = saved != nullptr ? saved->data_ptr<acc_t>() : nullptr;
    scalar_t* dp = dh.data_ptr<scalar_t>();
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    const bool stream = std::is_same_v<scalar_t, float> && stream_output(dh.nbytes());
    const int64_t block = block_for(s.dim);
    at::parallel_for(0, s.batch, grain_for(s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      acc_t* const mbuf = thread_scratch<acc_t>(block * s.dim);
      acc_t de[kBlock];
      const void* means_b[kBlock];
      bool is_row[kBlock];
      for (int64_t b = b0; b < b1; b += block) {
        const int64_t n = std::min(block, b1 - b), off = b * s.tokens * s.dim;
        // dg/dh = 2 m / (D T') is linear in the mean: the energies are not needed (e0 null)
        backward_energies<scalar_t, acc_t>(sm != nullptr ? sm + b * s.dim : nullptr, hp + (hp != nullptr ? off : 0), n,
                                           s.tokens, s.dim, skip_tokens, mbuf, nullptr, nullptr, means_b, is_row);
        for (int64_t j = 0; j < n; ++j) de[j] = gr[b + j] * gscale;  // dL/dE = dL/dg * dg/dE for both halves
        Sample<scalar_t, acc_t>::grads(dp + off, n, s.tokens, s.dim, skip_tokens, means_b, is_row, de, de, stream);
      }
      if (stream) store_fence();
    });
  });
  return dh;
}

// SFFA's activity term applies to SFFA only (ffkern.reference.sffa_loss).
void check_activity(bool activity_term, int loss, const std::string& loss_name) {
  TORCH_CHECK(!activity_term || loss == kLossSFFA, "activity_term is SFFA's factor: it needs loss 'sffa', got '",
              loss_name, "'");
}

// Returns (L, activity, means of h+, means of h-): L the 0-dim loss (L_S A with the activity term),
// activity = (L_S, A) [2] for the backward with the term (an empty tensor without it), and the token
// means [B, D] for the backward (token_mean_output).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_fused(const at::Tensor& hp_in,
                                                                                       const at::Tensor& hn_in,
                                                   std::string loss_name, double param, std::string kind,
                                                   int64_t skip_tokens, bool activity_term) {
  const int loss = parse_pair_loss(loss_name);
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_pair(hp_in, hn_in, loss, skip_tokens);
  check_activity(activity_term, loss, loss_name);
  const at::Tensor hp = hp_in.detach().contiguous(), hn = hn_in.detach().contiguous();
  const at::ScalarType ct = compute_type(hp.scalar_type());
  at::Tensor out = at::empty({}, hp.options().dtype(ct));
  at::Tensor activity = at::empty({activity_term ? 2 : 0}, hp.options().dtype(ct));
  at::Tensor means_p = token_mean_output(hp, s, skip_tokens), means_n = token_mean_output(hn, s, skip_tokens);
  // (E0+, E1+, E0-, E1-) per sample, for the backward: without them it reads h once more (where the
  // mean is a row of h) only to form them again before writing dh
  at::Tensor energies = at::empty({s.batch, 4}, hp.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hp.scalar_type(), "ffkern_pair_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = hp.data_ptr<scalar_t>();
    const scalar_t* np = hn.data_ptr<scalar_t>();
    acc_t* mpp = means_p.numel() ? means_p.data_ptr<acc_t>() : nullptr;
    acc_t* mnp = means_n.numel() ? means_n.data_ptr<acc_t>() : nullptr;
    acc_t* ep = energies.data_ptr<acc_t>();
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    // per sample: the loss term, and with the activity term the sums of the token means of h+, h-
    const int64_t per = activity_term ? 3 : 1;
    std::vector<acc_t> terms(s.batch * per);
    at::parallel_for(0, s.batch, grain_for(2 * s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      // a block's energies, then its terms (see Block)
      const int64_t block = block_for(s.dim);
      acc_t* const mbuf = thread_scratch<acc_t>(2 * block * s.dim);
      BlockEnergies<acc_t> e;
      acc_t block_terms[kBlock], sums_p[kBlock], sums_n[kBlock];
      const void* means_b[kBlock];
      bool is_row[kBlock];
      for (int64_t b = b0; b < b1; b += block) {
        const int64_t n = std::min(block, b1 - b), off = b * s.tokens * s.dim, stride = s.tokens * s.dim;
        // the means go straight to the outputs
        acc_t* m_p = mpp != nullptr ? mpp + b * s.dim : mbuf;
        acc_t* m_n = mnp != nullptr ? mnp + b * s.dim : mbuf + block * s.dim;
        Sample<scalar_t, acc_t>::energies(pp + off, n, stride, s.tokens, s.dim, skip_tokens, m_p, e.e0p, e.e1p,
                                          activity_term ? sums_p : nullptr, means_b, is_row);
        Sample<scalar_t, acc_t>::energies(np + off, n, stride, s.tokens, s.dim, skip_tokens, m_n, e.e0n, e.e1n,
                                          activity_term ? sums_n : nullptr, means_b, is_row);
        Block<acc_t>::terms(loss, acc_t(param), gscale, e, n, block_terms);
        for (int64_t j = 0; j < n; ++j) {
          acc_t* ej = ep + (b + j) * 4;
          ej[0] = e.e0p[j], ej[1] = e.e1p[j], ej[2] = e.e0n[j], ej[3] = e.e1n[j];
          terms[(b + j) * per] = block_terms[j];
          if (activity_term) {
            terms[(b + j) * per + 1] = sums_p[j];
            terms[(b + j) * per + 2] = sums_n[j];
          }
        }
      }
    });
    double total = 0, sum_pos = 0, sum_neg = 0;  // in sample order: independent of the thread split
    for (int64_t b = 0; b < s.batch; ++b) total += double(terms[b * per]);
    const double loss_s = total * pair_normalizer<double>(loss, s.batch);
    if (!activity_term) {
      out.fill_(loss_s);
      return;
    }
    for (int64_t b = 0; b < s.batch; ++b) {
      sum_pos += double(terms[b * per + 1]);
      sum_neg += double(terms[b * per + 2]);
    }
    // mu = sum over samples of the token means' sums / (B D): the mean of the kept entries
    const double entries = double(s.batch) * double(s.dim);
    const acc_t a = sffa_activity<acc_t>(acc_t((sum_pos + sum_neg) / entries));
    acc_t* act = activity.data_ptr<acc_t>();
    act[0] = acc_t(loss_s);
    act[1] = a;
    out.fill_(acc_t(loss_s) * a);
  });
  return {out, activity, means_p, means_n, energies};
}

// (L_S, A) from pair_loss_fused's activity output, when given (as doubles; has = false without it).
struct Activity {
  bool has = false;
  double loss_s = 0, a = 1;
};

Activity read_activity(const std::optional<at::Tensor>& activity, int loss, const std::string& loss_name) {
  Activity out;
  if (!activity.has_value() || !activity->defined()) return out;
  TORCH_CHECK(activity->numel() == 2, "activity must hold (L_S, A), 2 values, got shape ", activity->sizes());
  check_activity(true, loss, loss_name);
  const at::Tensor v = activity->detach().to(at::kDouble).cpu();
  out.has = true;
  out.loss_s = v.data_ptr<double>()[0];
  out.a = v.data_ptr<double>()[1];
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward(const at::Tensor& grad_in, const at::Tensor& hp_in,
                                                      const at::Tensor& hn_in, std::string loss_name, double param,
                                                      std::string kind, int64_t skip_tokens,
                                                      const std::optional<at::Tensor>& activity_in,
                                                      const std::optional<at::Tensor>& mean_pos,
                                                      const std::optional<at::Tensor>& mean_neg,
                                                      const std::optional<at::Tensor>& energies_in) {
  const int loss = parse_pair_loss(loss_name);
  const bool mean = parse_kind_is_mean(kind);
  const TokenShape s = check_pair(hp_in, hn_in, loss, skip_tokens);
  TORCH_CHECK(grad_in.numel() == 1, "grad must hold one value (the loss is a scalar), got shape ", grad_in.sizes());
  const Activity activity = read_activity(activity_in, loss, loss_name);
  const at::Tensor* saved_e = saved_energies(energies_in, hp_in, s);
  const at::Tensor* saved_p = saved_mean("mean_pos", mean_pos, hp_in, s);
  const at::Tensor* saved_n = saved_mean("mean_neg", mean_neg, hn_in, s);
  // h is read only where its means were not saved (else only its shape matters: no contiguous copy)
  const at::Tensor hp = saved_p != nullptr ? hp_in.detach() : hp_in.detach().contiguous();
  const at::Tensor hn = saved_n != nullptr ? hn_in.detach() : hn_in.detach().contiguous();
  const auto contiguous = hp.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dhp = at::empty(hp.sizes(), contiguous), dhn = at::empty(hn.sizes(), contiguous);
  const double grad = grad_in.detach().to(at::kDouble).item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hp.scalar_type(), "ffkern_pair_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = saved_p != nullptr ? nullptr : hp.data_ptr<scalar_t>();
    const scalar_t* np = saved_n != nullptr ? nullptr : hn.data_ptr<scalar_t>();
    const acc_t* smp = saved_p != nullptr ? saved_p->data_ptr<acc_t>() : nullptr;
    const acc_t* smn = saved_n != nullptr ? saved_n->data_ptr<acc_t>() : nullptr;
    const acc_t* se = saved_e != nullptr ? saved_e->data_ptr<acc_t>() : nullptr;
    scalar_t* dpp = dhp.data_ptr<scalar_t>();
    scalar_t* dnp = dhn.data_ptr<scalar_t>();
    const acc_t gscale = mean ? acc_t(1) / acc_t(s.dim) : acc_t(1);
    // dL/dh = A dL_S/dh + L_S dA/dh: the pair gradient scaled by A, plus a constant per kept element
    const acc_t a = acc_t(activity.a), loss_s = acc_t(activity.loss_s);
    const acc_t scale = acc_t(grad * pair_normalizer<double>(loss, s.batch)) * a;
    const acc_t inv_count = acc_t(1.0 / (double(s.batch) * double(s.tokens - skip_tokens) * double(s.dim)));
    const acc_t shift = activity.has ? sffa_activity_shift<acc_t>(acc_t(grad), loss_s, a, inv_count) : acc_t(0);
    const bool stream = std::is_same_v<scalar_t, float> && stream_output(dhp.nbytes() + dhn.nbytes());
    at::parallel_for(0, s.batch, grain_for(4 * s.tokens * s.dim), [&](int64_t b0, int64_t b1) {
      // a block's energies, then its dL/dE (see Block), then its dh; the means formed in a buffer
      // (no saved means, or 16-bit inputs) are kept per sample of the block
      const int64_t block = block_for(s.dim);
      acc_t* const mbuf = thread_scratch<acc_t>(2 * block * s.dim);
      BlockEnergies<acc_t> e;
      acc_t dp0[kBlock], dp1[kBlock], dn0[kBlock], dn1[kBlock];
      const void* mean_p[kBlock];
      const void* mean_n[kBlock];
      bool row_p[kBlock], row_n[kBlock];
      for (int64_t b = b0; b < b1; b += block) {
        const int64_t n = std::min(block, b1 - b), off = b * s.tokens * s.dim;
        if (se != nullptr) {  // the forward's energies (the same values it would form again here)
          for (int64_t j = 0; j < n; ++j) {
            const acc_t* ej = se + (b + j) * 4;
            e.e0p[j] = ej[0], e.e1p[j] = ej[1], e.e0n[j] = ej[2], e.e1n[j] = ej[3];
          }
        }
        // with saved energies only the means (the rows of h in place, or formed where not saved)
        backward_energies<scalar_t, acc_t>(smp != nullptr ? smp + b * s.dim : nullptr, pp + (pp != nullptr ? off : 0),
                                           n, s.tokens, s.dim, skip_tokens, mbuf, se ? nullptr : e.e0p, e.e1p, mean_p,
                                           row_p);
        backward_energies<scalar_t, acc_t>(smn != nullptr ? smn + b * s.dim : nullptr, np + (np != nullptr ? off : 0),
                                           n, s.tokens, s.dim, skip_tokens, mbuf + block * s.dim,
                                           se ? nullptr : e.e0n, e.e1n, mean_n, row_n);
        Block<acc_t>::grads(loss, acc_t(param), gscale, e, scale, n, dp0, dp1, dn0, dn1);
        Sample<scalar_t, acc_t>::grads(dpp + off, n, s.tokens, s.dim, skip_tokens, mean_p, row_p, dp0, dp1, stream,
                                       activity.has, shift);
        Sample<scalar_t, acc_t>::grads(dnp + off, n, s.tokens, s.dim, skip_tokens, mean_n, row_n, dn0, dn1, stream,
                                       activity.has, shift);
      }
      if (stream) store_fence();
    });
  });
  return {dhp, dhn};
}

}  // namespace
}  // namespace cpu
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern, CPU, m) {
  m.impl("goodness_fused", &ffkern::cpu::goodness_fused);
  m.impl("goodness_backward", &ffkern::cpu::goodness_backward);
  m.impl("pair_loss_fused", &ffkern::cpu::pair_loss_fused);
  m.impl("pair_loss_backward", &ffkern::cpu::pair_loss_backward);
}
