// Per-class goodness loss (SPEC 2.2): the schemas of the ffkern_per_class::* operators, and their
// CPU kernels (CUDA kernels: cuda/per_class_kernels.cu, bound in cuda/per_class_binding.cpp).
//
// A namespace of their own (not ffkern::*) so that these operators can be added without touching
// the others' registration; autograd and fake implementations: ffkern/cpp/per_class_ops.py.
//
// h [B, C, H, W] is read in place, contiguous (NCHW) or channels-last; another layout is copied
// to the one its gradient takes (ffkern.per_class.grad_like). Per sample, tiles of positions are
// processed while they are in cache: the class maps z = W h + beta of the tile (never of the whole
// map) are squared and summed into g [K]; the cross-entropy of the sample follows in the same task.
// Backward rebuilds each z tile and writes dh = W^T dz; dW and dbias are summed per fixed chunk of
// samples (chunks depend on B only, not on the thread count), then over chunks in order.
//
// Two ways to compute a tile (the same math):
//   blocked (float32 accumulation, i.e. fp32 / bf16 / fp16 maps): the tile's three products
//     (z = W h, dh = W^T dz, dW += dz h^T) are single-threaded BLAS calls
//     (at::native::cpublas::brgemm -> MKL / oneDNN, as PyTorch's own matmul) on the tile in place
//     (fp32) or widened to fp32 (16-bit maps); the element work (squares, dz) is on the small
//     [K, tile] result. The per-pixel dot products of the loops below are not register-blocked:
//     they lost to the reference's one large matrix product at C = 256 (0.78x).
//   loops (float64, and float32 on request): positions widened into a [C, kTile] buffer, plain
//     vectorized loops.
// FFKERN_CPU_PER_CLASS_PRODUCTS=loops selects the loops for float32 too (read per call; for
// benchmarks/per_class_cpu.py and the tests, which compare both); "blas" / unset: blocked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../per_class_common.h"
#include "simd.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

TORCH_LIBRARY(ffkern_per_class, m) {
  m.set_python_module("ffkern.cpp.per_class_ops");
  // g [B, K] (float32; float64 for float64 h)
  m.def("class_goodness(Tensor h, Tensor weight, Tensor? bias) -> Tensor");
  // (the reduced loss, g [B, K]); scale: a one-element tensor
  m.def(
      "per_class_loss(Tensor h, Tensor weight, Tensor labels, Tensor? bias, Tensor scale, str reduction) -> "
      "(Tensor, Tensor)");
  // coef = dL/dg [B, K]; returns (dh like h, dW [K, C], dbias [K]), the last two in the accumulation dtype
  m.def("per_class_backward(Tensor h, Tensor weight, Tensor? bias, Tensor coef) -> (Tensor, Tensor, Tensor)");
}

namespace ffkern {
namespace per_class {
namespace {

constexpr int64_t kTile = 32;   // positions per tile (a multiple of kLanes)
constexpr int64_t kLanes = 8;   // independent partial sums: the compiler vectorizes them
constexpr int64_t kChunks = 64; // most sample chunks of the backward's dW partial sums

template <typename acc_t>
inline acc_t dot_tile(const acc_t* a, const acc_t* b) {
  acc_t part[kLanes] = {};
  for (int64_t j = 0; j < kTile; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[j + l] * b[j + l];
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

// The sample's positions p0 .. p0+n-1 widened into hv [C, kTile] (zeros past n).
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* hb, const MapShape& s, int64_t p0, int64_t n, acc_t* hv) {
  if (s.channels_last) {
    std::fill(hv, hv + s.channels * kTile, acc_t(0));
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* hp = hb + (p0 + j) * s.stride_p;
      for (int64_t c = 0; c < s.channels; ++c) hv[c * kTile + j] = static_cast<acc_t>(hp[c]);
    }
  } else {
    for (int64_t c = 0; c < s.channels; ++c) {
      const scalar_t* hc = hb + c * s.stride_c + p0;
      acc_t* row = hv + c * kTile;
      for (int64_t j = 0; j < n; ++j) row[j] = static_cast<acc_t>(hc[j]);
      for (int64_t j = n; j < kTile; ++j) row[j] = acc_t(0);
    }
  }
}

// z [K, kTile] = W hv + bias, zero past n.
template <typename acc_t>
FFKERN_ALWAYS_INLINE void class_maps(const acc_t* w, const acc_t* bias, const acc_t* hv, int64_t classes, int64_t channels, int64_t n,
                acc_t* z) {
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* zk = z + k * kTile;
    const acc_t beta = bias ? bias[k] : acc_t(0);
    for (int64_t j = 0; j < kTile; ++j) zk[j] = beta;
    const acc_t* wk = w + k * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t wkc = wk[c];
      const acc_t* row = hv + c * kTile;
      for (int64_t j = 0; j < kTile; ++j) zk[j] += wkc * row[j];
    }
    for (int64_t j = n; j < kTile; ++j) zk[j] = acc_t(0);
  }
}

// dh tile [C, kTile] = W^T dz; dW [K, C] += dz hv^T, summed over the n positions in order (vector
// lanes over the channels: no horizontal sums).
template <typename acc_t>
FFKERN_ALWAYS_INLINE void tile_backward_impl(const acc_t* w, const acc_t* hv, const acc_t* dz, int64_t classes,
                                             int64_t channels, int64_t n, acc_t* hvt, acc_t* dht, acc_t* dw) {
  for (int64_t c = 0; c < channels; ++c) {
    acc_t* out = dht + c * kTile;
    for (int64_t j = 0; j < kTile; ++j) out[j] = acc_t(0);
    for (int64_t k = 0; k < classes; ++k) {
      const acc_t wkc = w[k * channels + c];
      const acc_t* dzk = dz + k * kTile;
      for (int64_t j = 0; j < kTile; ++j) out[j] += wkc * dzk[j];
    }
  }
  for (int64_t c = 0; c < channels; ++c)  // hvt [kTile, C]: the channels contiguous per position
    for (int64_t j = 0; j < n; ++j) hvt[j * channels + c] = hv[c * kTile + j];
  for (int64_t k = 0; k < classes; ++k) {
    acc_t* dwk = dw + k * channels;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = dz[k * kTile + j];
      const acc_t* row = hvt + j * channels;
      for (int64_t c = 0; c < channels; ++c) dwk[c] += a * row[c];
    }
  }
}

// The hot loops per accumulation type, compiled per instruction set (simd.h's FFKERN_CLONES).
FFKERN_CLONES void class_maps_f(const float* w, const float* bias, const float* hv, int64_t classes, int64_t channels,
                                int64_t n, float* z) {
  class_maps(w, bias, hv, classes, channels, n, z);
}
FFKERN_CLONES void class_maps_d(const double* w, const double* bias, const double* hv, int64_t classes,
                                int64_t channels, int64_t n, double* z) {
  class_maps(w, bias, hv, classes, channels, n, z);
}
inline void class_maps_any(const float* w, const float* b, const float* hv, int64_t k, int64_t c, int64_t n, float* z) {
  class_maps_f(w, b, hv, k, c, n, z);
}
inline void class_maps_any(const double* w, const double* b, const double* hv, int64_t k, int64_t c, int64_t n,
                           double* z) {
  class_maps_d(w, b, hv, k, c, n, z);
}
FFKERN_CLONES void tile_backward_f(const float* w, const float* hv, const float* dz, int64_t classes, int64_t channels,
                                   int64_t n, float* hvt, float* dht, float* dw) {
  tile_backward_impl(w, hv, dz, classes, channels, n, hvt, dht, dw);
}
FFKERN_CLONES void tile_backward_d(const double* w, const double* hv, const double* dz, int64_t classes,
                                   int64_t channels, int64_t n, double* hvt, double* dht, double* dw) {
  tile_backward_impl(w, hv, dz, classes, channels, n, hvt, dht, dw);
}
inline void tile_backward(const float* w, const float* hv, const float* dz, int64_t k, int64_t c, int64_t n,
                          float* hvt, float* dht, float* dw) {
  tile_backward_f(w, hv, dz, k, c, n, hvt, dht, dw);
}
inline void tile_backward(const double* w, const double* hv, const double* dz, int64_t k, int64_t c, int64_t n,
                          double* hvt, double* dht, double* dw) {
  tile_backward_d(w, hv, dz, k, c, n, hvt, dht, dw);
}

// ---- the blocked float32 path ------------------------------------------------------------------

bool use_loops_for_float() {
  const char* env = std::getenv("FFKERN_CPU_PER_CLASS_PRODUCTS");
  if (env == nullptr || *env == '\0') return false;
  const std::string v(env);
  TORCH_CHECK(v == "blas" || v == "loops", "FFKERN_CPU_PER_CLASS_PRODUCTS must be 'blas' or 'loops', got '", v, "'");
  return v == "loops";
}

// C[m, n] (+)= A[m, k] B[k, n], row-major with leading dimensions. Called inside at::parallel_for,
// so BLAS runs single-threaded on the tile; the order of a tile's sums depends on the sizes only.
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum (C = 0 channels, or K = 0 classes)
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// A 64-byte aligned float buffer per task (BLAS's fast paths and reproducibility do not depend on
// where malloc happened to put it).
class Buffer {
 public:
  float* get(int64_t count) {
    store_.resize(static_cast<size_t>(count) + 16);
    const auto address = reinterpret_cast<std::uintptr_t>(store_.data());
    return store_.data() + ((64 - address % 64) % 64) / sizeof(float);
  }

 private:
  std::vector<float> store_;
};

// Positions per tile: the tile of h (C x tile floats) stays within ~256 KB (L2) between the
// backward's two products that read it.
int64_t tile_positions(const MapShape& s) {
  return std::max<int64_t>(1, std::min<int64_t>(s.positions, std::max<int64_t>(16, 65536 / std::max<int64_t>(1, s.channels))));
}

// The tile of n positions from p0 of one sample as a float32 row-major matrix: NCHW [C, n], channels-last
// [n, C]; h itself for float32 (no copy), else widened into buf.
struct FloatTile {
  const float* data;
  int64_t ld;
};

template <typename scalar_t>
FloatTile float_tile(const scalar_t* hb, const MapShape& s, int64_t p0, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return s.channels_last ? FloatTile{hb + p0 * s.stride_p, s.stride_p} : FloatTile{hb + p0, s.stride_c};
  } else {
    if (s.channels_last) {
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* hp = hb + (p0 + j) * s.stride_p;
        float* row = buf + j * s.channels;
        for (int64_t c = 0; c < s.channels; ++c) row[c] = static_cast<float>(hp[c]);
      }
      return {buf, s.channels};
    }
    for (int64_t c = 0; c < s.channels; ++c) {
      const scalar_t* hc = hb + c * s.stride_c + p0;
      float* row = buf + c * n;
      for (int64_t j = 0; j < n; ++j) row[j] = static_cast<float>(hc[j]);
    }
    return {buf, n};
  }
}

// The tile's class maps: NCHW z [K, n] (row k: class k), channels-last zT [n, K] (row j: position j);
// without the bias (added by the element loops).
void tile_maps(const FloatTile& t, const float* w, const float* wt, const MapShape& s, int64_t n, float* z) {
  const int64_t K = s.classes, C = s.channels;
  if (s.channels_last)
    gemm(n, K, C, t.data, t.ld, wt, K, z, K, false);
  else
    gemm(K, n, C, w, C, t.data, t.ld, z, n, false);
}

// total[k] += sum over the tile of (z + beta_k)^2.
FFKERN_CLONES void add_squares(const float* z, const float* bias, int64_t classes, int64_t n, bool transposed,
                               float* total) {
  if (transposed) {  // zT [n, K]
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < classes; ++k) {
        const float v = z[j * classes + k] + (bias ? bias[k] : 0.0f);
        total[k] += v * v;
      }
    return;
  }
  for (int64_t k = 0; k < classes; ++k) {
    const float beta = bias ? bias[k] : 0.0f;
    const float* zk = z + k * n;
    float part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) part[l] += (zk[j + l] + beta) * (zk[j + l] + beta);
    float sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
    for (; j < n; ++j) sum += (zk[j] + beta) * (zk[j] + beta);
    total[k] += sum;
  }
}

// dz = a_k (z + beta_k) in both orientations (dz [K, n] and dzT [n, K]), db[k] += its sum over the tile.
FFKERN_CLONES void tile_dz(const float* z, const float* bias, const float* a, int64_t classes, int64_t n,
                           bool transposed, float* dz, float* dzt, float* db) {
  for (int64_t k = 0; k < classes; ++k) {
    const float beta = bias ? bias[k] : 0.0f;
    float sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const float v = a[k] * ((transposed ? z[j * classes + k] : z[k * n + j]) + beta);
      dz[k * n + j] = v;
      dzt[j * classes + k] = v;
      sum += v;
    }
    db[k] += sum;
  }
}

template <typename scalar_t>
void store_tile(const float* src, int64_t ld, const MapShape& ds, int64_t p0, int64_t n, scalar_t* dhb) {
  if (ds.channels_last) {
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* dp = dhb + (p0 + j) * ds.stride_p;
      for (int64_t c = 0; c < ds.channels; ++c) dp[c] = static_cast<scalar_t>(src[j * ld + c]);
    }
  } else {
    for (int64_t c = 0; c < ds.channels; ++c) {
      scalar_t* dc = dhb + c * ds.stride_c + p0;
      for (int64_t j = 0; j < n; ++j) dc[j] = static_cast<scalar_t>(src[c * ld + j]);
    }
  }
}

// A float32 dh larger than the caches is written with non-temporal (streaming) stores from the
// tile's scratch: a plain store first reads the line it writes (read for ownership), so dh would
// cost a read and a write of memory; streamed it costs the write only. A small dh is written by
// the product directly (still in cache for whoever reads it next). Same values either way.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target("avx512f"))) void stream_copy(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
bool can_stream() {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
}
// Streaming stores are weakly ordered: fenced before a task's results are used.
void store_fence() { _mm_sfence(); }
#else
void stream_copy(float* dst, const float* src, int64_t n) { std::copy(src, src + n, dst); }
bool can_stream() { return false; }
void store_fence() {}
#endif

// The tile's dh (scratch, row-major with leading dimension ld) streamed into a float32 dh.
void stream_tile(const float* src, int64_t ld, const MapShape& ds, int64_t p0, int64_t n, float* dhb) {
  if (ds.channels_last) {
    if (ld == ds.stride_p) return stream_copy(dhb + p0 * ds.stride_p, src, n * ld);  // the tile is one block of dh
    for (int64_t j = 0; j < n; ++j) stream_copy(dhb + (p0 + j) * ds.stride_p, src + j * ld, ds.channels);
  } else {
    for (int64_t c = 0; c < ds.channels; ++c) stream_copy(dhb + c * ds.stride_c + p0, src + c * ld, n);
  }
}

// g of one sample (sum of squares over positions, not yet divided by P).
template <typename scalar_t>
void sample_totals_blocked(const scalar_t* hb, const MapShape& s, const float* w, const float* wt, const float* bias,
                           Buffer& hbuf, Buffer& zbuf, float* total) {
  const int64_t K = s.classes, C = s.channels, P = s.positions, tile = tile_positions(s);
  float* hv = std::is_same_v<scalar_t, float> ? nullptr : hbuf.get(C * tile);
  float* z = zbuf.get(K * tile);
  std::fill(total, total + K, 0.0f);
  for (int64_t p0 = 0; p0 < P; p0 += tile) {
    const int64_t n = std::min(tile, P - p0);
    const FloatTile t = float_tile(hb, s, p0, n, hv);
    tile_maps(t, w, wt, s, n, z);
    add_squares(z, bias, K, n, s.channels_last, total);
  }
}

// One sample's backward: dh written (streamed from a scratch tile where `stream`; float32 only),
// dW (NCHW: dW^T [C, K]; channels-last: dW [K, C]) and db accumulated.
template <typename scalar_t>
void sample_backward_blocked(const scalar_t* hb, const MapShape& s, const float* w, const float* wt,
                             const float* bias, const float* coef_b, scalar_t* dhb, const MapShape& ds, bool stream,
                             float* dw, float* db, Buffer* bufs) {
  const int64_t K = s.classes, C = s.channels, P = s.positions, tile = tile_positions(s);
  constexpr bool in_place = std::is_same_v<scalar_t, float>;
  const bool direct = in_place && !stream;  // the product writes dh itself
  float* hv = in_place ? nullptr : bufs[0].get(C * tile);
  float* dht = direct ? nullptr : bufs[1].get(C * tile);
  float* z = bufs[2].get(K * tile);
  float* dz = bufs[3].get(K * tile);
  float* dzt = bufs[4].get(K * tile);
  float* a = bufs[5].get(K);
  const float two_over_p = 2.0f / static_cast<float>(P);
  for (int64_t k = 0; k < K; ++k) a[k] = coef_b[k] * two_over_p;
  for (int64_t p0 = 0; p0 < P; p0 += tile) {
    const int64_t n = std::min(tile, P - p0);
    const FloatTile t = float_tile(hb, s, p0, n, hv);
    tile_maps(t, w, wt, s, n, z);
    tile_dz(z, bias, a, K, n, s.channels_last, dz, dzt, db);
    const int64_t ld = s.channels_last ? (direct ? ds.stride_p : C) : (direct ? ds.stride_c : n);
    float* out = direct ? reinterpret_cast<float*>(dhb) + p0 * ds.stride_p : dht;
    if (s.channels_last) {
      // dh [n, C] = dzT [n, K] W [K, C]; dW [K, C] += dz [K, n] h [n, C]
      gemm(n, C, K, dzt, K, w, C, out, ld, false);
      gemm(K, C, n, dz, n, t.data, t.ld, dw, C, true);
    } else {
      // dh [C, n] = W^T [C, K] dz [K, n]; dW^T [C, K] += h [C, n] dzT [n, K]
      gemm(C, n, K, wt, K, dz, n, out, ld, false);
      gemm(C, K, n, t.data, t.ld, dzt, K, dw, K, true);
    }
    if constexpr (in_place) {
      if (stream) stream_tile(dht, ld, ds, p0, n, dhb);
    } else {
      store_tile(dht, ld, ds, p0, n, dhb);
    }
  }
}

// The sample's sum of squares per class by the loops (any accumulation type).
template <typename scalar_t, typename acc_t>
void sample_totals_loops(const scalar_t* hb, const MapShape& s, const acc_t* w, const acc_t* bias, acc_t* hv, acc_t* z,
                         acc_t* total) {
  const int64_t K = s.classes, C = s.channels, P = s.positions;
  std::fill(total, total + K, acc_t(0));
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const int64_t n = std::min(kTile, P - p0);
    load_tile(hb, s, p0, n, hv);
    class_maps_any(w, bias, hv, K, C, n, z);
    for (int64_t k = 0; k < K; ++k) total[k] += dot_tile(z + k * kTile, z + k * kTile);
  }
}

// wt: W^T [C, K] (the blocked path only; null for the loops).
template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& h, const MapShape& s, const acc_t* w, const acc_t* wt, const acc_t* bias,
                    const int64_t* labels, acc_t scale, acc_t* g, acc_t* losses) {
  const scalar_t* hdata = h.const_data_ptr<scalar_t>();
  const int64_t K = s.classes, C = s.channels, P = s.positions;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * P * K));
  at::parallel_for(0, s.batch, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> hv, z, total(K);
    Buffer hbuf, zbuf;
    if (wt == nullptr) {
      hv.resize(C * kTile);
      z.resize(K * kTile);
    }
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* hb = hdata + b * s.stride_b;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (wt != nullptr)
          sample_totals_blocked(hb, s, w, wt, bias, hbuf, zbuf, total.data());
        else
          sample_totals_loops(hb, s, w, bias, hv.data(), z.data(), total.data());
      } else {
        sample_totals_loops(hb, s, w, bias, hv.data(), z.data(), total.data());
      }
      acc_t* gb = g + b * K;
      for (int64_t k = 0; k < K; ++k) gb[k] = total[k] / static_cast<acc_t>(P);
      if (losses) {  // softmax cross-entropy of scale * g_b against y_b
        acc_t top = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = 0; k < K; ++k) top = std::max(top, scale * gb[k]);
        acc_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += std::exp(scale * gb[k] - top);
        const int64_t y = labels[b];
        // a label outside [0, K) (not checked under torch.compile) gives NaN, never a silent value
        losses[b] = (y >= 0 && y < K) ? top + std::log(sum) - scale * gb[y] : std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  });
}

// One sample's backward by the loops: dh written, dW [K, C] and db accumulated.
template <typename scalar_t, typename acc_t>
void sample_backward_loops(const scalar_t* hb, const MapShape& s, const acc_t* w, const acc_t* bias,
                           const acc_t* coef_b, scalar_t* dhb, const MapShape& ds, acc_t* dw, acc_t* db, acc_t* hv,
                           acc_t* z, acc_t* dht, acc_t* hvt) {
  const int64_t K = s.classes, C = s.channels, P = s.positions;
  const acc_t two_over_p = acc_t(2) / static_cast<acc_t>(P);
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const int64_t n = std::min(kTile, P - p0);
    load_tile(hb, s, p0, n, hv);
    class_maps_any(w, bias, hv, K, C, n, z);
    for (int64_t k = 0; k < K; ++k) {  // z becomes dz = dL/dg * 2 z / P
      const acc_t a = coef_b[k] * two_over_p;
      acc_t* zk = z + k * kTile;
      acc_t sum = 0;
      for (int64_t j = 0; j < kTile; ++j) {
        zk[j] *= a;
        sum += zk[j];
      }
      db[k] += sum;
    }
    tile_backward(w, hv, z, K, C, n, hvt, dht, dw);
    if (ds.channels_last) {
      for (int64_t j = 0; j < n; ++j) {
        scalar_t* dp = dhb + (p0 + j) * ds.stride_p;
        for (int64_t c = 0; c < C; ++c) dp[c] = static_cast<scalar_t>(dht[c * kTile + j]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* dc = dhb + c * ds.stride_c + p0;
        for (int64_t j = 0; j < n; ++j) dc[j] = static_cast<scalar_t>(dht[c * kTile + j]);
      }
    }
  }
}

// dw_part [chunks, K, C], except the blocked path on an NCHW map: [chunks, C, K] (dW^T, the
// orientation its product writes); the caller sums the chunks in order.
template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& h, const MapShape& s, const acc_t* w, const acc_t* wt, const acc_t* bias,
                     const acc_t* coef, at::Tensor& dh, const MapShape& ds, acc_t* dw_part, acc_t* db_part,
                     int64_t chunks) {
  const scalar_t* hdata = h.const_data_ptr<scalar_t>();
  scalar_t* dhdata = dh.mutable_data_ptr<scalar_t>();
  const int64_t K = s.classes, C = s.channels;
  const int64_t per_chunk = (s.batch + chunks - 1) / chunks;
  const bool stream = std::is_same_v<scalar_t, float> && wt != nullptr &&
                      dh.numel() * static_cast<int64_t>(sizeof(float)) >= kStreamBytes && can_stream();
  at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
    std::vector<acc_t> hv, z, dht, hvt;
    Buffer bufs[6];
    if (wt == nullptr) {
      hv.resize(C * kTile);
      z.resize(K * kTile);
      dht.resize(C * kTile);
      hvt.resize(C * kTile);
    }
    for (int64_t q = q0; q < q1; ++q) {
      acc_t* dw = dw_part + q * K * C;
      acc_t* db = db_part + q * K;
      std::fill(dw, dw + K * C, acc_t(0));
      std::fill(db, db + K, acc_t(0));
      for (int64_t b = q * per_chunk; b < std::min(s.batch, (q + 1) * per_chunk); ++b) {
        const scalar_t* hb = hdata + b * s.stride_b;
        scalar_t* dhb = dhdata + b * ds.stride_b;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (wt != nullptr) {
            sample_backward_blocked(hb, s, w, wt, bias, coef + b * K, dhb, ds, stream, dw, db, bufs);
            continue;
          }
        }
        sample_backward_loops(hb, s, w, bias, coef + b * K, dhb, ds, dw, db, hv.data(), z.data(), dht.data(),
                              hvt.data());
      }
    }
    if (stream) store_fence();
  });
}

// W^T [C, K] for the blocked path (float32 accumulation), else an undefined tensor (the loops).
at::Tensor blocked_transpose(const at::Tensor& w) {
  if (w.scalar_type() != at::kFloat || use_loops_for_float()) return at::Tensor();
  return w.t().contiguous();
}

// A large dh is usually fresh memory (glibc maps allocations above its threshold anew on every
// call), which the first write faults in 4 KiB at a time: for a 67 MB dh that cost more than the
// kernel itself (~16 ms on the development VM). Asking for transparent huge pages on the
// untouched buffer (as PyTorch's THP_MEM_ALLOC_ENABLE does for every allocation) makes those
// faults 2 MiB each. A hint: where it is refused (or THP is off) nothing changes; memory that is
// already mapped keeps its pages.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t bytes = static_cast<std::uintptr_t>(t.nbytes());
  if (bytes < 4 * kHuge) return;
  const std::uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1), end = (start + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& h_in, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias_in, const at::Tensor* labels_in,
                                               const at::Tensor* scale_in) {
  const at::Tensor h = kernel_input(h_in);
  const MapShape s = map_shape(h, weight, bias_in);
  const at::ScalarType acc = accumulation_type(h.scalar_type());
  const at::Tensor w = weight.detach().reshape({s.classes, s.channels}).to(acc).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->detach().to(acc).contiguous() : at::Tensor();
  at::Tensor g = at::empty({s.batch, s.classes}, h.options().dtype(acc));
  at::Tensor losses, labels;
  double scale = 1.0;
  if (labels_in) {
    labels = check_labels(*labels_in, s.batch).to(at::kLong).contiguous();
    scale = check_scale(*scale_in).item<double>();
    losses = at::empty({s.batch}, h.options().dtype(acc));
  }
  const at::Tensor wt = blocked_transpose(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "per_class_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(h, s, w.const_data_ptr<acc_t>(), wt.defined() ? wt.const_data_ptr<acc_t>() : nullptr,
                                    bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                    labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr,
                                    static_cast<acc_t>(scale), g.mutable_data_ptr<acc_t>(),
                                    losses.defined() ? losses.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {g, losses};
}

at::Tensor class_goodness(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return std::get<0>(run_forward(h, weight, bias, nullptr, nullptr));
}

std::tuple<at::Tensor, at::Tensor> per_class_loss(const at::Tensor& h, const at::Tensor& weight,
                                                  const at::Tensor& labels, const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& scale, std::string reduction) {
  const int mode = parse_reduction(reduction);
  auto [g, losses] = run_forward(h, weight, bias, &labels, &scale);
  return {reduce(losses, mode), g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> per_class_backward(const at::Tensor& h_in, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias_in,
                                                                  const at::Tensor& coef_in) {
  at::Tensor dh = grad_like(h_in);
  advise_huge_pages(dh);
  const at::Tensor h = h_in.detach().contiguous(map_format(h_in));
  const MapShape s = map_shape(h, weight, bias_in);
  const MapShape ds = map_shape(dh, weight, bias_in);
  const at::ScalarType acc = accumulation_type(h.scalar_type());
  const at::Tensor coef = check_coef(coef_in, s.batch, s.classes).to(acc).contiguous();
  const at::Tensor w = weight.detach().reshape({s.classes, s.channels}).to(acc).contiguous();
  const at::Tensor bias = bias_in.has_value() ? bias_in->detach().to(acc).contiguous() : at::Tensor();
  const at::Tensor wt = blocked_transpose(w);
  // the blocked path on an NCHW map sums dW^T [C, K] (the orientation its product writes)
  const bool transposed_dw = wt.defined() && !s.channels_last;
  const int64_t chunks = std::max<int64_t>(1, std::min(s.batch, kChunks));
  at::Tensor dw_part = transposed_dw ? at::empty({chunks, s.channels, s.classes}, h.options().dtype(acc))
                                     : at::empty({chunks, s.classes, s.channels}, h.options().dtype(acc));
  at::Tensor db_part = at::empty({chunks, s.classes}, h.options().dtype(acc));
  if (s.batch == 0) {
    dw_part.zero_();
    db_part.zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "per_class_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(h, s, w.const_data_ptr<acc_t>(), wt.defined() ? wt.const_data_ptr<acc_t>() : nullptr,
                                       bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                       coef.const_data_ptr<acc_t>(), dh, ds, dw_part.mutable_data_ptr<acc_t>(),
                                       db_part.mutable_data_ptr<acc_t>(), chunks);
    });
  }
  at::Tensor dw = dw_part.sum(0);
  return {dh, transposed_dw ? dw.t().contiguous() : dw, db_part.sum(0)};
}

}  // namespace
}  // namespace per_class
}  // namespace ffkern

TORCH_LIBRARY_IMPL(ffkern_per_class, CPU, m) {
  m.impl("class_goodness", &ffkern::per_class::class_goodness);
  m.impl("per_class_loss", &ffkern::per_class::per_class_loss);
  m.impl("per_class_backward", &ffkern::per_class::per_class_backward);
}
